"""The consumer's use case: copy one referenced message, exactly once; and a batch of them.

`copy_message` reads top to bottom as the path of one message: claim the UID; acknowledge what
is already final; skip a duplicate; fetch (BODY.PEEK[], so the source is never changed), and if
the answer holds no message, skip it as gone only once a new session cannot find it; mark
appending; APPEND; finalize with the destination UID and the fingerprint. An error releases the
claim and records the failure, so the queue's retry (and at last its dead letters) take over; a
claim lost to another consumer midway makes the message BUSY, not failed.

`copy_batch` is what the Lambda handler and the local `consume` loop both call: it quarantines
bodies that are not message references, and keeps FIFO order per route (after a message of a
route is not acknowledged, the rest of that route's messages in the batch are left unprocessed).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum

from shared.errors import (
    ClaimLost,
    MailSyncerError,
    MalformedMessageRef,
    QueueUnavailable,
    StateStoreUnavailable,
    UidNotAssigned,
)
from shared.mailbox.port import (
    AppendRejected,
    Mailboxes,
    MailboxThrottled,
    SourceMessage,
    UidFloor,
)
from shared.message_ref import MessageRef, UidKey
from shared.pipeline.budget import DownloadBudget, in_megabytes
from shared.pipeline.pauses import DESTINATION, describe, source_pause_name, throttle_pause
from shared.queue import MessageQueue, ReceivedMessage
from shared.queue.port import MAX_VISIBILITY_SECONDS
from shared.redaction import scrub
from shared.settings import Route
from shared.state import Claim, ClaimOutcome, ClaimStatus, CopiedMessage, HolderProbe, Pause, StateStore, Watermark

log = logging.getLogger("mail_syncer.copy")

# A lease is renewed at least this far apart during a long APPEND.
MIN_RENEW_SECONDS = 0.5
# The detail of a copy found in the destination instead of appended (Outcome.COPIED).
FOUND_IN_DESTINATION = "found in the destination"
# A message held by a process alive past its lease (stopped) is looked at again after this long.
STOPPED_HOLDER_WAIT_SECONDS = 20 * 60
# Added to a throttled message's wait: a receive right at the end of the wait could come early.
THROTTLE_MARGIN_SECONDS = 1


class MessageNotServed(MailSyncerError):
    """The source answered a FETCH without the message (or with another UID's data) though it
    still has it: a failure, retried by the queue; never "gone"."""


class Outcome(StrEnum):
    COPIED = "copied"
    SKIPPED = "skipped"  # final, with a reason (duplicate, gone, rejected for good)
    ALREADY_DONE = "already done"  # a redelivery of a message finished before
    BUSY = "busy"  # another consumer holds the claim: try again later
    FAILED = "failed"  # recorded; the queue retries it
    # Its mailbox asked to be left alone (a throttle, a bandwidth limit): due again when the
    # pause ends (retry_after); no attempt of its own is spent.
    PAUSED = "paused"
    DEAD_LETTERED = "dead-lettered"  # failed MAX_ATTEMPTS times: moved to the dead letters
    QUARANTINED = "quarantined"  # not a valid reference: dead-lettered at once
    UNPROCESSED = "unprocessed"  # left for later to keep its route's order

    @property
    def acknowledged(self) -> bool:
        """Off the queue: done with, or moved to the dead letters already."""
        return self in (Outcome.COPIED, Outcome.SKIPPED, Outcome.ALREADY_DONE, Outcome.DEAD_LETTERED, Outcome.QUARANTINED)

    @property
    def moved(self) -> bool:
        """Moved to the dead letters by the consumer: not to be deleted from the queue again."""
        return self in (Outcome.DEAD_LETTERED, Outcome.QUARANTINED)


@dataclass(frozen=True)
class CopyResult:
    outcome: Outcome
    key: UidKey | None = None  # None for a body that is not a message reference
    detail: str = ""  # the skip reason or the error
    dest_uid: int | None = None
    busy_until: float | None = None  # BUSY: when the holder's lease runs out (epoch seconds)
    # PAUSED (and UNPROCESSED behind it): the seconds until its mailbox takes commands again
    # (Outlook's suggested backoff, Gmail's bandwidth limits); see throttled_visibility.
    retry_after: float | None = None
    attempts: int = 0  # FAILED: the failed attempts recorded for it so far, this one included


@dataclass
class Copier:
    """What copying needs, passed in by the handler or the CLI (see shared.bootstrap)."""

    state: StateStore
    mailboxes: Mailboxes
    routes: Mapping[str, Route]
    owner: str  # unique per process (and per Lambda invocation)
    lease_until: Callable[[], float]  # when a claim taken now must expire
    # The destination's largest message (MAX_MESSAGE_BYTES): a reference whose size (the
    # source's RFC822.SIZE) is above it is skipped without downloading it. None: no check.
    max_message_bytes: int | None = None
    # Failed attempts of a message's own (throttles and waits behind others are not counted)
    # before copy_batch moves it to the dead letters (MAX_ATTEMPTS). None: left to the queue.
    max_attempts: int | None = None
    # Each source account's daily download budget (GMAIL_DAILY_DOWNLOAD_MB). None: not kept.
    download_budget: DownloadBudget | None = None
    # What can be told of another claim's holder (shared.claim_owners.holder_state). None:
    # judged by their leases alone.
    holder_state: HolderProbe | None = None
    clock: Callable[[], float] = time.time
    # Pauses of the mailboxes ("destination", "source <account>") as last read from state (once
    # a batch: None until then) and met here since.
    _pauses: dict[str, Pause] | None = field(default=None, init=False, repr=False)
    _lookup_bounds: dict[str, Watermark | None] = field(default_factory=dict, init=False, repr=False)

    def refresh(self) -> None:
        """Read what other processes record (pauses, lookup bounds) again, at the next message:
        once a batch."""
        self._pauses = None
        self._lookup_bounds.clear()

    def _maybe_copied_unrecorded(self, ref: MessageRef) -> bool:
        """Whether the message was found by a route's first scan with no watermark (see
        StateStore.set_lookup_bound): it may be in the destination already, unrecorded."""
        if ref.route not in self._lookup_bounds:
            self._lookup_bounds[ref.route] = self.state.read_lookup_bound(ref.route)
        bound = self._lookup_bounds[ref.route]
        return bound is not None and bound.uidvalidity == ref.uidvalidity and ref.uid <= bound.last_uid

    def copy_message(self, ref: MessageRef) -> CopyResult:
        try:
            return self._copy_message(ref)
        except ClaimLost as lost:
            # Our lease ran out midway and another consumer took the claim: the message is its
            # now. Not a failure of the message (nothing is recorded); the queue brings it back,
            # by when the claim is final or free again.
            holder = self.state.get_claim(ref.key)
            live = holder is not None and not holder.status.is_final
            log.warning("route %s UID %d: claim taken over midway: %s", ref.route, ref.uid, scrub(str(lost)))
            return CopyResult(Outcome.BUSY, ref.key, str(lost), busy_until=holder.lease_until if live else None)

    def _copy_message(self, ref: MessageRef) -> CopyResult:
        route = self.routes[ref.route]
        key = ref.key
        paused = self._pause_over(route)
        if paused is not None:
            # Its mailbox asked to be left alone: a command now would only be refused again.
            return CopyResult(Outcome.PAUSED, key, describe(paused), retry_after=paused.until - self.clock())
        claimed = self.state.claim_uid(key, self.owner, self.lease_until(), self.holder_state)
        if claimed.outcome is ClaimOutcome.FINAL:
            return CopyResult(Outcome.ALREADY_DONE, key, claimed.claim.reason or "")
        if claimed.outcome is ClaimOutcome.HELD:
            holder = claimed.claim
            if holder.lease_until <= self.clock():
                # Alive past its lease: stopped (SIGSTOP, a laptop lid, a paused VM), perhaps
                # with an APPEND sent. Taking over could copy it twice: it is left to its holder.
                why = f"held by {holder.owner}, alive past its lease (stopped?): copied once it goes on or ends"
                return CopyResult(Outcome.BUSY, key, why, busy_until=self.clock() + STOPPED_HOLDER_WAIT_SECONDS)
            return CopyResult(Outcome.BUSY, key, f"claimed by {holder.owner}", busy_until=holder.lease_until)
        resuming_append = claimed.claim.status is ClaimStatus.APPENDING
        # An earlier APPEND of this message may have landed (a process died after sending it):
        # look in the destination first, from where that APPEND was to land.
        look_first, look_from = resuming_append, _floor_of(claimed.claim)
        # Copied perhaps before this state store knew of the route: looked for everywhere.
        unrecorded = not resuming_append and self._maybe_copied_unrecorded(ref)
        look_first = look_first or unrecorded
        appending = False
        mailbox = _source_pause_name(route)  # whose throttle a failure is: the source's until the fetch is done
        try:
            if ref.fingerprint and not resuming_append:
                twin = self.state.find_copied(ref.fingerprint, self._routes_into(route.outlook_folder))
                if twin is not None and not twin.unresolved:
                    return self._skip(ref, f"duplicate of route {twin.route} UID {twin.uid}")
                if twin is not None:
                    # Its APPEND under the UID it had before the source was renumbered was
                    # interrupted, and is looked for now that the message is back.
                    look_first, look_from = True, _floor_of(twin)
            if not resuming_append and (too_large := self._over_size_limit(ref)) is not None:
                return self._skip(ref, too_large)
            source, folder = self.mailboxes.source(route)
            if folder.uidvalidity != ref.uidvalidity:
                # The UID names another message now; the producer rescans the renumbered folder
                # and fingerprints recognise what was copied already, or (an interrupted APPEND)
                # where to look for it.
                reason = f"UIDVALIDITY changed to {folder.uidvalidity} since it was queued"
                if resuming_append:
                    reason += "; its interrupted APPEND is looked for when it is queued again"
                return self._skip(ref, reason, append_unresolved=resuming_append)
            budget_left = self._reserve_download(route, ref)
            if budget_left is not None:
                return self._pause(ref, mailbox, budget_left, append_outcome_unknown=resuming_append)
            message = source.fetch(ref.uid)
            self._settle_download(route, ref, message)
            if message is None or message.uid != ref.uid:
                self._confirm_gone(route, ref)
                return self._skip(ref, "gone from the source")
            mailbox = DESTINATION
            destination = self.mailboxes.destination()
            if look_first:
                found = destination.find_copies(route.outlook_folder, message, look_from)
                if found:
                    how = "copied before the state store knew of it" if unrecorded else "after an interrupted APPEND"
                    return self._done(ref, found[0], f"{FOUND_IN_DESTINATION} {how}")
            destination.ensure_folder(route.outlook_folder)
            floor = destination.uid_floor(route.outlook_folder)
            self.state.mark_appending(
                key,
                self.owner,
                dest_uidvalidity=floor.uidvalidity if floor else None,
                dest_uid_floor=floor.uid if floor else None,
            )
            appending = True
            with self._lease_renewed(key):
                dest_uid = destination.append(route.outlook_folder, message)
            return self._done(ref, dest_uid)
        except AppendRejected as rejected:
            if rejected.permanent:
                return self._skip(ref, rejected.reason)
            if rejected.retry_after is not None:
                # Refused by a throttle: nothing landed; the whole destination waits.
                until = self.clock() + rejected.retry_after
                return self._pause(ref, DESTINATION, (until, scrub(str(rejected))), append_outcome_unknown=False)
            if rejected.final_after is not None and self._failed_before(key) + 1 >= rejected.final_after:
                # Refused as often as it takes to be sure it is about the message, not a glitch.
                return self._skip(ref, rejected.reason)
            # A refusal (not a lost connection): the APPEND certainly did not land.
            return self._fail(ref, rejected, append_outcome_unknown=False)
        except (StateStoreUnavailable, QueueUnavailable, ClaimLost):
            raise
        except KeyboardInterrupt:
            # Stopped by the user (Ctrl-C, SIGTERM): let the claim go now, so that the next run
            # need not wait out its lease; an APPEND cut off may have landed, and is looked for.
            self._let_go(ref, append_outcome_unknown=appending or resuming_append)
            raise
        except MailboxThrottled as throttled:
            # A throttled session is closed or closing on the server's side.
            self.mailboxes.drop_source(route)
            self.mailboxes.drop_destination()
            until_why = throttle_pause(
                throttled,
                account=route.gmail_user,
                size=ref.size or 0,
                budget=self.download_budget if mailbox != DESTINATION else None,
                now=self.clock(),
            )
            return self._pause(ref, mailbox, until_why, append_outcome_unknown=appending or resuming_append)
        except Exception as exc:  # noqa: BLE001 - recorded and retried by the queue
            self.mailboxes.drop_source(route)
            self.mailboxes.drop_destination()
            return self._fail(ref, exc, append_outcome_unknown=appending or resuming_append)

    @contextmanager
    def _lease_renewed(self, key: UidKey) -> Iterator[None]:
        """An APPEND can outlast the lease (a large message on a slow link). Another process
        would then take the claim over, find no copy yet and append its own: so the lease is
        renewed, from a thread, every third of its length until the APPEND returns."""
        every = max(MIN_RENEW_SECONDS, (self.lease_until() - time.time()) / 3)
        done = threading.Event()

        def renew() -> None:
            while not done.wait(every):
                try:
                    self.state.extend_lease(key, self.owner, self.lease_until())
                except Exception as exc:  # noqa: BLE001 - finalize will find out; the APPEND goes on
                    log.warning("route %s UID %d: lease not renewed during APPEND: %s", key.route, key.uid, scrub(str(exc)))
                    return

        renewer = threading.Thread(target=renew, name=f"lease-{key.route}-{key.uid}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()

    def _confirm_gone(self, route: Route, ref: MessageRef) -> None:
        """Raise unless a new session confirms that the message is gone. A FETCH answered without
        it proves nothing (a server's slip, another UID's data; the old session may still list
        an expunged one); skipping it would lose it for good."""
        self.mailboxes.drop_source(route)
        source, folder = self.mailboxes.source(route)
        not_served = f"FETCH of UID {ref.uid} was answered without the message"
        if folder.uidvalidity != ref.uidvalidity:
            raise MessageNotServed(f"{not_served}, and UIDVALIDITY is {folder.uidvalidity} now")  # the retry skips it
        if source.has_uid(ref.uid):
            raise MessageNotServed(f"{not_served}, yet a new session still finds it")
        if folder.uidnext is not None and ref.uid >= folder.uidnext:
            # Skipping it as gone would make the message that later gets this UID look copied
            # already. Failed instead.
            raise UidNotAssigned(f"not in use yet in the source (UIDNEXT {folder.uidnext})")

    def _over_size_limit(self, ref: MessageRef) -> str | None:
        """The skip reason of a message the destination cannot take by its size, else None."""
        if self.max_message_bytes is None or ref.size is None or ref.size <= self.max_message_bytes:
            return None
        return f"too large for the destination ({ref.size} bytes, limit {self.max_message_bytes})"

    def _reserve_download(self, route: Route, ref: MessageRef) -> tuple[float, str] | None:
        """Count the message's download against its account's daily budget; when there is no
        room, when the account may download again and why, counting nothing."""
        if self.download_budget is None:
            return None
        room = self.download_budget.reserve(route.gmail_user, ref.size or 0)
        if room.fits:
            return None
        assert room.resumes_at is not None
        budget = self.download_budget.daily_bytes
        spent = f"{in_megabytes(room.downloaded)} of {in_megabytes(budget)}"
        return room.resumes_at, f"daily download budget spent ({spent} in 24 hours)"

    def _settle_download(self, route: Route, ref: MessageRef, message: SourceMessage | None) -> None:
        if self.download_budget is not None:
            self.download_budget.settle(route.gmail_user, ref.size or 0, len(message.body) if message else 0)

    def _failed_before(self, key: UidKey) -> int:
        """Failed attempts recorded for the message before this one."""
        failure = self.state.get_failure(key)
        return failure.attempts if failure is not None else 0

    def _routes_into(self, folder: str) -> list[str]:
        """Routes that share a destination folder also share what counts as a duplicate."""
        return [name for name, route in self.routes.items() if route.outlook_folder == folder]

    def _done(self, ref: MessageRef, dest_uid: int | None, note: str = "") -> CopyResult:
        self.state.finalize(ref.key, self.owner, ClaimStatus.DONE, dest_uid=dest_uid, fingerprint=ref.fingerprint)
        return CopyResult(Outcome.COPIED, ref.key, note, dest_uid)

    def _skip(self, ref: MessageRef, reason: str, *, append_unresolved: bool = False) -> CopyResult:
        if append_unresolved and not ref.fingerprint:
            log.warning("route %s UID %d: an interrupted APPEND cannot be followed: no fingerprint", ref.route, ref.uid)
        self.state.finalize(
            ref.key,
            self.owner,
            ClaimStatus.SKIPPED,
            reason=reason,
            fingerprint=ref.fingerprint if append_unresolved else None,
            append_unresolved=append_unresolved,
        )
        log.info("route %s UID %d skipped: %s", ref.route, ref.uid, reason)
        return CopyResult(Outcome.SKIPPED, ref.key, reason)

    def _pause_over(self, route: Route) -> Pause | None:
        """The pause in force over the route's source account or the destination, if any."""
        if self._pauses is None:
            self._pauses = {pause.name: pause for pause in self.state.pauses()}
        now = self.clock()
        for name in (_source_pause_name(route), DESTINATION):
            pause = self._pauses.get(name)
            if pause is not None and pause.until > now:
                return pause
        return None

    def _pause(
        self, ref: MessageRef, mailbox: str, until_why: tuple[float, str], *, append_outcome_unknown: bool
    ) -> CopyResult:
        """A throttle or a spent budget: the mailbox is paused until `until` for every route and
        process, and the message waits with it. Not a failure of the message: no attempt is
        recorded against it."""
        until, why = until_why
        self.state.release(ref.key, self.owner, append_outcome_unknown=append_outcome_unknown)
        pause = self.state.pause(mailbox, until, why)
        if self._pauses is not None:
            self._pauses[mailbox] = pause
        log.warning("route %s UID %d: %s", ref.route, ref.uid, describe(pause))
        return CopyResult(Outcome.PAUSED, ref.key, describe(pause), retry_after=pause.until - self.clock())

    def _let_go(self, ref: MessageRef, *, append_outcome_unknown: bool) -> None:
        try:
            self.state.release(ref.key, self.owner, append_outcome_unknown=append_outcome_unknown)
        except Exception as exc:  # noqa: BLE001 - on the way out: the claim's holder is gone then
            log.warning("route %s UID %d: claim not released: %s", ref.route, ref.uid, scrub(str(exc)))

    def _fail(self, ref: MessageRef, exc: BaseException, *, append_outcome_unknown: bool) -> CopyResult:
        text = scrub(str(exc)) or type(exc).__name__
        # Released first: a claim taken over meanwhile raises ClaimLost here, before a failure is
        # recorded against the new owner's claim.
        self.state.release(ref.key, self.owner, append_outcome_unknown=append_outcome_unknown)
        attempts = self.state.record_failure(ref.key, type(exc).__name__, text)
        log.warning("route %s UID %d failed (attempt %d): %s", ref.route, ref.uid, attempts, text)
        return CopyResult(Outcome.FAILED, ref.key, text, attempts=attempts)


def copy_batch(
    messages: Sequence[ReceivedMessage], *, copier: Copier, queue: MessageQueue
) -> list[tuple[ReceivedMessage, CopyResult]]:
    """Each message with what became of it, in the order given. A message that failed
    `copier.max_attempts` times of its own is moved to the dead letters here; a message held back
    behind one that waits (a throttle) waits as long, so its route's group is due again together."""
    copier.refresh()
    held_back: dict[str, CopyResult] = {}  # FIFO group (route) -> the result that holds it back
    results = []
    for message in messages:
        blocking = held_back.get(message.group_id)
        if blocking is not None:
            results.append((message, CopyResult(Outcome.UNPROCESSED, retry_after=blocking.retry_after)))
            continue
        result = _copy_received(message, copier=copier, queue=queue)
        if result.outcome is Outcome.FAILED and copier.max_attempts and result.attempts >= copier.max_attempts:
            result = _give_up(message, result, queue)
        if not result.outcome.acknowledged:
            held_back[message.group_id] = result
        results.append((message, result))
    return results


def _give_up(message: ReceivedMessage, failed: CopyResult, queue: MessageQueue) -> CopyResult:
    """Move a message that failed MAX_ATTEMPTS times of its own to the dead letters, where
    `status` shows why and `redrive` puts it back. Counted in state, not by the queue's receive
    count: throttles and waits behind another message never count against it."""
    reason = f"failed {failed.attempts} times; last: {failed.detail}"
    queue.quarantine(message, reason)
    log.error("route %s UID %d moved to the dead letters: %s", failed.key.route, failed.key.uid, reason)
    return replace(failed, outcome=Outcome.DEAD_LETTERED, detail=reason)


def _copy_received(message: ReceivedMessage, *, copier: Copier, queue: MessageQueue) -> CopyResult:
    try:
        ref = MessageRef.from_body(message.body)
    except MalformedMessageRef as exc:
        return _quarantine(message, str(exc), queue)
    if ref.route not in copier.routes:
        return _quarantine(message, f"queue body.route: unknown route {ref.route!r}", queue)
    return copier.copy_message(ref)


def _quarantine(message: ReceivedMessage, reason: str, queue: MessageQueue) -> CopyResult:
    """Dead-letter a body that can never become a copy, now: a retry would fail the same way.
    One log line, after the move, so the line is never there without the dead letter."""
    # The reason is stored in the dead letters, where no log filter scrubs it.
    reason = scrub(reason)
    queue.quarantine(message, reason)
    log.error("queue message %s (group %s) quarantined: %s", message.message_id, message.group_id, reason)
    return CopyResult(Outcome.QUARANTINED, None, reason)


def throttled_visibility(result: CopyResult) -> int | None:
    """Seconds a message failed by a throttle stays invisible (local loop and Lambda alike): the
    server's wait rounded up, and a second more so that it is not received a moment early; its
    route's later messages wait behind it (FIFO). None when the failure was not a throttle."""
    if result.retry_after is None:
        return None
    return min(math.ceil(result.retry_after) + THROTTLE_MARGIN_SECONDS, MAX_VISIBILITY_SECONDS)


def _source_pause_name(route: Route) -> str:
    """Gmail's limits are the account's: every route of one account pauses together."""
    return source_pause_name(route.gmail_user)


def _floor_of(record: Claim | CopiedMessage) -> UidFloor | None:
    """Where an interrupted APPEND was to land, as its claim (or unresolved FP# record) has it."""
    if record.dest_uidvalidity is None or record.dest_uid_floor is None:
        return None  # recorded by an earlier version, or the server gave no UIDNEXT
    return UidFloor(record.dest_uidvalidity, record.dest_uid_floor)



def lease_for(seconds: float, clock: Callable[[], float] = time.time) -> Callable[[], float]:
    return lambda: clock() + seconds
