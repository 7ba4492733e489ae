"""A durable local queue in an SQLite file, with SQS FIFO's semantics.

Tables (prefixed `queue_`, so the file can be shared with the state store):
- `queue_messages`: one row per message, `seq` giving the send order (FIFO within a group). A
  message is in flight while `visible_at` is in the future; `receipt` is the one handed out by
  its latest receive, `receiver` the process that received it (NULL once it waits on a timer:
  a retry delay, a pause). A message whose receiver is gone (killed, crashed: nothing told the
  queue) is due again at once, not after its visibility timeout, so a rerun need not wait it out.
- `queue_dedup`: deduplication ids sent within the last 5 minutes.
- `queue_dead_letters`: messages moved out, with why and how often they were received;
  `redrive` puts them back in `queue_messages` as new messages.

Every write runs in `BEGIN IMMEDIATE` on a connection of its own, so threads and processes that
share the file take turns, and two receivers never get the same message while it is in flight.
A receipt stays current until the message is received again (SQS FIFO also refuses one whose
visibility timeout ran out; accepting it is safe, nobody else holds the message): a stale one
raises nothing and changes nothing in extend_visibility and quarantine (see `shared.queue.sqs`;
SQS cannot check a receipt before its quarantine copies the body to the DLQ, so there a stale
quarantine leaves a harmless extra copy in the DLQ), nor in delete while another receiver holds
the message in flight.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from shared.errors import QueueUnavailable
from shared.message_ref import MessageRef
from shared.queue.port import (
    DEAD_LETTER_PEEK_LIMIT,
    MAX_BATCH,
    DeadLetter,
    MessageQueue,
    QueueDepths,
    ReceivedMessage,
    Redriven,
    check_receive_arguments,
    check_visibility,
)
from shared.state import HolderProbe, HolderState, sqlite_file

# As in SQS FIFO.
DEDUP_WINDOW_SECONDS = 300
# Same cut as the SQS adapter's quarantine_reason attribute.
MAX_REASON_CHARS = 1000
# How long a writer waits for another process's transaction before the queue counts as unavailable.
BUSY_TIMEOUT_SECONDS = 30
# The most one receive gives: a drain's batch (bounded by bytes too: copier.MAX_BATCH_BYTES).
LOCAL_MAX_RECEIVE = 1000
# How often a waiting receive looks at the table again.
POLL_INTERVAL_SECONDS = 0.1

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    group_id TEXT NOT NULL,
    body TEXT NOT NULL,
    sent_at REAL NOT NULL,
    visible_at REAL NOT NULL DEFAULT 0,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    receiver TEXT
);
CREATE INDEX IF NOT EXISTS queue_messages_by_visible_at ON queue_messages (visible_at);
CREATE TABLE IF NOT EXISTS queue_dedup (
    dedup_id TEXT PRIMARY KEY,
    sent_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS queue_dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    body TEXT NOT NULL,
    reason TEXT NOT NULL,
    receive_count INTEGER NOT NULL,
    sent_at REAL NOT NULL,
    dead_at REAL NOT NULL
);
"""

# The rows of the groups a view was narrowed to (SqliteQueue.of_groups); every row without one.
OF_GROUPS = "(:groups IS NULL OR group_id IN (SELECT value FROM json_each(:groups)))"

# The next visible messages in send order, skipping the groups that had a message in flight when
# this receive began (later messages of a group delivered by this same receive do not block it).
NEXT_VISIBLE = f"""
SELECT seq, message_id, group_id, body, receive_count FROM queue_messages
WHERE seq > :after AND visible_at <= :now
  AND group_id NOT IN (SELECT value FROM json_each(:blocked))
  AND {OF_GROUPS}
ORDER BY seq LIMIT :limit
"""


class SqliteQueue(MessageQueue):
    max_receive = LOCAL_MAX_RECEIVE

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_receive_count: int = 5,
        clock: Callable[[], float] = time.time,
        receiver: str | None = None,
        receiver_state: HolderProbe | None = None,
    ):
        """`receiver`: this process's name, recorded with what it receives; `receiver_state`
        tells whether another receiver is gone (shared.claim_owners). Without them, a message
        in flight is due again only when its visibility timeout ends, as in SQS."""
        if max_receive_count < 1:
            raise ValueError(f"max_receive_count: {max_receive_count}, expected at least 1")
        # Recorded with every delivery, so that a message held in flight is told from one that
        # waits on a timer (receiver NULL).
        self._receiver = receiver or f"unnamed:{uuid.uuid4().hex}"
        self._receiver_state = receiver_state
        self._path = Path(path)
        self._max_receive_count = max_receive_count
        self._clock = clock
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._local = threading.local()
        self._opened: list[tuple[threading.Thread, sqlite3.Connection]] = []  # by thread, for close()
        self._groups: str | None = None  # JSON list of the groups received and counted (of_groups)

    def of_groups(self, groups: Sequence[str]) -> SqliteQueue:
        # A view sharing this one's connections and receiver name: one process, one file.
        view = copy.copy(self)
        view._groups = json.dumps(sorted(set(groups)))
        return view

    def describe(self) -> str:
        return f"SQLite {self._path}"

    def send_refs(self, refs: Sequence[MessageRef]) -> None:
        # One transaction: every ref is accepted, or none.
        with self._transaction() as conn:
            now = self._clock()
            conn.execute("DELETE FROM queue_dedup WHERE sent_at <= ?", (now - DEDUP_WINDOW_SECONDS,))
            for ref in refs:
                if _is_new_dedup_id(conn, ref.dedup_id, now):
                    conn.execute(
                        "INSERT INTO queue_messages (message_id, group_id, body, sent_at) VALUES (?, ?, ?, ?)",
                        (uuid.uuid4().hex, ref.group_id, ref.to_body(), now),
                    )

    def receive(
        self, max_messages: int = MAX_BATCH, visibility_timeout: int = 60, wait_seconds: int = 0
    ) -> list[ReceivedMessage]:
        check_receive_arguments(max_messages, visibility_timeout, wait_seconds, most=self.max_receive)
        # Real time, not the injected clock: a frozen test clock must not make this wait forever.
        deadline = time.monotonic() + wait_seconds
        while True:
            messages = self._receive_now(max_messages, visibility_timeout)
            remaining = deadline - time.monotonic()
            if messages or remaining <= 0:
                return messages
            time.sleep(min(POLL_INTERVAL_SECONDS, remaining))

    def delete(self, message: ReceivedMessage) -> None:
        """With a stale receipt too, unless another receiver holds the message in flight now: a
        message is deleted once its claim is final, and a later look at it (another run that met
        its holder stopped put it off for 20 minutes) would only find it done, while its route's
        later messages wait behind it."""
        self.delete_many([message])

    def delete_many(self, messages: Sequence[ReceivedMessage]) -> None:
        with self._transaction() as conn:  # one commit for a batch
            now = self._clock()
            conn.executemany(
                """
                DELETE FROM queue_messages WHERE message_id = :id
                  AND (receipt = :receipt OR receiver IS NULL OR visible_at <= :now)
                """,
                [{"id": message.message_id, "receipt": message.receipt, "now": now} for message in messages],
            )

    def extend_visibility(self, message: ReceivedMessage, seconds: int) -> None:
        check_visibility(seconds)
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT seq, receive_count FROM queue_messages WHERE message_id = ? AND receipt = ?",
                (message.message_id, message.receipt),
            ).fetchone()
            if row is None:
                return  # a stale receipt
            seq, receive_count = row
            if receive_count >= self._max_receive_count:
                # Its last delivery was handed back: no receive can take it again, and SQS would
                # dead-letter it at the next one. Doing it now spares a local run the wait.
                self._move_to_dead_letters(conn, seq, self._max_receive_count_reason())
                return
            # Waiting on a timer now, held by nobody: its receiver may end meanwhile.
            conn.execute(
                "UPDATE queue_messages SET visible_at = ?, receiver = NULL WHERE seq = ?", (self._clock() + seconds, seq)
            )

    def quarantine(self, message: ReceivedMessage, reason: str) -> None:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT seq FROM queue_messages WHERE message_id = ? AND receipt = ?",
                (message.message_id, message.receipt),
            ).fetchone()
            if row is not None:
                self._move_to_dead_letters(conn, row[0], reason[:MAX_REASON_CHARS])

    def depths(self) -> QueueDepths:
        with self._connection() as conn:
            # One statement: the three counts come from one snapshot.
            visible, in_flight, dead = conn.execute(
                f"""
                SELECT (SELECT COUNT(*) FROM queue_messages WHERE visible_at <= :now AND {OF_GROUPS}),
                       (SELECT COUNT(*) FROM queue_messages WHERE visible_at > :now AND {OF_GROUPS}),
                       (SELECT COUNT(*) FROM queue_dead_letters WHERE {OF_GROUPS})
                """,
                {"now": self._clock(), "groups": self._groups},
            ).fetchone()
        return QueueDepths(visible=visible, in_flight=in_flight, dead=dead)

    def in_flight_past(self, seconds: float) -> int | None:
        with self._connection() as conn:
            (count,) = conn.execute(
                f"SELECT COUNT(*) FROM queue_messages WHERE visible_at > :after AND {OF_GROUPS}",
                {"after": self._clock() + seconds, "groups": self._groups},
            ).fetchone()
        return count

    def dead_letters(self, limit: int = DEAD_LETTER_PEEK_LIMIT) -> list[DeadLetter]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT message_id, group_id, body, reason FROM queue_dead_letters ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def redrive(self, select: Callable[[DeadLetter], bool] | None = None, *, limit: int | None = None) -> Redriven:
        if limit is not None and limit < 0:
            raise ValueError(f"limit: {limit}, expected 0 or more")
        # One transaction: the moves happen all together or not at all.
        with self._transaction() as conn:
            moved = []
            rows = conn.execute("SELECT seq, message_id, group_id, body, reason FROM queue_dead_letters ORDER BY seq")
            for seq, *fields in rows.fetchall():
                if limit is not None and len(moved) >= limit:
                    break
                dead = DeadLetter(*fields)
                if select is not None and not select(dead):
                    continue
                # A new message, as SQS makes one: a new id, received 0 times, behind its group.
                conn.execute(
                    "INSERT INTO queue_messages (message_id, group_id, body, sent_at) VALUES (?, ?, ?, ?)",
                    (uuid.uuid4().hex, dead.group_id, dead.body, self._clock()),
                )
                conn.execute("DELETE FROM queue_dead_letters WHERE seq = ?", (seq,))
                moved.append(dead)
        return Redriven(moved=tuple(moved))

    def _max_receive_count_reason(self) -> str:
        return f"max receive count {self._max_receive_count} exceeded"

    def _receive_now(self, max_messages: int, visibility_timeout: int) -> list[ReceivedMessage]:
        with self._transaction() as conn:
            now = self._clock()
            self._make_due_what_gone_receivers_held(conn, now)
            blocked = json.dumps(_groups_in_flight(conn, now))
            received: list[ReceivedMessage] = []
            after = 0
            while len(received) < max_messages:
                rows = conn.execute(
                    NEXT_VISIBLE,
                    {
                        "after": after, "now": now, "blocked": blocked, "limit": max_messages - len(received),
                        "groups": self._groups,
                    },
                ).fetchall()
                if not rows:
                    break
                for seq, message_id, group_id, body, receive_count in rows:
                    after = seq
                    if receive_count >= self._max_receive_count:
                        # As in SQS: dead-lettered instead of delivered, which unblocks its group.
                        self._move_to_dead_letters(conn, seq, self._max_receive_count_reason())
                        continue
                    receipt = _deliver(conn, seq, receive_count + 1, visible_at=now + visibility_timeout, receiver=self._receiver)
                    received.append(ReceivedMessage(receipt, body, message_id, group_id, receive_count + 1))
            return received

    def _make_due_what_gone_receivers_held(self, conn: sqlite3.Connection, now: float) -> None:
        """Messages in flight with a process that is gone (kill -9, a crash, a reboot) are due
        now: that process will never delete them, and their claims are taken over at once too."""
        if self._receiver_state is None:
            return
        receivers = conn.execute(
            "SELECT DISTINCT receiver FROM queue_messages WHERE visible_at > ? AND receiver IS NOT NULL", (now,)
        ).fetchall()
        for (receiver,) in receivers:
            if receiver != self._receiver and self._receiver_state(receiver) is HolderState.GONE:
                conn.execute(
                    "UPDATE queue_messages SET visible_at = ?, receiver = NULL WHERE receiver = ? AND visible_at > ?",
                    (now, receiver, now),
                )

    def _move_to_dead_letters(self, conn: sqlite3.Connection, seq: int, reason: str) -> None:
        conn.execute(
            """
            INSERT INTO queue_dead_letters (message_id, group_id, body, reason, receive_count, sent_at, dead_at)
            SELECT message_id, group_id, body, ?, receive_count, sent_at, ? FROM queue_messages WHERE seq = ?
            """,
            (reason, self._clock(), seq),
        )
        conn.execute("DELETE FROM queue_messages WHERE seq = ?", (seq,))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the file's write lock from its start."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        # A connection per thread, kept (opening one per operation cost 0.07 ms and a schema
        # check each): nothing shared between threads, and a forked child opens its own.
        with self._errors_as_unavailable():
            self._ensure_schema()
            conn = getattr(self._local, "conn", None)
            if conn is None or self._local.pid != os.getpid():
                conn = self._connect()
                self._local.conn, self._local.pid = conn, os.getpid()
                with self._schema_lock:
                    # Those of threads that ended are closed: copy_batch's lanes come and go.
                    for thread, opened in self._opened:
                        if not thread.is_alive():
                            opened.close()
                    self._opened = [(t, c) for t, c in self._opened if t.is_alive()]
                    self._opened.append((threading.current_thread(), conn))
            yield conn

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE ... COMMIT above.
        # check_same_thread=False only so that close() can close every thread's connection.
        return sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False)

    def close(self) -> None:
        with self._schema_lock:
            opened, self._opened = self._opened, []
        for _, conn in opened:
            conn.close()
        self._local = threading.local()

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            self._path.parent.mkdir(parents=True, exist_ok=True)
            sqlite_file.prepare(self._path, SCHEMA)  # an empty file is refused, not made anew
            conn = self._connect()
            try:
                # WAL: readers (depths) never wait for the writer; the mode is stored in the file.
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
                _add_receiver_column(conn)
            finally:
                conn.close()
            self._schema_ready = True

    @contextlib.contextmanager
    def _errors_as_unavailable(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError, sqlite_file.Unusable) as exc:
            # The path lets the CLI tell a failing state file (where the local queue lives) apart.
            explained = sqlite_file.explain(self._path, exc)
            raise QueueUnavailable(f"SQLite queue {self._path}: {explained}", path=self._path) from exc


def _add_receiver_column(conn: sqlite3.Connection) -> None:
    """A file made before the column existed gets it (a version upgrade keeps its queue)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(queue_messages)")}
        if "receiver" not in columns:
            conn.execute("ALTER TABLE queue_messages ADD COLUMN receiver TEXT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _groups_in_flight(conn: sqlite3.Connection, now: float) -> list[str]:
    rows = conn.execute("SELECT DISTINCT group_id FROM queue_messages WHERE visible_at > ?", (now,))
    return [group for (group,) in rows]


def _deliver(conn: sqlite3.Connection, seq: int, receive_count: int, *, visible_at: float, receiver: str | None) -> str:
    """Hand the message out under a new receipt, which makes every earlier receipt stale."""
    receipt = secrets.token_urlsafe(24)
    conn.execute(
        "UPDATE queue_messages SET receipt = ?, receive_count = ?, visible_at = ?, receiver = ? WHERE seq = ?",
        (receipt, receive_count, visible_at, receiver, seq),
    )
    return receipt


def _is_new_dedup_id(conn: sqlite3.Connection, dedup_id: str, now: float) -> bool:
    """Remember `dedup_id`; False when it was already sent within the window (the send is dropped)."""
    cursor = conn.execute("INSERT OR IGNORE INTO queue_dedup (dedup_id, sent_at) VALUES (?, ?)", (dedup_id, now))
    return cursor.rowcount == 1
