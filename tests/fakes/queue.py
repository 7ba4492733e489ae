"""An in-memory `MessageQueue` with SQS FIFO's semantics, as the SQLite queue has them.

FIFO per group: while a message of a group is in flight (received, not yet deleted or visible
again) nothing later of that group is delivered. A receive counts; a message due for its
(max_receive_count + 1)-th receive is dead-lettered instead, and one handed back after its last
allowed receive is dead-lettered at once. Sends with a deduplication id sent within 5 minutes are
dropped. A receipt is current until the message is received again: a stale one changes nothing.
It passes the queue contract suite (tests/integration/test_queue_contract.py).

Time: visibility follows `clock` (epoch seconds). A waiting receive waits in real time, woken by
sends; with `waits_move_clock=True` (and a FakeClock) it waits in simulated time instead, moving
the clock to the moment the next in-flight message is visible again, at most `wait_seconds`, so
a consume loop that waits out retry delays runs in no time.

For tests: `send_raw` (a body no producer of ours sends), `calls` (what was done to which
message), `fail_next` (e.g. QueueUnavailable on the second send), `bodies()`, `visible_at()`.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
from tests.fakes.faults import FaultScript

# As in SQS FIFO.
DEDUP_WINDOW_SECONDS = 300
# As both adapters cut a quarantine reason.
MAX_REASON_CHARS = 1000
# A real-time wait looks again this often (a clock moved by the test wakes nobody).
POLL_INTERVAL_SECONDS = 0.05

OPERATIONS = frozenset(
    {"send_refs", "receive", "delete", "extend_visibility", "quarantine", "depths", "dead_letters", "redrive"}
)


@dataclass
class QueuedMessage:
    seq: int  # send order
    message_id: str
    group_id: str
    body: str
    sent_at: float
    visible_at: float = 0.0
    receive_count: int = 0
    receipt: str | None = None  # of the latest receive


@dataclass(frozen=True)
class _Dead:
    letter: DeadLetter
    receive_count: int


class FakeQueue(MessageQueue):
    def __init__(
        self,
        *,
        max_receive_count: int = 5,
        clock: Callable[[], float] = time.time,
        waits_move_clock: bool = False,
    ) -> None:
        if max_receive_count < 1:
            raise ValueError(f"max_receive_count: {max_receive_count}, expected at least 1")
        if waits_move_clock and not hasattr(clock, "advance_to"):
            raise ValueError("waits_move_clock needs a clock with advance_to (tests.fakes.FakeClock)")
        self.max_receive_count = max_receive_count
        self._clock = clock
        self._waits_move_clock = waits_move_clock
        self._messages: list[QueuedMessage] = []  # in send order
        self._dead: list[_Dead] = []  # oldest first
        self._dedup: dict[str, float] = {}
        self._seq = itertools.count(1)
        self._changed = threading.Condition(threading.RLock())
        self._script = FaultScript(OPERATIONS)
        # ("send", message_id), ("delete", message_id), ("extend_visibility", message_id, seconds),
        # ("quarantine", message_id, reason), ("dead", message_id, reason): in the order they happened.
        self.calls: list[tuple] = []

    def describe(self) -> str:
        return "in-memory queue (tests.fakes)"

    # -- for the test ---------------------------------------------------------------------------
    def fail_next(self, operation: str, error: BaseException, times: int = 1, *, after: int = 0) -> None:
        """After `after` calls that work, `times` calls to `operation` raise `error` (e.g.
        QueueUnavailable) before doing anything."""
        self._script.raise_(operation, error, times, after=after)

    def send_raw(self, body: str, group_id: str) -> str:
        """Send any body, as a foreign or broken sender would (no deduplication): its message id."""
        with self._changed:
            message_id = self._append(group_id, body)
            self._changed.notify_all()
            return message_id

    def bodies(self) -> list[str]:
        """Bodies on the queue (visible or in flight), in send order."""
        with self._changed:
            return [message.body for message in self._messages]

    def refs(self) -> list[MessageRef]:
        """The queued bodies as references (each must parse)."""
        return [MessageRef.from_body(body) for body in self.bodies()]

    def visible_at(self, message_id: str) -> float:
        with self._changed:
            return self._find(message_id).visible_at

    def calls_to(self, operation: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == operation]

    # -- MessageQueue ---------------------------------------------------------------------------
    def send_refs(self, refs: Sequence[MessageRef]) -> None:
        self._script.before("send_refs")  # a fault here sends nothing: all or none, as SQLite's
        with self._changed:
            now = self._clock()
            self._dedup = {key: at for key, at in self._dedup.items() if at > now - DEDUP_WINDOW_SECONDS}
            for ref in refs:
                if ref.dedup_id in self._dedup:
                    continue
                self._dedup[ref.dedup_id] = now
                self._append(ref.group_id, ref.to_body())
            self._changed.notify_all()

    def receive(
        self, max_messages: int = MAX_BATCH, visibility_timeout: int = 60, wait_seconds: int = 0
    ) -> list[ReceivedMessage]:
        check_receive_arguments(max_messages, visibility_timeout, wait_seconds)
        self._script.before("receive")
        deadline = time.monotonic() + wait_seconds
        with self._changed:
            while True:
                received = self._receive_now(max_messages, visibility_timeout)
                if received or wait_seconds == 0:
                    return received
                if self._waits_move_clock:
                    return self._receive_after_simulated_wait(max_messages, visibility_timeout, wait_seconds)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._changed.wait(min(POLL_INTERVAL_SECONDS, remaining))

    def delete(self, message: ReceivedMessage) -> None:
        self._script.before("delete")
        with self._changed:
            self.calls.append(("delete", message.message_id))
            current = self._current(message)
            if current is not None:
                self._messages.remove(current)
            self._changed.notify_all()

    def extend_visibility(self, message: ReceivedMessage, seconds: int) -> None:
        check_visibility(seconds)
        self._script.before("extend_visibility")
        with self._changed:
            self.calls.append(("extend_visibility", message.message_id, seconds))
            current = self._current(message)
            if current is None:
                return  # a stale receipt
            if current.receive_count >= self.max_receive_count:
                # Handed back after its last allowed receive: no receive can take it again.
                self._move_to_dead_letters(current, self._max_receive_count_reason())
            else:
                current.visible_at = self._clock() + seconds
            self._changed.notify_all()

    def quarantine(self, message: ReceivedMessage, reason: str) -> None:
        self._script.before("quarantine")
        with self._changed:
            self.calls.append(("quarantine", message.message_id, reason))
            current = self._current(message)
            if current is not None:
                self._move_to_dead_letters(current, reason[:MAX_REASON_CHARS])
            self._changed.notify_all()

    def depths(self) -> QueueDepths:
        self._script.before("depths")
        with self._changed:
            now = self._clock()
            visible = sum(1 for message in self._messages if message.visible_at <= now)
            return QueueDepths(visible=visible, in_flight=len(self._messages) - visible, dead=len(self._dead))

    def in_flight_past(self, seconds: float) -> int | None:
        self._script.before("in_flight_past")
        with self._changed:
            due = self._clock() + seconds
            return sum(1 for message in self._messages if message.visible_at > due)

    def dead_letters(self, limit: int = DEAD_LETTER_PEEK_LIMIT) -> list[DeadLetter]:
        self._script.before("dead_letters")
        with self._changed:
            return [dead.letter for dead in self._dead[:limit]]

    def redrive(self, select: Callable[[DeadLetter], bool] | None = None, *, limit: int | None = None) -> Redriven:
        if limit is not None and limit < 0:
            raise ValueError(f"limit: {limit}, expected 0 or more")
        self._script.before("redrive")
        with self._changed:
            moved = []
            for dead in list(self._dead):
                if limit is not None and len(moved) >= limit:
                    break
                if select is not None and not select(dead.letter):
                    continue
                # A new message, as SQS makes one: a new id, received 0 times, behind its group.
                self._append(dead.letter.group_id, dead.letter.body)
                self._dead.remove(dead)
                moved.append(dead.letter)
            self._changed.notify_all()
            return Redriven(moved=tuple(moved))

    # -- inside ---------------------------------------------------------------------------------
    def _append(self, group_id: str, body: str) -> str:
        message_id = uuid.uuid4().hex
        self._messages.append(QueuedMessage(next(self._seq), message_id, group_id, body, sent_at=self._clock()))
        self.calls.append(("send", message_id))
        return message_id

    def _receive_now(self, max_messages: int, visibility_timeout: int) -> list[ReceivedMessage]:
        now = self._clock()
        # Groups with a message in flight when this receive began deliver nothing more; later
        # messages of a group delivered by this same receive do not block it.
        blocked = {message.group_id for message in self._messages if message.visible_at > now}
        received: list[ReceivedMessage] = []
        for message in list(self._messages):
            if len(received) >= max_messages:
                break
            if message.visible_at > now or message.group_id in blocked:
                continue
            if message.receive_count >= self.max_receive_count:
                # As in SQS: dead-lettered instead of delivered, which unblocks its group.
                self._move_to_dead_letters(message, self._max_receive_count_reason())
                continue
            message.receive_count += 1
            message.receipt = uuid.uuid4().hex  # every earlier receipt is stale now
            message.visible_at = now + visibility_timeout
            received.append(
                ReceivedMessage(message.receipt, message.body, message.message_id, message.group_id, message.receive_count)
            )
        return received

    def _receive_after_simulated_wait(
        self, max_messages: int, visibility_timeout: int, wait_seconds: int
    ) -> list[ReceivedMessage]:
        """Let time pass until the next in-flight message is due again, at most `wait_seconds`."""
        now = self._clock()
        next_due = min((message.visible_at for message in self._messages if message.visible_at > now), default=None)
        waited_until = now + wait_seconds if next_due is None else min(next_due, now + wait_seconds)
        self._clock.advance_to(waited_until)
        return self._receive_now(max_messages, visibility_timeout)

    def _move_to_dead_letters(self, message: QueuedMessage, reason: str) -> None:
        self._messages.remove(message)
        letter = DeadLetter(message.message_id, message.group_id, message.body, reason)
        self._dead.append(_Dead(letter, message.receive_count))
        self.calls.append(("dead", message.message_id, reason))

    def _current(self, message: ReceivedMessage) -> QueuedMessage | None:
        """The queued message if `message`'s receipt is its latest, else None (stale or gone)."""
        for queued in self._messages:
            if queued.message_id == message.message_id and queued.receipt == message.receipt:
                return queued
        return None

    def _find(self, message_id: str) -> QueuedMessage:
        for queued in self._messages:
            if queued.message_id == message_id:
                return queued
        raise KeyError(f"message {message_id} is not on the queue")

    def _max_receive_count_reason(self) -> str:
        return f"max receive count {self.max_receive_count} exceeded"
