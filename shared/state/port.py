"""The state store port: what the pipeline needs to remember, whatever holds it.

Layout (DESIGN.md): per route a WATERMARK, the outcome of its last scan (`SCAN`), where its first
scan started (`START`), a claim per source UID (`UID#<uidvalidity>#<uid>`), a failure record per
UID (`FAIL#...`), and a fingerprint per copied message (`FP#...`); per refresh token, when it last
worked and why it was last refused (never the token).
DynamoDB keeps the open claims of a route in one item instead (README "State layout in
DynamoDB"); what the port promises is the same on both.
Adapters: `shared.state.dynamodb.DynamoStateStore` (AWS) and `shared.state.sqlite.SqliteStateStore`
(embedded). Both pass the same contract suite, `tests/integration/test_state_contract.py`.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from shared.errors import ClaimLost
from shared.message_ref import UidKey

__all__ = [
    "Claim",
    "ClaimOutcome",
    "ClaimResult",
    "ClaimStatus",
    "Copied",
    "CopiedMessage",
    "FailureRecord",
    "RouteCounts",
    "RouteStart",
    "ScanRecord",
    "Pause",
    "StateStore",
    "TokenHealth",
    "UidKey",
    "Watermark",
]

# Failure text kept in state is cut here: enough to act on, never a whole server dump.
MAX_ERROR_TEXT = 1000
# A token's "last worked" is rewritten only once it is this old (seconds): a write an hour per
# token at most, however many runs and Lambda containers refresh it.
TOKEN_WORKED_FRESH_SECONDS = 3600.0


class ClaimStatus(StrEnum):
    IN_PROGRESS = "in_progress"
    # APPEND was sent (or about to be): whoever takes the claim over must look in the destination
    # before appending again. It stays APPENDING across takeovers until finalized.
    APPENDING = "appending"
    DONE = "done"
    SKIPPED = "skipped"
    # Released after an error; claimable again at once.
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (ClaimStatus.DONE, ClaimStatus.SKIPPED)


class HolderState(StrEnum):
    """What can be told of a claim's holder (shared.claim_owners): a claim is not taken from an
    ALIVE holder even when its lease ran out (it may be frozen mid-APPEND), and is taken from a
    GONE one at once; an UNKNOWN one is judged by its lease."""

    ALIVE = "alive"
    GONE = "gone"
    UNKNOWN = "unknown"


# Tells what can be known of a claim's holder, by its owner name.
HolderProbe = Callable[[str], HolderState]


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"  # the caller owns the claim now (new, released, or lease expired)
    FINAL = "final"  # done or skipped already: acknowledge and move on
    HELD = "held"  # another owner's lease is still live


@dataclass(frozen=True)
class Watermark:
    uidvalidity: int
    last_uid: int
    # When it last moved (epoch seconds): every message not yet enqueued arrived after it.
    updated_at: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Claim:
    key: UidKey
    status: ClaimStatus
    owner: str | None
    lease_until: float  # epoch seconds; 0 when released
    attempts: int  # how many times it was claimed
    dest_uid: int | None = None
    fingerprint: str | None = None
    reason: str | None = None
    updated_at: float = 0.0
    # Where an APPEND of it lands at the earliest (set with APPENDING): the destination folder's
    # UIDVALIDITY and a UID every message appended since is at or above. A takeover looks for an
    # earlier copy from there (shared.mailbox.port.UidFloor). None when not known.
    dest_uidvalidity: int | None = None
    dest_uid_floor: int | None = None


@dataclass(frozen=True)
class Copied:
    """A message whose APPEND landed (or whose copy was found): what finalize_many makes DONE."""

    key: UidKey
    dest_uid: int | None
    fingerprint: str | None


@dataclass(frozen=True)
class ClaimResult:
    outcome: ClaimOutcome
    # CLAIMED: the claim as now held (status APPENDING means a crashed append must be resolved);
    # FINAL / HELD: the claim as found.
    claim: Claim


@dataclass(frozen=True)
class FailureRecord:
    key: UidKey
    attempts: int
    error_class: str
    error_text: str
    first_failure_at: float
    last_failure_at: float


@dataclass(frozen=True)
class CopiedMessage:
    """An `FP#` record: a message already copied, found by its fingerprint; or (`unresolved`) one
    whose APPEND under an earlier UID was interrupted and can no longer be looked for there (the
    source was renumbered): its copy under the new UID must look in the destination first, from
    the floor that APPEND recorded."""

    route: str
    fingerprint: str
    uidvalidity: int
    uid: int
    dest_uid: int | None
    copied_at: float
    unresolved: bool = False
    dest_uidvalidity: int | None = None
    dest_uid_floor: int | None = None


@dataclass(frozen=True)
class ScanRecord:
    """A route's last scan of its source: when, and why it failed (None: it worked)."""

    at: float
    error: str | None
    # When the current run of failed scans began; None once a scan works again.
    failing_since: float | None


@dataclass(frozen=True)
class RouteCounts:
    # Claims by status, e.g. {"done": 10, "skipped": 2}.
    by_status: dict[str, int] = field(default_factory=dict)
    # Skipped claims by their reason, e.g. {"duplicate": 1, "too large": 1}.
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    # Open failure records by error class.
    failures: dict[str, int] = field(default_factory=dict)


class StateStore(abc.ABC):
    """Every write that guards exactly-once is one conditional write (or one transaction).

    Adapters raise `shared.errors.StateStoreUnavailable` when the backend cannot be reached,
    and `shared.errors.ClaimLost` when a conditional change finds the caller no longer owns
    the claim. Times come from the adapter's `clock` (epoch seconds), so tests can move it.
    """

    # -- watermark -------------------------------------------------------------------------
    @abc.abstractmethod
    def read_watermark(self, route: str) -> Watermark | None: ...

    @abc.abstractmethod
    def advance_watermark(self, route: str, uidvalidity: int, last_uid: int) -> bool:
        """Set the watermark when there is none, when `uidvalidity` differs from the stored one,
        or when `last_uid` is above the stored one. Never moves it down for the same
        uidvalidity: returns False (and writes nothing) then."""

    # -- scans -----------------------------------------------------------------------------
    @abc.abstractmethod
    def record_scan(self, route: str, error: str | None) -> None:
        """Upsert the route's scan record: `at` now, `error` (cut to MAX_ERROR_TEXT; None for a
        scan that worked). `failing_since` keeps the time of the first failure while failures
        go on, and is cleared by a scan that worked. The caller scrubs secrets from the text."""

    @abc.abstractmethod
    def read_scan(self, route: str) -> ScanRecord | None: ...

    @abc.abstractmethod
    def record_route_start(
        self, route: str, since: dt.date, older: int, fallback_days: int | None, *, replace: bool = False
    ) -> None:
        """Where the route's first scan started (`since`), how many messages of its folder were
        older (`older`: never copied), and `fallback_days` when `since` came from
        FALLBACK_SINCE_DAYS (None: the route's own since); `at` is now. Set once per route: a
        later call leaves the first, unless `replace` (a start moved back on purpose)."""

    @abc.abstractmethod
    def read_route_start(self, route: str) -> RouteStart | None: ...

    # -- copies this store may not know of ---------------------------------------------------
    @abc.abstractmethod
    def set_lookup_bound(self, route: str, uidvalidity: int, last_uid: int) -> None:
        """The route's messages up to `last_uid` (under `uidvalidity`) may be in the destination
        already with no record here: found by a first scan, with no watermark (a new or lost
        state store, another copier before). The consumer looks for each in the destination
        before appending it. Set once per route: a later call leaves the first bound."""

    @abc.abstractmethod
    def widen_lookup_bound(self, route: str, uidvalidity: int, last_uid: int) -> None:
        """Make the bound cover `last_uid` too: older messages queued below the watermark (a
        backfill, `drain --since`) may also be in the destination with no record here. Under the
        same UIDVALIDITY the higher of the two stays; with no bound, or one of another UIDVALIDITY
        (whose UIDs are gone), this one is set."""

    @abc.abstractmethod
    def read_lookup_bound(self, route: str) -> Watermark | None: ...

    # -- claims ----------------------------------------------------------------------------
    @abc.abstractmethod
    def claim_uid(
        self,
        key: UidKey,
        owner: str,
        lease_until: float,
        holder_state: HolderProbe | None = None,
        *,
        fingerprint: str | None = None,
    ) -> ClaimResult:
        """One conditional write (after a read, for a claim that exists). Claims when no claim
        exists, or when the claim is not final and was released, or its holder is gone, or its
        lease has expired and `holder_state` does not say its holder is alive (see
        rules.answer_without_taking). Increments `attempts`. The new status is IN_PROGRESS,
        except that an APPENDING claim stays APPENDING. `fingerprint`: the one queued with the
        key, if any; an adapter may find a claim made final by it (see get_claim)."""

    def claim_many(
        self,
        keys: Sequence[UidKey],
        owner: str,
        lease_until: float,
        holder_state: HolderProbe | None = None,
        *,
        fingerprints: Sequence[str | None] | None = None,
    ) -> list[ClaimResult]:
        """claim_uid for each of `keys` in order, up to and including the first that is HELD:
        the keys behind it are not claimed, and have no result. An adapter may take them all in
        one conditional write. `fingerprints`: the one queued with each key (or None)."""
        prints = list(fingerprints) if fingerprints is not None else [None] * len(keys)
        results = []
        for key, fingerprint in zip(keys, prints, strict=True):
            result = self.claim_uid(key, owner, lease_until, holder_state, fingerprint=fingerprint)
            results.append(result)
            if result.outcome is ClaimOutcome.HELD:
                break
        return results

    @abc.abstractmethod
    def get_claim(self, key: UidKey, *, fingerprint: str | None = None) -> Claim | None:
        """The claim of `key`; a final one too. `fingerprint` (the one queued with the key) is a
        hint: an adapter that records a copy by its fingerprint alone (DynamoDB) finds it at
        once with it, and by a longer search without."""

    @abc.abstractmethod
    def extend_lease(self, key: UidKey, owner: str, lease_until: float) -> None:
        """Raises ClaimLost unless `owner` holds a non-final claim."""

    @abc.abstractmethod
    def mark_appending(
        self, key: UidKey, owner: str, *, dest_uidvalidity: int | None = None, dest_uid_floor: int | None = None
    ) -> None:
        """IN_PROGRESS or APPENDING -> APPENDING, with where the APPEND lands at the earliest
        (kept across takeovers until the next mark_appending). Raises ClaimLost unless `owner`
        holds it."""

    def mark_appending_many(
        self,
        keys: Sequence[UidKey],
        owner: str,
        *,
        dest_uidvalidity: int | None = None,
        dest_uid_floor: int | None = None,
    ) -> int:
        """mark_appending for each of `keys` in order, up to the first that `owner` does not
        hold: how many were marked (that one, if any, is left as it is, and mark_appending on it
        raises ClaimLost). An adapter may mark them all in one conditional write."""
        for marked, key in enumerate(keys):
            try:
                self.mark_appending(key, owner, dest_uidvalidity=dest_uidvalidity, dest_uid_floor=dest_uid_floor)
            except ClaimLost:
                return marked
        return len(keys)

    def extend_leases(self, keys: Sequence[UidKey], owner: str, lease_until: float) -> None:
        """extend_lease for each of `keys` that `owner` still holds (the others are left: their
        finalize finds out)."""
        for key in keys:
            try:
                self.extend_lease(key, owner, lease_until)
            except ClaimLost:
                continue

    def finalize_many(self, copies: Sequence[Copied], owner: str) -> list[ClaimLost | None]:
        """finalize(DONE) for each copy (its key, destination UID and fingerprint): for each,
        None, or the ClaimLost that finalize would have raised. An adapter may make them final
        in a few writes: the copies' records first, then the claims."""
        lost: list[ClaimLost | None] = []
        for copy in copies:
            try:
                self.finalize(copy.key, owner, ClaimStatus.DONE, dest_uid=copy.dest_uid, fingerprint=copy.fingerprint)
                lost.append(None)
            except ClaimLost as exc:
                lost.append(exc)
        return lost

    @abc.abstractmethod
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
        """Make the claim DONE or SKIPPED, delete its failure record, and (DONE with a
        fingerprint) put the `FP#` record: all in one transaction. `append_unresolved` (SKIPPED
        with a fingerprint): the claim's APPEND may have landed and cannot be looked for under
        this UID; an unresolved `FP#` record with the claim's floor is put instead, unless the
        fingerprint is recorded as copied already. Raises ClaimLost unless `owner` holds a
        non-final claim; ValueError for a status that is not final."""

    @abc.abstractmethod
    def release(self, key: UidKey, owner: str, *, append_outcome_unknown: bool = False) -> None:
        """Give the claim up after an error so it can be claimed again at once (lease 0).
        Status becomes FAILED, except that an APPENDING claim stays APPENDING when
        `append_outcome_unknown` (the APPEND may have reached the destination).
        Raises ClaimLost unless `owner` holds a non-final claim."""

    # -- failures --------------------------------------------------------------------------
    @abc.abstractmethod
    def record_failure(self, key: UidKey, error_class: str, error_text: str) -> int:
        """Upsert the failure record (text cut to MAX_ERROR_TEXT); returns its attempts.
        The caller scrubs secrets from the text before it gets here."""

    @abc.abstractmethod
    def get_failure(self, key: UidKey) -> FailureRecord | None: ...

    # -- fingerprints ----------------------------------------------------------------------
    @abc.abstractmethod
    def find_copied(self, fingerprint: str, routes: Sequence[str]) -> CopiedMessage | None:
        """The `FP#` record of `fingerprint` under any of `routes` (the routes that share one
        destination folder), or None."""

    # -- reporting and the gate ------------------------------------------------------------
    @abc.abstractmethod
    def route_counts(self, route: str) -> RouteCounts: ...

    @abc.abstractmethod
    def check_health(self) -> None:
        """Write then read back a health item; raise StateStoreUnavailable naming the backend
        and the cause when either fails. The fail-safe gate runs this before any IMAP."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the state lives, for messages: `DynamoDB table T`, `SQLite /path`."""

    def close(self) -> None:  # noqa: B027 - optional for adapters
        """Release connections."""

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """The writes made inside are committed together when it ends, also when it ends with an
        exception (each write stays all or nothing, and a failed one is undone alone): a batch's
        claims, its APPENDING marks, its results, each a single commit. An adapter that cannot
        (DynamoDB) writes each at once, as outside."""
        yield

    # -- token problems (a refused refresh token, for `status`) ----------------------------
    # The rotated tokens themselves are never in state: see shared.tokens.store.TokenFile.
    @abc.abstractmethod
    def record_token_problem(self, name: str, error: str | None) -> None:
        """Upsert why the token `name` failed (cut to MAX_ERROR_TEXT, secrets scrubbed by the
        caller), keeping the time of the first failure while failures go on; None clears it."""

    @abc.abstractmethod
    def read_token_problem(self, name: str) -> TokenProblem | None: ...

    # -- token health: when each refresh token last worked, for `status` and `check` ---------
    @abc.abstractmethod
    def record_token_worked(
        self, provider: str, account: str, tag: str, *, fresh_for: float = TOKEN_WORKED_FRESH_SECONDS
    ) -> bool:
        """Record that the refresh token of `account` at `provider` worked now. `tag` tells one
        configured token from the next (shared.tokens.health.token_tag; never the token): a
        record of another tag starts over, with `first_worked_at` now too. Writes nothing and
        returns False when the record has this tag and worked less than `fresh_for` seconds ago;
        True when it wrote."""

    @abc.abstractmethod
    def read_token_health(self, provider: str, account: str) -> TokenHealth | None: ...

    # -- pauses: a mailbox that asked to be left alone -------------------------------------
    @abc.abstractmethod
    def pause(self, name: str, until: float, reason: str) -> Pause:
        """Record that mailbox `name` ("destination", "source <account>") takes no command until
        `until` (epoch seconds). A pause is only ever lengthened: a shorter one leaves the
        longer in force. Returns the pause in force."""

    @abc.abstractmethod
    def read_pause(self, name: str) -> Pause | None:
        """The last pause of `name`, run out or not (the caller compares `until` with its clock)."""

    @abc.abstractmethod
    def pauses(self) -> list[Pause]:
        """Every pause recorded, by name."""

    # -- downloads: bytes fetched from a source account, by hour (its daily budget) ----------
    @abc.abstractmethod
    def count_download(self, account: str, hour: int, size: int) -> None:
        """Add `size` bytes (negative: take back) to what `account` downloaded in `hour` (epoch
        seconds // 3600), atomically: processes counting at once each add theirs. Kept two days."""

    @abc.abstractmethod
    def downloads(self, account: str, since_hour: int) -> dict[int, int]:
        """The bytes `account` downloaded in each hour from `since_hour` on, by hour; hours with
        none are left out."""


@dataclass(frozen=True)
class TokenHealth:
    """When a refresh token (one account's at one provider) first and last worked: a refresh
    that gave an access token. Neither the token nor anything it could be read back from."""

    provider: str  # "google", "microsoft"
    account: str
    tag: str  # tells a replaced token from the one before it (shared.tokens.health.token_tag)
    first_worked_at: float
    last_worked_at: float


@dataclass(frozen=True)
class RouteStart:
    """Where a route's first scan started, and what of its folder was older: never copied."""

    route: str
    since: dt.date
    older: int
    fallback_days: int | None  # since came from FALLBACK_SINCE_DAYS; None: the route's own since
    at: float


@dataclass(frozen=True)
class TokenProblem:
    """Why a token was last refused (e.g. invalid_grant), and since when."""

    name: str
    error: str
    first_at: float
    last_at: float


@dataclass(frozen=True)
class Pause:
    """A mailbox that asked to be left alone (a throttle, a bandwidth limit): every route to it
    waits until `until` instead of sending what would be refused again."""

    name: str
    until: float
    reason: str
