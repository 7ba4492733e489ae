"""The local consumer loop, `consume_queue`, on the fake queue: what it tells the queue after each
outcome (delete, a delay, a throttle's wait, at once), and when it stops.

The fake queue's waits move the world's clock, so retry delays pass in no time; the loop's
`busy_delay` reads the real clock, so a holder's lease in those tests is set from time.time().
"""

from __future__ import annotations

import time

import pytest

from shared.pipeline.consume import (
    BUSY_DELAY_SECONDS,
    MAX_RETRY_DELAY_SECONDS,
    Wait,
    busy_delay,
    consume_queue,
    retry_delay,
)
from shared.pipeline.copier import CopyResult, Outcome
from shared.queue import QueueDepths
from shared.queue.port import MAX_VISIBILITY_SECONDS
from shared.state import ClaimStatus
from tests.fakes import FakeWorld
from tests.fakes.world import LEASE_SECONDS

REFUSAL = "refused for now by the destination: [UNAVAILABLE]"


@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path)
    yield world
    world.close()


class Stop(Exception):
    """Ends the loop from on_result, once what the test looks at has happened."""


def consume(world: FakeWorld, on_result=None) -> list[tuple[float, CopyResult]]:
    """Run the loop to its end; each reported result with the clock's time when it came."""
    seen: list[tuple[float, CopyResult]] = []

    def record(result: CopyResult) -> None:
        seen.append((world.clock(), result))
        if on_result is not None:
            on_result(result)

    consume_queue(world.queue, world.copier(), visibility_timeout=LEASE_SECONDS, on_result=record)
    return seen


def sent_ids(world: FakeWorld) -> list[str]:
    return [call[1] for call in world.queue.calls_to("send")]


def visibility_changes(world: FakeWorld, message_id: str) -> list[int]:
    return [seconds for _, changed, seconds in world.queue.calls_to("extend_visibility") if changed == message_id]


# -- the delays ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("receive_count", "delay"), [(1, 2), (2, 4), (3, 8), (5, 32), (6, 60), (7, 60), (40, 60)])
def test_retry_delay_doubles_with_each_receive_up_to_a_minute(receive_count, delay):
    assert retry_delay(receive_count) == delay
    assert retry_delay(receive_count) <= MAX_RETRY_DELAY_SECONDS


@pytest.mark.parametrize(
    ("lease_left", "delay"),
    [(None, BUSY_DELAY_SECONDS), (29.2, 30), (30, 30), (0.1, 1), (0, 1), (-100, 1), (10**9, MAX_VISIBILITY_SECONDS)],
)
def test_busy_delay_lasts_until_the_holders_lease_ends(lease_left, delay):
    now = 1_700_000_000.0
    assert busy_delay(None if lease_left is None else now + lease_left, now) == delay


# -- the loop ------------------------------------------------------------------------------------


def test_the_loop_copies_everything_queued_then_ends(world):
    refs = [world.arrive("work"), world.arrive("home"), world.arrive("news"), world.arrive("work")]
    world.queue.send_refs(refs)

    seen = consume(world)

    assert sorted((result.key.route, result.key.uid, result.outcome) for _, result in seen) == sorted(
        (ref.route, ref.uid, Outcome.COPIED) for ref in refs
    )
    assert world.queue.depths() == QueueDepths(visible=0, in_flight=0, dead=0)
    assert [call[1] for call in world.queue.calls_to("delete")] == sent_ids(world)  # each acknowledged
    assert (len(world.destination.bodies("Work")), len(world.destination.bodies("News"))) == (3, 1)


def test_the_loop_ends_at_once_on_an_empty_queue(world):
    assert consume(world) == []
    assert world.state.calls == []


def test_a_failed_message_waits_its_retry_delay_and_its_routes_next_message_waits_behind_it(world, one_message_per_batch):
    first, second = world.arrive("work"), world.arrive("work")
    world.queue.send_refs([first, second])
    first_id, second_id = sent_ids(world)
    world.destination.refuse_next_append(REFUSAL, permanent=False)

    seen = consume(world)

    # The unprocessed one is not reported; it is made visible at once, and waits behind the
    # failed one (FIFO) until that one's 2 s delay has passed.
    assert [(result.key.uid, result.outcome) for _, result in seen] == [
        (first.uid, Outcome.FAILED), (first.uid, Outcome.COPIED), (second.uid, Outcome.COPIED)
    ]
    assert visibility_changes(world, first_id) == [retry_delay(1)]
    assert visibility_changes(world, second_id) == [0]
    (failed_at, _), (copied_at, _), _ = seen
    assert copied_at - failed_at >= retry_delay(1)
    assert world.destination.bodies("Work") == [
        world.source_of("work").message("INBOX", uid).body for uid in (first.uid, second.uid)
    ]
    assert world.queue.depths() == QueueDepths(0, 0, 0)


def test_a_message_failing_every_time_backs_off_up_to_a_minute_then_is_dead_lettered_and_the_loop_ends(tmp_path):
    world = FakeWorld.build(tmp_path, max_receive_count=7)
    ref = world.arrive("work")
    world.queue.send_refs([ref])
    [message_id] = sent_ids(world)
    world.destination.refuse_next_append(REFUSAL, permanent=False, times=7)

    seen = consume(world)

    assert [result.outcome for _, result in seen] == [Outcome.FAILED] * 7
    assert visibility_changes(world, message_id) == [2, 4, 8, 16, 32, 60, 60]
    assert world.queue.depths() == QueueDepths(visible=0, in_flight=0, dead=1)
    assert [letter.reason for letter in world.queue.dead_letters()] == ["max receive count 7 exceeded"]
    claim, failure = world.claim(ref), world.failure(ref)
    assert (claim.status, claim.attempts) == (ClaimStatus.FAILED, 7)
    assert (failure.attempts, failure.error_class) == (7, "AppendRejected")
    assert world.destination.bodies("Work") == []
    world.close()


def test_a_throttled_message_stays_away_the_servers_wait_plus_a_second_instead_of_the_retry_delay(world):
    ref = world.arrive("work")
    world.queue.send_refs([ref])
    [message_id] = sent_ids(world)
    world.destination.refuse_next_append("throttled by the destination", permanent=False, retry_after=2.5)

    seen = consume(world)

    assert [result.outcome for _, result in seen] == [Outcome.PAUSED, Outcome.COPIED]
    assert visibility_changes(world, message_id) == [4]  # ceil(2.5) + 1, not retry_delay(1) = 2
    (throttled_at, _), (copied_at, _) = seen
    assert copied_at - throttled_at >= 2.5
    assert len(world.destination.bodies("Work")) == 1


def test_the_loop_leaves_messages_waiting_for_a_long_pause_queued_and_says_how_many(world):
    """Gmail's [OVERQUOTA] pauses an account for hours: drain does not wait that out. The paused
    message and the one of its route behind it stay queued; another route's is copied."""
    first, second = world.arrive("work"), world.arrive("work")
    other = world.arrive("home")
    world.queue.send_refs([first, second, other])
    world.source_of("work").throttle_next("fetch", retry_after=3 * 3600)

    left = consume_queue(world.queue, world.copier(), visibility_timeout=LEASE_SECONDS, max_pause_wait=900)

    assert left == 2
    assert world.queue.depths() == QueueDepths(visible=0, in_flight=2, dead=0)
    assert len(world.destination.bodies("Work")) == 1  # route home's
    # A later run (nothing of its own parked) leaves them too.
    assert consume_queue(world.queue, world.copier(), visibility_timeout=LEASE_SECONDS, max_pause_wait=900) == 2
    # Once the pause is over, the next run copies them.
    world.clock.advance(3 * 3600 + 2)
    assert consume_queue(world.queue, world.copier(), visibility_timeout=LEASE_SECONDS, max_pause_wait=900) == 0
    assert len(world.destination.bodies("Work")) == 3


def test_a_busy_message_comes_back_when_the_holders_lease_ends(world):
    ref = world.arrive("work")
    world.state.inner.claim_uid(ref.key, "consumer-2", time.time() + 30)
    world.queue.send_refs([ref])
    [message_id] = sent_ids(world)

    def stop(result: CopyResult) -> None:
        raise Stop

    with pytest.raises(Stop):
        consume(world, on_result=stop)

    assert visibility_changes(world, message_id) == [30]  # not BUSY_DELAY_SECONDS, not a retry delay
    assert world.queue.visible_at(message_id) == world.clock() + 30
    assert world.queue.calls_to("delete") == []
    assert world.claim(ref).owner == "consumer-2"


def test_a_quarantined_message_is_dead_lettered_and_not_deleted_as_well(world):
    bad_id = world.queue.send_raw('{"v": 1}', "work")
    good = world.arrive("work")
    world.queue.send_refs([good])

    seen = consume(world)

    assert [result.outcome for _, result in seen] == [Outcome.QUARANTINED, Outcome.COPIED]
    assert [call[1] for call in world.queue.calls_to("quarantine")] == [bad_id]
    assert bad_id not in [call[1] for call in world.queue.calls_to("delete")]
    assert bad_id not in [call[1] for call in world.queue.calls_to("extend_visibility")]
    assert [letter.message_id for letter in world.queue.dead_letters()] == [bad_id]
    assert world.queue.depths() == QueueDepths(visible=0, in_flight=0, dead=1)


def test_skipped_and_already_done_messages_are_acknowledged(world):
    done, gone = world.arrive("work"), world.arrive("work")
    world.copier("earlier-run").copy_message(done)
    world.source_of("work").expunge("INBOX", gone.uid)
    world.queue.send_refs([done, gone])

    seen = consume(world)

    assert [result.outcome for _, result in seen] == [Outcome.ALREADY_DONE, Outcome.SKIPPED]
    assert [call[1] for call in world.queue.calls_to("delete")] == sent_ids(world)
    assert world.queue.depths() == QueueDepths(0, 0, 0)


# -- saying what it waits for --------------------------------------------------------------------


def test_while_nothing_is_due_the_loop_says_which_message_it_waits_for_and_why(world):
    ref = world.arrive("work")
    world.queue.send_refs([ref])
    world.destination.refuse_next_append("throttled by the destination", permanent=False, retry_after=2.5)
    waits = []

    before = time.time()
    consume_queue(world.queue, world.copier(), visibility_timeout=LEASE_SECONDS, on_wait=waits.append)

    assert waits, "the loop waited without saying for what"
    wait = waits[0]
    assert wait.reason.startswith(f"route work UID {ref.uid}: destination paused")
    assert "throttled by the destination" in wait.reason
    assert (wait.waiting, wait.elsewhere) == (1, 0)
    assert before + 4 <= wait.until <= time.time() + 4  # ceil(2.5) + 1 from when it was paused


def test_messages_another_run_holds_are_said_to_be_in_flight_elsewhere(world):
    ref = world.arrive("work")
    world.queue.send_refs([ref])
    world.queue.receive(10, visibility_timeout=3)  # another drain took it and is at work on it
    waits = []

    consume_queue(world.queue, world.copier(), visibility_timeout=LEASE_SECONDS, on_wait=waits.append)

    assert waits[0] == Wait(None, "messages in flight with another run", 0, 1)
