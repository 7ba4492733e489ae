"""Dead letters: why each one is there (for `status`), and `redrive`, which puts them back.

A message reaches the dead letters after its max receive count (the queue moves it; its `FAIL#`
record in state says why it failed), or at once when its body is not a message reference
(quarantined, with the reason). Redrive moves references of configured routes back to the main
queue; the UID claim makes a message that was copied meanwhile a harmless acknowledgement.

Bodies that are not references of a configured route are left in the dead letters and reported:
put back, they would only be quarantined again at once. `include_malformed` moves them anyway.
Without a route or count filter, SQS may move everything itself (its message move task); that
path is taken only when the dead letters looked at hold no such body, and one hidden deeper in
a FIFO group would go back with the rest and be quarantined again at once, not retried.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shared.errors import MalformedMessageRef
from shared.message_ref import MessageRef
from shared.queue import DeadLetter, MessageQueue
from shared.settings import Route
from shared.state import StateStore


@dataclass
class DeadLetterCounts:
    count: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        self.count += 1
        self.reasons[reason] += 1


@dataclass(frozen=True)
class DeadLetterReport:
    by_route: dict[str, DeadLetterCounts]  # configured routes that have dead letters
    not_routed: DeadLetterCounts  # bodies that are not references of a configured route
    # False when only part of the dead letters could be looked at: SQS FIFO shows no message of
    # a group behind one in flight, and at most `limit` are looked at.
    complete: bool


@dataclass(frozen=True)
class RedriveReport:
    moved_by_route: Counter[str]  # route (or "group G, not a reference") -> how many moved
    moved_by_service: int  # moved by SQS's message move task, which gives a count only
    skipped: tuple[tuple[DeadLetter, str], ...]  # left in the dead letters, with why
    dry_run: bool
    complete: bool = True  # dry run: False when only part of the dead letters could be seen

    @property
    def total(self) -> int:
        return sum(self.moved_by_route.values()) + self.moved_by_service


def reference_of(dead: DeadLetter, routes: Mapping[str, Route]) -> MessageRef | str:
    """The message reference a dead letter carries, or why it carries none a route can use."""
    try:
        ref = MessageRef.from_body(dead.body)
    except MalformedMessageRef as exc:
        return str(exc)
    if ref.route not in routes:
        return f"queue body.route: route {ref.route!r} is not configured"
    return ref


def report_dead_letters(
    queue: MessageQueue, state: StateStore, routes: Mapping[str, Route], *, limit: int | None = None
) -> DeadLetterReport:
    """Dead letters per route, each with the reason recorded for it."""
    dead_letters = queue.dead_letters() if limit is None else queue.dead_letters(limit)
    by_route: dict[str, DeadLetterCounts] = {}
    not_routed = DeadLetterCounts()
    for dead in dead_letters:
        ref = reference_of(dead, routes)
        if isinstance(ref, str):
            not_routed.add(dead.reason)
        else:
            by_route.setdefault(ref.route, DeadLetterCounts()).add(_why_dead(dead, ref, state))
    complete = len(dead_letters) >= queue.depths().dead
    return DeadLetterReport(by_route, not_routed, complete)


def _why_dead(dead: DeadLetter, ref: MessageRef, state: StateStore) -> str:
    failure = state.get_failure(ref.key)
    if failure is not None:
        return f"{failure.error_class}: {failure.error_text}"
    claim = state.get_claim(ref.key, fingerprint=ref.fingerprint)
    if claim is not None and claim.status.is_final:
        return f"{dead.reason}; since then {claim.status.value} (a redrive just acknowledges it)"
    return (
        f"{dead.reason} without a failure of its own "
        "(held back behind a failing message of its route, or its consumer stopped)"
    )


def redrive_dead_letters(
    queue: MessageQueue,
    routes: Mapping[str, Route],
    *,
    route: str | None = None,
    max_messages: int | None = None,
    include_malformed: bool = False,
    dry_run: bool = False,
) -> RedriveReport:
    """Put dead letters back on the main queue: all, or one route's, at most `max_messages`."""
    if route is not None and route not in routes:
        raise ValueError(f"unknown route {route!r} (routes: {', '.join(routes)})")
    skipped: dict[str, tuple[DeadLetter, str]] = {}

    def select(dead: DeadLetter) -> bool:
        if route is not None and dead.group_id != route:
            return False  # another route's (the group is the route): not asked about
        ref = reference_of(dead, routes)
        if isinstance(ref, str):
            if include_malformed:
                return True
            skipped[dead.message_id] = (dead, ref)
            return False
        return route is None or ref.route == route

    if dry_run:
        seen = queue.dead_letters()
        chosen = [dead for dead in seen if select(dead)][:max_messages]
        complete = len(seen) >= queue.depths().dead
        return RedriveReport(_by_route(chosen, routes), 0, tuple(skipped.values()), dry_run=True, complete=complete)
    unfiltered = route is None and max_messages is None
    move_all = unfiltered and (include_malformed or all(select(dead) for dead in queue.dead_letters()))
    skipped.clear()  # what the look above found; the move below reports again what it leaves
    if move_all:
        # Nothing to leave behind among those that can be seen: the queue service may move them all.
        redriven = queue.redrive()
    else:
        redriven = queue.redrive(select, limit=max_messages)
    return RedriveReport(
        _by_route(redriven.moved, routes), redriven.moved_by_service, tuple(skipped.values()), dry_run=False
    )


def _by_route(moved: Iterable[DeadLetter], routes: Mapping[str, Route]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for dead in moved:
        ref = reference_of(dead, routes)
        counts[f"group {dead.group_id or '-'}, not a reference" if isinstance(ref, str) else ref.route] += 1
    return counts
