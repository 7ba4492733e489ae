"""A Gmail account's daily download budget (shared.pipeline.budget) and what the copier does with
it and with Gmail's `[OVERQUOTA]`: the account waits, no attempt is spent, nothing is lost.

DownloadBudget runs on a real SqliteStateStore and a fake clock; the copier on tests.fakes.
"""

from __future__ import annotations

import random

import pytest

from shared.pipeline.budget import HOUR_SECONDS, DownloadBudget
from shared.pipeline.copier import Outcome, throttled_visibility
from shared.state import ClaimStatus
from shared.state.sqlite import SqliteStateStore
from tests.fakes import FakeClock, FakeWorld, email

ACCOUNT = "alice@gmail.com"
DAY = 24 * HOUR_SECONDS


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(tmp_path, clock):
    store = SqliteStateStore(tmp_path / "state.db", clock=clock)
    yield store
    store.close()


def end_of_hour(clock: FakeClock, hours_later: int = 0) -> float:
    return (clock() // HOUR_SECONDS + 1 + hours_later) * HOUR_SECONDS


# -- the budget ----------------------------------------------------------------------------------
def test_downloads_fit_until_the_budget_then_wait_for_the_oldest_hour_to_leave_the_window(state, clock):
    budget = DownloadBudget(state, 1000, clock=clock)
    first_hour_ends = end_of_hour(clock)
    assert budget.reserve(ACCOUNT, 600).fits
    clock.advance(5 * HOUR_SECONDS)
    assert budget.reserve(ACCOUNT, 300).fits

    refused = budget.reserve(ACCOUNT, 200)

    assert not refused.fits and refused.downloaded == 900
    # The 600 bytes of the first hour leave the window 24 hours after that hour ends.
    assert refused.resumes_at == first_hour_ends + 23 * HOUR_SECONDS
    assert budget.downloaded(ACCOUNT) == 900  # what did not fit was not counted
    clock.advance(refused.resumes_at - clock())
    assert budget.reserve(ACCOUNT, 200).fits
    assert budget.downloaded(ACCOUNT) == 500


def test_settle_counts_the_bytes_really_downloaded(state, clock):
    budget = DownloadBudget(state, 1000, clock=clock)
    budget.reserve(ACCOUNT, 400)
    budget.settle(ACCOUNT, 400, 450)
    budget.reserve(ACCOUNT, 100)
    budget.settle(ACCOUNT, 100, 0)  # gone from the source: nothing came
    assert budget.downloaded(ACCOUNT) == 450


def test_accounts_have_budgets_of_their_own(state, clock):
    budget = DownloadBudget(state, 1000, clock=clock)
    assert budget.reserve(ACCOUNT, 1000).fits
    assert not budget.reserve(ACCOUNT, 1).fits
    assert budget.reserve("bob@gmail.com", 1000).fits


def test_no_24_hours_ever_download_more_than_the_budget(state, clock):
    """A week of random arrivals, each downloaded as soon as the budget lets it: every 24 hours
    (each start on the hour, the budget's grain) hold at most the budget, and all is downloaded."""
    budget = DownloadBudget(state, 10_000, clock=clock)
    rng = random.Random(12)
    start = clock()
    waiting: list[int] = []
    downloads: list[tuple[float, int]] = []
    while clock() < start + 7 * DAY:
        waiting += [rng.randint(100, 3000) for _ in range(rng.randint(0, 3))]
        while waiting:
            room = budget.reserve(ACCOUNT, waiting[0])
            if not room.fits:
                assert room.resumes_at > clock()
                break
            downloads.append((clock(), waiting.pop(0)))
        clock.advance(600)
    while waiting:  # the backlog drains once arrivals stop
        room = budget.reserve(ACCOUNT, waiting[0])
        if room.fits:
            downloads.append((clock(), waiting.pop(0)))
        else:
            clock.advance(room.resumes_at - clock())

    hours = {int(at // HOUR_SECONDS) for at, _ in downloads}
    for first in range(min(hours) - 23, max(hours) + 1):
        in_window = sum(size for at, size in downloads if first <= at // HOUR_SECONDS < first + 24)
        assert in_window <= 10_000
    assert sum(size for _, size in downloads) > 5 * 10_000  # it went on day after day


def test_two_processes_reserving_the_last_room_at_once_cannot_both_take_it(state, clock):
    budget = DownloadBudget(state, 1000, clock=clock)
    budget.reserve(ACCOUNT, 700)
    # The other process's reservation is counted between ours and our look at the window.
    state.count_download(ACCOUNT, int(clock() // HOUR_SECONDS), 200)
    assert not budget.reserve(ACCOUNT, 200).fits
    assert budget.downloaded(ACCOUNT) == 900


def test_overquota_fills_the_window_and_waits_for_it_to_pass(state, clock):
    budget = DownloadBudget(state, 1000, clock=clock)
    budget.reserve(ACCOUNT, 100)
    clock.advance(3 * HOUR_SECONDS)

    spent = budget.spent(ACCOUNT, 50)

    # Gmail counted more than we did (the user's own apps): the rest is taken to be this hour's,
    # and the window has room again when the first hour's 100 bytes have left it.
    assert spent.downloaded == 1000 and budget.downloaded(ACCOUNT) == 1000
    assert spent.resumes_at == end_of_hour(clock, -3) + 23 * HOUR_SECONDS
    # With nothing of ours in the window, it waits a whole window.
    assert budget.spent("bob@gmail.com", 50).resumes_at == end_of_hour(clock) + 23 * HOUR_SECONDS


# -- the copier ----------------------------------------------------------------------------------
@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path)
    yield world
    world.close()


def test_a_message_past_the_budget_waits_without_a_download_or_an_attempt(world):
    bodies = [email(f"big {n}", body="x" * 5000) for n in range(3)]
    first, second = world.arrive("work", bodies[0]), world.arrive("work", bodies[1])
    copier = world.copier(daily_download_bytes=len(bodies[0]) + 100)
    assert copier.copy_message(first).outcome is Outcome.COPIED

    result = copier.copy_message(second)

    assert result.outcome is Outcome.PAUSED
    account = world.routes["work"].gmail_user
    assert f"source {account} paused until" in result.detail
    spent = f"{len(bodies[0]):,} bytes of {len(bodies[0]) + 100:,} bytes"
    assert f"daily download budget spent ({spent} in 24 hours)" in result.detail
    assert len(world.source_of("work").calls_to("fetch")) == 1  # the second was never downloaded
    assert world.claim(second).status is ClaimStatus.FAILED and world.failure(second) is None
    assert throttled_visibility(result) is not None and result.retry_after > 22 * HOUR_SECONDS
    # The other route of the same account waits too; the budget is the account's.
    other = world.arrive("news", bodies[2])
    assert world.routes["news"].gmail_user == account
    assert copier.copy_message(other).outcome is Outcome.PAUSED

    world.clock.advance(result.retry_after)
    assert copier.copy_message(second).outcome is Outcome.COPIED
    assert world.destination.bodies("Work") == bodies[:2]


def test_overquota_pauses_the_account_until_its_window_passes_and_spends_no_attempt(world):
    ref = world.arrive("work")
    world.source_of("work").quota_spent_next("fetch")
    copier = world.copier(daily_download_bytes=2_000_000_000)

    result = copier.copy_message(ref)

    assert result.outcome is Outcome.PAUSED
    assert "[OVERQUOTA]" in result.detail and "waits for the daily download window" in result.detail
    assert result.retry_after == pytest.approx(end_of_hour(world.clock) + 23 * HOUR_SECONDS - world.clock())
    assert world.failure(ref) is None and world.claim(ref).status is ClaimStatus.FAILED
    account = world.routes["work"].gmail_user
    assert world.state.inner.read_pause(f"source {account}").until == pytest.approx(world.clock() + result.retry_after)

    world.clock.advance(result.retry_after)
    assert copier.copy_message(ref).outcome is Outcome.COPIED


def test_without_a_budget_overquota_waits_what_the_throttle_says(world):
    ref = world.arrive("work")
    world.source_of("work").quota_spent_next("fetch")
    result = world.copier().copy_message(ref)
    assert (result.outcome, result.retry_after) == (Outcome.PAUSED, 60)


# -- a batch's downloads, reserved at once -------------------------------------------------------
def test_a_batch_reserved_at_once_counts_once_and_gives_back_what_was_not_taken(state, clock):
    budget = DownloadBudget(state, 1000, clock=clock)
    counted = []
    real_count = state.count_download

    def count_download(account, hour, size):
        counted.append(size)
        real_count(account, hour, size)

    state.count_download = count_download
    with budget.reserving(ACCOUNT, 600):
        assert budget.reserve(ACCOUNT, 200).fits
        assert budget.reserve(ACCOUNT, 300).fits
        assert budget.downloaded(ACCOUNT) == 600  # reserved ahead: the others see all of it
        assert budget.reserve(ACCOUNT, 200).fits  # more than is left of it: counted on its own
        assert budget.downloaded(ACCOUNT) == 800

    assert counted == [600, 200, -100]  # the batch once, the one beyond it, the 100 not taken
    assert budget.downloaded(ACCOUNT) == 700


def test_a_batch_that_does_not_fit_reserves_each_message_on_its_own(state, clock):
    budget = DownloadBudget(state, 1000, clock=clock)
    budget.reserve(ACCOUNT, 500)

    with budget.reserving(ACCOUNT, 800):
        assert budget.downloaded(ACCOUNT) == 500  # the whole batch was not counted
        assert budget.reserve(ACCOUNT, 400).fits
        assert not budget.reserve(ACCOUNT, 400).fits

    assert budget.downloaded(ACCOUNT) == 900


def test_the_copier_counts_a_batch_of_downloads_once(world):
    refs = [world.arrive("work", email(f"m {n}", body="x" * 1000)) for n in range(5)]
    copier = world.copier(daily_download_bytes=2_000_000_000)
    counted = []
    real_count = world.state.inner.count_download
    world.state.inner.count_download = lambda *args: (counted.append(args[2]), real_count(*args))[1]

    results = copier.copy_messages(refs)

    assert [r.outcome for r in results] == [Outcome.COPIED] * 5
    assert counted == [sum(ref.size for ref in refs)]  # one count; the sizes queued were exact
