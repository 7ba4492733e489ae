"""The producer's use case: find each route's new source UIDs and enqueue references to them.

Per route: EXAMINE the source folder; with a watermark of the same UIDVALIDITY, the new UIDs are
those above it; otherwise (first run, or the mailbox was renumbered) the `SINCE` window from the
route's start point (after a renumbering, the fallback start reaches back to the day before the
watermark last moved, if that is earlier). INTERNALDATE stands in for arrival there: a message
moved into the folder with an older INTERNALDATE between the last scan and the renumbering is
outside the window. References go to the queue in chunks, and the watermark moves up to a
chunk's last UID only after that chunk was sent, so a crash resends at most one chunk (the UID
claim makes a resend harmless). A cap per run spreads a large backlog over several runs.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from shared.errors import MailSyncerError, QueueUnavailable, StateStoreUnavailable
from shared.mailbox.port import (
    FolderState,
    ListedMessage,
    MailboxThrottled,
    MessageSummary,
    SourceMailbox,
    fingerprint,
)
from shared.message_ref import MessageRef
from shared.pipeline.budget import DownloadBudget
from shared.pipeline.pauses import describe, source_pause_name, throttle_pause
from shared.queue import MessageQueue
from shared.redaction import scrub
from shared.settings import Route, routes_by_account
from shared.state import StateStore, Watermark

log = logging.getLogger("mail_syncer.scan")

# UIDs whose metadata is fetched, sent and committed to the watermark together (a FETCH or
# two and a commit each: at 100 ms, chunks of 100 made the scan of 1,000 new messages take 1.3 s).
CHUNK = 1000

OpenSource = Callable[[Route], AbstractContextManager[SourceMailbox]]


@dataclass
class RouteScan:
    route: str
    found: int = 0  # new UIDs found
    enqueued: int = 0  # references sent this run (or, dry run, that would be sent)
    left_for_next_run: int = 0  # found but over the cap
    watermark: Watermark | None = None  # after the run
    # Where a scan without a watermark (a route's first, or after a UIDVALIDITY change) started:
    # the route's `since`, else today less FALLBACK_SINCE_DAYS; None for a scan above a watermark.
    since: dt.date | None = None
    # On a route's first scan, or a backfill: the folder's messages from before `since`, not copied.
    older: int | None = None
    # A backfill (`backfill_since`, below the watermark): messages from `since` on that this
    # store never queued (counted in `found`), and those it knows already (queued or copied).
    backfilled: int | None = None
    known: int = 0
    refs: list[MessageRef] = field(default_factory=list)  # what was (or would be) sent
    # Dry run: each ref's INTERNALDATE, From and Subject, for the listing.
    listed: list[ListedMessage] = field(default_factory=list)
    error: str | None = None  # why the route could not be scanned
    # Not scanned, and why: its source account asked to be left alone ("source <account> paused
    # until ...: reason"). Not an error: the next scan after the pause goes on from the watermark.
    paused: str | None = None


@dataclass(frozen=True)
class ScanLimits:
    max_enqueue_per_run: int
    fallback_since_days: int
    today: dt.date


def scan_routes(
    routes: Sequence[Route],
    *,
    state: StateStore,
    queue: MessageQueue,
    open_source: OpenSource,
    limits: ScanLimits,
    dry_run: bool = False,
    download_budget: DownloadBudget | None = None,
    clock: Callable[[], float] = time.time,
    on_new_mail: Callable[[Route], None] = lambda route: None,
    accounts_at_once: int = 1,
    backfill_since: dt.date | None = None,
) -> list[RouteScan]:
    """Scan every route; one route's failure is recorded and the others go on.

    The fail-safe gate comes first: if the state store cannot be read and written this raises
    StateStoreUnavailable before any IMAP connection is opened. A queue or state store that
    fails mid-run fails every route alike, so that ends the run too. A route whose source
    account is paused is not scanned (its commands would only be refused again); a throttle met
    while scanning pauses the account, as the consumer's would (`download_budget`: see
    shared.pipeline.pauses.throttle_pause). `on_new_mail` is told of a route with messages to
    queue as soon as EXAMINE shows mail above its watermark (any mail, on its first scan), else
    when its search finds some (the CLI logs in to the destination meanwhile).
    `accounts_at_once`: the routes of that many source accounts scanned at the same time, a
    thread each (an account's routes one after the other: they share its sessions); the scans
    come back in the order of `routes` all the same. `backfill_since`: also queue the messages
    from that day on, below the watermark, that this store never queued (`drain --since`)."""
    state.check_health()

    def scan_each(some: Sequence[Route]) -> list[RouteScan]:
        return [
            _scan_or_say_why_not(
                route, state=state, queue=queue, open_source=open_source, limits=limits, dry_run=dry_run,
                download_budget=download_budget, clock=clock, on_new_mail=on_new_mail,
                backfill_since=backfill_since,
            )
            for route in some
        ]

    by_account = routes_by_account(routes)
    if accounts_at_once <= 1 or len(by_account) <= 1:
        return scan_each(routes)
    with ThreadPoolExecutor(min(accounts_at_once, len(by_account)), thread_name_prefix="scan") as pool:
        futures = [pool.submit(scan_each, some) for some in by_account.values()]
    scanned = {scan.route: scan for future in futures for scan in future.result()}
    return [scanned[route.name] for route in routes]


def _scan_or_say_why_not(
    route: Route,
    *,
    state: StateStore,
    queue: MessageQueue,
    open_source: OpenSource,
    limits: ScanLimits,
    dry_run: bool,
    download_budget: DownloadBudget | None,
    clock: Callable[[], float],
    on_new_mail: Callable[[Route], None],
    backfill_since: dt.date | None = None,
) -> RouteScan:
    pause = state.read_pause(source_pause_name(route.gmail_user))
    if pause is not None and pause.until > clock():
        return RouteScan(route.name, paused=describe(pause), watermark=state.read_watermark(route.name))
    try:
        scan = scan_route(
            route, state=state, queue=queue, open_source=open_source, limits=limits, dry_run=dry_run,
            on_new_mail=on_new_mail, backfill_since=backfill_since,
        )
    except (StateStoreUnavailable, QueueUnavailable):
        raise
    except MailboxThrottled as throttled:
        until, why = throttle_pause(
            throttled, account=route.gmail_user, size=0, budget=download_budget, now=clock()
        )
        pause = state.pause(source_pause_name(route.gmail_user), until, why)
        log.warning("route %s: not scanned: %s", route.name, describe(pause))
        return RouteScan(route.name, paused=describe(pause), watermark=state.read_watermark(route.name))
    except Exception as exc:  # noqa: BLE001 - one route's failure must not stop the others
        error = scrub(str(exc)) or type(exc).__name__
        log.error("route %s: scan failed: %s", route.name, error)
        scan = RouteScan(route.name, error=error, watermark=state.read_watermark(route.name))
    if not dry_run:
        # Kept in state, so `status` can say why a route is not being copied.
        state.record_scan(route.name, scan.error)
    return scan


def _has_mail_above(folder: FolderState, last_uid: int | None) -> bool:
    """Whether EXAMINE's answer shows mail above `last_uid` (None: any mail at all, for a route
    with no watermark): UIDNEXT past it. Mail can be expunged meanwhile, or older than a new
    route's start point: the SEARCH decides what is queued; this only starts the destination's
    login early."""
    if last_uid is None:
        return folder.exists > 0
    return folder.uidnext is not None and folder.uidnext - 1 > last_uid


class _SummaryReader:
    """A chunk's summaries; when the server cannot read one message of it (Dovecot ends the
    session: "BYE FETCH failed: Internal error"), the chunk is halved and each half read in a new
    session, down to the messages that fail alone: those come back as (uid, reason), and the
    rest of the route is scanned as usual."""

    def __init__(self, route: Route, source: SourceMailbox, open_source: OpenSource, uidvalidity: int) -> None:
        self.route, self.source, self.open_source, self.uidvalidity = route, source, open_source, uidvalidity
        self.fresh = False  # after a failure the first session may be gone: new ones from then on

    def read(self, uids: Sequence[int]) -> tuple[list[MessageSummary], list[tuple[int, str]]]:
        try:
            return self._summaries(uids), []
        except (StateStoreUnavailable, QueueUnavailable, MailboxThrottled, UidValidityChanged):
            raise
        except MailSyncerError as exc:
            self.fresh = True
            if len(uids) == 1:
                return [], [(uids[0], scrub(str(exc)) or type(exc).__name__)]
        half = len(uids) // 2
        first, second = self.read(uids[:half]), self.read(uids[half:])
        return first[0] + second[0], first[1] + second[1]

    def _summaries(self, uids: Sequence[int]) -> list[MessageSummary]:
        if not self.fresh:
            return self.source.summaries(uids)
        with self.open_source(self.route) as source:
            folder = source.examine(self.route.gmail_folder)
            if folder.uidvalidity != self.uidvalidity:
                raise UidValidityChanged(f"UIDVALIDITY changed to {folder.uidvalidity} during the scan")
            return source.summaries(uids)


class UidValidityChanged(MailSyncerError):
    """The folder was renumbered during the scan: the next scan starts over with the new UIDs."""


def scan_route(
    route: Route,
    *,
    state: StateStore,
    queue: MessageQueue,
    open_source: OpenSource,
    limits: ScanLimits,
    dry_run: bool = False,
    on_new_mail: Callable[[Route], None] = lambda route: None,
    backfill_since: dt.date | None = None,
) -> RouteScan:
    scan = RouteScan(route.name)
    with open_source(route) as source:
        folder = source.examine(route.gmail_folder)
        mark = state.read_watermark(route.name)
        renumbered = mark is not None and mark.uidvalidity != folder.uidvalidity
        told = not dry_run and _has_mail_above(folder, None if mark is None or renumbered else mark.last_uid)
        if told:
            on_new_mail(route)  # a round trip before the SEARCH that lists it
        summaries = _SummaryReader(route, source, open_source, folder.uidvalidity)
        backlog: list[MessageRef] = []
        if mark is not None and not renumbered:
            uids = source.uids_above(mark.last_uid)
            if backfill_since is not None:
                backlog = _backlog(route, source, summaries, state, folder, mark, backfill_since, scan)
                start = state.read_route_start(route.name)
                if not dry_run and (start is None or backfill_since < start.since):
                    # `status` says where the route starts now, and what is older still.
                    state.record_route_start(route.name, backfill_since, scan.older or 0, None, replace=True)
        else:
            since = route.since or limits.today - dt.timedelta(days=limits.fallback_since_days)
            if renumbered and route.since is None and mark.updated_at:
                # The fallback start rolls forward with the date, and mail that arrived since the
                # watermark last moved is new: reach back to that day (and one more, for the zone
                # SEARCH dates are taken in) when the route was down or quiet longer than its
                # window. What was copied already is recognised by fingerprint and skipped.
                moved = dt.datetime.fromtimestamp(mark.updated_at, dt.timezone.utc).date()
                since = min(since, moved - dt.timedelta(days=1))
            if renumbered:
                log.warning(
                    "route %s: UIDVALIDITY changed from %s to %s; rescanning since %s (copied messages are "
                    "recognised by fingerprint)", route.name, mark.uidvalidity, folder.uidvalidity, since,
                )
            uids = source.uids_since(since)
            scan.since = since
            # A first scan's window is the backfill: later, `drain --since` reaches further back.
            if backfill_since is not None and backfill_since < since:
                uids = source.uids_since(backfill_since)
                scan.since = since = backfill_since
            if mark is None:
                scan.older = max(0, folder.exists - len(uids))
                if not dry_run:  # for `status`: where the route started, what it left behind
                    own = route.since is not None or since == backfill_since
                    state.record_route_start(route.name, since, scan.older, None if own else limits.fallback_since_days)
        scan.found = len(uids) + len(backlog)
        if (uids or backlog) and not dry_run and not told:
            on_new_mail(route)
        if mark is None and uids and not dry_run:
            # No watermark: this store has no record of what was copied before (a first run, a
            # lost state file, another copier before it). Each of these is looked for in the
            # destination before it is appended; set before any is queued.
            state.set_lookup_bound(route.name, folder.uidvalidity, uids[-1])
        # Older messages first (their UIDs are lower), within the same cap.
        backlog_now = backlog[: limits.max_enqueue_per_run]
        pending = uids[: limits.max_enqueue_per_run - len(backlog_now)]
        scan.left_for_next_run = scan.found - len(backlog_now) - len(pending)
        if backlog_now:
            _queue_backlog(route, backlog_now, source, state, queue, folder, scan, dry_run=dry_run)
        for start in range(0, len(pending), CHUNK):
            chunk = pending[start : start + CHUNK]
            found, unreadable = summaries.read(chunk)
            refs = [
                MessageRef(route.name, folder.uidvalidity, summary.uid, fingerprint(summary), summary.size)
                for summary in found
            ]
            for uid, reason in unreadable:
                # Queued all the same, without a fingerprint: the copy meets the fault, and after
                # its attempts the message waits in the dead letters with the reason, not lost.
                log.warning("route %s UID %d: not readable in the source (%s); queued to be tried", route.name, uid, reason)
                refs.append(MessageRef(route.name, folder.uidvalidity, uid, None, None))
            refs.sort(key=lambda ref: ref.uid)
            scan.refs.extend(refs)
            scan.enqueued += len(refs)
            if dry_run:
                scan.listed.extend(source.identities(chunk))
                continue
            queue.send_refs(refs)
            # Up to the chunk's last UID, not its last summary: UIDs expunged since the search
            # have no summary and must not be searched again.
            state.advance_watermark(route.name, folder.uidvalidity, chunk[-1])
        if not dry_run and (mark is None or renumbered) and not scan.left_for_next_run and folder.uidnext:
            # The whole window is queued: every other UID below UIDNEXT is older than the start
            # point. Start the watermark at the folder's top, so the next run asks only for UIDs
            # above it.
            state.advance_watermark(route.name, folder.uidvalidity, folder.uidnext - 1)
    scan.watermark = mark if dry_run else state.read_watermark(route.name)
    if scan.backfilled is not None:
        log.info(
            "route %s: backfill from %s: %d older message(s) never queued, %d known already",
            route.name, scan.since, scan.backfilled, scan.known,
        )
    log.info(
        "route %s: %d new%s, %s %d, %d left for the next run%s",
        route.name, scan.found, f" since {scan.since}" if scan.since else "",
        "would enqueue" if dry_run else "enqueued", scan.enqueued, scan.left_for_next_run,
        f"; {scan.older} older not copied" if scan.older else "",
    )
    return scan


def _backlog(
    route: Route,
    source: SourceMailbox,
    summaries: _SummaryReader,
    state: StateStore,
    folder: FolderState,
    mark: Watermark,
    since: dt.date,
    scan: RouteScan,
) -> list[MessageRef]:
    """A backfill: the references of the messages from `since` on, below the watermark, that this
    store never queued (no claim: neither copied, skipped nor tried). Those it knows are left to
    their records: copied ones stay copied, failed ones wait for `redrive`."""
    from_since = source.uids_since(since)
    older = [uid for uid in from_since if uid <= mark.last_uid]
    backlog: list[MessageRef] = []
    for start in range(0, len(older), CHUNK):
        found, unreadable = summaries.read(older[start : start + CHUNK])
        refs = [MessageRef(route.name, folder.uidvalidity, s.uid, fingerprint(s), s.size) for s in found]
        refs += [MessageRef(route.name, folder.uidvalidity, uid, None, None) for uid, _ in unreadable]
        for ref in sorted(refs, key=lambda ref: ref.uid):
            if state.get_claim(ref.key, fingerprint=ref.fingerprint) is None:
                backlog.append(ref)
            else:
                scan.known += 1
    scan.since, scan.backfilled = since, len(backlog)
    scan.older = max(0, folder.exists - len(from_since))  # older than the backfill still
    return backlog


def _queue_backlog(
    route: Route,
    refs: Sequence[MessageRef],
    source: SourceMailbox,
    state: StateStore,
    queue: MessageQueue,
    folder: FolderState,
    scan: RouteScan,
    *,
    dry_run: bool,
) -> None:
    """Send a backfill's references; the watermark stays where it is (it only moves up)."""
    scan.refs.extend(refs)
    scan.enqueued += len(refs)
    if dry_run:
        for start in range(0, len(refs), CHUNK):
            scan.listed.extend(source.identities([ref.uid for ref in refs[start : start + CHUNK]]))
        return
    # Never queued by this store, so perhaps copied by something before it (another copier, a
    # lost state file): each is looked for in the destination before it is appended.
    state.widen_lookup_bound(route.name, folder.uidvalidity, max(ref.uid for ref in refs))
    for start in range(0, len(refs), CHUNK):
        queue.send_refs(refs[start : start + CHUNK])

