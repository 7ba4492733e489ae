"""`reconcile` on fakes: a state store that knows nothing of earlier copies learns them from the
destination folder, so that copying afterwards makes no second copy and misses none.

The destination here holds copies made "before": by the fake's own APPEND (exact bytes, the
source's INTERNALDATE), or by another copier that kept neither the bytes nor the INTERNALDATE.
"""

from __future__ import annotations

import datetime as dt

import pytest

from shared.pipeline.copier import Outcome
from shared.pipeline.reconcile import RECONCILED, reconcile_routes
from shared.pipeline.scan import ScanLimits, scan_routes
from shared.state import ClaimStatus
from tests.fakes import FakeWorld, email, make_route

DAY = dt.date(2023, 11, 14)  # the fake clock's day
SINCE = DAY - dt.timedelta(days=7)


def at(hour: int, day: dt.date = DAY) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour), dt.timezone.utc)


@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path, [make_route("work", outlook_folder="Work")])
    yield world
    world.close()


def reconcile(world: FakeWorld, *, dry_run: bool = False, owner: str = "reconcile-1"):
    [result] = reconcile_routes(
        list(world.routes.values()),
        state=world.state,
        open_source=world.mailboxes.open_source,
        destination=lambda: world.destination,
        since_of=lambda route: SINCE,
        owner=owner,
        lease_until=lambda: world.clock() + 60,
        dry_run=dry_run,
    )
    return result


def copied_before(world: FakeWorld, body: bytes, internaldate: dt.datetime) -> int:
    """A copy already in the destination folder, as an APPEND leaves it; its UID."""
    folder = world.destination.create_folder("Work")
    return folder.store(body, (), internaldate, None)


def drain(world: FakeWorld) -> list[Outcome]:
    scan_routes(
        list(world.routes.values()),
        state=world.state,
        queue=world.queue,
        open_source=world.mailboxes.open_source,
        limits=ScanLimits(max_enqueue_per_run=1000, fallback_since_days=7, today=DAY),
    )
    copier = world.copier()
    return [copier.copy_message(ref).outcome for ref in world.queue.refs()]


def test_copies_already_in_the_folder_are_recorded_and_only_the_rest_is_copied(world):
    bodies = [email(f"message {n}") for n in range(5)]
    refs = [world.arrive("work", body, internaldate=at(8 + n)) for n, body in enumerate(bodies)]
    before = {n: copied_before(world, bodies[n], at(8 + n)) for n in (0, 2, 3)}
    copied_before(world, email("not from this source"), at(9))

    result = reconcile(world)

    assert (result.in_source, result.found, result.not_found, result.by_identity_only) == (5, 3, 2, 0)
    for n, dest_uid in before.items():
        claim = world.claim(refs[n])
        assert (claim.status, claim.dest_uid, claim.reason) == (ClaimStatus.DONE, dest_uid, RECONCILED)
        assert claim.fingerprint == refs[n].fingerprint
    assert world.destination.appends == 0

    outcomes = drain(world)
    assert sorted(outcomes) == sorted([Outcome.ALREADY_DONE] * 3 + [Outcome.COPIED] * 2)
    assert sorted(world.destination.bodies("Work")) == sorted([*bodies, email("not from this source")])


def test_a_dry_run_counts_the_same_and_records_nothing(world):
    bodies = [email(f"message {n}") for n in range(3)]
    refs = [world.arrive("work", body, internaldate=at(8 + n)) for n, body in enumerate(bodies)]
    copied_before(world, bodies[1], at(9))

    result = reconcile(world, dry_run=True)

    assert (result.in_source, result.found, result.not_found) == (3, 1, 2)
    assert [world.claim(ref) for ref in refs] == [None, None, None]


def test_copies_another_copier_made_later_and_rebuilt_are_matched_by_their_headers(world):
    # Another copier gave its copies the time of copying and the destination rebuilt the MIME:
    # only Message-ID, Date, From and Subject are left to match.
    dated = [f"Date: Tue, 14 Nov 2023 0{n}:00:00 +0000" for n in range(3)]
    bodies = [email(f"message {n}", extra_headers=[dated[n]]) for n in range(3)]
    refs = [world.arrive("work", body, internaldate=at(8 + n)) for n, body in enumerate(bodies)]
    for body in bodies[:2]:
        copied_before(world, body.replace(b"\r\n\r\n", b"\r\nX-Rebuilt: yes\r\n\r\n", 1), at(20))

    result = reconcile(world)

    assert (result.found, result.by_identity_only, result.not_found) == (2, 2, 1)
    assert [world.claim(ref).status if world.claim(ref) else None for ref in refs] == [ClaimStatus.DONE, ClaimStatus.DONE, None]


def test_a_message_without_message_id_is_matched_by_its_internaldate_only(world):
    body = email("no id", message_id=None, extra_headers=["Date: Tue, 14 Nov 2023 08:00:00 +0000"])
    same_time, other_time = world.arrive("work", body, internaldate=at(8)), world.arrive("work", body, internaldate=at(9))
    copied_before(world, body, at(8))

    result = reconcile(world)

    # Headers alone could not tell the two apart: the one without a dated copy is copied.
    assert (result.found, result.not_found) == (1, 1)
    assert world.claim(same_time).status is ClaimStatus.DONE
    assert world.claim(other_time) is None


def test_one_copy_stands_for_one_source_message(world):
    # Two alike (a duplicate delivered twice, one Message-ID) and one copy in the destination.
    body = email("twice", extra_headers=["Date: Tue, 14 Nov 2023 08:00:00 +0000"])
    first, second = world.arrive("work", body, internaldate=at(8)), world.arrive("work", body, internaldate=at(10))
    copied_before(world, body, at(10))

    result = reconcile(world)

    assert (result.found, result.by_identity_only, result.not_found) == (1, 0, 1)
    assert world.claim(second).status is ClaimStatus.DONE  # the copy with its INTERNALDATE
    assert world.claim(first) is None


def test_recorded_messages_are_left_as_they_are_and_keep_their_copy(world):
    body = email("copied by us", extra_headers=["Date: Tue, 14 Nov 2023 08:00:00 +0000"])
    ours = world.arrive("work", body, internaldate=at(8))
    assert world.copier().copy_message(ours).outcome is Outcome.COPIED
    twin = world.arrive("work", body, internaldate=at(11))  # its copy, if any, would be another

    result = reconcile(world)

    assert (result.recorded_before, result.found, result.not_found) == (1, 0, 1)
    assert world.claim(twin) is None


def test_a_message_a_running_copier_holds_is_left_to_it(world):
    body = email("in flight")
    ref = world.arrive("work", body, internaldate=at(8))
    copied_before(world, body, at(8))
    assert world.state.claim_uid(ref.key, "consumer-2", world.clock() + 60).outcome.value == "claimed"

    result = reconcile(world)

    assert (result.busy, result.found) == (1, 0)
    assert world.claim(ref).owner == "consumer-2"


def test_a_folder_that_does_not_exist_yet_holds_no_copies(world):
    world.arrive("work", email("first"), internaldate=at(8))

    result = reconcile(world)

    assert (result.in_source, result.found, result.not_found, result.error) == (1, 0, 1, None)
