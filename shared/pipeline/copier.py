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

import datetime as dt
import logging
import math
import queue as queue_module
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TypeVar

from shared.errors import (
    ClaimLost,
    MailSyncerError,
    MalformedMessageRef,
    QueueUnavailable,
    StateStoreUnavailable,
    UidNotAssigned,
)
from shared.mailbox.port import (
    AppendAnswer,
    AppendRejected,
    DestinationMailbox,
    FolderState,
    ListedMessage,
    Mailboxes,
    MailboxThrottled,
    SourceMessage,
    UidFloor,
    copies_in,
)
from shared.message_ref import MessageRef, UidKey
from shared.pipeline.budget import DownloadBudget, in_megabytes
from shared.pipeline.pauses import DESTINATION, describe, source_pause_name, throttle_pause
from shared.queue import MessageQueue, ReceivedMessage
from shared.queue.port import MAX_VISIBILITY_SECONDS
from shared.redaction import scrub
from shared.settings import Route
from shared.state import (
    Claim,
    ClaimOutcome,
    ClaimResult,
    ClaimStatus,
    Copied,
    CopiedMessage,
    HolderProbe,
    Pause,
    StateStore,
    Watermark,
)

log = logging.getLogger("mail_syncer.copy")

T = TypeVar("T")

# A lease is renewed at least this far apart during a long APPEND.
MIN_RENEW_SECONDS = 0.5
# The detail of a copy found in the destination instead of appended (Outcome.COPIED).
FOUND_IN_DESTINATION = "found in the destination"
# A message held by a process alive past its lease (stopped) is looked at again after this long.
STOPPED_HOLDER_WAIT_SECONDS = 20 * 60
# The sizes (as the source gave them) of the messages one batch claims at once (a larger message
# goes alone): bounds how long a batch takes, not memory (see CHUNK_BYTES).
MAX_BATCH_BYTES = 64 * 1024 * 1024
# A batch is fetched and appended in chunks, the next one's FETCH overlapping this one's APPENDs:
# the bodies of two chunks at most are in memory at once. Each chunk costs a round trip or two,
# so chunks are large: at 40 to 100 ms, chunks of 25 made a batch of 100 slower than one chunk,
# and chunks of 500 (16 MiB) copied 1,000 messages faster than chunks of 250 (8 MiB).
CHUNK_MESSAGES = 500
CHUNK_BYTES = 16 * 1024 * 1024
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
    # COPIED: what was copied, for per-message lines and metrics: the bytes appended, the
    # source's INTERNALDATE, and the milliseconds from its batch's start to its copy recorded.
    # They describe a result without deciding anything: left out of ==.
    size: int | None = field(default=None, compare=False)
    internaldate: dt.datetime | None = field(default=None, compare=False)
    elapsed_ms: int | None = field(default=None, compare=False)
    # PAUSED: whose pause holds it back, the pause's name (DESTINATION, or a source account's).
    paused_by: str | None = field(default=None, compare=False)


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
    # Pauses this copier met (a throttle, a spent budget), by mailbox: shared with its lanes
    # (dataclasses.replace keeps the dict), so that a lane learns of another's throttle before
    # its next APPENDs, not at its next batch.
    pauses_met: dict[str, Pause] = field(default_factory=dict, repr=False)
    # Pauses of the mailboxes ("destination", "source <account>") as last read from state (once
    # a batch: None until then); those met since are in pauses_met.
    _pauses: dict[str, Pause] | None = field(default=None, init=False, repr=False)
    _lookup_bounds: dict[str, Watermark | None] = field(default_factory=dict, init=False, repr=False)
    # Destination folders as listed for the messages a route's first scan found (folder -> the
    # day listed from, and its messages): see _copies_made_before.
    _listings: dict[str, tuple[dt.date, list[ListedMessage]]] = field(default_factory=dict, init=False, repr=False)

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
        return self.copy_messages([ref])[0]

    def copy_messages(self, refs: Sequence[MessageRef]) -> list[CopyResult]:
        """Copy messages of one route, in their queue order: one result each.

        The path of a batch, top to bottom: claim each (one commit) and weed out what needs no
        copy; then, a chunk at a time, fetch the chunk in one FETCH; look in the destination for
        those that may be there already; mark the rest APPENDING (one commit) before the first
        APPEND byte; send their APPENDs one after the other without waiting (LITERAL+), while
        the next chunk's FETCH goes on; finalize each by its own answer (one commit). A message
        that has to wait (held by another process, paused, failed before its APPEND) stops the
        batch there: the messages behind it are let go unprocessed, so that the route keeps
        its order."""
        route = self.routes[refs[0].route]
        if any(ref.route != route.name for ref in refs):
            raise ValueError("copy_messages: one route at a time")
        batch = _Batch(refs, _source_pause_name(route), self.clock())
        try:
            self._claim_each(route, batch)
            self._copy_claimed(route, batch)
        except KeyboardInterrupt:
            # Stopped by the user (Ctrl-C, SIGTERM): let the claims go now, so that the next run
            # need not wait out their leases; an APPEND cut off may have landed, and is looked for.
            for step in batch.open_steps():
                self._let_go(step.ref, append_outcome_unknown=step.appending or step.resuming_append)
            raise
        batch.let_go_rest(self)
        return batch.results()

    # -- 1. claim, and weed out what needs no copy ----------------------------------------------
    def _claim_each(self, route: Route, batch: _Batch) -> None:
        claimed: list[_Step] = []
        fingerprints_claimed: set[str] = set()

        def claim(step: _Step) -> CopyResult | None:
            if step.ref.fingerprint in fingerprints_claimed:
                # Its twin is ahead of it in this batch, not yet copied: it is taken up again once
                # the twin is final, and skipped then as its duplicate.
                return CopyResult(Outcome.UNPROCESSED, retry_after=0)
            result = self._claim(route, step)
            if result is None:
                claimed.append(step)
                if step.ref.fingerprint:
                    fingerprints_claimed.add(step.ref.fingerprint)
            return result

        # Every claim of the batch in one commit, before anything is fetched. A claim that cannot
        # be taken is no failure of the message's (none can be recorded without it): what raises
        # here ends the batch. They are taken at once up to the first twin (no claim loop gets
        # further), then looked at one by one.
        with self.state.batched():
            self._claim_many(route, batch.up_to_first_twin())
            batch.each(batch.steps, claim)
        if not claimed:
            return
        # The source's session opened first: the checks below (one commit) make no network call.
        opened = self._guarded(route, claimed[0], self.mailboxes.source, route)
        if isinstance(opened, CopyResult):
            claimed[0].result = opened
            batch.stop(opened)
            return
        with self.state.batched(), self._downloads_reserved(route, claimed):
            _, folder = opened
            batch.claimed, _ = batch.each(
                claimed, lambda step: self._guarded(route, step, self._check_claimed, route, step, folder)
            )

    def _claim(self, route: Route, step: _Step) -> CopyResult | None:
        """None when the message is claimed; else why it waits."""
        key = step.ref.key
        paused = self._pause_over(route)
        if paused is not None:
            # Its mailbox asked to be left alone: a command now would only be refused again.
            return self._waits_for(key, paused)
        claimed = step.taken or self.state.claim_uid(
            key, self.owner, self.lease_until(), self.holder_state, fingerprint=step.ref.fingerprint
        )
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
        step.claimed = True
        step.resuming_append = claimed.claim.status is ClaimStatus.APPENDING
        # An earlier APPEND of this message may have landed (a process died after sending it):
        # look in the destination first, from where that APPEND was to land.
        step.look_first, step.look_from = step.resuming_append, _floor_of(claimed.claim)
        # Copied perhaps before this state store knew of the route: looked for everywhere.
        step.unrecorded = not step.resuming_append and self._maybe_copied_unrecorded(step.ref)
        step.look_first = step.look_first or step.unrecorded
        return None

    def _claim_many(self, route: Route, steps: Sequence[_Step]) -> None:
        """The claims _claim takes one by one, taken at once (StateStore.claim_many), up to the
        first that is held."""
        if self._pause_over(route) is not None:
            return
        results = self.state.claim_many(
            [step.ref.key for step in steps],
            self.owner,
            self.lease_until(),
            self.holder_state,
            fingerprints=[step.ref.fingerprint for step in steps],
        )
        for step, result in zip(steps, results, strict=False):
            step.taken = result
            # Let go with the others if the batch ends before _claim gets to it.
            step.claimed = result.outcome is ClaimOutcome.CLAIMED

    @contextmanager
    def _downloads_reserved(self, route: Route, steps: Sequence[_Step]) -> Iterator[None]:
        """The claimed messages' downloads reserved in the account's budget at once, when they
        all fit: each _reserve_download inside then takes its part of it, and what no message
        took is given back at the end. When they do not all fit, each reserves its own."""
        if self.download_budget is None:
            yield
            return
        with self.download_budget.reserving(route.gmail_user, sum(step.ref.size or 0 for step in steps)):
            yield

    def _check_claimed(self, route: Route, step: _Step, folder: FolderState) -> CopyResult | None:
        """None when the claimed message is still to be fetched; else what became of it
        (`folder`: the source folder as the batch's session EXAMINEd it)."""
        ref = step.ref
        if ref.fingerprint and not step.resuming_append:
            twin = self.state.find_copied(ref.fingerprint, self._routes_into(route.outlook_folder))
            if twin is not None and not twin.unresolved:
                return self._skip(ref, f"duplicate of route {twin.route} UID {twin.uid}")
            if twin is not None:
                # Its APPEND under the UID it had before the source was renumbered was
                # interrupted, and is looked for now that the message is back.
                step.look_first, step.look_from = True, _floor_of(twin)
        if not step.resuming_append and (too_large := self._over_size_limit(ref)) is not None:
            return self._skip(ref, too_large)
        if folder.uidvalidity != ref.uidvalidity:
            # The UID names another message now; the producer rescans the renumbered folder
            # and fingerprints recognise what was copied already, or (an interrupted APPEND)
            # where to look for it.
            reason = f"UIDVALIDITY changed to {folder.uidvalidity} since it was queued"
            if step.resuming_append:
                reason += "; its interrupted APPEND is looked for when it is queued again"
            return self._skip(ref, reason, append_unresolved=step.resuming_append)
        budget_left = self._reserve_download(route, ref)
        if budget_left is not None:
            return self._pause(ref, step.mailbox, budget_left, append_outcome_unknown=step.resuming_append)
        return None

    # -- 2. fetch, and look for copies made before ----------------------------------------------
    def _copy_claimed(self, route: Route, batch: _Batch) -> None:
        """The claimed messages fetched and appended a chunk at a time, the next chunk's FETCH
        going on (on the source's session, from a thread) while this chunk's APPENDs go out (on
        the destination's), so that the round trips of one hide those of the other. Each
        session is used by one thread at a time: errors are handled once both are done."""
        if not batch.claimed:
            return
        with self._leases_renewed(batch):
            self._copy_in_chunks(route, batch)

    def _copy_in_chunks(self, route: Route, batch: _Batch) -> None:
        chunks = _chunks(batch.claimed)
        # The destination made ready while the first chunk is fetched (a cold start's login).
        self.mailboxes.prepare_destination(route.outlook_folder)
        fetching = self._fetch_chunk(route, chunks[0], background=False)
        for index, chunk in enumerate(chunks):
            assert fetching is not None
            ready, go_on = self._take_fetched(route, batch, chunk, fetching.outcome())
            following = chunks[index + 1] if go_on and index + 1 < len(chunks) else None
            fetching = self._fetch_chunk(route, following, background=True) if following else None
            # Not waited for when this raises (Ctrl-C): the FETCH thread is a daemon, and its
            # session is closed with the others.
            go_on = self._append_fetched(route, batch, ready, meanwhile=fetching) and go_on
            if fetching is not None:
                fetching.wait()
            if not go_on:
                return

    # -- 2. fetch, and look for copies made before ----------------------------------------------
    def _fetch_chunk(self, route: Route, steps: Sequence[_Step], *, background: bool) -> _Fetching:
        """One FETCH of the chunk's messages (a single message is fetched on its own, later)."""
        if len(steps) == 1:
            return _Fetching.done(None)
        try:
            source, _ = self.mailboxes.source(route)
        except Exception as exc:  # noqa: BLE001 - looked at in _take_fetched, as a FETCH failure
            return _Fetching.done(exc)
        return _Fetching(lambda: source.fetch_many([step.ref.uid for step in steps]), background=background)

    def _take_fetched(
        self, route: Route, batch: _Batch, steps: Sequence[_Step], fetched: dict[int, SourceMessage] | BaseException | None
    ) -> tuple[list[_Step], bool]:
        """The chunk's messages to append, and whether the batch goes on after them."""
        if isinstance(fetched, MailboxThrottled):
            # The account's limit: every claimed message waits for it (none is charged).
            for step in steps:
                step.result = self._after_error(route, step, fetched)
            batch.stop(steps[0].result)
            return [], False
        if isinstance(fetched, (StateStoreUnavailable, QueueUnavailable, ClaimLost)) or (
            isinstance(fetched, BaseException) and not isinstance(fetched, Exception)
        ):
            raise fetched
        if isinstance(fetched, Exception):
            # One message the server cannot serve fails the whole FETCH: each is fetched on its
            # own, so that only that one fails. (A lost session fails the first again.)
            log.info("route %s: batch FETCH failed, fetching one by one: %s", route.name, scrub(str(fetched)))
            self.mailboxes.drop_source(route)
            fetched = None
        # The destination is listed once for the chunk (see _copies_made_before), from the
        # earliest day one of its messages needs, not again for each that needs an earlier day.
        earliest = min(
            (
                fetched[step.ref.uid].internaldate.date()
                for step in steps
                if fetched is not None and step.unrecorded and step.look_from is None and step.ref.uid in fetched
            ),
            default=None,
        )
        return batch.each(
            steps, lambda step: self._guarded(route, step, self._fetch_one, route, step, fetched, earliest)
        )

    def _fetch_one(
        self, route: Route, step: _Step, fetched: dict[int, SourceMessage] | None, earliest: dt.date | None = None
    ) -> CopyResult | None:
        """None when the message is fetched and to be appended; else what became of it."""
        ref = step.ref
        if fetched is not None:
            message = fetched.get(ref.uid)
        else:
            source, _ = self.mailboxes.source(route)
            message = source.fetch(ref.uid)
        self._settle_download(route, ref, message)
        if message is None or message.uid != ref.uid:
            self._confirm_gone(route, ref)
            return self._skip(ref, "gone from the source")
        step.message = message
        step.mailbox = DESTINATION  # whose throttle a failure is from here on
        if step.look_first:
            found = self._copies_made_before(route, step, earliest)
            if found:
                how = "copied before the state store knew of it" if step.unrecorded else "after an interrupted APPEND"
                return self._done(ref, found[0], f"{FOUND_IN_DESTINATION} {how}", message=message, started=step.started)
        return None

    def _copies_made_before(self, route: Route, step: _Step, earliest: dt.date | None) -> list[int]:
        if not (step.unrecorded and step.look_from is None):
            # After an interrupted APPEND: looked at now, from where that APPEND was to land.
            return self.mailboxes.destination().find_copies(route.outlook_folder, step.message, step.look_from)
        # Found by the route's first scan, maybe copied before this state store knew of it: any
        # such copy was there before the scan, so the folder is listed once a run from the
        # earliest day needed (servers differ in the zone they take SEARCH dates in) and each
        # message is matched in the listing, not looked for with a SEARCH and FETCH of its own
        # (which made a new route's first run take about six round trips a message).
        day = step.message.internaldate.date()
        return copies_in(self._listing_from(route, min(day, earliest or day)), step.message)

    def _listing_from(self, route: Route, day: dt.date) -> list[ListedMessage]:
        """The route's destination folder listed from the day before `day` on, at most once a
        run unless an earlier day is asked for."""
        day -= dt.timedelta(days=1)
        listed_from, listing = self._listings.get(route.outlook_folder, (None, []))
        if listed_from is None or day < listed_from:
            listing = self.mailboxes.destination().identities_since(route.outlook_folder, day)
            self._listings[route.outlook_folder] = (day, listing)
        return listing

    # -- 3. mark appending, APPEND, finalize -----------------------------------------------------
    def _append_fetched(self, route: Route, batch: _Batch, steps: list[_Step], *, meanwhile: _Fetching | None) -> bool:
        """Whether the batch goes on after these (a throttle or a lost session stops it)."""
        if not steps:
            return True
        throttled = self.pauses_met.get(DESTINATION)
        if throttled is not None and throttled.until > self.clock():
            # Another lane met the destination's throttle meanwhile: nothing more is sent to it.
            for step in steps:
                self._let_go(step.ref, append_outcome_unknown=step.resuming_append)
                step.result = self._waits_for(step.ref.key, throttled)
            batch.stop(steps[0].result)
            return False
        ready = self._guarded(route, steps[0], self._destination_ready, route)
        if isinstance(ready, CopyResult):
            steps[0].result = ready
            batch.stop(ready)
            return False
        destination, floor = ready
        # Every message of the batch APPENDING, with where its APPEND lands at the earliest, in
        # one commit before the first APPEND byte goes out.
        marked_all = True
        with self.state.batched():
            marked = self._mark_appending_many(steps, floor)
            for index, step in enumerate(steps):
                if index < marked:
                    continue
                result = self._guarded(route, step, self._mark_appending, step, floor)
                if result is not None:
                    step.result = result
                    batch.stop(result)
                    steps, marked_all = steps[:index], False
                    break
        if not steps:
            return False
        try:
            answers = destination.append_many(route.outlook_folder, [step.message for step in steps])
        except Exception as exc:  # noqa: BLE001 - the port answers each; whatever slips through, unknown
            answers = [AppendAnswer(failed=exc, sent=True)] * len(steps)
        if meanwhile is not None:
            meanwhile.wait()  # handling a failure may drop the source's session too
        # The results of the chunk in one commit.
        with self.state.batched():
            self._finalize_each(route, steps, answers)
        for step in steps:
            step.message = None  # memory holds a chunk or two of bodies, not the batch's
        stops = (Outcome.PAUSED, Outcome.UNPROCESSED, Outcome.BUSY)
        stopping = next((step.result for step in steps if step.result.outcome in stops), None)
        if stopping is not None:
            batch.stop(stopping)
        return stopping is None and marked_all

    def _finalize_each(self, route: Route, steps: Sequence[_Step], answers: Sequence[AppendAnswer]) -> None:
        throttled: CopyResult | None = None  # the first APPEND of the batch a throttle answered
        answered = False  # the session answered an APPEND of the batch
        charged = False  # the session's failure was charged to an earlier message of the batch
        copies = self._done_many(route, [(step, answer) for step, answer in zip(steps, answers, strict=True) if answer.landed])
        for step, answer in zip(steps, answers, strict=True):
            # Until finalized, whether a copy may be in the destination (landed, or sent and
            # unanswered): a claim let go before then must be looked for first.
            step.appending = answer.landed or (answer.failed is not None and answer.sent)
            if answer.landed:
                answered = True
                step.result = copies[step]
            elif (
                (answered or charged)
                and throttled is None
                and answer.failed is not None
                and not isinstance(answer.failed, MailboxThrottled)
            ):
                # The session ended after answering an earlier APPEND of the batch (Outlook.com
                # ends one when its token expires), or failed with an earlier one, charged for it:
                # not this message's failure, so no attempt is charged. Sent, whether it landed
                # is unknown, so it is looked for first. (A message that ends every session is
                # charged: first in its next batch.)
                how = "left unanswered by" if answer.sent else "not sent, for"
                log.info("route %s UID %d: its APPEND was %s a session that ended", route.name, step.ref.uid, how)
                self._let_go(step.ref, append_outcome_unknown=step.appending)
                step.result = CopyResult(Outcome.UNPROCESSED)
            elif throttled is not None and answer.failed is not None:
                # Sent behind a throttled one, and the session ended unanswered (Outlook's BAD
                # throttle closes it): part of the throttle, not a failure of its own; whether
                # it landed is unknown, so it is looked for first.
                until_why = (self.clock() + (throttled.retry_after or 0), throttled.detail)
                step.result = self._guarded(
                    route, step, self._pause, step.ref, DESTINATION, until_why, append_outcome_unknown=step.appending
                )
            else:
                answered = answered or answer.refused is not None
                charged = charged or answer.failed is not None
                step.result = self._after_error(route, step, answer.refused or answer.failed)
                if throttled is None and step.result.outcome is Outcome.PAUSED and step.mailbox == DESTINATION:
                    throttled = step.result

    def _done_many(self, route: Route, landed: Sequence[tuple[_Step, AppendAnswer]]) -> dict[_Step, CopyResult]:
        """_done for each landed APPEND, at once (StateStore.finalize_many)."""
        if not landed:
            return {}
        for step, _ in landed:
            step.appending = True
        copies = [Copied(step.ref.key, answer.uid, step.ref.fingerprint) for step, answer in landed]
        try:
            lost = self.state.finalize_many(copies, self.owner)
        except (StateStoreUnavailable, QueueUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - as _guarded makes of it, for each
            return {step: self._after_error(route, step, exc) for step, _ in landed}
        return {
            step: self._lost(step, failed) if failed is not None else self._copied(step, answer.uid)
            for (step, answer), failed in zip(landed, lost, strict=True)
        }

    def _destination_ready(self, route: Route) -> tuple[DestinationMailbox, UidFloor | None]:
        """The destination with the route's folder made, and where an APPEND lands at the earliest."""
        destination = self.mailboxes.destination()
        destination.ensure_folder(route.outlook_folder)
        return destination, destination.uid_floor(route.outlook_folder)

    def _mark_appending_many(self, steps: Sequence[_Step], floor: UidFloor | None) -> int:
        """The steps marked APPENDING at once (StateStore.mark_appending_many), from the first:
        how many. The one after them, if any, is not held: _mark_appending finds out."""
        marked = self.state.mark_appending_many(
            [step.ref.key for step in steps],
            self.owner,
            dest_uidvalidity=floor.uidvalidity if floor else None,
            dest_uid_floor=floor.uid if floor else None,
        )
        for step in steps[:marked]:
            step.appending = True
        return marked

    def _mark_appending(self, step: _Step, floor: UidFloor | None) -> None:
        self.state.mark_appending(
            step.ref.key,
            self.owner,
            dest_uidvalidity=floor.uidvalidity if floor else None,
            dest_uid_floor=floor.uid if floor else None,
        )
        step.appending = True

    # -- what an error makes of a message -------------------------------------------------------
    def _guarded(
        self, route: Route, step: _Step, operation: Callable[..., T], *args: object, **kwargs: object
    ) -> T | CopyResult:
        try:
            return operation(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except ClaimLost as lost:
            return self._lost(step, lost)
        except Exception as exc:  # noqa: BLE001 - what it makes of the message is decided below
            return self._after_error(route, step, exc)

    def _after_error(self, route: Route, step: _Step, error: BaseException) -> CopyResult:
        ref, key = step.ref, step.ref.key
        append_outcome_unknown = step.appending or step.resuming_append
        try:
            if isinstance(error, AppendRejected):
                if error.permanent:
                    return self._skip(ref, error.reason)
                if error.retry_after is not None:
                    # Refused by a throttle: nothing landed; the whole destination waits.
                    until = self.clock() + error.retry_after
                    return self._pause(ref, DESTINATION, (until, scrub(str(error))), append_outcome_unknown=False)
                if error.final_after is not None and self._failed_before(key) + 1 >= error.final_after:
                    # Refused as often as it takes to be sure it is about the message, not a glitch.
                    return self._skip(ref, error.reason)
                # A refusal (not a lost connection): the APPEND certainly did not land.
                return self._fail(ref, error, append_outcome_unknown=False)
            if isinstance(error, (StateStoreUnavailable, QueueUnavailable, ClaimLost)):
                raise error
            if isinstance(error, MailboxThrottled):
                # A throttled session is closed or closing on the server's side.
                self.mailboxes.drop_source(route)
                self.mailboxes.drop_destination()
                until_why = throttle_pause(
                    error,
                    account=route.gmail_user,
                    size=ref.size or 0,
                    budget=self.download_budget if step.mailbox != DESTINATION else None,
                    now=self.clock(),
                )
                return self._pause(ref, step.mailbox, until_why, append_outcome_unknown=append_outcome_unknown)
            if not isinstance(error, Exception):
                raise error
            self.mailboxes.drop_source(route)
            self.mailboxes.drop_destination()
            return self._fail(ref, error, append_outcome_unknown=append_outcome_unknown)
        except ClaimLost as lost:
            return self._lost(step, lost)

    def _lost(self, step: _Step, lost: ClaimLost) -> CopyResult:
        """Our lease ran out midway and another consumer took the claim: the message is its now.
        Not a failure of the message (nothing is recorded); the queue brings it back, by when
        the claim is final or free again."""
        ref = step.ref
        step.claimed = False
        holder = self.state.get_claim(ref.key, fingerprint=ref.fingerprint)
        live = holder is not None and not holder.status.is_final
        log.warning("route %s UID %d: claim taken over midway: %s", ref.route, ref.uid, scrub(str(lost)))
        return CopyResult(Outcome.BUSY, ref.key, str(lost), busy_until=holder.lease_until if live else None)

    @contextmanager
    def _leases_renewed(self, batch: _Batch) -> Iterator[None]:
        """A batch can outlast the lease (many messages, or large ones on a slow link). Another
        process would then take a claim over, find no copy yet and append its own: so the leases
        of the batch's open claims are renewed, from one thread, every third of their length
        until the batch is done."""
        every = max(MIN_RENEW_SECONDS, (self.lease_until() - time.time()) / 3)
        done = threading.Event()

        def renew() -> None:
            while not done.wait(every):
                keys = [step.ref.key for step in batch.open_steps()]
                try:
                    # Those finalized meanwhile, or taken over, are left: finalize finds out.
                    self.state.extend_leases(keys, self.owner, self.lease_until())
                except Exception as exc:  # noqa: BLE001 - finalize will find out; the batch goes on
                    log.warning("route %s: leases not renewed: %s", batch.steps[0].ref.route, scrub(str(exc)))

        renewer = threading.Thread(target=renew, name=f"lease-{batch.steps[0].ref.route}", daemon=True)
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

    def _done(
        self, ref: MessageRef, dest_uid: int | None, note: str = "", *, message: SourceMessage | None = None,
        started: float | None = None,
    ) -> CopyResult:
        self.state.finalize(ref.key, self.owner, ClaimStatus.DONE, dest_uid=dest_uid, fingerprint=ref.fingerprint)
        return self._described(CopyResult(Outcome.COPIED, ref.key, note, dest_uid), message, started)

    def _copied(self, step: _Step, dest_uid: int | None) -> CopyResult:
        return self._described(CopyResult(Outcome.COPIED, step.ref.key, "", dest_uid), step.message, step.started)

    def _described(self, result: CopyResult, message: SourceMessage | None, started: float | None) -> CopyResult:
        elapsed = None if started is None else max(0, round((self.clock() - started) * 1000))
        if message is None:
            return replace(result, elapsed_ms=elapsed)
        return replace(result, size=len(message.body), internaldate=message.internaldate, elapsed_ms=elapsed)

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
        return CopyResult(Outcome.SKIPPED, ref.key, reason)

    def _pause_over(self, route: Route) -> Pause | None:
        """The pause in force over the route's source account or the destination, if any."""
        if self._pauses is None:
            self._pauses = {pause.name: pause for pause in self.state.pauses()}
        now = self.clock()
        for name in (_source_pause_name(route), DESTINATION):
            for pause in (self._pauses.get(name), self.pauses_met.get(name)):
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
        self.pauses_met[mailbox] = pause
        log.warning("route %s UID %d: %s", ref.route, ref.uid, describe(pause))
        return self._waits_for(ref.key, pause)

    def _waits_for(self, key: UidKey, pause: Pause) -> CopyResult:
        return CopyResult(Outcome.PAUSED, key, describe(pause), retry_after=pause.until - self.clock(), paused_by=pause.name)

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
        return CopyResult(Outcome.FAILED, ref.key, text, attempts=attempts)


@dataclass(eq=False)
class _Step:
    """One message on its way through a batch (Copier.copy_messages)."""

    ref: MessageRef
    mailbox: str  # whose throttle a failure is: the source account's until the fetch is done
    claimed: bool = False
    resuming_append: bool = False  # claimed APPENDING: an earlier APPEND of it may have landed
    look_first: bool = False  # look in the destination before appending
    look_from: UidFloor | None = None
    unrecorded: bool = False  # perhaps copied before this state store knew of the route
    message: SourceMessage | None = None
    appending: bool = False  # marked APPENDING in this batch
    result: CopyResult | None = None
    taken: ClaimResult | None = None  # its claim as Copier._claim_many took it, for _claim
    started: float | None = None  # when its batch began (Copier.clock), for CopyResult.elapsed_ms


class _Batch:
    def __init__(self, refs: Sequence[MessageRef], source_mailbox: str, started: float | None = None) -> None:
        self.steps = [_Step(ref, source_mailbox, started=started) for ref in refs]
        self.claimed: list[_Step] = []  # claimed, to be fetched
        self.blocking: CopyResult | None = None  # the first result that stopped the batch

    def up_to_first_twin(self) -> list[_Step]:
        """The steps before the first whose fingerprint one of them has (its twin)."""
        seen: set[str] = set()
        for index, step in enumerate(self.steps):
            if step.ref.fingerprint in seen:
                return self.steps[:index]
            if step.ref.fingerprint:
                seen.add(step.ref.fingerprint)
        return list(self.steps)

    def each(
        self, steps: Sequence[_Step], operation: Callable[[_Step], CopyResult | None]
    ) -> tuple[list[_Step], bool]:
        """`operation` on each step in turn: the steps it answered None for (to go on with), and
        whether it went through all. A result that is not acknowledged stops the batch there."""
        kept = []
        for step in steps:
            result = operation(step)
            if result is None:
                kept.append(step)
                continue
            step.result = result
            if not result.outcome.acknowledged:
                self.stop(result)
                return kept, False
        return kept, True

    def stop(self, result: CopyResult | None) -> None:
        if self.blocking is None:
            self.blocking = result

    def open_steps(self) -> list[_Step]:
        """Claimed, and not yet finalized, released or failed."""
        return [step for step in self.steps if step.claimed and step.result is None]

    def let_go_rest(self, copier: Copier) -> None:
        """The messages behind the one that stopped the batch: their claims let go, each left
        unprocessed, due again when the one ahead of them is."""
        retry_after = self.blocking.retry_after if self.blocking is not None else None
        for step in self.steps:
            if step.result is not None:
                continue
            if step.claimed:
                copier._let_go(step.ref, append_outcome_unknown=step.resuming_append)
            step.result = CopyResult(Outcome.UNPROCESSED, retry_after=retry_after)

    def results(self) -> list[CopyResult]:
        return [step.result for step in self.steps if step.result is not None]


class _Fetching:
    """A chunk's FETCH, done at once or going on in a thread: `outcome` is what it returned or
    raised (None: nothing was fetched, the messages are fetched one by one)."""

    def __init__(self, fetch: Callable[[], object] | None, *, background: bool = False) -> None:
        self._outcome: object = None
        self._thread: threading.Thread | None = None
        if fetch is None:
            return
        if background:
            self._thread = threading.Thread(target=self._run, args=(fetch,), name="fetch-ahead", daemon=True)
            self._thread.start()
        else:
            self._run(fetch)

    @classmethod
    def done(cls, outcome: object) -> _Fetching:
        fetching = cls(None)
        fetching._outcome = outcome
        return fetching

    def _run(self, fetch: Callable[[], object]) -> None:
        try:
            self._outcome = fetch()
        except BaseException as exc:  # noqa: BLE001 - handed to the copier's thread, which decides
            self._outcome = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def outcome(self):  # dict[int, SourceMessage] | BaseException | None
        self.wait()
        return self._outcome


def _chunks(steps: Sequence[_Step]) -> list[list[_Step]]:
    """`steps` in chunks of at most CHUNK_MESSAGES and CHUNK_BYTES (by the source's sizes)."""
    chunks: list[list[_Step]] = []
    size = 0
    for step in steps:
        step_size = step.ref.size or 0
        if not chunks or len(chunks[-1]) >= CHUNK_MESSAGES or (chunks[-1] and size + step_size > CHUNK_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(step)
        size += step_size
    return chunks


def copy_batch(
    messages: Sequence[ReceivedMessage],
    *,
    copier: Copier,
    queue: MessageQueue,
    lanes: Sequence[Copier] = (),
) -> list[tuple[ReceivedMessage, CopyResult]]:
    """Each message with what became of it, in the order given. The messages of a route are
    copied together (Copier.copy_messages), in runs bounded by MAX_BATCH_BYTES; after one that
    is not acknowledged, the rest of its route wait as long, so its group is due again together.
    A message that failed `copier.max_attempts` times of its own is moved to the dead letters.

    `lanes`: more copiers (each with a destination session of its own) to copy the routes of
    other source accounts at the same time, one thread each. The routes of one account go one
    after the other in one thread: they share its sessions and its limits."""
    copier.refresh()
    results: dict[int, CopyResult] = {}
    routes: dict[str, list[tuple[int, MessageRef]]] = {}  # FIFO group (route) -> its messages, in order
    for index, message in enumerate(messages):
        ref = _reference(message, copier=copier, queue=queue)
        if isinstance(ref, CopyResult):
            results[index] = ref
        else:
            routes.setdefault(message.group_id, []).append((index, ref))
    accounts: dict[str, list[list[tuple[int, MessageRef]]]] = {}
    for group in routes.values():
        accounts.setdefault(copier.routes[group[0][1].route].gmail_user, []).append(group)

    def copy_account(groups: list[list[tuple[int, MessageRef]]], lane: Copier) -> None:
        for group in groups:
            _copy_route(group, lane, messages, queue, results)

    if not lanes or len(accounts) == 1:
        for groups in accounts.values():
            copy_account(groups, copier)
    else:
        _in_parallel(list(accounts.values()), [copier, *lanes], copy_account)
    return [(message, results[index]) for index, message in enumerate(messages)]


def _copy_route(
    group: list[tuple[int, MessageRef]],
    copier: Copier,
    messages: Sequence[ReceivedMessage],
    queue: MessageQueue,
    results: dict[int, CopyResult],
) -> None:
    blocking: CopyResult | None = None
    for run in _runs_by_size(group):
        if blocking is not None:
            for index, _ in run:
                results[index] = CopyResult(Outcome.UNPROCESSED, retry_after=blocking.retry_after)
            continue
        for (index, _), result in zip(run, copier.copy_messages([ref for _, ref in run]), strict=True):
            if result.outcome is Outcome.FAILED and copier.max_attempts and result.attempts >= copier.max_attempts:
                result = _give_up(messages[index], result, queue)
            if blocking is None and not result.outcome.acknowledged:
                blocking = result
            results[index] = result


def _in_parallel(work: list[T], copiers: list[Copier], run: Callable[[T, Copier], None]) -> None:
    """`run` on each piece of `work`, as many at once as there are copiers, each with a copier
    no other thread uses meanwhile. What one raises is raised here once all are done."""
    free: queue_module.SimpleQueue[Copier] = queue_module.SimpleQueue()
    for lane in copiers:
        lane.refresh()
        free.put(lane)

    def take_a_lane(piece: T) -> None:
        lane = free.get()
        try:
            run(piece, lane)
        finally:
            free.put(lane)

    with ThreadPoolExecutor(min(len(copiers), len(work)), thread_name_prefix="lane") as pool:
        futures = [pool.submit(take_a_lane, piece) for piece in work]
    for future in futures:
        future.result()


def _runs_by_size(group: list[tuple[int, MessageRef]]) -> Iterator[list[tuple[int, MessageRef]]]:
    """A route's messages in runs of at most MAX_BATCH_BYTES by their sizes (a message above it
    alone): the bodies of a run are held in memory together."""
    run: list[tuple[int, MessageRef]] = []
    size = 0
    for entry in group:
        entry_size = entry[1].size or 0
        if run and size + entry_size > MAX_BATCH_BYTES:
            yield run
            run, size = [], 0
        run.append(entry)
        size += entry_size
    if run:
        yield run


def _give_up(message: ReceivedMessage, failed: CopyResult, queue: MessageQueue) -> CopyResult:
    """Move a message that failed MAX_ATTEMPTS times of its own to the dead letters, where
    `status` shows why and `redrive` puts it back. Counted in state, not by the queue's receive
    count: throttles and waits behind another message never count against it."""
    reason = f"failed {failed.attempts} times; last: {failed.detail}"
    queue.quarantine(message, reason)
    return replace(failed, outcome=Outcome.DEAD_LETTERED, detail=reason)


def _reference(message: ReceivedMessage, *, copier: Copier, queue: MessageQueue) -> MessageRef | CopyResult:
    """The message reference a queue message carries; one that is not, quarantined."""
    try:
        ref = MessageRef.from_body(message.body)
    except MalformedMessageRef as exc:
        return _quarantine(message, str(exc), queue)
    if ref.route not in copier.routes:
        return _quarantine(message, f"queue body.route: unknown route {ref.route!r}", queue)
    return ref


def _quarantine(message: ReceivedMessage, reason: str, queue: MessageQueue) -> CopyResult:
    """Dead-letter a body that can never become a copy, now: a retry would fail the same way.
    Its log line (shared.outcome_lines) comes after the move, never without the dead letter."""
    # The reason is stored in the dead letters, where no log filter scrubs it.
    reason = scrub(reason)
    queue.quarantine(message, reason)
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
