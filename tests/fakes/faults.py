"""Faults queued per operation, for the fakes of the ports (mailbox, queue).

A fake calls `script.before(operation)` at the start of each operation. The next step queued for
it runs first: it may raise (the fault), return `Answer(value)` (the operation returns that value
instead of doing its work), or return None (the operation goes on as usual, e.g. after a hook
that changed the world). Steps are used up in the order they were queued.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Answer:
    """What the operation returns instead of doing its work."""

    value: Any


Step = Callable[[], "Answer | None"]


class FaultScript:
    def __init__(self, operations: frozenset[str]) -> None:
        self._operations = operations  # a misspelt operation name fails the test at once
        self._steps: dict[str, deque[Step]] = defaultdict(deque)
        self._lock = threading.Lock()

    def queue(self, operation: str, step: Step, times: int = 1) -> None:
        if operation not in self._operations:
            raise ValueError(f"no operation {operation!r}; one of {sorted(self._operations)}")
        with self._lock:
            self._steps[operation].extend([step] * times)

    def raise_(self, operation: str, error: BaseException, times: int = 1, *, after: int = 0) -> None:
        """`after` calls work as usual, then `times` calls raise `error`."""

        def fail() -> None:
            raise error

        if after:
            self.queue(operation, lambda: None, after)
        self.queue(operation, fail, times)

    def answer(self, operation: str, value: Any, times: int = 1) -> None:
        self.queue(operation, lambda: Answer(value), times)

    def before(self, operation: str) -> Answer | None:
        with self._lock:
            steps = self._steps.get(operation)
            step = steps.popleft() if steps else None
        return step() if step is not None else None

    def pending(self, operation: str) -> int:
        """Steps not yet used (a test can check its fault was reached)."""
        with self._lock:
            return len(self._steps.get(operation, ()))

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()
