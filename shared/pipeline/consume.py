"""The local consumer loop: receive, copy, acknowledge, until the queue is empty.

The Lambda consumer gets its batches from SQS and hands failures back to it; this loop plays
SQS's part for a local process: it deletes what was acknowledged, puts a failed message back
after a growing delay, or after the wait a throttling server asked for (the queue dead-letters
it after its max receive count), and lets messages left unprocessed to keep their route's order
be received again at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from shared.pipeline.copier import Copier, CopyResult, Outcome, copy_batch, throttled_visibility
from shared.queue import MAX_BATCH, MessageQueue
from shared.queue.port import MAX_VISIBILITY_SECONDS

# A failed message waits 2, 4, 8 ... seconds before its next try, at most this long.
MAX_RETRY_DELAY_SECONDS = 60
# Another process holds the claim and its lease end is unknown: look again after this long.
BUSY_DELAY_SECONDS = 5


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
) -> None:
    """Copy until nothing is queued or in flight (failed messages either succeed on a retry or
    reach the dead letters first)."""
    while True:
        messages = queue.receive(MAX_BATCH, visibility_timeout=visibility_timeout)
        if not messages:
            depths = queue.depths()
            if depths.visible == 0 and depths.in_flight == 0:
                return
            # Messages are waiting out a retry delay: long-poll until one is back.
            messages = queue.receive(MAX_BATCH, visibility_timeout=visibility_timeout, wait_seconds=2)
        for message, result in copy_batch(messages, copier=copier, queue=queue):
            if result.outcome is Outcome.QUARANTINED:
                pass  # already moved to the dead letters
            elif result.outcome.acknowledged:
                queue.delete(message)
            elif result.outcome is Outcome.FAILED:
                # A throttle is waited out as the server asked, instead of the growing delay.
                throttled = throttled_visibility(result)
                queue.extend_visibility(message, retry_delay(message.receive_count) if throttled is None else throttled)
            elif result.outcome is Outcome.BUSY:
                queue.extend_visibility(message, busy_delay(result.busy_until, time.time()))
            else:  # unprocessed: due again as soon as its route's failed message allows
                queue.extend_visibility(message, 0)
            if result.outcome is not Outcome.UNPROCESSED:
                on_result(result)
