"""`drain --watch`: stay connected after a drain and copy each route's new mail within seconds.

Each watched route has an IDLE session of its own on its source folder, in a thread of its own,
so the main thread stays free to copy (and to take Ctrl-C). A route becomes due when its session
reports a change, when its session is (re)opened (whatever arrived while it was down is found
then), and for every route every `rescan_seconds` (IDLE can miss things: a notification lost
with a connection, a route without a session). The main thread runs `copy_round` on the due
routes: the caller's scan and copy, the same that drain runs.

A session is re-IDLEd every `reidle_seconds`: RFC 2177 (section 3) lets a server log off a
client idling past its inactivity timeout and advises re-issuing IDLE "at least every 29
minutes"; servers and NAT boxes drop quiet connections sooner (Gmail within about 10 to 29
minutes, issue 14). A session that fails is reopened after a delay that doubles, up to
`max_retry_seconds`, and back to the first once a session has waited through an IDLE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.mailbox.port import FolderWatch
from shared.redaction import scrub
from shared.settings import Route, routes_by_account

log = logging.getLogger("mail_syncer.watch")

OpenWatch = Callable[[Route], FolderWatch]


@dataclass(frozen=True)
class WatchTimes:
    reidle_seconds: float
    rescan_seconds: float
    first_retry_seconds: float = 1.0
    max_retry_seconds: float = 60.0

    def retry_delay(self, failures_in_a_row: int) -> float:
        return min(self.first_retry_seconds * 2 ** (failures_in_a_row - 1), self.max_retry_seconds)


def idle_budget(routes: Sequence[Route], spare: Callable[[str, int], int]) -> tuple[list[Route], list[Route]]:
    """The routes that get an IDLE session, and those left to the rescan alone. `spare(account,
    wanted)` says how many sessions of the account's budget may idle (Gmail allows 15 a account,
    and an IDLE session is one of them); the account's first routes get them."""
    idle, rescanned = [], []
    for user, its_routes in routes_by_account(routes).items():
        granted = spare(user, len(its_routes))
        idle += its_routes[:granted]
        rescanned += its_routes[granted:]
    return idle, rescanned


class _DueRoutes:
    """Route names marked due by the sessions' threads, taken by the main thread."""

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._stopped = False
        self._changed = threading.Condition()

    def mark(self, name: str) -> None:
        with self._changed:
            self._names.add(name)
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def take(self, timeout: float) -> set[str]:
        """The names marked since the last take, waiting up to `timeout` for one (or a stop)."""
        with self._changed:
            self._changed.wait_for(lambda: self._names or self._stopped, timeout)
            names, self._names = self._names, set()
            return names


class RouteWatch:
    """`run()` copies what arrives until `stop()` (from any thread) or KeyboardInterrupt.

    `on_lost(route, error, delay)` is told when a route's session failed (or could not be
    opened) and how many seconds until it is tried again."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        idle_on: Sequence[Route],
        open_watch: OpenWatch,
        copy_round: Callable[[Sequence[Route]], None],
        times: WatchTimes,
        on_lost: Callable[[Route, str, float], None] = lambda route, error, delay: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._routes = list(routes)
        self._copy_round = copy_round
        self._times = times
        self._clock = clock
        self._due = _DueRoutes()
        self._stopped = threading.Event()
        self._sessions = [_IdleSession(route, open_watch, self._due, times, self._stopped, on_lost) for route in idle_on]

    def run(self) -> None:
        for session in self._sessions:
            session.start()
        next_rescan = self._clock() + self._times.rescan_seconds
        try:
            while not self._stopped.is_set():
                names = self._due.take(timeout=max(0.0, next_rescan - self._clock()))
                if self._stopped.is_set():
                    return
                if self._clock() >= next_rescan:
                    names = {route.name for route in self._routes}
                    next_rescan = self._clock() + self._times.rescan_seconds
                due = [route for route in self._routes if route.name in names]
                if due:
                    self._copy_round(due)
        finally:
            self.stop()

    def stop(self) -> None:
        self._stopped.set()
        self._due.stop()
        for session in self._sessions:
            session.close()

    def join(self, timeout: float) -> None:
        """Wait for the sessions' threads to end (after `stop`)."""
        deadline = time.monotonic() + timeout
        for session in self._sessions:
            session.thread.join(max(0.0, deadline - time.monotonic()))


class _IdleSession:
    """One route's IDLE session, kept open (reopened after a failure) in a thread of its own."""

    def __init__(
        self,
        route: Route,
        open_watch: OpenWatch,
        due: _DueRoutes,
        times: WatchTimes,
        stopped: threading.Event,
        on_lost: Callable[[Route, str, float], None],
    ) -> None:
        self._route = route
        self._open_watch = open_watch
        self._due = due
        self._times = times
        self._stopped = stopped
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._watch: FolderWatch | None = None
        # A daemon: a thread blocked in a connect must not keep an interrupted process alive.
        self.thread = threading.Thread(target=self._run, name=f"watch-{route.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.close()  # wakes a wait_for_change in the thread

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                watch = self._open_watch(self._route)
            except Exception as exc:  # noqa: BLE001 - any failure: try again later
                failures += 1
                self._lost(exc, failures)
                continue
            with self._lock:
                self._watch = watch
            try:
                if self._stopped.is_set():
                    return
                # (Re)opened: what arrived while there was no session is found by a scan now;
                # what arrives from here on, the server reports (IDLE starts from the EXAMINE).
                self._due.mark(self._route.name)
                while not self._stopped.is_set():
                    changed = watch.wait_for_change(self._times.reidle_seconds)
                    failures = 0
                    if changed:
                        self._due.mark(self._route.name)
            except Exception as exc:  # noqa: BLE001 - the session is lost: open another
                if self._stopped.is_set():
                    return
                failures += 1
                self._lost(exc, failures)
            finally:
                with self._lock:
                    self._watch = None
                watch.close()

    def _lost(self, error: BaseException, failures: int) -> None:
        delay = self._times.retry_delay(failures)
        text = scrub(str(error)) or type(error).__name__
        log.warning("route %s: IDLE session lost (%s); opening another in %g s", self._route.name, text, delay)
        self._on_lost(self._route, text, delay)
        self._stopped.wait(delay)
