"""`RouteWatch` (drain --watch) on fakes: IDLE sessions in memory (tests/fakes/watch.py), and each
copy round the real scan and consumer on the fake world, as the CLI wires them. Every wait is on
a condition with a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from shared.mailbox.connections import MailboxConnections
from shared.pipeline.consume import consume_queue
from shared.pipeline.scan import ScanLimits, scan_routes
from shared.pipeline.watch import RouteWatch, WatchTimes, idle_budget
from shared.settings import Route
from tests.fakes import FakeWorld, make_route
from tests.fakes.mailbox import DEFAULT_INTERNALDATE
from tests.fakes.watch import FakeWatches
from tests.fakes.world import LEASE_SECONDS

# Long enough that nothing but the event under test makes a round.
NEVER = 3600.0
DEADLINE = 5.0


def wait_for(condition, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.002)


@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path)
    yield world
    world.close()


class Rounds:
    """The copy round the CLI runs (scan the due routes, consume the queue), recorded."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.due: list[list[str]] = []

    def __call__(self, routes: Sequence[Route]) -> None:
        world = self.world
        scan_routes(
            routes,
            state=world.state,
            queue=world.queue,
            open_source=world.mailboxes.open_source,
            limits=ScanLimits(max_enqueue_per_run=1000, fallback_since_days=7, today=DEFAULT_INTERNALDATE.date()),
        )
        consume_queue(world.queue, world.copier(), visibility_timeout=LEASE_SECONDS)
        self.due.append([route.name for route in routes])


@contextmanager
def running(watch: RouteWatch) -> Iterator[RouteWatch]:
    """`watch.run()` in a thread; stopped, and its threads joined, on the way out."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            watch.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        watch.stop()
        thread.join(DEADLINE)
        watch.join(DEADLINE)
        assert not thread.is_alive(), "run() did not return after stop()"
    if failed:
        raise failed[0]


def make_watch(world, watches, rounds, *, idle_on=("work",), routes=("work",), lost=None, **times) -> RouteWatch:
    chosen = [world.routes[name] for name in routes]
    return RouteWatch(
        chosen,
        idle_on=[world.routes[name] for name in idle_on],
        open_watch=watches.open,
        copy_round=rounds,
        times=WatchTimes(**({"reidle_seconds": NEVER, "rescan_seconds": NEVER, "first_retry_seconds": 0.01} | times)),
        on_lost=lost or (lambda route, error, delay: None),
    )


def copied(world: FakeWorld, folder: str = "Work") -> list[bytes]:
    return world.destination.bodies(folder)


def test_a_change_idle_reports_is_copied_once(world):
    watches, rounds = FakeWatches(), Rounds(world)
    with running(make_watch(world, watches, rounds)):
        watches.wait_until_idle("work")
        wait_for(lambda: rounds.due == [["work"]], "the scan after the session opened")
        uid = world.source_of("work").add("INBOX")
        watches.notify("work")
        wait_for(lambda: len(copied(world)) == 1, "the copy")
    assert copied(world) == [world.source_of("work").message("INBOX", uid).body]
    assert rounds.due == [["work"], ["work"]]  # the scan on opening, then the one IDLE asked for
    assert watches.all_closed


def test_idle_is_issued_again_every_reidle_seconds(world):
    watches, rounds = FakeWatches(), Rounds(world)
    with running(make_watch(world, watches, rounds, reidle_seconds=0.02)):
        wait_for(lambda: len(watches.timeouts["work"]) >= 3, "three IDLEs")
    # Each IDLE waits at most the re-IDLE interval, on the one session (nothing was lost).
    assert set(watches.timeouts["work"]) == {0.02}
    assert watches.opened["work"] == 1
    assert rounds.due == [["work"]]  # a quiet re-IDLE is no reason to scan


def test_a_lost_session_is_reopened_and_what_arrived_meanwhile_is_copied(world):
    watches, rounds = FakeWatches(), Rounds(world)
    lost: list[tuple[str, float]] = []
    source = world.source_of("work")
    arrived: list[int] = []
    with running(make_watch(world, watches, rounds, lost=lambda route, error, delay: lost.append((route.name, delay)))):
        watches.wait_until_idle("work")
        wait_for(lambda: rounds.due == [["work"]], "the round on opening")  # not merged with the next
        # The message arrives with the session going down: no IDLE reports it.
        watches.drop("work", before=lambda: arrived.append(source.add("INBOX")))
        watches.wait_until_idle("work", sessions=2)
        wait_for(lambda: len(copied(world)) == 1, "the copy after the reopen")
    assert copied(world) == [source.message("INBOX", arrived[0]).body]
    assert lost == [("work", 0.01)]
    assert rounds.due == [["work"], ["work"]]  # on opening, and on reopening


def test_reopening_backs_off_and_starts_over_after_a_good_session(world):
    watches, rounds = FakeWatches(), Rounds(world)
    delays: list[float] = []
    watches.fail_opens("work", 3)
    with running(make_watch(world, watches, rounds, reidle_seconds=0.01, lost=lambda route, error, delay: delays.append(delay))):
        watches.wait_until_idle("work")
        wait_for(lambda: len(watches.timeouts["work"]) >= 2, "an IDLE waited through")
        watches.drop("work")
        watches.wait_until_idle("work", sessions=2)
    assert delays == [0.01, 0.02, 0.04, 0.01]


def test_every_route_is_rescanned_without_news_from_idle(world):
    watches, rounds = FakeWatches(), Rounds(world)
    # "news" has no IDLE session (no session to spare): only the rescan finds its mail.
    watch = make_watch(world, watches, rounds, routes=("work", "news"), idle_on=("work",), rescan_seconds=0.05)
    with running(watch):
        watches.wait_until_idle("work")
        world.source_of("work").add("INBOX")  # IDLE says nothing of these
        world.source_of("news").add("News")
        wait_for(lambda: len(copied(world)) == 1 and len(copied(world, "News")) == 1, "the rescan's copies")
    assert ["work", "news"] in rounds.due
    assert watches.opened == {"work": 1}


def test_stop_ends_the_run_and_closes_every_session(world):
    watches, rounds = FakeWatches(), Rounds(world)
    watch = make_watch(world, watches, rounds, routes=("work", "news"), idle_on=("work", "news"))
    with running(watch):
        watches.wait_until_idle("work")
        watches.wait_until_idle("news")
    assert watches.all_closed
    assert not any(session.thread.is_alive() for session in watch._sessions)


def test_idle_sessions_come_out_of_the_accounts_budget():
    work, news = make_route("work"), make_route("news", gmail_folder="News")
    home = make_route("home", gmail_user="bob@gmail.test")
    # alice has 3 sessions, one must stay with the pool: one route idles, one is rescanned only.
    connections = MailboxConnections(lambda route: None, lambda: None, sessions_per_source_account=2)
    idle, rescanned = idle_budget([work, news, home], connections.set_aside)
    assert [route.name for route in idle] == ["work", "home"]
    assert [route.name for route in rescanned] == ["news"]
    assert connections.set_aside("alice@gmail.test", 5) == 1
    assert MailboxConnections(lambda route: None, lambda: None).set_aside("alice@gmail.test", 5) == 5
