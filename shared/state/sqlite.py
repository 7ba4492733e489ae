"""The state store in one SQLite file (the embedded adapter, for a local process).

The tables mirror the DynamoDB layout (DESIGN.md "State"): a watermark, a last-scan record and its
first scan's start per route, a claim and a failure record per source UID, a fingerprint record
per copied message, when each refresh token last worked, and a health row.

Concurrency: one connection per store, used under a lock, so threads take turns; processes
sharing the file are kept apart by SQLite itself. Every change reads and writes inside
`BEGIN IMMEDIATE`, which takes the write lock before the read, so two processes can never both
find a claim free. WAL mode lets readers go on while a writer works.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from shared.errors import ClaimLost, StateStoreUnavailable
from shared.state import sqlite_file
from shared.state.port import (
    TOKEN_WORKED_FRESH_SECONDS,
    Claim,
    ClaimOutcome,
    ClaimResult,
    ClaimStatus,
    Copied,
    CopiedMessage,
    FailureRecord,
    HolderProbe,
    Pause,
    RouteCounts,
    RouteStart,
    ScanRecord,
    StateStore,
    TokenHealth,
    TokenProblem,
    UidKey,
    Watermark,
)
from shared.state.rules import (
    DOWNLOADS_KEPT_HOURS,
    NO_REASON,
    answer_without_taking,
    claim_lost,
    cut_error_text,
    is_owned_by,
    require_final,
    status_after_release,
    status_after_taking,
    watermark_moves,
)

# A writer waits this long for another process's transaction before giving up.
BUSY_TIMEOUT_SECONDS = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS watermarks (
    route TEXT PRIMARY KEY,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lookup_bounds (
    route TEXT PRIMARY KEY,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS scans (
    route TEXT PRIMARY KEY,
    at REAL NOT NULL,
    error TEXT,
    failing_since REAL
);
CREATE TABLE IF NOT EXISTS claims (
    route TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    lease_until REAL NOT NULL,
    attempts INTEGER NOT NULL,
    dest_uid INTEGER,
    fingerprint TEXT,
    reason TEXT,
    updated_at REAL NOT NULL,
    dest_uidvalidity INTEGER,
    dest_uid_floor INTEGER,
    PRIMARY KEY (route, uidvalidity, uid)
);
CREATE TABLE IF NOT EXISTS failures (
    route TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    error_class TEXT NOT NULL,
    error_text TEXT NOT NULL,
    first_failure_at REAL NOT NULL,
    last_failure_at REAL NOT NULL,
    PRIMARY KEY (route, uidvalidity, uid)
);
CREATE TABLE IF NOT EXISTS fingerprints (
    route TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    dest_uid INTEGER,
    copied_at REAL NOT NULL,
    unresolved INTEGER NOT NULL DEFAULT 0,
    dest_uidvalidity INTEGER,
    dest_uid_floor INTEGER,
    PRIMARY KEY (route, fingerprint)
);
CREATE TABLE IF NOT EXISTS pauses (
    name TEXT PRIMARY KEY,
    until REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS downloads (
    account TEXT NOT NULL,
    hour INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (account, hour)
);
CREATE TABLE IF NOT EXISTS route_starts (
    route TEXT PRIMARY KEY,
    since TEXT NOT NULL,
    older INTEGER NOT NULL,
    fallback_days INTEGER,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS token_health (
    provider TEXT NOT NULL,
    account TEXT NOT NULL,
    tag TEXT NOT NULL,
    first_worked_at REAL NOT NULL,
    last_worked_at REAL NOT NULL,
    PRIMARY KEY (provider, account)
);
CREATE TABLE IF NOT EXISTS health (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at REAL NOT NULL
);
"""

_KEY_MATCH = "route = :route AND uidvalidity = :uidvalidity AND uid = :uid"
_SAVE_CLAIM = (
    "INSERT OR REPLACE INTO claims (route, uidvalidity, uid, status, owner, lease_until,"
    " attempts, dest_uid, fingerprint, reason, updated_at, dest_uidvalidity, dest_uid_floor)"
    " VALUES (:route, :uidvalidity, :uid, :status, :owner, :lease_until, :attempts, :dest_uid,"
    " :fingerprint, :reason, :updated_at, :dest_uidvalidity, :dest_uid_floor)"
)
# UIDs in one `IN (...)` list: SQLite before 3.32 allows 999 parameters a statement.
_IN_LIST_MAX = 500
# Columns added since a table was first made: a state file made by an earlier version gains them
# when it is opened (SQLite adds a column in place; its rows read NULL there).
_ADDED_COLUMNS = {
    "claims": ("dest_uidvalidity INTEGER", "dest_uid_floor INTEGER"),
    "fingerprints": ("unresolved INTEGER NOT NULL DEFAULT 0", "dest_uidvalidity INTEGER", "dest_uid_floor INTEGER"),
}


class SqliteStateStore(StateStore):
    def __init__(self, path: str | os.PathLike, *, clock: Callable[[], float] = time.time):
        self._path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._batch_open = False  # within batched(): each transaction is a savepoint in its one
        # Opened on first use, so a bad path surfaces in check_health (the gate), not here.
        self._db: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"SQLite {self._path}"

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- watermark -------------------------------------------------------------------------
    def read_watermark(self, route: str) -> Watermark | None:
        with self._reading() as db:
            return self._select_watermark(db, route)

    def set_lookup_bound(self, route: str, uidvalidity: int, last_uid: int) -> None:
        with self._writing() as db:
            db.execute(
                "INSERT OR IGNORE INTO lookup_bounds (route, uidvalidity, last_uid, updated_at) VALUES (?, ?, ?, ?)",
                (route, uidvalidity, last_uid, self._clock()),
            )

    def widen_lookup_bound(self, route: str, uidvalidity: int, last_uid: int) -> None:
        with self._writing() as db:
            # SET reads the row's old values: the CASE compares the bound that was there.
            db.execute(
                """
                INSERT INTO lookup_bounds (route, uidvalidity, last_uid, updated_at) VALUES (?, ?, ?, ?)
                ON CONFLICT (route) DO UPDATE SET
                    last_uid = CASE WHEN uidvalidity = excluded.uidvalidity
                                    THEN max(last_uid, excluded.last_uid) ELSE excluded.last_uid END,
                    uidvalidity = excluded.uidvalidity,
                    updated_at = excluded.updated_at
                """,
                (route, uidvalidity, last_uid, self._clock()),
            )

    def read_lookup_bound(self, route: str) -> Watermark | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM lookup_bounds WHERE route = ?", (route,)).fetchone()
        return None if row is None else Watermark(row["uidvalidity"], row["last_uid"], row["updated_at"])

    def advance_watermark(self, route: str, uidvalidity: int, last_uid: int) -> bool:
        with self._writing() as db:
            if not watermark_moves(self._select_watermark(db, route), uidvalidity, last_uid):
                return False
            db.execute(
                "INSERT OR REPLACE INTO watermarks (route, uidvalidity, last_uid, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (route, uidvalidity, last_uid, self._clock()),
            )
            return True

    # -- scans -----------------------------------------------------------------------------
    def record_scan(self, route: str, error: str | None) -> None:
        now = self._clock()
        with self._writing() as db:
            found = self._select_scan(db, route)
            if error is None:
                failing_since = None
            else:
                error = cut_error_text(error)
                failing_since = found.failing_since if found and found.failing_since is not None else now
            db.execute(
                "INSERT OR REPLACE INTO scans (route, at, error, failing_since) VALUES (?, ?, ?, ?)",
                (route, now, error, failing_since),
            )

    def read_scan(self, route: str) -> ScanRecord | None:
        with self._reading() as db:
            return self._select_scan(db, route)

    def record_route_start(
        self, route: str, since: dt.date, older: int, fallback_days: int | None, *, replace: bool = False
    ) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self._writing() as db:
            db.execute(
                f"{verb} INTO route_starts (route, since, older, fallback_days, at) VALUES (?, ?, ?, ?, ?)",
                (route, since.isoformat(), older, fallback_days, self._clock()),
            )

    def read_route_start(self, route: str) -> RouteStart | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM route_starts WHERE route = ?", (route,)).fetchone()
        if row is None:
            return None
        return RouteStart(route, dt.date.fromisoformat(row["since"]), row["older"], row["fallback_days"], row["at"])

    # -- claims ----------------------------------------------------------------------------
    def claim_uid(
        self,
        key: UidKey,
        owner: str,
        lease_until: float,
        holder_state: HolderProbe | None = None,
        *,
        fingerprint: str | None = None,  # not needed: every claim has its row here
    ) -> ClaimResult:
        return self.claim_many([key], owner, lease_until, holder_state)[0]

    def claim_many(
        self,
        keys: Sequence[UidKey],
        owner: str,
        lease_until: float,
        holder_state: HolderProbe | None = None,
        *,
        fingerprints: Sequence[str | None] | None = None,  # not needed, as for claim_uid
    ) -> list[ClaimResult]:
        # The port's rules a key at a time, on rows read in one query and written in one
        # executemany: a batch's claims were 4 statements each.
        now = self._clock()
        results: list[ClaimResult] = []
        with self._writing() as db:
            found = self._select_claims(db, keys)
            taken: dict[UidKey, Claim] = {}
            for key in keys:
                current = taken.get(key) or found.get(key)
                answer = answer_without_taking(current, owner, now, holder_state)
                if answer is not None:
                    results.append(answer)
                    if answer.outcome is ClaimOutcome.HELD:
                        break
                    continue
                keeps_floor = current is not None and status_after_taking(current) is ClaimStatus.APPENDING
                taken[key] = Claim(
                    key=key,
                    status=status_after_taking(current),
                    owner=owner,
                    lease_until=lease_until,
                    attempts=(current.attempts if current else 0) + 1,
                    updated_at=now,
                    # A takeover mid-APPEND looks for the earlier copy from where that APPEND landed.
                    dest_uidvalidity=current.dest_uidvalidity if keeps_floor else None,
                    dest_uid_floor=current.dest_uid_floor if keeps_floor else None,
                )
                results.append(ClaimResult(ClaimOutcome.CLAIMED, taken[key]))
            self._save_claims(db, taken.values())
        return results

    def get_claim(self, key: UidKey, *, fingerprint: str | None = None) -> Claim | None:
        with self._reading() as db:
            return self._select_claim(db, key)

    def extend_lease(self, key: UidKey, owner: str, lease_until: float) -> None:
        with self._writing() as db:
            claim = self._owned_claim(db, key, owner)
            self._save_claim(db, replace(claim, lease_until=lease_until, updated_at=self._clock()))

    def mark_appending(
        self, key: UidKey, owner: str, *, dest_uidvalidity: int | None = None, dest_uid_floor: int | None = None
    ) -> None:
        if not self.mark_appending_many([key], owner, dest_uidvalidity=dest_uidvalidity, dest_uid_floor=dest_uid_floor):
            raise claim_lost(key, owner, self.get_claim(key))

    def mark_appending_many(
        self,
        keys: Sequence[UidKey],
        owner: str,
        *,
        dest_uidvalidity: int | None = None,
        dest_uid_floor: int | None = None,
    ) -> int:
        now = self._clock()
        with self._writing() as db:
            found = self._select_claims(db, keys)
            count, marked = 0, {}
            for key in keys:
                if not is_owned_by(found.get(key), owner):
                    break
                marked[key] = replace(
                    found[key],
                    status=ClaimStatus.APPENDING,
                    updated_at=now,
                    dest_uidvalidity=dest_uidvalidity,
                    dest_uid_floor=dest_uid_floor,
                )
                count += 1
            self._save_claims(db, marked.values())
        return count

    def finalize(
        self,
        key: UidKey,
        owner: str,
        status: ClaimStatus,
        *,
        dest_uid: int | None = None,
        fingerprint: str | None = None,
        reason: str | None = None,
        append_unresolved: bool = False,
    ) -> None:
        status = require_final(status)
        now = self._clock()
        with self._writing() as db:
            claim = self._owned_claim(db, key, owner)
            done = replace(
                claim,
                status=status,
                lease_until=0.0,
                dest_uid=dest_uid,
                fingerprint=fingerprint,
                reason=reason,
                updated_at=now,
            )
            self._save_claim(db, done)
            db.execute(f"DELETE FROM failures WHERE {_KEY_MATCH}", _key_params(key))
            if status is ClaimStatus.DONE and fingerprint:
                db.execute(
                    "INSERT OR REPLACE INTO fingerprints"
                    " (route, fingerprint, uidvalidity, uid, dest_uid, copied_at, unresolved)"
                    " VALUES (?, ?, ?, ?, ?, ?, 0)",
                    (key.route, fingerprint, key.uidvalidity, key.uid, dest_uid, now),
                )
            elif status is ClaimStatus.SKIPPED and fingerprint and append_unresolved:
                # Never over a record of a copy made: that one already answers for the message.
                db.execute(
                    "INSERT INTO fingerprints (route, fingerprint, uidvalidity, uid, dest_uid, copied_at,"
                    " unresolved, dest_uidvalidity, dest_uid_floor) VALUES (?, ?, ?, ?, NULL, ?, 1, ?, ?)"
                    " ON CONFLICT (route, fingerprint) DO UPDATE SET uidvalidity = excluded.uidvalidity,"
                    " uid = excluded.uid, copied_at = excluded.copied_at, dest_uidvalidity ="
                    " excluded.dest_uidvalidity, dest_uid_floor = excluded.dest_uid_floor"
                    " WHERE fingerprints.unresolved = 1",
                    (key.route, fingerprint, key.uidvalidity, key.uid, now, claim.dest_uidvalidity, claim.dest_uid_floor),
                )

    def finalize_many(self, copies: Sequence[Copied], owner: str) -> list[ClaimLost | None]:
        # finalize(DONE) of each, on rows read in one query and written in three executemany.
        now = self._clock()
        with self._writing() as db:
            found = self._select_claims(db, [copy.key for copy in copies])
            lost: list[ClaimLost | None] = []
            done: dict[UidKey, Claim] = {}
            for copy in copies:
                current = done.get(copy.key) or found.get(copy.key)
                if not is_owned_by(current, owner):
                    lost.append(claim_lost(copy.key, owner, current))
                    continue
                done[copy.key] = replace(
                    current,
                    status=ClaimStatus.DONE,
                    lease_until=0.0,
                    dest_uid=copy.dest_uid,
                    fingerprint=copy.fingerprint,
                    reason=None,
                    updated_at=now,
                )
                lost.append(None)
            self._save_claims(db, done.values())
            db.executemany(f"DELETE FROM failures WHERE {_KEY_MATCH}", [_key_params(key) for key in done])
            db.executemany(
                "INSERT OR REPLACE INTO fingerprints"
                " (route, fingerprint, uidvalidity, uid, dest_uid, copied_at, unresolved)"
                " VALUES (?, ?, ?, ?, ?, ?, 0)",
                [
                    (key.route, claim.fingerprint, key.uidvalidity, key.uid, claim.dest_uid, now)
                    for key, claim in done.items()
                    if claim.fingerprint
                ],
            )
        return lost

    def release(self, key: UidKey, owner: str, *, append_outcome_unknown: bool = False) -> None:
        with self._writing() as db:
            claim = self._owned_claim(db, key, owner)
            released = replace(
                claim,
                status=status_after_release(claim.status, append_outcome_unknown),
                owner=None,
                lease_until=0.0,
                updated_at=self._clock(),
            )
            self._save_claim(db, released)

    # -- failures --------------------------------------------------------------------------
    def record_failure(self, key: UidKey, error_class: str, error_text: str) -> int:
        now = self._clock()
        with self._writing() as db:
            found = self._select_failure(db, key)
            record = FailureRecord(
                key=key,
                attempts=(found.attempts if found else 0) + 1,
                error_class=error_class,
                error_text=cut_error_text(error_text),
                first_failure_at=found.first_failure_at if found else now,
                last_failure_at=now,
            )
            db.execute(
                "INSERT OR REPLACE INTO failures (route, uidvalidity, uid, attempts, error_class,"
                " error_text, first_failure_at, last_failure_at) VALUES (:route, :uidvalidity, :uid,"
                " :attempts, :error_class, :error_text, :first_failure_at, :last_failure_at)",
                _key_params(key)
                | {
                    "attempts": record.attempts,
                    "error_class": record.error_class,
                    "error_text": record.error_text,
                    "first_failure_at": record.first_failure_at,
                    "last_failure_at": record.last_failure_at,
                },
            )
            return record.attempts

    def get_failure(self, key: UidKey) -> FailureRecord | None:
        with self._reading() as db:
            return self._select_failure(db, key)

    # -- fingerprints ----------------------------------------------------------------------
    def find_copied(self, fingerprint: str, routes: Sequence[str]) -> CopiedMessage | None:
        with self._reading() as db:
            for route in dict.fromkeys(routes):
                row = db.execute(
                    "SELECT * FROM fingerprints WHERE route = ? AND fingerprint = ?", (route, fingerprint)
                ).fetchone()
                if row is not None:
                    return CopiedMessage(
                        route=row["route"],
                        fingerprint=row["fingerprint"],
                        uidvalidity=row["uidvalidity"],
                        uid=row["uid"],
                        dest_uid=row["dest_uid"],
                        copied_at=row["copied_at"],
                        unresolved=bool(row["unresolved"]),
                        dest_uidvalidity=row["dest_uidvalidity"],
                        dest_uid_floor=row["dest_uid_floor"],
                    )
        return None

    # -- reporting and the gate ------------------------------------------------------------
    def route_counts(self, route: str) -> RouteCounts:
        with self._reading() as db:
            by_status = db.execute(
                "SELECT status, COUNT(*) FROM claims WHERE route = ? GROUP BY status", (route,)
            ).fetchall()
            skipped_reasons = db.execute(
                "SELECT COALESCE(reason, ?), COUNT(*) FROM claims WHERE route = ? AND status = ? GROUP BY 1",
                (NO_REASON, route, ClaimStatus.SKIPPED.value),
            ).fetchall()
            failures = db.execute(
                "SELECT error_class, COUNT(*) FROM failures WHERE route = ? GROUP BY error_class", (route,)
            ).fetchall()
        return RouteCounts(
            by_status=_counts(by_status),
            skipped_reasons=_counts(skipped_reasons),
            failures=_counts(failures),
        )

    def check_health(self) -> None:
        with self._writing() as db:
            db.execute("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)", (self._clock(),))
        with self._reading() as db:
            if db.execute("SELECT checked_at FROM health WHERE id = 1").fetchone() is None:
                raise self._unavailable("the health row written was not read back")

    # -- transactions and connection -------------------------------------------------------
    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE: take the write lock before reading, so read-decide-write is atomic
        # across processes too (a deferred transaction could read, then lose the upgrade).
        with self._transaction("BEGIN IMMEDIATE") as db:
            yield db

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        # A transaction even for reads, so several SELECTs see one snapshot.
        with self._transaction("BEGIN") as db:
            yield db

    @contextmanager
    def batched(self) -> Iterator[None]:
        # One commit (and one fsync) for a batch's writes instead of one each. The write lock is
        # taken at the start and held to the end: other processes wait meanwhile, so the copier
        # makes no network call inside.
        with self._lock:
            if self._batch_open:
                yield  # part of the batch already open
                return
            with self._translated_errors():
                db = self._connection()
                db.execute("BEGIN IMMEDIATE")
            self._batch_open = True
            try:
                yield
            finally:
                self._batch_open = False
                with self._translated_errors():
                    if db.in_transaction:  # SQLite may have rolled back already (a full disk does)
                        db.execute("COMMIT")

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._translated_errors():
            db = self._connection()
            # Holding the lock while a batch is open means being inside it (it holds the lock).
            end, undo = ("RELEASE one", ("ROLLBACK TO one", "RELEASE one")) if self._batch_open else ("COMMIT", ("ROLLBACK",))
            db.execute("SAVEPOINT one" if self._batch_open else begin)
            try:
                yield db
                db.execute(end)
            except BaseException:
                if db.in_transaction:
                    for statement in undo:
                        db.execute(statement)
                raise

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise self._unavailable(sqlite_file.explain(self._path, exc)) from exc
        except sqlite_file.Unusable as exc:
            raise self._unavailable(str(exc)) from exc

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._open()
        return self._db

    def _open(self) -> sqlite3.Connection:
        self._make_parent_directory()
        sqlite_file.prepare(self._path, _SCHEMA)  # an empty file is refused, not made anew
        db = sqlite3.connect(
            self._path,
            timeout=BUSY_TIMEOUT_SECONDS,  # SQLite's busy_timeout
            isolation_level=None,  # autocommit; transactions are begun explicitly
            check_same_thread=False,  # shared by threads, always under self._lock
        )
        try:
            db.row_factory = sqlite3.Row
            _use_wal(db)
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            _add_missing_columns(db)
        except BaseException:
            db.close()
            raise
        return db

    def _make_parent_directory(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise self._unavailable(f"cannot create directory {exc.filename}: a file is in the way") from exc
        except OSError as exc:
            where = exc.filename or self._path.parent
            raise self._unavailable(f"cannot create directory {where}: {exc.strerror}") from exc

    def _unavailable(self, cause: str) -> StateStoreUnavailable:
        return StateStoreUnavailable(f"SQLite {self._path}: {cause}")

    # -- rows ------------------------------------------------------------------------------
    @staticmethod
    def _select_watermark(db: sqlite3.Connection, route: str) -> Watermark | None:
        row = db.execute(
            "SELECT uidvalidity, last_uid, updated_at FROM watermarks WHERE route = ?", (route,)
        ).fetchone()
        return Watermark(row["uidvalidity"], row["last_uid"], row["updated_at"]) if row else None

    @staticmethod
    def _select_scan(db: sqlite3.Connection, route: str) -> ScanRecord | None:
        row = db.execute("SELECT at, error, failing_since FROM scans WHERE route = ?", (route,)).fetchone()
        return ScanRecord(row["at"], row["error"], row["failing_since"]) if row else None

    @classmethod
    def _select_claim(cls, db: sqlite3.Connection, key: UidKey) -> Claim | None:
        row = db.execute(f"SELECT * FROM claims WHERE {_KEY_MATCH}", _key_params(key)).fetchone()
        return cls._claim_of(key, row) if row is not None else None

    @staticmethod
    def _claim_of(key: UidKey, row: sqlite3.Row) -> Claim:
        return Claim(
            key=key,
            status=ClaimStatus(row["status"]),
            owner=row["owner"],
            lease_until=row["lease_until"],
            attempts=row["attempts"],
            dest_uid=row["dest_uid"],
            fingerprint=row["fingerprint"],
            reason=row["reason"],
            updated_at=row["updated_at"],
            dest_uidvalidity=row["dest_uidvalidity"],
            dest_uid_floor=row["dest_uid_floor"],
        )

    def _owned_claim(self, db: sqlite3.Connection, key: UidKey, owner: str) -> Claim:
        claim = self._select_claim(db, key)
        if not is_owned_by(claim, owner):
            raise claim_lost(key, owner, claim)
        return claim

    @staticmethod
    def _save_claim(db: sqlite3.Connection, claim: Claim) -> None:
        db.execute(_SAVE_CLAIM, _claim_params(claim))

    @classmethod
    def _select_claims(cls, db: sqlite3.Connection, keys: Sequence[UidKey]) -> dict[UidKey, Claim]:
        """The claims of `keys` that exist, by key: one query per route, UIDVALIDITY and up to
        _IN_LIST_MAX UIDs."""
        uids_of: dict[tuple[str, int], set[int]] = {}
        for key in keys:
            uids_of.setdefault((key.route, key.uidvalidity), set()).add(key.uid)
        found: dict[UidKey, Claim] = {}
        for (route, uidvalidity), uids in uids_of.items():
            ordered = sorted(uids)
            for start in range(0, len(ordered), _IN_LIST_MAX):
                part = ordered[start : start + _IN_LIST_MAX]
                rows = db.execute(
                    f"SELECT * FROM claims WHERE route = ? AND uidvalidity = ? AND uid IN ({','.join('?' * len(part))})",
                    (route, uidvalidity, *part),
                ).fetchall()
                for row in rows:
                    key = UidKey(route, uidvalidity, row["uid"])
                    found[key] = cls._claim_of(key, row)
        return found

    @staticmethod
    def _save_claims(db: sqlite3.Connection, claims: Iterable[Claim]) -> None:
        db.executemany(_SAVE_CLAIM, [_claim_params(claim) for claim in claims])

    @staticmethod
    def _select_failure(db: sqlite3.Connection, key: UidKey) -> FailureRecord | None:
        row = db.execute(f"SELECT * FROM failures WHERE {_KEY_MATCH}", _key_params(key)).fetchone()
        if row is None:
            return None
        return FailureRecord(
            key=key,
            attempts=row["attempts"],
            error_class=row["error_class"],
            error_text=row["error_text"],
            first_failure_at=row["first_failure_at"],
            last_failure_at=row["last_failure_at"],
        )

    # -- token problems ----------------------------------------------------------------------
    # Their table is made on first use, inside the write transaction, so this part stands
    # apart from the schema above.
    def record_token_problem(self, name: str, error: str | None) -> None:
        now = self._clock()
        with self._token_problem_table() as db:
            if error is None:
                db.execute("DELETE FROM token_problems WHERE name = ?", (name,))
                return
            db.execute(
                "INSERT INTO token_problems (name, error, first_at, last_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET error = excluded.error, last_at = excluded.last_at",
                (name, cut_error_text(error), now, now),
            )

    def read_token_problem(self, name: str) -> TokenProblem | None:
        with self._token_problem_table() as db:
            row = db.execute("SELECT * FROM token_problems WHERE name = ?", (name,)).fetchone()
        return None if row is None else TokenProblem(name, row["error"], row["first_at"], row["last_at"])

    # -- token health ----------------------------------------------------------------------
    def record_token_worked(
        self, provider: str, account: str, tag: str, *, fresh_for: float = TOKEN_WORKED_FRESH_SECONDS
    ) -> bool:
        now = self._clock()
        with self._writing() as db:
            found = self._select_token_health(db, provider, account)
            if found is not None and found.tag == tag and now - found.last_worked_at < fresh_for:
                return False
            first = found.first_worked_at if found is not None and found.tag == tag else now
            db.execute(
                "INSERT OR REPLACE INTO token_health (provider, account, tag, first_worked_at, last_worked_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (provider, account, tag, first, now),
            )
            return True

    def read_token_health(self, provider: str, account: str) -> TokenHealth | None:
        with self._reading() as db:
            return self._select_token_health(db, provider, account)

    @staticmethod
    def _select_token_health(db: sqlite3.Connection, provider: str, account: str) -> TokenHealth | None:
        row = db.execute("SELECT * FROM token_health WHERE provider = ? AND account = ?", (provider, account)).fetchone()
        if row is None:
            return None
        return TokenHealth(provider, account, row["tag"], row["first_worked_at"], row["last_worked_at"])

    # -- pauses ----------------------------------------------------------------------------
    def pause(self, name: str, until: float, reason: str) -> Pause:
        with self._writing() as db:
            db.execute(
                "INSERT INTO pauses (name, until, reason) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
                " SET until = excluded.until, reason = excluded.reason WHERE excluded.until > pauses.until",
                (name, until, cut_error_text(reason)),
            )
            row = db.execute("SELECT * FROM pauses WHERE name = ?", (name,)).fetchone()
        return Pause(name, row["until"], row["reason"])

    def read_pause(self, name: str) -> Pause | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM pauses WHERE name = ?", (name,)).fetchone()
        return None if row is None else Pause(name, row["until"], row["reason"])

    def pauses(self) -> list[Pause]:
        with self._reading() as db:
            rows = db.execute("SELECT * FROM pauses ORDER BY name").fetchall()
        return [Pause(row["name"], row["until"], row["reason"]) for row in rows]

    def count_download(self, account: str, hour: int, size: int) -> None:
        with self._writing() as db:
            db.execute(
                "INSERT INTO downloads (account, hour, bytes) VALUES (?, ?, ?)"
                " ON CONFLICT (account, hour) DO UPDATE SET bytes = bytes + excluded.bytes",
                (account, hour, size),
            )
            # Older hours than the budget's window are of no use to anyone.
            db.execute("DELETE FROM downloads WHERE hour < ?", (hour - DOWNLOADS_KEPT_HOURS,))

    def downloads(self, account: str, since_hour: int) -> dict[int, int]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT hour, bytes FROM downloads WHERE account = ? AND hour >= ? AND bytes != 0 ORDER BY hour",
                (account, since_hour),
            ).fetchall()
        return {row["hour"]: row["bytes"] for row in rows}

    @contextmanager
    def _token_problem_table(self) -> Iterator[sqlite3.Connection]:
        with self._writing() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS token_problems (name TEXT PRIMARY KEY, error TEXT NOT NULL,"
                " first_at REAL NOT NULL, last_at REAL NOT NULL)"
            )
            yield db


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Give a table made by an earlier version the _ADDED_COLUMNS it lacks; looked at under the
    write lock, so two processes opening the same old file add each column once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column.split()[0] not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled back already (a full disk does)
            db.execute("ROLLBACK")
        raise


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL mode (it stays so: later opens find it already done).

    The switch needs the file to itself for a moment, and there SQLite answers "database is
    locked" at once instead of waiting out busy_timeout, as when several processes open a new
    file together. So wait here, within the same budget."""
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _claim_params(claim: Claim) -> dict[str, object]:
    return _key_params(claim.key) | {
        "status": claim.status.value,
        "owner": claim.owner,
        "lease_until": claim.lease_until,
        "attempts": claim.attempts,
        "dest_uid": claim.dest_uid,
        "fingerprint": claim.fingerprint,
        "reason": claim.reason,
        "updated_at": claim.updated_at,
        "dest_uidvalidity": claim.dest_uidvalidity,
        "dest_uid_floor": claim.dest_uid_floor,
    }


def _key_params(key: UidKey) -> dict[str, object]:
    return {"route": key.route, "uidvalidity": key.uidvalidity, "uid": key.uid}


def _counts(rows: list[sqlite3.Row]) -> dict[str, int]:
    return {name: count for name, count in rows}
