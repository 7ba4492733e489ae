"""The local consumer loop: receive, copy, acknowledge, until the queue is empty.

The Lambda consumer gets its batches from SQS and hands failures back to it; this loop plays
SQS's part for a local process: it deletes what was acknowledged, puts a failed message back
after a growing delay (copy_batch moves it to the dead letters after MAX_ATTEMPTS failures of
its own), keeps a paused one away until its mailbox takes commands again, and lets messages left
unprocessed to keep their route's order be due when the one ahead of them is.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.outcome_lines import log_outcome
from shared.pipeline.copier import Copier, CopyResult, Outcome, copy_batch, throttled_visibility
from shared.queue import MessageQueue, ReceivedMessage
from shared.queue.port import MAX_VISIBILITY_SECONDS

# A failed message waits 2, 4, 8 ... seconds before its next try, at most this long.
MAX_RETRY_DELAY_SECONDS = 60
# Another process holds the claim and its lease end is unknown: look again after this long.
BUSY_DELAY_SECONDS = 5


@dataclass(frozen=True)
class Wait:
    """What a run waits for while nothing is due: for the person watching, who would otherwise
    see a run sit silently at `101/130 done`."""

    until: float | None  # when the next of this run's waiting messages is due; None: not known
    reason: str  # why that one waits: its route and UID, and the throttle, holder or error
    waiting: int  # messages of this run waiting out a delay, a pause or another's claim
    elsewhere: int  # in flight with another run (a second drain on the same queue)


def retry_delay(receive_count: int) -> int:
    return min(2**receive_count, MAX_RETRY_DELAY_SECONDS)


def busy_delay(busy_until: float | None, now: float) -> int:
    """Until the holder's lease runs out: by then a killed holder's claim can be taken, and a live
    holder has finished (each look costs a receive, and enough of them dead-letter a message)."""
    if busy_until is None:
        return BUSY_DELAY_SECONDS
    return max(1, min(math.ceil(busy_until - now), MAX_VISIBILITY_SECONDS))


def consume_queue(
    queue: MessageQueue,
    copier: Copier,
    *,
    visibility_timeout: int,
    on_result: Callable[[CopyResult], None] = lambda result: None,
    max_pause_wait: float | None = None,
    on_wait: Callable[[Wait], None] = lambda wait: None,
    lanes: Sequence[Copier] = (),
) -> int:
    """Copy until nothing is queued or in flight (failed messages either succeed on a retry or
    reach the dead letters first). Messages that wait for a pause longer than `max_pause_wait`
    seconds (Gmail's download limit: hours; a holder stopped past its lease) are not waited for:
    they stay queued, due when the wait ends, and so do those of their routes behind them.
    Returns how many were left so. While nothing is due, `on_wait` is told what the run waits for.
    `lanes`: copiers for the routes of other accounts at the same time (see copy_batch)."""
    parked: dict[str, float] = {}  # message id -> when due: waiting longer than max_pause_wait
    waiting: dict[str, tuple[float, str]] = {}  # message id -> when due, and why it waits
    while True:
        messages = queue.receive(queue.max_receive, visibility_timeout=visibility_timeout)
        if not messages:
            depths = queue.depths()
            if depths.visible == 0 and depths.in_flight == 0:
                return 0
            # Messages are waiting out a retry delay: long-poll until one is back.
            messages = queue.receive(queue.max_receive, visibility_timeout=visibility_timeout, wait_seconds=2)
            if not messages and 0 < depths.in_flight <= _waiting_long(queue, parked, max_pause_wait):
                # All in flight wait long; whatever is visible is of their routes, behind them.
                return depths.in_flight + depths.visible
            if not messages:
                on_wait(_what_it_waits_for(waiting, depths.in_flight))
                continue
        try:
            results = copy_batch(messages, copier=copier, queue=queue, lanes=lanes)
        except KeyboardInterrupt:
            _make_due_again(queue, messages)
            raise
        done = [message for message, result in results if result.outcome.acknowledged and not result.outcome.moved]
        queue.delete_many(done)  # one commit for the batch
        for message, result in results:
            parked.pop(message.message_id, None)
            waiting.pop(message.message_id, None)
            if result.outcome.acknowledged:
                pass  # deleted above, or in the dead letters already
            elif result.outcome is Outcome.FAILED:
                delay = retry_delay(message.receive_count)
                queue.extend_visibility(message, delay)
                waiting[message.message_id] = (time.time() + delay, f"{_named(result)} failed, tried again: {result.detail}")
            elif result.outcome is Outcome.BUSY:
                delay = busy_delay(result.busy_until, time.time())
                queue.extend_visibility(message, delay)
                waiting[message.message_id] = (time.time() + delay, f"{_named(result)} {result.detail}")
                if max_pause_wait is not None and delay > max_pause_wait:
                    parked[message.message_id] = time.time() + delay
            else:
                # Paused, or held back behind a message of its route: due again when its mailbox
                # takes commands again (the server's wait), or as soon as its route allows.
                waited = throttled_visibility(result)
                queue.extend_visibility(message, 0 if waited is None else waited)
                if waited:
                    waiting[message.message_id] = (time.time() + waited, f"{_named(result)}: {result.detail}")
                if waited is not None and max_pause_wait is not None and waited > max_pause_wait:
                    parked[message.message_id] = time.time() + waited
            if result.outcome is not Outcome.UNPROCESSED:
                # Its log line, as the Lambda consumer writes it; the routine ones at DEBUG, where
                # the CLI's progress line and summary say the same.
                log_outcome(result, message_id=message.message_id, routine_level=logging.DEBUG)
                on_result(result)


def _named(result: CopyResult) -> str:
    return "a message" if result.key is None else f"route {result.key.route} UID {result.key.uid}"


def _what_it_waits_for(waiting: dict[str, tuple[float, str]], in_flight: int) -> Wait:
    now = time.time()
    ahead = sorted(entry for entry in waiting.values() if entry[0] > now)
    if not ahead:
        return Wait(None, "messages in flight with another run", 0, in_flight)
    until, reason = ahead[0]
    return Wait(until, reason, len(ahead), max(0, in_flight - len(ahead)))


def _make_due_again(queue: MessageQueue, messages: Sequence[ReceivedMessage]) -> None:
    """Interrupted (Ctrl-C, SIGTERM): the batch received is due again at once, not after its
    visibility timeout, so that the next run finds it. Those finished in it are acknowledged
    then (their claims are final)."""
    for message in messages:
        try:
            queue.extend_visibility(message, 0)
        except Exception:  # noqa: BLE001 - on the way out: it comes back after its timeout anyway
            return


def _waiting_long(queue: MessageQueue, parked: dict[str, float], max_pause_wait: float | None) -> int:
    """In-flight messages due only after more than `max_pause_wait`: those of earlier runs too,
    where the queue can tell; else this run's own (`parked`)."""
    if max_pause_wait is None:
        return 0
    counted = queue.in_flight_past(max_pause_wait)
    if counted is not None:
        return counted
    later = time.time() + max_pause_wait
    return sum(1 for due in parked.values() if due > later)
