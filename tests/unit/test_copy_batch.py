"""`copy_batch`: FIFO per route within a batch, and quarantine of bodies that are not references.

Batches come from the fake queue as the consumer receives them, so quarantine is checked where a
user would look: the dead letters, with their reasons, each once.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from shared.pipeline.copier import Copier, CopyResult, Outcome, copy_batch
from shared.queue import ReceivedMessage
from shared.state import ClaimStatus
from tests.fakes import FakeWorld


@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path)
    yield world
    world.close()


def receive_all(world: FakeWorld) -> list[ReceivedMessage]:
    batch = world.queue.receive(10, visibility_timeout=60)
    assert world.queue.depths().visible == 0, "the test's batch did not fit in one receive"
    return batch


def outcomes(results: list[tuple[ReceivedMessage, CopyResult]]) -> list[tuple[str, str]]:
    return [(message.group_id, result.outcome) for message, result in results]


def test_after_a_message_that_is_not_acknowledged_the_rest_of_its_route_waits_and_other_routes_go_on(world, one_message_per_batch):
    work_1, work_2 = world.arrive("work"), world.arrive("work")
    news_1 = world.arrive("news")
    work_3 = world.arrive("work")
    world.queue.send_refs([work_1, work_2, news_1, work_3])
    batch = receive_all(world)
    world.destination.refuse_next_append("refused for now by the destination: [UNAVAILABLE]", permanent=False)

    results = copy_batch(batch, copier=world.copier(), queue=world.queue)

    assert [message for message, _ in results] == batch  # in the order given
    assert outcomes(results) == [
        ("work", Outcome.FAILED),
        ("work", Outcome.UNPROCESSED),
        ("news", Outcome.COPIED),
        ("work", Outcome.UNPROCESSED),
    ]
    assert all(result == CopyResult(Outcome.UNPROCESSED) for _, result in results if result.outcome is Outcome.UNPROCESSED)
    # Held back, not tried: never claimed (a claim comes before any IMAP).
    assert world.claim(work_2) is None and world.claim(work_3) is None
    assert world.destination.bodies("Work") == []
    assert len(world.destination.bodies("News")) == 1


def test_a_busy_message_holds_back_its_route_too(world):
    work_1, work_2 = world.arrive("work"), world.arrive("work")
    world.state.inner.claim_uid(work_1.key, "consumer-2", world.clock() + 30)
    world.queue.send_refs([work_1, work_2])

    results = copy_batch(receive_all(world), copier=world.copier(), queue=world.queue)

    assert outcomes(results) == [("work", Outcome.BUSY), ("work", Outcome.UNPROCESSED)]
    assert world.claim(work_2) is None


def test_acknowledged_outcomes_do_not_hold_back_the_route(world):
    done, gone, fresh = world.arrive("work"), world.arrive("work"), world.arrive("work")
    world.copier().copy_message(done)
    world.source_of("work").expunge("INBOX", gone.uid)
    world.queue.send_raw(done.to_body(), "work")  # a redelivery
    world.queue.send_refs([gone, fresh])

    results = copy_batch(receive_all(world), copier=world.copier(), queue=world.queue)

    assert outcomes(results) == [("work", Outcome.ALREADY_DONE), ("work", Outcome.SKIPPED), ("work", Outcome.COPIED)]
    assert len(world.destination.bodies("Work")) == 2


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "queue body: not JSON (Expecting value: line 1 column 1 (char 0))"),
        (json.dumps({"v": 1, "route": "work", "uidvalidity": 7}), "queue body.uid: missing or not an integer from 1 to 4294967295"),
        (json.dumps({"Records": []}), "queue body.v: missing, not a message reference (fields: 'Records')"),
        (json.dumps({"v": 1, "route": "nobody", "uidvalidity": 7, "uid": 1}), "queue body.route: unknown route 'nobody'"),
    ],
)
def test_a_body_that_is_not_a_reference_of_a_configured_route_is_dead_lettered_once_naming_the_field(
    world, body, reason
):
    before = world.arrive("work")
    world.queue.send_refs([before])
    bad_id = world.queue.send_raw(body, "work")
    after = world.arrive("work")
    world.queue.send_refs([after])

    results = copy_batch(receive_all(world), copier=world.copier(), queue=world.queue)

    # Quarantine is acknowledged: the good messages on either side of it, same route, are copied.
    assert outcomes(results) == [("work", Outcome.COPIED), ("work", Outcome.QUARANTINED), ("work", Outcome.COPIED)]
    assert results[1][1] == CopyResult(Outcome.QUARANTINED, None, reason)
    assert [(letter.message_id, letter.body, letter.reason) for letter in world.queue.dead_letters()] == [
        (bad_id, body, reason)
    ]
    assert world.queue.calls_to("quarantine") == [("quarantine", bad_id, reason)]
    assert len(world.destination.bodies("Work")) == 2
    assert world.state.calls_to("claim_uid") == 2  # nothing was claimed for the bad body


def test_quarantine_in_a_batch_does_not_touch_the_state_store_or_mailboxes(world):
    bad_id = world.queue.send_raw("{}", "work")
    world.state.fail()  # any state call would raise

    results = copy_batch(receive_all(world), copier=world.copier(), queue=world.queue)

    assert outcomes(results) == [("work", Outcome.QUARANTINED)]
    assert [letter.message_id for letter in world.queue.dead_letters()] == [bad_id]
    assert world.state.calls == [] and world.mailboxes.sources_opened == []


def test_a_routes_messages_land_in_the_destination_in_queue_order(world):
    first, second = world.arrive("work"), world.arrive("work")
    world.queue.send_refs([first, second])

    copy_batch(receive_all(world), copier=world.copier(), queue=world.queue)

    assert [world.claim(ref).status for ref in (first, second)] == [ClaimStatus.DONE, ClaimStatus.DONE]
    assert world.destination.bodies("Work") == [
        world.source_of("work").message("INBOX", uid).body for uid in (first.uid, second.uid)
    ]


def test_a_message_that_failed_max_attempts_times_of_its_own_goes_to_the_dead_letters_with_why(world):
    ref = world.arrive("work")
    world.queue.send_refs([ref])
    world.destination.refuse_next_append("refused for now by the destination: [UNAVAILABLE]", permanent=False, times=2)
    copier = world.copier(max_attempts=2)

    first = copy_batch(receive_all(world), copier=copier, queue=world.queue)
    world.queue.extend_visibility(first[0][0], 0)
    second = copy_batch(receive_all(world), copier=copier, queue=world.queue)

    assert [result.outcome for _, result in first + second] == [Outcome.FAILED, Outcome.DEAD_LETTERED]
    [letter] = world.queue.dead_letters()
    assert "[UNAVAILABLE]" in letter.reason and letter.reason.startswith("failed 2 times; last: ")
    assert world.queue.depths().visible == world.queue.depths().in_flight == 0
    assert world.failure(ref).attempts == 2  # `status` and redrive see why


def test_throttles_never_count_as_attempts(tmp_path):
    """Five throttles in a row with MAX_ATTEMPTS 2: still copied, never dead-lettered (the queue's
    own safety net, MAX_RECEIVE_COUNT, is far above them, as by default)."""
    world = FakeWorld.build(tmp_path, max_receive_count=100)
    ref = world.arrive("work")
    world.queue.send_refs([ref])
    for _ in range(5):
        world.destination.refuse_next_append("throttled by the destination", permanent=False, retry_after=10)
    copier = world.copier(max_attempts=2)

    seen = []
    while not seen or seen[-1] is not Outcome.COPIED:
        batch = receive_all(world)
        [(message, result)] = copy_batch(batch, copier=copier, queue=world.queue)
        seen.append(result.outcome)
        if not result.outcome.acknowledged:
            world.clock.advance(result.retry_after)
            world.queue.extend_visibility(message, 0)

    assert seen == [Outcome.PAUSED] * 5 + [Outcome.COPIED]
    assert world.queue.dead_letters() == [] and world.failure(ref) is None
    world.close()


def test_messages_held_back_behind_a_paused_one_wait_as_long_as_it(world, one_message_per_batch):
    first, second = world.arrive("work"), world.arrive("work")
    world.queue.send_refs([first, second])
    world.destination.refuse_next_append("throttled by the destination", permanent=False, retry_after=300)

    results = copy_batch(receive_all(world), copier=world.copier(), queue=world.queue)

    assert outcomes(results) == [("work", Outcome.PAUSED), ("work", Outcome.UNPROCESSED)]
    assert results[0][1].retry_after == results[1][1].retry_after == 300


def test_routes_of_other_accounts_are_copied_at_the_same_time_and_one_accounts_routes_by_one_thread(world):
    refs = [world.arrive(route) for route in ("work", "home", "news", "work", "home", "news")]
    world.queue.send_refs(refs)
    batch = receive_all(world)
    main, lane = world.copier(), world.copier()
    both_running = threading.Barrier(2, timeout=10)  # broken unless two copies run at once
    seen: dict[str, set[str]] = {}

    def watched(copier):
        first = []

        def copy_messages(refs):
            seen.setdefault(refs[0].route, set()).add(threading.current_thread().name)
            if not first:
                first.append(True)
                both_running.wait()
            return Copier.copy_messages(copier, refs)

        copier.copy_messages = copy_messages
        return copier

    results = copy_batch(batch, copier=watched(main), queue=world.queue, lanes=[watched(lane)])

    assert [result.outcome for _, result in results] == [Outcome.COPIED] * 6
    # alice's two routes in one thread, bob's in another
    assert len(seen["work"]) == len(seen["news"]) == len(seen["home"]) == 1
    assert seen["work"] == seen["news"] != seen["home"]
    assert len(world.destination.bodies("Work")) == 4 and len(world.destination.bodies("News")) == 2


def test_without_lanes_or_with_one_account_every_route_is_copied_in_the_calling_thread(world):
    refs = [world.arrive(route) for route in ("work", "news", "work")]
    world.queue.send_refs(refs)
    batch = receive_all(world)
    threads = set()
    main = world.copier()
    original = main.copy_messages
    main.copy_messages = lambda refs: threads.add(threading.current_thread().name) or original(refs)

    results = copy_batch(batch, copier=main, queue=world.queue, lanes=[world.copier()])

    assert [result.outcome for _, result in results] == [Outcome.COPIED] * 3
    assert threads == {threading.current_thread().name}


def test_a_lane_that_learns_of_a_throttle_met_by_another_sends_nothing_more(world):
    """Outlook's throttle is the mailbox's: once one lane is throttled, a message another lane
    claimed and fetched before waits with it instead of being sent into the pause."""
    work, home = world.arrive("work"), world.arrive("home")  # alice's route, bob's route
    world.queue.send_refs([work, home])
    batch = receive_all(world)
    world.destination.refuse_next_append("throttled by the destination", permanent=False, retry_after=30)
    throttled, home_claimed = threading.Event(), threading.Event()
    # bob's message is claimed, then its FETCH waits until alice's APPEND was throttled (which
    # waits, at alice's FETCH, until bob's message was claimed).
    world.source_of("home").before_next("fetch", lambda: home_claimed.set() or throttled.wait(10))
    world.source_of("work").before_next("fetch", lambda: home_claimed.wait(10))
    main = world.copier()
    lane = replace(main)  # as the CLI makes its lanes: what the copier met, the lane knows

    def watched(copier):
        def copy_messages(refs):
            results = Copier.copy_messages(copier, refs)
            if refs[0].route == "work":
                throttled.set()
            return results

        copier.copy_messages = copy_messages
        return copier

    answered = copy_batch(batch, copier=watched(main), queue=world.queue, lanes=[watched(lane)])
    results = {message.group_id: result for message, result in answered}

    assert throttled.is_set() and home_claimed.is_set()
    assert results["work"].outcome is Outcome.PAUSED and results["home"].outcome is Outcome.PAUSED
    assert 0 < results["home"].retry_after <= 30
    assert world.destination.calls_to("append") == [("append", ("Work", work.uid))]  # home's never sent
    assert world.failure(home) is None
    assert world.claim(home).status not in (ClaimStatus.APPENDING, ClaimStatus.DONE)  # to be taken again
