"""A route's messages copied as one batch (Copier.copy_messages): one FETCH, every claim marked
APPENDING before the first APPEND, the APPENDs sent together, each message finalized by its own
answer; and what a refusal, a lost session, an unreadable message or twins do to the rest."""

from __future__ import annotations

import threading

import pytest

from shared.mailbox.port import AppendRejected
from shared.pipeline.copier import CHUNK_MESSAGES, FOUND_IN_DESTINATION, Outcome, copy_batch
from shared.state import ClaimStatus
from tests.fakes import FakeWorld
from tests.fakes.mailbox import ConnectionLost


@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path)
    yield world
    world.close()


def copy_queued(world: FakeWorld, refs, copier=None) -> list[tuple[int, Outcome]]:
    world.queue.send_refs(refs)
    batch = world.queue.receive(10, visibility_timeout=60)
    results = copy_batch(batch, copier=copier or world.copier(), queue=world.queue)
    for message, result in results:
        if result.outcome.acknowledged:
            world.queue.delete(message)
        else:
            world.queue.extend_visibility(message, 0)
    return [(result.key.uid if result.key else None, result.outcome) for _, result in results]


def bodies(world: FakeWorld, refs) -> list[bytes]:
    return [world.source_of("work").message("INBOX", ref.uid).body for ref in refs]


def test_a_routes_messages_are_fetched_at_once_and_all_marked_appending_before_the_first_append(world):
    refs = [world.arrive("work") for _ in range(3)]
    at_first_append = []
    world.destination.before_next("append", lambda: at_first_append.extend(world.claim(ref).status for ref in refs))

    assert copy_queued(world, refs) == [(ref.uid, Outcome.COPIED) for ref in refs]

    assert at_first_append == [ClaimStatus.APPENDING] * 3
    assert len(world.source_of("work").calls_to("fetch_many")) == 1
    assert world.destination.bodies("Work") == bodies(world, refs)
    assert [world.claim(ref).status for ref in refs] == [ClaimStatus.DONE] * 3


def test_a_refusal_in_mid_batch_fails_only_the_message_it_concerns(world):
    refs = [world.arrive("work") for _ in range(3)]
    refusal = AppendRejected("APPEND answered NO [UNAVAILABLE]", permanent=False, reason="refused for now")
    world.destination.fail_next("append", refusal, after=1)

    assert copy_queued(world, refs) == [(refs[0].uid, Outcome.COPIED), (refs[1].uid, Outcome.FAILED), (refs[2].uid, Outcome.COPIED)]
    assert world.failure(refs[1]).attempts == 1 and world.failure(refs[2]) is None
    # Refused: it certainly did not land, so its retry appends without looking first.
    assert world.claim(refs[1]).status is ClaimStatus.FAILED
    assert copy_queued(world, []) == [(refs[1].uid, Outcome.COPIED)]
    assert world.destination.calls_to("find_copies") == []
    assert sorted(world.destination.bodies("Work")) == sorted(bodies(world, refs))


def test_a_session_lost_after_the_first_append_leaves_the_rest_looked_for_before_appending(world):
    refs = [world.arrive("work") for _ in range(3)]
    world.destination.fail_next("append", ConnectionLost("destination: connection lost"), after=1)

    assert copy_queued(world, refs) == [(refs[0].uid, Outcome.COPIED), (None, Outcome.UNPROCESSED), (None, Outcome.UNPROCESSED)]
    # Sent without an answer: they may have landed. The session ended after answering the
    # first: not their failure, so no attempt is charged.
    assert [world.claim(ref).status for ref in refs[1:]] == [ClaimStatus.APPENDING] * 2
    assert world.failure(refs[1]) is None and world.failure(refs[2]) is None

    assert copy_queued(world, []) == [(refs[1].uid, Outcome.COPIED), (refs[2].uid, Outcome.COPIED)]
    assert len(world.destination.calls_to("find_copies")) == 2
    assert world.destination.bodies("Work") == bodies(world, refs)  # each once


def test_a_session_lost_after_an_append_landed_unanswered_copies_it_once(world):
    refs = [world.arrive("work") for _ in range(2)]
    world.destination.lose_connection_in_next_append(landed=True)

    # The session's failure is charged to the first message it met; the one behind it waits,
    # uncharged (a failure of each would send a batch to the dead letters for one outage).
    assert copy_queued(world, refs) == [(refs[0].uid, Outcome.FAILED), (None, Outcome.UNPROCESSED)]
    assert world.failure(refs[0]).attempts == 1 and world.failure(refs[1]) is None
    results = copy_batch(world.queue.receive(10, visibility_timeout=60), copier=world.copier(), queue=world.queue)

    assert [(result.outcome, result.detail.startswith(FOUND_IN_DESTINATION)) for _, result in results] == [
        (Outcome.COPIED, True), (Outcome.COPIED, False)
    ]
    assert world.destination.bodies("Work") == bodies(world, refs)


def test_a_message_the_source_cannot_serve_fails_alone_and_the_rest_are_not_charged(world):
    refs = [world.arrive("work") for _ in range(3)]
    source = world.source_of("work")
    source.make_unreadable(refs[1].uid)  # the batch FETCH fails for it, and so does its own

    assert copy_queued(world, refs) == [(refs[0].uid, Outcome.COPIED), (refs[1].uid, Outcome.FAILED), (None, Outcome.UNPROCESSED)]
    assert len(source.calls_to("fetch_many")) == 1
    assert world.failure(refs[1]).attempts == 1
    assert world.failure(refs[0]) is None and world.failure(refs[2]) is None
    source.make_readable(refs[1].uid)
    assert copy_queued(world, []) == [(refs[1].uid, Outcome.COPIED), (refs[2].uid, Outcome.COPIED)]
    assert world.destination.bodies("Work") == bodies(world, refs)


def test_twins_in_one_batch_are_copied_once(world):
    twin = b"Message-ID: <twin@example.org>\r\nSubject: twin\r\n\r\nsame\r\n"
    first, second = world.arrive("work", twin), world.arrive("work", twin)
    assert first.fingerprint == second.fingerprint

    assert copy_queued(world, [first, second]) == [(first.uid, Outcome.COPIED), (None, Outcome.UNPROCESSED)]
    assert world.claim(second) is None  # not claimed: taken up once its twin is final
    assert copy_queued(world, []) == [(second.uid, Outcome.SKIPPED)]
    assert world.destination.bodies("Work") == [twin]


def test_ctrl_c_while_finalizing_leaves_the_landed_copies_to_be_found_not_appended_again(world):
    refs = [world.arrive("work") for _ in range(3)]
    world.state.fail("finalize", after=1, times=1, error=KeyboardInterrupt())
    world.queue.send_refs(refs)
    batch = world.queue.receive(10, visibility_timeout=60)

    with pytest.raises(KeyboardInterrupt):
        copy_batch(batch, copier=world.copier(), queue=world.queue)

    # All three landed; the first is final; the others, let go unfinalized, stay APPENDING (a
    # claim let go as failed would be appended again without a look: a second copy).
    assert [world.claim(ref).status for ref in refs] == [ClaimStatus.DONE, ClaimStatus.APPENDING, ClaimStatus.APPENDING]
    assert [world.claim(ref).owner for ref in refs[1:]] == [None, None]
    again = copy_batch(batch, copier=world.copier("consumer-2"), queue=world.queue)
    assert [(result.outcome, result.detail) for _, result in again] == [
        (Outcome.ALREADY_DONE, ""),
        (Outcome.COPIED, f"{FOUND_IN_DESTINATION} after an interrupted APPEND"),
        (Outcome.COPIED, f"{FOUND_IN_DESTINATION} after an interrupted APPEND"),
    ]
    assert world.destination.bodies("Work") == bodies(world, refs)


def test_a_new_routes_first_messages_are_matched_in_one_listing_of_the_destination(world):
    """Found by a route's first scan (the state store knew nothing of it): each may have been
    copied before. The destination folder is listed once a run, not searched per message (six
    round trips a message made a new route's first run slow at any latency)."""
    refs = [world.arrive("work") for _ in range(4)]
    world.destination.create_folder("Work")
    for ref in refs[:2]:  # copied by an earlier run whose state was lost
        world.destination.append("Work", world.source_of("work").message("INBOX", ref.uid).as_source_message())
    world.state.set_lookup_bound("work", refs[0].uidvalidity, refs[-1].uid)
    world.destination.calls.clear()

    copier = world.copier()  # one a drain run
    first = copy_queued(world, refs[:3], copier)
    second = copy_queued(world, refs[3:], copier)

    assert first + second == [(ref.uid, Outcome.COPIED) for ref in refs]
    assert world.destination.bodies("Work") == bodies(world, refs)  # each once
    operations = [operation for operation, _ in world.destination.calls]
    assert operations.count("identities_since") == 1
    assert "find_copies" not in operations


def test_the_next_chunks_fetch_goes_on_while_this_chunks_appends_go_out(world):
    refs = [world.arrive("work") for _ in range(CHUNK_MESSAGES * 2 + 1)]
    source = world.source_of("work")
    # The second chunk's FETCH and the first chunk's first APPEND each wait for the other to
    # begin: only when both are under way at once do they go on before the timeout.
    both_under_way = threading.Barrier(2, timeout=5)
    overlapped = []

    def meet() -> None:
        try:
            both_under_way.wait()
            overlapped.append(True)
        except threading.BrokenBarrierError:
            overlapped.append(False)

    source.before_next("fetch_many", lambda: None)  # the first chunk's, before any APPEND
    source.before_next("fetch_many", meet)
    world.destination.before_next("append", meet)

    results = world.copier().copy_messages(refs)  # a local batch (the local queue gives 100)

    assert [(result.key.uid, result.outcome) for result in results] == [(ref.uid, Outcome.COPIED) for ref in refs]
    assert overlapped == [True, True]
    # Two full chunks with one FETCH each; the last message alone, fetched on its own.
    assert [len(uids) for operation, uids in source.calls if operation == "fetch_many"] == [CHUNK_MESSAGES] * 2
    assert world.destination.bodies("Work") == bodies(world, refs)  # in the route's order
    assert [world.claim(ref).status for ref in refs] == [ClaimStatus.DONE] * len(refs)
