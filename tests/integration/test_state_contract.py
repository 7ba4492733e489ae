"""The state store contract: one suite, run against both adapters.

SQLite on a file under tmp_path; DynamoDB on moto's server over HTTP, a fresh table per test.
A controllable clock moves leases past their expiry without sleeping.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import re
import socket
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.aws import make_client
from shared.errors import ClaimLost, StateStoreUnavailable
from shared.state.dynamodb import DynamoStateStore, create_state_table
from shared.state.port import (
    MAX_ERROR_TEXT,
    ClaimOutcome,
    ClaimStatus,
    Copied,
    CopiedMessage,
    FailureRecord,
    HolderState,
    Pause,
    RouteCounts,
    RouteStart,
    ScanRecord,
    TokenHealth,
    UidKey,
    Watermark,
)
from shared.state.sqlite import SqliteStateStore
from tests.fakes.state import FailingStateStore
from tests.harness.aws import REGION, unique_name
from tests.harness.aws_cost import _kilobytes
from tests.harness.aws_cost import _size as _item_size

START = 1_700_000_000.0
LEASE = 60.0
ROUTE = "work"


class FakeClock:
    def __init__(self, now: float = START):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def uid_key(uid: int = 42, *, route: str = ROUTE, uidvalidity: int = 7) -> UidKey:
    return UidKey(route, uidvalidity, uid)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dynamodb_client(aws_env):
    return make_client("dynamodb", aws_env["AWS_ENDPOINT_URL"], REGION)


@pytest.fixture(params=["sqlite", "dynamodb", "failing-wrapper"])
def store(request, tmp_path, clock):
    if request.param == "sqlite":
        store = SqliteStateStore(tmp_path / "state" / "state.db", clock=clock)
        yield store
        store.close()
    elif request.param == "failing-wrapper":
        # The unit tests' fault-injecting wrapper, with no fault set: it must change nothing.
        store = FailingStateStore(SqliteStateStore(tmp_path / "state" / "state.db", clock=clock))
        yield store
        store.close()
    else:
        client = request.getfixturevalue("dynamodb_client")
        table = unique_name("state")
        create_state_table(client, table)
        store = DynamoStateStore(table, client=client, clock=clock)
        yield store
        store.close()
        client.delete_table(TableName=table)


def claim(store, key: UidKey, owner: str, clock: FakeClock, lease: float = LEASE):
    return store.claim_uid(key, owner, clock.now + lease)


# -- watermark -----------------------------------------------------------------------------
def test_watermark_is_absent_until_set(store):
    assert store.read_watermark(ROUTE) is None
    assert store.advance_watermark(ROUTE, 7, 100) is True
    assert store.read_watermark(ROUTE) == Watermark(7, 100)
    assert store.read_watermark("other") is None


def test_watermark_moves_only_up_for_the_same_uidvalidity(store):
    store.advance_watermark(ROUTE, 7, 100)

    assert store.advance_watermark(ROUTE, 7, 99) is False
    assert store.advance_watermark(ROUTE, 7, 100) is False
    assert store.read_watermark(ROUTE) == Watermark(7, 100)

    assert store.advance_watermark(ROUTE, 7, 101) is True
    assert store.read_watermark(ROUTE) == Watermark(7, 101)


def test_watermark_of_a_new_uidvalidity_replaces_the_old_one(store):
    store.advance_watermark(ROUTE, 7, 100)

    assert store.advance_watermark(ROUTE, 8, 3) is True

    assert store.read_watermark(ROUTE) == Watermark(8, 3)


# -- scans ---------------------------------------------------------------------------------
def test_scan_record_is_absent_until_recorded(store):
    assert store.read_scan(ROUTE) is None
    store.record_scan(ROUTE, None)

    assert store.read_scan(ROUTE) == ScanRecord(at=START, error=None, failing_since=None)
    assert store.read_scan("other") is None


def test_failed_scans_keep_the_time_of_the_first_failure(store, clock):
    store.record_scan(ROUTE, None)
    clock.advance(10)
    store.record_scan(ROUTE, "connection refused")
    clock.advance(30)

    store.record_scan(ROUTE, "login failed")

    assert store.read_scan(ROUTE) == ScanRecord(at=START + 40, error="login failed", failing_since=START + 10)


def test_a_scan_that_works_clears_the_error(store, clock):
    store.record_scan(ROUTE, "connection refused")
    clock.advance(30)
    store.record_scan(ROUTE, None)

    assert store.read_scan(ROUTE) == ScanRecord(at=START + 30, error=None, failing_since=None)
    # A later failure starts a new run of failures.
    clock.advance(30)
    store.record_scan(ROUTE, "timed out")
    assert store.read_scan(ROUTE) == ScanRecord(at=START + 60, error="timed out", failing_since=START + 60)


def test_record_scan_cuts_long_text(store):
    store.record_scan(ROUTE, "x" * (MAX_ERROR_TEXT + 500))

    assert store.read_scan(ROUTE).error == "x" * MAX_ERROR_TEXT


def test_the_scan_record_and_the_watermark_do_not_overwrite_each_other(store, clock):
    store.record_scan(ROUTE, "connection refused")
    store.advance_watermark(ROUTE, 7, 100)
    clock.advance(5)
    store.advance_watermark(ROUTE, 7, 101)
    store.record_scan(ROUTE, "connection refused")

    assert store.read_watermark(ROUTE) == Watermark(7, 101)
    assert store.read_scan(ROUTE) == ScanRecord(at=START + 5, error="connection refused", failing_since=START)


# -- claiming ------------------------------------------------------------------------------
def test_claiming_a_new_uid(store, clock):
    result = claim(store, uid_key(), "a", clock)

    assert result.outcome is ClaimOutcome.CLAIMED
    assert result.claim.status is ClaimStatus.IN_PROGRESS
    assert (result.claim.owner, result.claim.attempts, result.claim.lease_until) == ("a", 1, START + LEASE)
    assert store.get_claim(uid_key()) == result.claim
    assert store.get_claim(uid_key(43)) is None


def test_a_live_claim_is_held_and_shows_its_holder(store, clock):
    claim(store, uid_key(), "a", clock)
    clock.advance(LEASE - 1)

    result = claim(store, uid_key(), "b", clock)

    assert result.outcome is ClaimOutcome.HELD
    assert (result.claim.owner, result.claim.attempts) == ("a", 1)
    assert store.get_claim(uid_key()).owner == "a"


def test_the_holder_claiming_again_keeps_its_claim(store, clock):
    # As when a request is retried after its first answer was lost.
    first = claim(store, uid_key(), "a", clock)

    again = claim(store, uid_key(), "a", clock)

    assert again.outcome is ClaimOutcome.CLAIMED
    assert again.claim == first.claim


def test_an_expired_claim_is_taken_over(store, clock):
    claim(store, uid_key(), "a", clock)
    clock.advance(LEASE + 1)

    result = claim(store, uid_key(), "b", clock)

    assert result.outcome is ClaimOutcome.CLAIMED
    assert result.claim.status is ClaimStatus.IN_PROGRESS
    assert (result.claim.owner, result.claim.attempts) == ("b", 2)
    assert store.get_claim(uid_key()) == result.claim


def test_an_appending_claim_taken_over_stays_appending(store, clock):
    claim(store, uid_key(), "a", clock)
    store.mark_appending(uid_key(), "a")
    clock.advance(LEASE + 1)

    result = claim(store, uid_key(), "b", clock)

    assert result.outcome is ClaimOutcome.CLAIMED
    assert result.claim.status is ClaimStatus.APPENDING
    assert (result.claim.owner, result.claim.attempts) == ("b", 2)


def test_extending_the_lease_keeps_the_claim_held(store, clock):
    claim(store, uid_key(), "a", clock)
    store.extend_lease(uid_key(), "a", clock.now + 10 * LEASE)
    clock.advance(2 * LEASE)

    assert claim(store, uid_key(), "b", clock).outcome is ClaimOutcome.HELD


def test_mark_appending(store, clock):
    claim(store, uid_key(), "a", clock)

    store.mark_appending(uid_key(), "a")
    store.mark_appending(uid_key(), "a")  # already APPENDING: still fine

    assert store.get_claim(uid_key()).status is ClaimStatus.APPENDING


def test_where_an_append_lands_is_kept_across_takeovers_until_the_next_append(store, clock):
    claim(store, uid_key(), "a", clock)
    store.mark_appending(uid_key(), "a", dest_uidvalidity=9, dest_uid_floor=120)
    clock.advance(LEASE + 1)

    taken = claim(store, uid_key(), "b", clock).claim
    assert (taken.status, taken.dest_uidvalidity, taken.dest_uid_floor) == (ClaimStatus.APPENDING, 9, 120)
    store.release(uid_key(), "b", append_outcome_unknown=True)
    again = claim(store, uid_key(), "c", clock).claim
    assert (again.dest_uidvalidity, again.dest_uid_floor) == (9, 120)
    assert store.get_claim(uid_key()) == again

    store.mark_appending(uid_key(), "c", dest_uidvalidity=9, dest_uid_floor=131)
    assert (store.get_claim(uid_key()).dest_uidvalidity, store.get_claim(uid_key()).dest_uid_floor) == (9, 131)
    store.mark_appending(uid_key(), "c")  # where this one lands is not known: no stale floor is kept
    assert (store.get_claim(uid_key()).dest_uidvalidity, store.get_claim(uid_key()).dest_uid_floor) == (None, None)


def test_a_claim_taken_again_after_a_certain_failure_has_no_floor(store, clock):
    claim(store, uid_key(), "a", clock)
    store.mark_appending(uid_key(), "a", dest_uidvalidity=9, dest_uid_floor=120)
    store.release(uid_key(), "a")  # refused: the APPEND certainly did not land

    taken = claim(store, uid_key(), "b", clock).claim
    assert (taken.status, taken.dest_uidvalidity, taken.dest_uid_floor) == (ClaimStatus.IN_PROGRESS, None, None)
    assert store.get_claim(uid_key()) == taken


def test_a_state_file_of_an_earlier_version_gains_the_new_columns(tmp_path, clock):
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:  # the claims table as the first release made it
        db.execute(
            "CREATE TABLE claims (route TEXT NOT NULL, uidvalidity INTEGER NOT NULL, uid INTEGER NOT NULL,"
            " status TEXT NOT NULL, owner TEXT, lease_until REAL NOT NULL, attempts INTEGER NOT NULL,"
            " dest_uid INTEGER, fingerprint TEXT, reason TEXT, updated_at REAL NOT NULL,"
            " PRIMARY KEY (route, uidvalidity, uid))"
        )
        db.execute("INSERT INTO claims VALUES ('work', 7, 42, 'appending', NULL, 0, 1, NULL, NULL, NULL, 1.0)")
        db.execute(
            "CREATE TABLE fingerprints (route TEXT NOT NULL, fingerprint TEXT NOT NULL, uidvalidity INTEGER NOT NULL,"
            " uid INTEGER NOT NULL, dest_uid INTEGER, copied_at REAL NOT NULL, PRIMARY KEY (route, fingerprint))"
        )
        db.execute("INSERT INTO fingerprints VALUES ('work', 'gm:1', 7, 41, 9, 1.0)")
    store = SqliteStateStore(path, clock=clock)
    assert store.find_copied("gm:1", ["work"]) == CopiedMessage("work", "gm:1", 7, 41, 9, 1.0)  # a copy made

    found = store.get_claim(uid_key())
    assert (found.status, found.dest_uidvalidity, found.dest_uid_floor) == (ClaimStatus.APPENDING, None, None)
    claim(store, uid_key(), "a", clock)
    store.mark_appending(uid_key(), "a", dest_uidvalidity=9, dest_uid_floor=5)
    assert store.get_claim(uid_key()).dest_uid_floor == 5
    store.close()
    assert SqliteStateStore(path, clock=clock).get_claim(uid_key()).dest_uid_floor == 5  # opened again: no change


# -- release -------------------------------------------------------------------------------
def test_a_released_claim_is_failed_and_claimable_at_once(store, clock):
    claim(store, uid_key(), "a", clock)

    store.release(uid_key(), "a")

    released = store.get_claim(uid_key())
    assert (released.status, released.owner, released.lease_until) == (ClaimStatus.FAILED, None, 0)
    result = claim(store, uid_key(), "b", clock)
    assert result.outcome is ClaimOutcome.CLAIMED
    assert (result.claim.status, result.claim.owner, result.claim.attempts) == (ClaimStatus.IN_PROGRESS, "b", 2)


def test_releasing_an_append_of_unknown_outcome_keeps_appending(store, clock):
    claim(store, uid_key(), "a", clock)
    store.mark_appending(uid_key(), "a")

    store.release(uid_key(), "a", append_outcome_unknown=True)

    assert store.get_claim(uid_key()).status is ClaimStatus.APPENDING
    result = claim(store, uid_key(), "b", clock)
    assert (result.outcome, result.claim.status) == (ClaimOutcome.CLAIMED, ClaimStatus.APPENDING)


def test_an_unknown_outcome_before_any_append_releases_as_failed(store, clock):
    claim(store, uid_key(), "a", clock)

    store.release(uid_key(), "a", append_outcome_unknown=True)

    assert store.get_claim(uid_key()).status is ClaimStatus.FAILED


# -- ownership -----------------------------------------------------------------------------
CHANGES = {
    "mark_appending": lambda store, key, owner: store.mark_appending(key, owner),
    "extend_lease": lambda store, key, owner: store.extend_lease(key, owner, START + 10 * LEASE),
    "finalize": lambda store, key, owner: store.finalize(key, owner, ClaimStatus.DONE, dest_uid=1),
    "release": lambda store, key, owner: store.release(key, owner),
}


@pytest.mark.parametrize("change", CHANGES)
def test_only_the_owner_changes_a_claim(store, clock, change):
    held = claim(store, uid_key(), "a", clock).claim

    with pytest.raises(ClaimLost) as lost:
        CHANGES[change](store, uid_key(), "b")

    assert str(lost.value) == (
        "claim on route work UID 42 (UIDVALIDITY 7) is not held by b: it is in_progress, owner a"
    )
    assert store.get_claim(uid_key()) == held


@pytest.mark.parametrize("change", CHANGES)
def test_an_owner_taken_over_has_lost_its_claim(store, clock, change):
    claim(store, uid_key(), "a", clock)
    clock.advance(LEASE + 1)
    taken = claim(store, uid_key(), "b", clock).claim

    with pytest.raises(ClaimLost):
        CHANGES[change](store, uid_key(), "a")

    assert store.get_claim(uid_key()) == taken


@pytest.mark.parametrize("change", CHANGES)
def test_an_owner_that_released_has_lost_its_claim(store, clock, change):
    claim(store, uid_key(), "a", clock)
    store.release(uid_key(), "a")

    with pytest.raises(ClaimLost):
        CHANGES[change](store, uid_key(), "a")


@pytest.mark.parametrize("change", CHANGES)
def test_changing_a_claim_that_does_not_exist_is_lost(store, change):
    with pytest.raises(ClaimLost, match="is not held by a: there is no claim"):
        CHANGES[change](store, uid_key(), "a")

    assert store.get_claim(uid_key()) is None


# -- pauses --------------------------------------------------------------------------------
def test_a_pause_is_kept_and_only_ever_lengthened(store, clock):
    assert store.read_pause("destination") is None and store.pauses() == []

    first = store.pause("destination", clock.now + 300, "throttled by the destination (suggested backoff 299609 ms)")
    assert first == Pause("destination", clock.now + 300, "throttled by the destination (suggested backoff 299609 ms)")
    assert store.pause("destination", clock.now + 60, "a shorter one") == first  # the longer stays
    longer = store.pause("destination", clock.now + 600, "a longer one")
    assert longer == Pause("destination", clock.now + 600, "a longer one") == store.read_pause("destination")

    store.pause("source alice@gmail.com", clock.now + 3600, "[OVERQUOTA] bandwidth")
    assert [pause.name for pause in store.pauses()] == ["destination", "source alice@gmail.com"]


# -- downloads -----------------------------------------------------------------------------
def test_downloads_add_up_by_hour_and_are_read_from_an_hour_on(store):
    assert store.downloads("alice@gmail.com", 0) == {}
    store.count_download("alice@gmail.com", 490_000, 3_000_000)
    store.count_download("alice@gmail.com", 490_000, 2_000_000)
    store.count_download("alice@gmail.com", 490_005, 700)
    store.count_download("alice@gmail.com", 490_005, -700)  # taken back: the hour reads as none
    store.count_download("alice@gmail.com", 490_010, 40)
    store.count_download("bob@gmail.com", 490_010, 9)

    assert store.downloads("alice@gmail.com", 490_000) == {490_000: 5_000_000, 490_010: 40}
    assert store.downloads("alice@gmail.com", 490_001) == {490_010: 40}
    assert store.downloads("bob@gmail.com", 0) == {490_010: 9}


def test_downloads_counted_at_once_by_many_threads_all_count(store):
    def count(_: int) -> None:
        for _ in range(10):
            store.count_download("alice@gmail.com", 7, 3)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(count, range(8)))
    assert store.downloads("alice@gmail.com", 0) == {7: 8 * 10 * 3}


# -- finalize ------------------------------------------------------------------------------
def test_finalize_done_records_the_copy(store, clock):
    claim(store, uid_key(), "a", clock)
    store.record_failure(uid_key(), "ImapFailure", "APPEND timed out")
    clock.advance(5)

    store.finalize(uid_key(), "a", ClaimStatus.DONE, dest_uid=9001, fingerprint="gm:1234")

    done = store.get_claim(uid_key())
    assert (done.status, done.dest_uid, done.fingerprint, done.owner) == (ClaimStatus.DONE, 9001, "gm:1234", "a")
    assert store.get_failure(uid_key()) is None
    assert store.find_copied("gm:1234", [ROUTE]) == CopiedMessage(
        route=ROUTE, fingerprint="gm:1234", uidvalidity=7, uid=42, dest_uid=9001, copied_at=START + 5
    )


def test_find_copied_searches_only_the_given_routes(store, clock):
    claim(store, uid_key(route="home"), "a", clock)
    store.finalize(uid_key(route="home"), "a", ClaimStatus.DONE, dest_uid=5, fingerprint="gm:1")

    assert store.find_copied("gm:1", [ROUTE]) is None
    assert store.find_copied("gm:1", []) is None
    assert store.find_copied("gm:2", [ROUTE, "home"]) is None
    found = store.find_copied("gm:1", [ROUTE, "home"])
    assert (found.route, found.uid, found.dest_uid) == ("home", 42, 5)


def test_an_append_left_unresolved_is_recorded_with_its_floor_until_a_copy_resolves_it(store, clock):
    """The source was renumbered under an interrupted APPEND: the old UID is skipped, and its
    fingerprint says where that APPEND may have landed, until its copy under the new UID is done."""
    old, new = uid_key(42, uidvalidity=7), uid_key(5, uidvalidity=8)
    claim(store, old, "a", clock)
    store.mark_appending(old, "a", dest_uidvalidity=9, dest_uid_floor=120)
    store.finalize(old, "a", ClaimStatus.SKIPPED, fingerprint="h:abc", reason="renumbered", append_unresolved=True)

    left = store.find_copied("h:abc", [ROUTE])
    assert (left.unresolved, left.dest_uid, left.dest_uidvalidity, left.dest_uid_floor) == (True, None, 9, 120)
    assert (left.uidvalidity, left.uid) == (7, 42)
    assert store.get_claim(old).status is ClaimStatus.SKIPPED

    claim(store, new, "b", clock)
    store.finalize(new, "b", ClaimStatus.DONE, dest_uid=121, fingerprint="h:abc")
    resolved = store.find_copied("h:abc", [ROUTE])
    assert (resolved.unresolved, resolved.dest_uid, resolved.uidvalidity, resolved.uid) == (False, 121, 8, 5)


def test_an_unresolved_append_never_replaces_a_copy_made(store, clock):
    copied, old = uid_key(1), uid_key(2)
    claim(store, copied, "a", clock)
    store.finalize(copied, "a", ClaimStatus.DONE, dest_uid=50, fingerprint="h:x")
    claim(store, old, "a", clock)
    store.mark_appending(old, "a", dest_uidvalidity=9, dest_uid_floor=60)

    store.finalize(old, "a", ClaimStatus.SKIPPED, fingerprint="h:x", reason="renumbered", append_unresolved=True)

    found = store.find_copied("h:x", [ROUTE])
    assert (found.unresolved, found.dest_uid, found.uid) == (False, 50, 1)
    assert store.get_claim(old).status is ClaimStatus.SKIPPED


def test_finalize_skipped_keeps_the_reason(store, clock):
    claim(store, uid_key(), "a", clock)

    store.finalize(uid_key(), "a", ClaimStatus.SKIPPED, reason="too large", fingerprint="gm:9")

    skipped = store.get_claim(uid_key())
    assert (skipped.status, skipped.reason, skipped.dest_uid) == (ClaimStatus.SKIPPED, "too large", None)
    # Only a copy is a fingerprint record: a skipped message never reached the destination.
    assert store.find_copied("gm:9", [ROUTE]) is None


def test_a_final_claim_is_never_claimed_again(store, clock):
    claim(store, uid_key(), "a", clock)
    store.finalize(uid_key(), "a", ClaimStatus.DONE, dest_uid=9001)
    done = store.get_claim(uid_key())
    clock.advance(1000 * LEASE)

    result = claim(store, uid_key(), "b", clock)

    assert result.outcome is ClaimOutcome.FINAL
    assert result.claim == done
    assert store.get_claim(uid_key()) == done


def test_finalizing_twice_is_lost(store, clock):
    claim(store, uid_key(), "a", clock)
    store.finalize(uid_key(), "a", ClaimStatus.DONE, dest_uid=9001)

    with pytest.raises(ClaimLost, match="it is done, owner a"):
        store.finalize(uid_key(), "a", ClaimStatus.DONE, dest_uid=9002)

    assert store.get_claim(uid_key()).dest_uid == 9001


@pytest.mark.parametrize("status", [ClaimStatus.IN_PROGRESS, ClaimStatus.APPENDING, ClaimStatus.FAILED])
def test_finalize_needs_a_final_status(store, clock, status):
    held = claim(store, uid_key(), "a", clock).claim

    with pytest.raises(ValueError, match="final status"):
        store.finalize(uid_key(), "a", status)

    assert store.get_claim(uid_key()) == held


# -- failures ------------------------------------------------------------------------------
def test_record_failure_counts_attempts_and_keeps_the_first_time(store, clock):
    assert store.get_failure(uid_key()) is None
    assert store.record_failure(uid_key(), "ImapFailure", "connection reset") == 1
    clock.advance(30)

    assert store.record_failure(uid_key(), "TimeoutError", "read timed out") == 2

    assert store.get_failure(uid_key()) == FailureRecord(
        key=uid_key(),
        attempts=2,
        error_class="TimeoutError",
        error_text="read timed out",
        first_failure_at=START,
        last_failure_at=START + 30,
    )


def test_record_failure_cuts_long_text(store):
    store.record_failure(uid_key(), "ImapFailure", "x" * (MAX_ERROR_TEXT + 500))

    assert store.get_failure(uid_key()).error_text == "x" * MAX_ERROR_TEXT


# -- reporting and health ------------------------------------------------------------------
def test_route_counts(store, clock):
    def finish(uid, status, **fields):
        claim(store, uid_key(uid), "a", clock)
        store.finalize(uid_key(uid), "a", status, **fields)

    finish(1, ClaimStatus.DONE, dest_uid=1, fingerprint="gm:1")
    finish(2, ClaimStatus.DONE, dest_uid=2)
    finish(3, ClaimStatus.SKIPPED, reason="too large")
    finish(4, ClaimStatus.SKIPPED, reason="too large")
    finish(5, ClaimStatus.SKIPPED, reason="duplicate")
    finish(6, ClaimStatus.SKIPPED)
    claim(store, uid_key(7), "a", clock)
    claim(store, uid_key(8), "a", clock)
    store.release(uid_key(8), "a")
    store.record_failure(uid_key(8), "ImapFailure", "rejected")
    store.record_failure(uid_key(8), "ImapFailure", "rejected")
    store.record_failure(uid_key(9), "TimeoutError", "slow")
    store.advance_watermark(ROUTE, 7, 9)
    store.record_scan(ROUTE, "connection refused")
    # Another route's records are not counted.
    claim(store, uid_key(1, route="home"), "a", clock)
    store.record_failure(uid_key(1, route="home"), "ImapFailure", "rejected")

    assert store.route_counts(ROUTE) == RouteCounts(
        by_status={"done": 2, "skipped": 4, "in_progress": 1, "failed": 1},
        skipped_reasons={"too large": 2, "duplicate": 1, "no reason given": 1},
        failures={"ImapFailure": 1, "TimeoutError": 1},
    )
    assert store.route_counts("empty") == RouteCounts()


def test_route_counts_reads_every_page(store, clock):
    # DynamoDB returns a query in pages of at most 1 MB; these claims take three pages.
    reason = "r" * 60_000
    for uid in range(1, 41):
        claim(store, uid_key(uid), "a", clock)
        store.finalize(uid_key(uid), "a", ClaimStatus.SKIPPED, reason=reason)

    counts = store.route_counts(ROUTE)

    assert counts.by_status == {"skipped": 40}
    assert counts.skipped_reasons == {reason: 40}


def test_check_health_passes_on_a_good_store(store):
    store.check_health()
    store.check_health()


def test_describe_names_the_backend(store):
    assert re.fullmatch(r"SQLite /\S+/state/state\.db|DynamoDB table state-[0-9a-f]{10}", store.describe())


# -- races ---------------------------------------------------------------------------------
THREADS = 16
RACED_UIDS = range(1, 21)


def test_one_claim_wins_per_uid_across_threads(store, clock):
    start = threading.Barrier(THREADS, timeout=30)

    def worker(n: int) -> list[tuple[int, str, ClaimOutcome]]:
        owner = f"worker-{n}"
        start.wait()
        return [(uid, owner, claim(store, uid_key(uid), owner, clock).outcome) for uid in RACED_UIDS]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [row for rows in pool.map(worker, range(THREADS)) for row in rows]

    assert_one_winner_per_uid(store, results, contenders=THREADS)


def assert_one_winner_per_uid(store, results, *, contenders: int) -> None:
    winners = defaultdict(list)
    for uid, owner, outcome in results:
        if outcome is ClaimOutcome.CLAIMED:
            winners[uid].append(owner)
    assert {uid: len(owners) for uid, owners in winners.items()} == dict.fromkeys(RACED_UIDS, 1)
    assert Counter(outcome for _, _, outcome in results) == {
        ClaimOutcome.CLAIMED: len(RACED_UIDS),
        ClaimOutcome.HELD: len(RACED_UIDS) * (contenders - 1),
    }
    for uid, (owner,) in winners.items():
        won = store.get_claim(uid_key(uid))
        assert (won.owner, won.attempts) == (owner, 1)


PROCESSES = 4


def _claim_in_child(path: str, n: int, start, results) -> None:
    """Runs in a child process: claim every raced UID once, report the outcomes."""
    store = SqliteStateStore(path)
    owner = f"process-{n}"
    try:
        start.wait()
        outcomes = [store.claim_uid(uid_key(uid), owner, time.time() + 600).outcome for uid in RACED_UIDS]
        results.put([(uid, owner, outcome.value) for uid, outcome in zip(RACED_UIDS, outcomes)])
    except Exception as exc:  # reported to the parent, which fails the test with it
        results.put(f"{owner}: {type(exc).__name__}: {exc}")
    finally:
        store.close()


def test_one_sqlite_claim_wins_per_uid_across_processes(tmp_path):
    path = str(tmp_path / "shared" / "state.db")
    # spawn: a fresh interpreter, not a fork of this threaded one (moto's server runs here).
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES, timeout=60)
    results = context.Queue()
    children = [
        context.Process(target=_claim_in_child, args=(path, n, start, results)) for n in range(PROCESSES)
    ]
    for child in children:
        child.start()
    try:
        reports = [results.get(timeout=120) for _ in children]
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.terminate()

    errors = [report for report in reports if isinstance(report, str)]
    assert errors == []
    outcomes = [(uid, owner, ClaimOutcome(outcome)) for report in reports for uid, owner, outcome in report]
    store = SqliteStateStore(path)
    assert_one_winner_per_uid(store, outcomes, contenders=PROCESSES)
    store.close()


# -- when the store cannot be used ---------------------------------------------------------
def test_dynamodb_health_names_a_missing_table(aws_env):
    client = make_client("dynamodb", aws_env["AWS_ENDPOINT_URL"], REGION)
    store = DynamoStateStore("no-such-table", client=client)

    with pytest.raises(StateStoreUnavailable) as unavailable:
        store.check_health()

    assert str(unavailable.value) == (
        "DynamoDB table no-such-table: ResourceNotFoundException: Requested resource not found"
    )


def test_dynamodb_health_fails_fast_when_nothing_listens(aws_env):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    client = make_client("dynamodb", endpoint, REGION)
    store = DynamoStateStore("state", client=client)

    with pytest.raises(StateStoreUnavailable) as unavailable:
        store.check_health()

    assert str(unavailable.value) == (
        f'DynamoDB table state: EndpointConnectionError: Could not connect to the endpoint URL: "{endpoint}/"'
    )
    # A silent endpoint (packets dropped, not refused) is cut short too: botocore's defaults
    # would wait 60 s per connection attempt, and retry.
    config = client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (3, 30)
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}


def closed_port() -> int:
    """A loopback port nothing listens on: one the OS just handed out and we closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sqlite_health_names_a_path_under_a_regular_file(tmp_path):
    (tmp_path / "not-a-dir").write_text("a file where a directory should be")
    path = tmp_path / "not-a-dir" / "state.db"
    store = SqliteStateStore(path)

    with pytest.raises(StateStoreUnavailable) as unavailable:
        store.check_health()

    assert str(unavailable.value) == (
        f"SQLite {path}: cannot create directory {tmp_path / 'not-a-dir'}: a file is in the way"
    )


def test_sqlite_health_names_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not SQLite " * 100)
    store = SqliteStateStore(path)

    with pytest.raises(StateStoreUnavailable) as unavailable:
        store.check_health()

    assert str(unavailable.value) == (
        f"SQLite {path}: file is not a database: the file is damaged: restore it from a backup; if it is truly"
        " lost, move it aside and run again: each route's window is then looked for in the destination before"
        " anything is copied (`reconcile` does it at once), so nothing is copied twice"
    )


# -- token problems -----------------------------------------------------------------------
def test_token_problem_keeps_its_first_time_until_cleared(store, clock):
    assert store.read_token_problem("microsoft") is None
    store.record_token_problem("microsoft", "invalid_grant: revoked")
    clock.advance(60)
    store.record_token_problem("microsoft", "invalid_grant: expired " + "x" * MAX_ERROR_TEXT)

    problem = store.read_token_problem("microsoft")

    assert problem.error == ("invalid_grant: expired " + "x" * MAX_ERROR_TEXT)[:MAX_ERROR_TEXT]
    assert (problem.first_at, problem.last_at) == (START, START + 60)
    store.record_token_problem("microsoft", None)
    assert store.read_token_problem("microsoft") is None
    store.record_token_problem("microsoft", None)  # clearing nothing is fine
    assert store.read_token_problem("microsoft") is None


# -- token health --------------------------------------------------------------------------
def test_token_health_is_written_once_an_hour_at_most(store, clock):
    assert store.read_token_health("google", "alice@gmail.test") is None
    assert store.record_token_worked("google", "alice@gmail.test", "tag-1") is True
    clock.advance(3599)

    # Fresh: every refresh of the hour after it writes nothing.
    assert store.record_token_worked("google", "alice@gmail.test", "tag-1") is False
    assert store.read_token_health("google", "alice@gmail.test") == TokenHealth("google", "alice@gmail.test", "tag-1", START, START)

    clock.advance(1)
    assert store.record_token_worked("google", "alice@gmail.test", "tag-1") is True
    assert store.read_token_health("google", "alice@gmail.test") == TokenHealth(
        "google", "alice@gmail.test", "tag-1", START, START + 3600
    )
    # One record per provider and account.
    assert store.read_token_health("google", "bob@gmail.test") is None
    assert store.read_token_health("microsoft", "alice@gmail.test") is None


def test_a_replaced_token_starts_its_health_record_over(store, clock):
    store.record_token_worked("microsoft", "me@outlook.test", "old")
    clock.advance(60)

    # Another tag: written at once, however fresh the old token's record.
    assert store.record_token_worked("microsoft", "me@outlook.test", "new") is True

    assert store.read_token_health("microsoft", "me@outlook.test") == TokenHealth(
        "microsoft", "me@outlook.test", "new", START + 60, START + 60
    )
    clock.advance(10)
    assert store.record_token_worked("microsoft", "me@outlook.test", "new", fresh_for=5) is True
    assert store.read_token_health("microsoft", "me@outlook.test").first_worked_at == START + 60


# -- route starts --------------------------------------------------------------------------
def test_route_start_is_kept_from_the_first_scan(store, clock):
    assert store.read_route_start(ROUTE) is None
    store.record_route_start(ROUTE, dt.date(2026, 11, 24), 32, 7)
    clock.advance(60)
    store.record_route_start(ROUTE, dt.date(2026, 11, 25), 0, 7)  # a later first scan: the first stays

    assert store.read_route_start(ROUTE) == RouteStart(ROUTE, dt.date(2026, 11, 24), 32, 7, START)
    assert store.read_route_start("other") is None

    # A route's own since: no fallback days; `replace` moves a start on purpose.
    store.record_route_start(ROUTE, dt.date(2020, 1, 1), 0, None, replace=True)
    assert store.read_route_start(ROUTE) == RouteStart(ROUTE, dt.date(2020, 1, 1), 0, None, START + 60)


# -- the holder of a claim (shared.claim_owners) -------------------------------------------
def holders(**states: HolderState):
    """A holder probe answering `states` by owner name, UNKNOWN for anyone else; the names asked."""
    asked: list[str] = []

    def probe(owner: str) -> HolderState:
        asked.append(owner)
        return states.get(owner, HolderState.UNKNOWN)

    return probe, asked


def test_a_claim_past_its_lease_is_not_taken_from_a_holder_still_alive(store, clock):
    key = uid_key()
    claim(store, key, "frozen", clock)
    store.mark_appending(key, "frozen", dest_uidvalidity=5, dest_uid_floor=40)
    clock.advance(LEASE + 1)
    probe, asked = holders(frozen=HolderState.ALIVE)

    held = store.claim_uid(key, "b", clock.now + LEASE, probe)

    assert held.outcome is ClaimOutcome.HELD and held.claim.owner == "frozen" and asked == ["frozen"]
    # Once it is gone, the claim is taken, still appending, with the floor of its APPEND.
    taken = store.claim_uid(key, "b", clock.now + LEASE, holders(frozen=HolderState.GONE)[0])
    assert (taken.outcome, taken.claim.owner, taken.claim.status) == (ClaimOutcome.CLAIMED, "b", ClaimStatus.APPENDING)
    assert (taken.claim.dest_uidvalidity, taken.claim.dest_uid_floor) == (5, 40)


def test_a_claim_of_a_holder_gone_is_taken_at_once_within_its_lease(store, clock):
    key = uid_key()
    claim(store, key, "crashed", clock)
    probe, _ = holders(crashed=HolderState.GONE)

    taken = store.claim_uid(key, "b", clock.now + LEASE, probe)

    assert (taken.outcome, taken.claim.owner, taken.claim.status) == (ClaimOutcome.CLAIMED, "b", ClaimStatus.IN_PROGRESS)
    assert taken.claim.attempts == 2


def test_a_holder_that_cannot_be_told_is_judged_by_its_lease(store, clock):
    key = uid_key()
    claim(store, key, "elsewhere", clock)
    probe, _ = holders()
    assert store.claim_uid(key, "b", clock.now + LEASE, probe).outcome is ClaimOutcome.HELD
    clock.advance(LEASE + 1)
    assert store.claim_uid(key, "b", clock.now + LEASE, probe).outcome is ClaimOutcome.CLAIMED


def test_a_released_or_own_claim_needs_no_word_on_its_holder(store, clock):
    released, own = uid_key(1), uid_key(2)
    claim(store, released, "a", clock)
    store.release(released, "a")
    claim(store, own, "b", clock)
    probe, asked = holders(a=HolderState.ALIVE, b=HolderState.ALIVE)

    assert store.claim_uid(released, "b", clock.now + LEASE, probe).outcome is ClaimOutcome.CLAIMED
    assert store.claim_uid(own, "b", clock.now + LEASE, probe).outcome is ClaimOutcome.CLAIMED
    assert asked == []


# -- lookup bounds (copies this store may not know of) ----------------------------------------
def test_a_lookup_bound_is_kept_once_per_route(store):
    assert store.read_lookup_bound(ROUTE) is None
    store.set_lookup_bound(ROUTE, 7, 40)
    store.set_lookup_bound(ROUTE, 8, 90)  # a later first scan of the route leaves the first bound
    store.set_lookup_bound("other", 3, 5)
    bound = store.read_lookup_bound(ROUTE)
    assert (bound.uidvalidity, bound.last_uid) == (7, 40)
    assert (store.read_lookup_bound("other").uidvalidity, store.read_lookup_bound("other").last_uid) == (3, 5)


def test_a_lookup_bound_widens_to_cover_a_backfill_and_never_narrows(store):
    store.widen_lookup_bound(ROUTE, 7, 30)  # none before: set
    store.set_lookup_bound(ROUTE, 7, 40)  # set once: left as it is
    assert store.read_lookup_bound(ROUTE).last_uid == 30
    store.widen_lookup_bound(ROUTE, 7, 55)
    store.widen_lookup_bound(ROUTE, 7, 12)  # lower: the bound stays
    assert (store.read_lookup_bound(ROUTE).uidvalidity, store.read_lookup_bound(ROUTE).last_uid) == (7, 55)
    store.widen_lookup_bound(ROUTE, 9, 4)  # renumbered: the old UIDs are gone, the new bound counts
    assert (store.read_lookup_bound(ROUTE).uidvalidity, store.read_lookup_bound(ROUTE).last_uid) == (9, 4)


# -- batched writes ------------------------------------------------------------------------------
def test_writes_in_a_batch_all_hold_after_it_and_a_refused_one_is_undone_alone(store, clock):
    first, second = uid_key(1), uid_key(2)
    with pytest.raises(RuntimeError, match="the batch ends with an error"):
        with store.batched():
            assert claim(store, first, "a", clock).outcome is ClaimOutcome.CLAIMED
            with pytest.raises(ClaimLost):
                store.mark_appending(second, "a")  # never claimed: refused, and nothing written
            assert claim(store, second, "a", clock).outcome is ClaimOutcome.CLAIMED
            store.mark_appending(second, "a")
            assert store.get_claim(second).status is ClaimStatus.APPENDING  # read back inside
            raise RuntimeError("the batch ends with an error")
    # Each write that was made holds (as it would have outside a batch); the refused one left none.
    assert (store.get_claim(first).status, store.get_claim(first).owner) == (ClaimStatus.IN_PROGRESS, "a")
    assert (store.get_claim(second).status, store.get_claim(second).owner) == (ClaimStatus.APPENDING, "a")
    assert claim(store, first, "b", clock).outcome is ClaimOutcome.HELD


def test_a_sqlite_batch_is_one_commit_that_other_processes_see_whole(tmp_path, clock):
    path = tmp_path / "state.db"
    store, other = SqliteStateStore(path, clock=clock), SqliteStateStore(path, clock=clock)
    try:
        store.check_health()
        keys = [uid_key(uid) for uid in range(1, 4)]
        with store.batched():
            for key in keys:
                claim(store, key, "a", clock)
            # Not committed yet: another connection sees none of them (WAL readers see the last commit).
            with sqlite3.connect(path) as reader:
                assert reader.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
        assert [other.get_claim(key).owner for key in keys] == ["a", "a", "a"]
    finally:
        store.close()
        other.close()


# -- batches: claim_many, mark_appending_many, extend_leases, finalize_many -----------------------
def keys_of(*uids: int) -> list[UidKey]:
    return [uid_key(uid) for uid in uids]


def prints_of(*uids: int) -> list[str]:
    return [f"gm:{uid}" for uid in uids]


def copies_of(*uids: int) -> list[Copied]:
    return [Copied(uid_key(uid), 1000 + uid, f"gm:{uid}") for uid in uids]


def test_claim_many_claims_in_order_up_to_the_first_held(store, clock):
    claim(store, uid_key(3), "a", clock)

    results = store.claim_many(keys_of(1, 2, 3, 4), "b", clock.now + LEASE, fingerprints=prints_of(1, 2, 3, 4))

    assert [r.outcome for r in results] == [ClaimOutcome.CLAIMED, ClaimOutcome.CLAIMED, ClaimOutcome.HELD]
    assert [store.get_claim(uid_key(uid)).owner for uid in (1, 2, 3)] == ["b", "b", "a"]
    assert store.get_claim(uid_key(4)) is None  # behind the held one: not claimed
    assert results[0].claim == store.get_claim(uid_key(1))


def test_a_batch_of_two_routes_larger_than_one_query_is_claimed_marked_and_finalized_whole(store, clock):
    """A batch's keys read at once (SQLite: an IN list of at most 500 UIDs a query) across two
    routes and a key given twice: every key is claimed, marked and made final, none left out."""
    other = [UidKey("other", 7, uid) for uid in range(1, 4)]
    keys = keys_of(*range(1, 503)) + other + [other[0]]

    results = store.claim_many(keys, "a", clock.now + LEASE)

    assert [r.outcome for r in results] == [ClaimOutcome.CLAIMED] * len(keys)
    assert store.mark_appending_many(keys, "a", dest_uidvalidity=9, dest_uid_floor=100) == len(keys)
    copies = [Copied(key, 5000 + n, f"fp:{key.route}:{key.uid}") for n, key in enumerate(keys[:-1])]
    assert store.finalize_many(copies, "a") == [None] * len(copies)
    sample = [keys[0], keys[499], keys[500], keys[501], *other]
    assert {store.get_claim(key).status for key in sample} == {ClaimStatus.DONE}
    assert store.get_claim(other[2]).dest_uid == 5000 + 504
    assert store.find_copied("fp:other:3", ["other"]).dest_uid == 5000 + 504


def test_a_batch_finalized_is_final_by_key_with_or_without_its_fingerprint(store, clock):
    store.claim_many(keys_of(1, 2, 3), "a", clock.now + LEASE, fingerprints=prints_of(1, 2, 3))
    assert store.mark_appending_many(keys_of(1, 2, 3), "a", dest_uidvalidity=9, dest_uid_floor=100) == 3
    store.record_failure(uid_key(2), "ImapFailure", "APPEND timed out")
    clock.advance(5)

    assert store.finalize_many(copies_of(1, 2), "a") == [None, None]

    for uid in (1, 2):
        for hint in (f"gm:{uid}", None):
            done = store.get_claim(uid_key(uid), fingerprint=hint)
            assert (done.status, done.dest_uid, done.owner, done.fingerprint) == (ClaimStatus.DONE, 1000 + uid, "a", f"gm:{uid}")
        assert store.find_copied(f"gm:{uid}", [ROUTE]).dest_uid == 1000 + uid
    assert store.get_failure(uid_key(2)) is None
    assert store.get_claim(uid_key(3)).status is ClaimStatus.APPENDING
    clock.advance(1000 * LEASE)
    again = store.claim_many(keys_of(1, 2, 3), "b", clock.now + LEASE, fingerprints=prints_of(1, 2, 3))
    assert [r.outcome for r in again] == [ClaimOutcome.FINAL, ClaimOutcome.FINAL, ClaimOutcome.CLAIMED]
    assert again[0].claim == store.get_claim(uid_key(1))
    assert (again[2].claim.status, again[2].claim.dest_uid_floor) == (ClaimStatus.APPENDING, 100)
    assert [claim(store, uid_key(uid), "c", clock).outcome for uid in (1, 2)] == [ClaimOutcome.FINAL] * 2
    assert store.route_counts(ROUTE).by_status == {"done": 2, "appending": 1}
    with pytest.raises(ClaimLost, match="it is done, owner a"):
        store.finalize(uid_key(1), "a", ClaimStatus.DONE, dest_uid=1, fingerprint="gm:1")


def test_an_appending_batch_past_its_lease_is_taken_over_and_its_first_owner_has_lost_it(store, clock):
    store.claim_many(keys_of(1, 2, 3), "a", clock.now + LEASE, fingerprints=prints_of(1, 2, 3))
    store.mark_appending_many(keys_of(1, 2, 3), "a", dest_uidvalidity=9, dest_uid_floor=100)
    clock.advance(LEASE + 1)

    taken = store.claim_many(keys_of(1, 2, 3), "b", clock.now + LEASE, fingerprints=prints_of(1, 2, 3))

    assert [(r.outcome, r.claim.status, r.claim.owner, r.claim.attempts, r.claim.dest_uid_floor) for r in taken] == [
        (ClaimOutcome.CLAIMED, ClaimStatus.APPENDING, "b", 2, 100)
    ] * 3
    # The first owner, back from a pause: each of its changes is refused, none lands.
    store.extend_leases(keys_of(1, 2, 3), "a", clock.now + 10 * LEASE)
    assert store.mark_appending_many(keys_of(1, 2, 3), "a") == 0
    lost = store.finalize_many(copies_of(1, 2, 3), "a")
    assert all(isinstance(exc, ClaimLost) for exc in lost)
    assert [store.get_claim(uid_key(uid)).owner for uid in (1, 2, 3)] == ["b"] * 3
    # The new owner's leases hold past the first owner's try, and it finalizes.
    store.extend_leases(keys_of(1, 2, 3), "b", clock.now + 3 * LEASE)
    clock.advance(2 * LEASE)
    assert claim(store, uid_key(2), "c", clock).outcome is ClaimOutcome.HELD
    assert store.finalize_many(copies_of(1, 2, 3), "b") == [None] * 3
    assert store.route_counts(ROUTE).by_status == {"done": 3}


def test_a_batch_claim_released_and_claimed_again_is_finalized_once(store, clock):
    store.claim_many(keys_of(1, 2), "a", clock.now + LEASE)
    store.mark_appending_many(keys_of(1, 2), "a")
    store.release(uid_key(1), "a", append_outcome_unknown=True)
    store.release(uid_key(2), "a")
    store.record_failure(uid_key(2), "ImapFailure", "refused")

    again = store.claim_many(keys_of(1, 2), "b", clock.now + LEASE, fingerprints=prints_of(1, 2))

    assert [(r.outcome, r.claim.status, r.claim.attempts) for r in again] == [
        (ClaimOutcome.CLAIMED, ClaimStatus.APPENDING, 2),
        (ClaimOutcome.CLAIMED, ClaimStatus.IN_PROGRESS, 2),
    ]
    assert store.mark_appending_many(keys_of(1, 2), "b") == 2
    assert store.finalize_many(copies_of(1, 2), "b") == [None, None]
    assert store.get_failure(uid_key(2)) is None
    assert store.route_counts(ROUTE).by_status == {"done": 2}
    assert [r.outcome for r in store.claim_many(keys_of(1, 2), "c", clock.now + LEASE)] == [ClaimOutcome.FINAL] * 2


BATCH_OWNERS = 6


def test_owners_racing_for_overlapping_batches_each_claim_a_uid_once(store, clock):
    """Each owner claims a window of 10 UIDs overlapping its neighbours' at once, all starting
    together: no UID is claimed twice, each owner's results stop at its first held UID, and
    every UID claimed shows its one claimant."""
    start = threading.Barrier(BATCH_OWNERS, timeout=30)

    def worker(n: int) -> tuple[str, list[int], list]:
        owner = f"owner-{n}"
        uids = list(range(3 * n + 1, 3 * n + 11))
        start.wait()
        return owner, uids, store.claim_many(keys_of(*uids), owner, clock.now + LEASE, fingerprints=prints_of(*uids))

    with ThreadPoolExecutor(BATCH_OWNERS) as pool:
        rows = list(pool.map(worker, range(BATCH_OWNERS)))

    claimants = defaultdict(list)
    for owner, uids, results in rows:
        outcomes = [r.outcome for r in results]
        assert ClaimOutcome.FINAL not in outcomes
        assert ClaimOutcome.HELD not in outcomes[:-1]
        assert len(results) == len(uids) or outcomes[-1] is ClaimOutcome.HELD
        for uid, result in zip(uids, results, strict=False):
            if result.outcome is ClaimOutcome.CLAIMED:
                claimants[uid].append(owner)
    assert claimants and all(len(owners) == 1 for owners in claimants.values()), claimants
    for uid, (owner,) in claimants.items():
        assert (store.get_claim(uid_key(uid)).owner, store.get_claim(uid_key(uid)).attempts) == (owner, 1)


@pytest.fixture
def dynamodb_store(dynamodb_client, clock):
    table = unique_name("state")
    create_state_table(dynamodb_client, table)
    yield DynamoStateStore(table, client=dynamodb_client, clock=clock)
    dynamodb_client.delete_table(TableName=table)


class Crash(BaseException):
    """The process killed at that point (not an Exception: nothing handles it on the way)."""


def test_a_crash_between_the_copy_records_and_the_finalize_write_leaves_them_copied(dynamodb_store, clock, monkeypatch):
    """DynamoDB finalizes a batch in several writes: each copy's FP# record, then one write
    taking the claims out of OPEN#. Killed between the two, the claims still say APPENDING, yet
    each reads as done and is never claimed (so never appended) again."""
    store = dynamodb_store
    store.claim_many(keys_of(1, 2, 3), "a", clock.now + LEASE, fingerprints=prints_of(1, 2, 3))
    store.mark_appending_many(keys_of(1, 2, 3), "a", dest_uidvalidity=9, dest_uid_floor=100)

    def crash(*args, **kwargs):
        raise Crash

    with monkeypatch.context() as patched:
        patched.setattr(DynamoStateStore, "_take_out", crash)
        with pytest.raises(Crash):
            store.finalize_many(copies_of(1, 2, 3), "a")
    clock.advance(LEASE + 1)

    for uid in (1, 2, 3):
        assert store.get_claim(uid_key(uid)).status is ClaimStatus.DONE
        assert store.get_claim(uid_key(uid), fingerprint=f"gm:{uid}").dest_uid == 1000 + uid
    taken = store.claim_many(keys_of(1, 2, 3), "b", clock.now + LEASE, fingerprints=prints_of(1, 2, 3))
    assert [r.outcome for r in taken] == [ClaimOutcome.FINAL] * 3
    assert [claim(store, uid_key(uid), "c", clock).outcome for uid in (1, 2, 3)] == [ClaimOutcome.FINAL] * 3
    assert store.route_counts(ROUTE).by_status == {"done": 3}
    # The entries left behind went with the first claim that found them copied.
    assert store._read_open(ROUTE, 7).entries == {}


def test_a_crash_amid_the_copy_records_leaves_the_rest_appending_for_a_look_first(dynamodb_store, clock, monkeypatch):
    """Killed after the first FP# record of a batch: that message is done, the others are taken
    over still APPENDING (their APPENDs may have landed: looked for before appending again)."""
    store = dynamodb_store
    store.claim_many(keys_of(1, 2, 3), "a", clock.now + LEASE, fingerprints=prints_of(1, 2, 3))
    store.mark_appending_many(keys_of(1, 2, 3), "a", dest_uidvalidity=9, dest_uid_floor=100)
    real_put = DynamoStateStore._put_copy
    puts = []

    def put_then_crash(self, *args, **kwargs):
        if puts:
            raise Crash
        puts.append(args)
        return real_put(self, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(DynamoStateStore, "_put_copy", put_then_crash)
        with pytest.raises(Crash):
            store.finalize_many(copies_of(1, 2, 3), "a")
    clock.advance(LEASE + 1)

    taken = store.claim_many(keys_of(1, 2, 3), "b", clock.now + LEASE, fingerprints=prints_of(1, 2, 3))
    assert [(r.outcome, r.claim.status) for r in taken] == [
        (ClaimOutcome.FINAL, ClaimStatus.DONE),
        (ClaimOutcome.CLAIMED, ClaimStatus.APPENDING),
        (ClaimOutcome.CLAIMED, ClaimStatus.APPENDING),
    ]
    assert store.finalize_many(copies_of(2, 3), "b") == [None, None]
    assert store.route_counts(ROUTE).by_status == {"done": 3}


def test_a_batch_of_open_claims_is_one_small_item(dynamodb_store, dynamodb_client, clock):
    """A batch of 10 claims (Lambda's batch) is one item under 1 KB: one write unit a write."""
    store = dynamodb_store
    owner = "lambda:" + "f" * 36
    store.claim_many(keys_of(*range(100_001, 100_011)), owner, clock.now + LEASE + 0.123456, fingerprints=prints_of(*range(100_001, 100_011)))
    store.mark_appending_many(keys_of(*range(100_001, 100_011)), owner, dest_uidvalidity=123456789, dest_uid_floor=1234567)

    items = dynamodb_client.scan(TableName=store._table)["Items"]
    (opened,) = [item for item in items if item["sk"]["S"].startswith("OPEN#")]
    assert _kilobytes(opened) <= 1
    assert _item_size(opened) < 900  # 6-digit UIDs, 9-digit destination UIDVALIDITY and floor


def test_releases_renewals_and_claims_of_one_route_at_once_all_hold(store, clock):
    """One owner releasing its claims one by one and renewing the rest, while another claims,
    marks and finalizes batches of the same route and UIDVALIDITY (on DynamoDB: one OPEN# item
    under every one of these writes): each change lands, none undoes another."""
    store.claim_many(keys_of(*range(1, 11)), "a", clock.now + LEASE)
    start = threading.Barrier(3, timeout=30)

    def release_each() -> None:
        start.wait()
        for uid in range(1, 11, 2):
            store.release(uid_key(uid), "a")

    def renew() -> None:
        start.wait()
        for _ in range(5):
            store.extend_leases(keys_of(*range(2, 11, 2)), "a", clock.now + 5 * LEASE)

    def copy_batches() -> None:
        start.wait()
        for first in (11, 16):
            uids = list(range(first, first + 5))
            assert [r.outcome for r in store.claim_many(keys_of(*uids), "b", clock.now + LEASE, fingerprints=prints_of(*uids))] == [
                ClaimOutcome.CLAIMED
            ] * 5
            assert store.mark_appending_many(keys_of(*uids), "b") == 5
            assert store.finalize_many(copies_of(*uids), "b") == [None] * 5

    with ThreadPoolExecutor(3) as pool:
        for done in [pool.submit(job) for job in (release_each, renew, copy_batches)]:
            done.result()

    assert [store.get_claim(uid_key(uid)).status for uid in range(1, 11, 2)] == [ClaimStatus.FAILED] * 5
    held = [store.get_claim(uid_key(uid)) for uid in range(2, 11, 2)]
    assert {(c.owner, c.lease_until) for c in held} == {("a", clock.now + 5 * LEASE)}
    assert store.route_counts(ROUTE).by_status == {"done": 10, "failed": 5, "in_progress": 5}
