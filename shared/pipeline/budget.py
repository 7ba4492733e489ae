"""A source account's daily download budget: Gmail lets IMAP download about 2,500 MB per account
per day (support.google.com/a/answer/1071518, "Download with IMAP: 2500 MB per day"), and past
it refuses every command with `[OVERQUOTA]`, sometimes for hours.

The budget is kept over a rolling 24 hours, in hourly counts in the state store, so every
process and Lambda of one account spends one budget. A download is counted before it is made
(`reserve`): when the last 24 hours hold no room for it, nothing is counted and the account
waits until enough of the oldest hour has left the window; so once the budget is spent, mail
goes on at the pace at which the day before's downloads age out, and never above the budget in
any 24 hours. Gmail counts what the user's own mail apps download too: the default budget leaves
them a margin, and an `[OVERQUOTA]` all the same (`spent`) fills this account's window up to
the budget, so it waits for that window to pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from shared.state import StateStore

HOUR_SECONDS = 3600
WINDOW_HOURS = 24


def in_megabytes(size: int) -> str:
    """`1,234.5 MB` (10^6 bytes, as Gmail counts); bytes below a tenth of one."""
    return f"{size / 1_000_000:,.1f} MB" if size >= 100_000 else f"{size:,} bytes"


@dataclass(frozen=True)
class Room:
    """Whether a download fits the account's budget now; if not, from when it does."""

    fits: bool
    downloaded: int  # bytes in the last 24 hours, this download included when it fits
    resumes_at: float | None = None  # epoch seconds; None when it fits


@dataclass
class DownloadBudget:
    state: StateStore
    daily_bytes: int
    clock: Callable[[], float] = time.time
    # What `reserving` set aside and no `reserve` has taken yet, by account and thread.
    _ahead: dict[tuple[str, int], int] = field(default_factory=dict, init=False, repr=False)
    _ahead_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @contextmanager
    def reserving(self, account: str, size: int) -> Iterator[None]:
        """Reserve `size` bytes for a batch in one count, if the last 24 hours leave room for
        all of it: `reserve` in this thread then takes from it without counting, and what it
        did not take is given back (to the hour it was counted in) at the end. When there is no
        room for all of it, nothing is set aside and each `reserve` counts its own."""
        slot = (account, threading.get_ident())
        hour = self._hour()
        room = self.reserve(account, size) if size > 0 else None
        if room is not None and room.fits:
            with self._ahead_lock:
                self._ahead[slot] = size
        try:
            yield
        finally:
            with self._ahead_lock:
                left = self._ahead.pop(slot, 0)
            if left:
                self.state.count_download(account, hour, -left)

    def reserve(self, account: str, size: int) -> Room:
        """Count `size` bytes as downloaded from `account` now if the last 24 hours leave room.
        Counted first and looked at after, so that two processes reserving at once cannot both
        take the last room (both may give it up, which errs on the safe side)."""
        slot = (account, threading.get_ident())
        with self._ahead_lock:
            if self._ahead.get(slot, -1) >= size:
                self._ahead[slot] -= size
                return Room(True, 0)
        hour = self._hour()
        self.state.count_download(account, hour, size)
        counts = self._window(account, hour)
        downloaded = sum(counts.values())
        if downloaded <= self.daily_bytes:
            return Room(True, downloaded)
        self.state.count_download(account, hour, -size)
        counts[hour] -= size
        return Room(False, downloaded - size, self._room_at(counts, size))

    def settle(self, account: str, reserved: int, downloaded: int) -> None:
        """Correct a reservation by what the download really was (the size queued is the
        source's RFC822.SIZE, which the fetched bytes may differ from)."""
        if downloaded != reserved:
            self.state.count_download(account, self._hour(), downloaded - reserved)

    def spent(self, account: str, size: int) -> Room:
        """The server says the account's allowance is used up (Gmail's `[OVERQUOTA]`): what it
        counted beyond ours (the user's own apps) is taken to be in this hour, so the account
        waits until the window has room for a download of `size` again."""
        hour = self._hour()
        counts = self._window(account, hour)
        beyond = self.daily_bytes - sum(counts.values())
        if beyond > 0:
            self.state.count_download(account, hour, beyond)
            counts[hour] = counts.get(hour, 0) + beyond
        return Room(False, sum(counts.values()), self._room_at(counts, size))

    def downloaded(self, account: str) -> int:
        """Bytes counted for `account` in the last 24 hours."""
        return sum(self._window(account, self._hour()).values())

    def _hour(self) -> int:
        return int(self.clock() // HOUR_SECONDS)

    def _window(self, account: str, hour: int) -> dict[int, int]:
        return self.state.downloads(account, hour - WINDOW_HOURS + 1)

    def _room_at(self, counts: dict[int, int], size: int) -> float:
        """When the oldest hours have left the window far enough for `size` more bytes: an hour
        h is in the window up to the end of hour h + 23."""
        left = sum(counts.values())
        for hour in sorted(counts):
            left -= counts[hour]
            if left + size <= self.daily_bytes:
                return float((hour + WINDOW_HOURS) * HOUR_SECONDS)
        # Only a download larger than the whole budget gets here (settings forbid one).
        return float((self._hour() + WINDOW_HOURS) * HOUR_SECONDS)
