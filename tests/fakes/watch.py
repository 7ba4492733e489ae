"""`FakeWatches`: the open_watch of `shared.pipeline.watch.RouteWatch`, IDLE sessions in memory.

    watches = FakeWatches()
    watch = RouteWatch(routes, idle_on=routes, open_watch=watches.open, ...)
    watches.wait_until_idle("work")            # a session of the route is in wait_for_change
    watches.notify("work")                     # the server reports a change: that wait returns True
    watches.drop("work", before=action)        # the session is lost: `action()`, then the wait raises
    watches.fail_opens("work", 2)              # the next 2 opens of the route raise ConnectionLost

Recorded: `opened[route]` (sessions opened), `timeouts[route]` (each wait's timeout), `closed`.
A wait that nobody wakes returns False after its timeout, in real time.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable

from shared.settings import Route
from tests.fakes.mailbox import ConnectionLost


class FakeFolderWatch:
    def __init__(self, owner: FakeWatches, route: str) -> None:
        self._owner = owner
        self.route = route
        self.closed = False
        self.waiting = False
        self._news: list[str] = []  # "change" or "drop"

    def wait_for_change(self, timeout: float) -> bool:
        owner = self._owner
        with owner.changed:
            if self.closed:
                raise ConnectionLost("session closed")
            owner.timeouts[self.route].append(timeout)
            self.waiting = True
            owner.changed.notify_all()
            owner.changed.wait_for(lambda: self._news or self.closed, timeout)
            self.waiting = False
            if self.closed:
                raise ConnectionLost("session closed")
            news, self._news = self._news, []
        if "drop" in news:
            action = owner.before_drop.pop(self.route, None)
            if action is not None:
                action()
            self.close()
            raise ConnectionLost(f"route {self.route}: connection reset by the fake server")
        return "change" in news

    def close(self) -> None:
        with self._owner.changed:
            self.closed = True
            self._owner.changed.notify_all()

    def tell(self, news: str) -> None:
        with self._owner.changed:
            self._news.append(news)
            self._owner.changed.notify_all()


class FakeWatches:
    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.opened: Counter[str] = Counter()
        self.timeouts: dict[str, list[float]] = defaultdict(list)
        self.before_drop: dict[str, Callable[[], None]] = {}
        self._failing_opens: Counter[str] = Counter()
        self._current: dict[str, FakeFolderWatch] = {}

    def open(self, route: Route) -> FakeFolderWatch:
        with self.changed:
            if self._failing_opens[route.name]:
                self._failing_opens[route.name] -= 1
                raise ConnectionLost(f"route {route.name}: connection refused by the fake server")
            self.opened[route.name] += 1
            watch = self._current[route.name] = FakeFolderWatch(self, route.name)
            return watch

    def fail_opens(self, route: str, times: int) -> None:
        with self.changed:
            self._failing_opens[route] += times

    def wait_until_idle(self, route: str, *, sessions: int = 1, timeout: float = 5.0) -> FakeFolderWatch:
        """The route's current session once it waits in IDLE, the `sessions`-th opened."""
        with self.changed:
            ok = self.changed.wait_for(
                lambda: self.opened[route] >= sessions and self._current[route].waiting and not self._current[route].closed,
                timeout,
            )
            assert ok, f"route {route}: no session #{sessions} waiting in IDLE within {timeout} s"
            return self._current[route]

    def notify(self, route: str) -> None:
        self.wait_until_idle(route, sessions=self.opened[route]).tell("change")

    def drop(self, route: str, *, before: Callable[[], None] | None = None) -> None:
        if before is not None:
            self.before_drop[route] = before
        self.wait_until_idle(route, sessions=self.opened[route]).tell("drop")

    @property
    def all_closed(self) -> bool:
        with self.changed:
            return all(watch.closed for watch in self._current.values())
