"""`Copier.copy_message` and the destination's limits, on fakes: a refusal that becomes final
after a second failure (Outlook.com's Command Error 10 and Argument Error 11), and the size
checked against MAX_MESSAGE_BYTES before the message is downloaded.

What a user would check: the claim's status and reason (what `status` shows), the failure
record, what reached the destination, and what was read from the source.
"""

from __future__ import annotations

import dataclasses

import pytest

from shared.pipeline.copier import Copier, CopyResult, Outcome
from shared.state import ClaimStatus
from tests.fakes import FakeWorld, email
from tests.fakes.world import LEASE_SECONDS

LINE_TOO_LONG = "rejected by the destination: Command Error. 10 (a line longer than it accepts)"
CANNOT_PARSE = "rejected by the destination: Command Argument Error. 11 (a message it cannot parse)"


@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path)
    yield world
    world.close()


def limited(world: FakeWorld, max_message_bytes: int, owner: str = "consumer-1") -> Copier:
    return dataclasses.replace(world.copier(owner), max_message_bytes=max_message_bytes)


# ---- refused until it is final -------------------------------------------------------------------
@pytest.mark.parametrize("reason", [LINE_TOO_LONG, CANNOT_PARSE])
def test_refused_twice_is_skipped_with_the_reason_after_one_retry(world, reason):
    ref = world.arrive("work")
    world.destination.refuse_next_append(reason, permanent=False, final_after=2, times=2)

    first = world.copier().copy_message(ref)
    # The first refusal may be a glitch: failed, released, retried by the queue.
    assert first.outcome is Outcome.FAILED and reason in first.detail
    assert world.claim(ref).status is ClaimStatus.FAILED
    assert world.failure(ref).attempts == 1

    second = world.copier().copy_message(ref)
    assert second == CopyResult(Outcome.SKIPPED, ref.key, reason)
    assert second.outcome.acknowledged  # not retried again: the queue deletes it
    claim = world.claim(ref)
    assert (claim.status, claim.reason) == (ClaimStatus.SKIPPED, reason)
    assert world.failure(ref) is None
    assert world.destination.bodies("Work") == []
    assert len(world.destination.calls_to("append")) == 2
    assert world.copier().copy_message(ref).outcome is Outcome.ALREADY_DONE


def test_refused_once_then_taken_is_copied(world):
    ref = world.arrive("work", email("glitch"))
    world.destination.refuse_next_append(CANNOT_PARSE, permanent=False, final_after=2)

    assert world.copier().copy_message(ref).outcome is Outcome.FAILED
    result = world.copier().copy_message(ref)

    assert result.outcome is Outcome.COPIED
    assert world.destination.bodies("Work") == [email("glitch")]
    assert (world.claim(ref).status, world.failure(ref)) == (ClaimStatus.DONE, None)


def test_final_after_one_is_skipped_on_the_first_refusal(world):
    ref = world.arrive("work")
    world.destination.refuse_next_append(LINE_TOO_LONG, permanent=False, final_after=1)

    assert world.copier().copy_message(ref) == CopyResult(Outcome.SKIPPED, ref.key, LINE_TOO_LONG)


def test_other_refusals_stay_failures_however_often_they_come(world):
    # Unchanged: a refusal without final_after (e.g. Server Unavailable. 15) is never final.
    ref = world.arrive("work")
    reason = "refused for now by the destination: Server Unavailable. 15"
    world.destination.refuse_next_append(reason, permanent=False, times=3)

    outcomes = [world.copier().copy_message(ref).outcome for _ in range(3)]

    assert outcomes == [Outcome.FAILED] * 3
    assert (world.claim(ref).status, world.failure(ref).attempts) == (ClaimStatus.FAILED, 3)
    assert world.copier().copy_message(ref).outcome is Outcome.COPIED


# ---- the size, before the download ---------------------------------------------------------------
def test_a_message_over_the_limit_is_skipped_without_downloading_it(world):
    big = world.arrive("work", email("big", body="x" * 5000))
    small = world.arrive("work", email("small"))
    assert big.size > 4096 > small.size

    skipped = limited(world, 4096).copy_message(big)
    copied = limited(world, 4096).copy_message(small)

    reason = f"too large for the destination ({big.size} bytes, limit 4096)"
    assert skipped == CopyResult(Outcome.SKIPPED, big.key, reason)
    assert (world.claim(big).status, world.claim(big).reason) == (ClaimStatus.SKIPPED, reason)
    assert copied.outcome is Outcome.COPIED
    assert world.destination.bodies("Work") == [email("small")]
    # Only the small one was fetched; the big one never was, nor appended.
    assert world.source_of("work").calls_to("fetch") == [("fetch", small.uid)]
    assert len(world.destination.calls_to("append")) == 1


def test_a_message_at_the_limit_and_one_of_unknown_size_are_copied(world):
    at_limit = world.arrive("work", email("exact"))
    unknown = dataclasses.replace(world.arrive("work", email("no size", body="y" * 5000)), size=None)

    copier = limited(world, at_limit.size)

    assert copier.copy_message(at_limit).outcome is Outcome.COPIED
    assert copier.copy_message(unknown).outcome is Outcome.COPIED  # an older producer's reference
    assert world.destination.bodies("Work") == [email("exact"), email("no size", body="y" * 5000)]


def test_an_interrupted_append_is_looked_for_whatever_the_limit(world):
    """A process died after sending the APPEND of a message the limit (lowered since) would
    skip: the copy it may have made is looked for, not hidden behind a skip."""
    ref = world.arrive("work", email("landed", body="z" * 5000))
    folder = world.routes["work"].outlook_folder
    world.destination.create_folder(folder)
    floor = world.destination.folders[folder]
    world.state.inner.claim_uid(ref.key, "crashed", world.clock() + LEASE_SECONDS)
    world.state.inner.mark_appending(ref.key, "crashed", dest_uidvalidity=floor.uidvalidity, dest_uid_floor=floor.uidnext)
    message = world.source_of("work").message("INBOX", ref.uid).as_source_message()
    world.destination.append(folder, message)
    world.clock.advance(LEASE_SECONDS + 1)

    result = limited(world, 4096).copy_message(ref)

    assert result.outcome is Outcome.COPIED
    assert world.destination.bodies("Work") == [email("landed", body="z" * 5000)]
