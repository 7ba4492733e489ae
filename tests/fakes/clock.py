"""A clock the test moves: pass it wherever the code takes `clock` or builds `lease_until`."""

from __future__ import annotations

import threading

# An epoch second in November 2023: far enough from today that code mixing this clock with the
# real one (time.time()) shows up as a lease long expired, not as a subtle off-by-a-second.
START = 1_700_000_000.0


class FakeClock:
    """Epoch seconds that stand still until `advance` moves them (safe across threads)."""

    def __init__(self, start: float = START) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    @property
    def now(self) -> float:
        return self()

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        with self._lock:
            self._now += seconds

    def advance_to(self, when: float) -> None:
        """Move to `when` if that is later; never back."""
        with self._lock:
            self._now = max(self._now, when)
