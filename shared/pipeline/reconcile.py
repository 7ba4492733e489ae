"""`reconcile`: record as copied what a route's destination folder holds already.

For a state store that does not know what was copied before: a first run into a folder another
copier (imapsync, mbsync, a laptop before AWS) filled, a state file that was lost. The source
messages of the route's window are matched with the destination folder's messages by INTERNALDATE
and identity (Message-ID, Date, From, Subject: shared.mailbox.identity), never by bytes or size,
which Outlook.com re-renders. Each match is recorded DONE with its destination UID and
fingerprint, so no copy will be made of it; nothing is appended.

A copier that did not keep INTERNALDATE leaves copies dated when they were made: those are
matched by identity alone, but only with a Message-ID on both sides and a Date, From or Subject
to compare (`Identity.described`). Each destination message stands for one source message
at most, so two source messages alike (a duplicate) need two copies to be both recorded.

The automatic part needs no command: a route's first scan without a watermark makes the copier
look for each message in the destination before appending it (StateStore.set_lookup_bound).
This does the same for a whole window in two FETCHes a side, and says what it found.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.mailbox.port import DestinationMailbox, ListedMessage, fingerprint
from shared.pipeline.scan import OpenSource
from shared.settings import Route
from shared.state import ClaimOutcome, ClaimStatus, HolderProbe, StateStore, UidKey

log = logging.getLogger(__name__)

RECONCILED = "found in the destination by reconcile"


@dataclass
class RouteReconcile:
    route: str
    folder: str  # the destination folder
    since: dt.date
    in_source: int = 0  # source messages in the window
    found: int = 0  # matched with a copy and recorded now (or, dry run: would be)
    by_identity_only: int = 0  # of `found`: their copy's INTERNALDATE differs
    recorded_before: int = 0  # done or skipped in the state store already
    busy: int = 0  # matched, but claimed by a copier running now: left to it
    not_found: int = 0  # no copy: the next drain copies them
    error: str | None = None


def reconcile_routes(
    routes: Sequence[Route],
    *,
    state: StateStore,
    open_source: OpenSource,
    destination: Callable[[], DestinationMailbox],
    since_of: Callable[[Route], dt.date],
    owner: str,
    lease_until: Callable[[], float],
    holder_state: HolderProbe | None = None,
    dry_run: bool = False,
) -> list[RouteReconcile]:
    """Reconcile every route; one route's failure is recorded and the others go on."""
    results = []
    for route in routes:
        try:
            results.append(
                reconcile_route(
                    route, state=state, open_source=open_source, destination=destination(), since=since_of(route),
                    owner=owner, lease_until=lease_until, holder_state=holder_state, dry_run=dry_run,
                )
            )
        except Exception as exc:  # noqa: BLE001 - reported per route; the state store's errors are too
            log.warning("route %s: reconcile failed: %s", route.name, exc)
            results.append(RouteReconcile(route.name, route.outlook_folder, since_of(route), error=str(exc)))
    return results


def reconcile_route(
    route: Route,
    *,
    state: StateStore,
    open_source: OpenSource,
    destination: DestinationMailbox,
    since: dt.date,
    owner: str,
    lease_until: Callable[[], float],
    holder_state: HolderProbe | None = None,
    dry_run: bool = False,
) -> RouteReconcile:
    result = RouteReconcile(route.name, route.outlook_folder, since)
    with open_source(route) as source:
        folder = source.examine(route.gmail_folder)
        uids = source.uids_since(since)
        listed = source.identities(uids)
        fingerprints = {summary.uid: fingerprint(summary) for summary in source.summaries(uids)}
    # A day earlier: servers differ in the zone they take SEARCH dates in.
    copies = _Copies(destination.identities_since(route.outlook_folder, since - dt.timedelta(days=1)))
    result.in_source = len(listed)
    pending = []
    for message in listed:
        key = UidKey(route.name, folder.uidvalidity, message.uid)
        claim = state.get_claim(key, fingerprint=fingerprints.get(message.uid))
        if claim is not None and claim.status.is_final:
            result.recorded_before += 1
            copies.take_uid(claim.dest_uid)  # that copy is this message's, not another's
        else:
            pending.append(message)
    # Exact INTERNALDATE first for every message, so a match by identity alone never takes
    # the copy another message has by date.
    matches = {message.uid: copy for message in pending if (copy := copies.take_dated(message)) is not None}
    for message in pending:
        if message.uid not in matches and (copy := copies.take_undated(message)) is not None:
            matches[message.uid] = copy
            result.by_identity_only += 1
    for message in pending:
        copy = matches.get(message.uid)
        if copy is None:
            result.not_found += 1
            continue
        if dry_run:
            result.found += 1
            continue
        key = UidKey(route.name, folder.uidvalidity, message.uid)
        claimed = state.claim_uid(key, owner, lease_until(), holder_state, fingerprint=fingerprints.get(message.uid))
        if claimed.outcome is ClaimOutcome.FINAL:
            result.recorded_before += 1
        elif claimed.outcome is ClaimOutcome.HELD:
            result.busy += 1  # its holder finds the copy itself before appending
        else:
            state.finalize(
                key, owner, ClaimStatus.DONE, dest_uid=copy.uid, fingerprint=fingerprints.get(message.uid), reason=RECONCILED
            )
            result.found += 1
    log.info(
        "route %s: %d in the source since %s, %d found in %r, %d recorded before, %d not found",
        route.name, result.in_source, since, result.found, route.outlook_folder, result.recorded_before, result.not_found,
    )
    return result


class _Copies:
    """The destination folder's messages not yet matched with a source message."""

    def __init__(self, listed: Sequence[ListedMessage]) -> None:
        self._free = {message.uid: message for message in listed}
        self._by_date: dict[dt.datetime, list[ListedMessage]] = defaultdict(list)
        for message in listed:
            self._by_date[message.internaldate].append(message)

    def take_uid(self, uid: int | None) -> None:
        if uid is not None:
            self._free.pop(uid, None)

    def take_dated(self, source: ListedMessage) -> ListedMessage | None:
        """A free copy with the source's INTERNALDATE and identity (what an APPEND of ours leaves)."""
        return self._take(self._by_date.get(source.internaldate, ()), source)

    def take_undated(self, source: ListedMessage) -> ListedMessage | None:
        """A free copy by identity alone: only with a Message-ID on both sides and more to compare."""
        wanted = source.identity
        if wanted.message_id is None or not wanted.described:
            return None
        # Described: a copy without Date, From and Subject would pass Identity.same_as unread.
        candidates = [
            copy for copy in self._free.values() if copy.identity.message_id == wanted.message_id and copy.identity.described
        ]
        return self._take(candidates, source)

    def _take(self, candidates, source: ListedMessage) -> ListedMessage | None:
        for copy in sorted(candidates, key=lambda message: message.uid):
            if copy.uid in self._free and source.identity.same_as(copy.identity):
                del self._free[copy.uid]
                return copy
        return None
