"""`scan_routes` and `scan_route` on fakes: which UIDs are enqueued, when the watermark moves, and
what a failure leaves behind (the queue, the watermark, the scan record).

Dates: the fake source's SEARCH SINCE compares each message's INTERNALDATE date; messages here
are dated at noon UTC so no zone question arises.
"""

from __future__ import annotations

import datetime as dt

import pytest

from shared.errors import QueueUnavailable, StateStoreUnavailable
from shared.mailbox.port import fingerprint
from shared.pipeline.budget import HOUR_SECONDS, DownloadBudget
from shared.pipeline.scan import CHUNK, RouteScan, ScanLimits, scan_route, scan_routes
from shared.redaction import register_secret
from shared.state import Watermark
from tests.fakes import FakeMailboxError, FakeWorld, email, make_route

# The fake clock's start (epoch 1_700_000_000) is this day in UTC: the day watermarks first move.
FIRST_SCAN_DAY = dt.date(2023, 11, 14)
FALLBACK_DAYS = 7


@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path)
    assert dt.datetime.fromtimestamp(world.clock(), dt.timezone.utc).date() == FIRST_SCAN_DAY
    yield world
    world.close()


def noon(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(12), dt.timezone.utc)


def limits(today: dt.date = FIRST_SCAN_DAY, *, cap: int = 1000) -> ScanLimits:
    return ScanLimits(max_enqueue_per_run=cap, fallback_since_days=FALLBACK_DAYS, today=today)


def scan(
    world: FakeWorld, *route_names: str, today: dt.date = FIRST_SCAN_DAY, cap: int = 1000, dry_run: bool = False,
    backfill_since: dt.date | None = None,
):
    return scan_routes(
        [world.routes[name] for name in route_names or ("work",)],
        state=world.state,
        queue=world.queue,
        open_source=world.mailboxes.open_source,
        limits=limits(today, cap=cap),
        dry_run=dry_run,
        download_budget=DownloadBudget(world.state, 1_000_000, clock=world.clock),
        clock=world.clock,
        backfill_since=backfill_since,
    )


def arrive_on(world: FakeWorld, route: str, *days: dt.date) -> list[int]:
    return [world.arrive(route, internaldate=noon(day)).uid for day in days]


def queued_uids(world: FakeWorld, route: str = "work") -> list[int]:
    return [ref.uid for ref in world.queue.refs() if ref.route == route]


def watermark(world: FakeWorld, route: str = "work") -> tuple[int, int] | None:
    mark = world.state.inner.read_watermark(route)
    return None if mark is None else (mark.uidvalidity, mark.last_uid)


def uidvalidity(world: FakeWorld, route: str = "work") -> int:
    route_ = world.routes[route]
    return world.sources[route_.gmail_user].folder(route_.gmail_folder).uidvalidity


# -- the first run -------------------------------------------------------------------------------


def test_a_first_run_enqueues_the_messages_since_today_minus_the_fallback_days(world):
    day = FIRST_SCAN_DAY
    old, first_day, recent = arrive_on(world, "work", day - dt.timedelta(days=8), day - dt.timedelta(days=7), day)

    [result] = scan(world)

    assert world.source_of("work").calls_to("uids_since") == [("uids_since", day - dt.timedelta(days=FALLBACK_DAYS))]
    assert queued_uids(world) == [first_day, recent]
    assert (result.found, result.enqueued, result.left_for_next_run, result.error) == (2, 2, 0, None)
    assert result.refs == world.queue.refs()
    # The whole window is queued: the watermark starts at the folder's top.
    assert watermark(world) == (uidvalidity(world), recent)
    assert result.watermark == world.state.inner.read_watermark("work")
    assert old not in queued_uids(world)


def test_a_first_scan_tells_where_it_started_and_how_many_older_messages_it_leaves(world):
    """A dry run said "9 new" for a folder of 41, and nothing said the other 32 would never be
    copied: the scan now reports its start and the older messages it leaves behind."""
    day = FIRST_SCAN_DAY
    arrive_on(world, "work", *[day - dt.timedelta(days=30)] * 3, day - dt.timedelta(days=8), day, day)

    [first] = scan(world)

    assert (first.since, first.found, first.older) == (day - dt.timedelta(days=FALLBACK_DAYS), 2, 4)
    arrive_on(world, "work", day)
    [later] = scan(world)
    assert (later.since, later.found, later.older) == (None, 1, None)  # above the watermark: nothing left behind


def test_a_first_scan_records_its_start_for_status_and_later_scans_leave_it(world):
    day = FIRST_SCAN_DAY
    arrive_on(world, "work", *[day - dt.timedelta(days=30)] * 3, day)

    scan(world, dry_run=True)
    assert world.state.read_route_start("work") is None  # a dry run writes nothing
    scan(world)
    arrive_on(world, "work", day)
    scan(world)

    start = world.state.read_route_start("work")
    assert (start.since, start.older, start.fallback_days) == (day - dt.timedelta(days=FALLBACK_DAYS), 3, FALLBACK_DAYS)
    assert world.state.calls_to("record_route_start") == 1


def test_a_routes_own_since_is_recorded_as_its_start(world):
    since = FIRST_SCAN_DAY - dt.timedelta(days=40)
    world.routes["work"] = make_route("work", since=since)
    arrive_on(world, "work", since - dt.timedelta(days=1), FIRST_SCAN_DAY)

    scan(world)

    start = world.state.read_route_start("work")
    assert (start.since, start.older, start.fallback_days) == (since, 1, None)


def test_a_reference_carries_the_fingerprint_and_size_of_its_message(world):
    body = email("Invoice", body="x" * 300)
    world.arrive("work", body, internaldate=noon(FIRST_SCAN_DAY), gmail_msgid=991)

    scan(world)

    [ref] = world.queue.refs()
    summary = world.source_of("work").message("INBOX", ref.uid).summary()
    assert (ref.route, ref.uidvalidity, ref.fingerprint, ref.size) == (
        "work", uidvalidity(world), "gm:991", len(body)
    )
    assert ref.fingerprint == fingerprint(summary)
    assert world.queue.calls_to("send")  # sent on the queue, not only listed


def test_a_first_run_starts_at_the_routes_since_date_when_it_has_one(world):
    since = FIRST_SCAN_DAY - dt.timedelta(days=40)
    world.routes["work"] = make_route("work", since=since)
    uids = arrive_on(world, "work", since - dt.timedelta(days=1), since, FIRST_SCAN_DAY - dt.timedelta(days=20))

    scan(world)

    assert world.source_of("work").calls_to("uids_since") == [("uids_since", since)]
    assert queued_uids(world) == uids[1:]


def test_a_first_run_with_nothing_in_its_window_starts_the_watermark_at_the_folders_top(world):
    old = arrive_on(world, "work", FIRST_SCAN_DAY - dt.timedelta(days=30), FIRST_SCAN_DAY - dt.timedelta(days=9))

    [result] = scan(world)

    assert (result.found, result.enqueued, world.queue.refs()) == (0, 0, [])
    assert watermark(world) == (uidvalidity(world), old[-1])
    # So the next run asks only for what arrives from now on.
    [new] = arrive_on(world, "work", FIRST_SCAN_DAY)
    scan(world)
    assert queued_uids(world) == [new]
    assert world.source_of("work").calls_to("uids_above") == [("uids_above", old[-1])]


# -- later runs ----------------------------------------------------------------------------------


def test_a_later_run_enqueues_only_the_uids_above_the_watermark(world):
    arrive_on(world, "work", FIRST_SCAN_DAY, FIRST_SCAN_DAY)
    scan(world)
    # A message moved in with an old INTERNALDATE is new to the folder all the same.
    new = arrive_on(world, "work", FIRST_SCAN_DAY - dt.timedelta(days=300), FIRST_SCAN_DAY)

    [result] = scan(world)

    assert (result.found, result.enqueued) == (2, 2)
    assert queued_uids(world) == [1, 2, *new]
    assert world.source_of("work").calls_to("uids_since") == [("uids_since", FIRST_SCAN_DAY - dt.timedelta(days=7))]
    assert world.source_of("work").calls_to("uids_above") == [("uids_above", 2)]
    assert watermark(world) == (uidvalidity(world), new[-1])


def test_a_run_with_nothing_new_sends_nothing_and_keeps_the_watermark(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    scan(world)
    sends = len(world.queue.calls)

    [result] = scan(world)

    assert (result.found, result.enqueued, result.refs) == (0, 0, [])
    assert len(world.queue.calls) == sends
    assert watermark(world) == (uidvalidity(world), 1)
    assert world.state.inner.read_scan("work").error is None


# -- a renumbered folder (UIDVALIDITY change) ----------------------------------------------------


def test_a_uidvalidity_change_rescans_back_to_the_day_before_the_watermark_last_moved(world):
    # The watermark last moved on FIRST_SCAN_DAY; a month later the folder is renumbered. Mail
    # that came in meanwhile is older than the usual 7-day window and must not be missed.
    arrive_on(world, "work", FIRST_SCAN_DAY)
    scan(world)
    world.clock.advance(30 * 86400)
    today = FIRST_SCAN_DAY + dt.timedelta(days=30)
    arrive_on(
        world, "work",
        FIRST_SCAN_DAY - dt.timedelta(days=2),  # before the reach: not new
        FIRST_SCAN_DAY + dt.timedelta(days=10),  # while the route was quiet
        today,
    )
    renumbered = world.source_of("work").renumber("INBOX")
    new_uidvalidity = uidvalidity(world)

    [result] = scan(world, today=today)

    reach = FIRST_SCAN_DAY - dt.timedelta(days=1)  # a day more, for the zone SEARCH dates are in
    assert world.source_of("work").calls_to("uids_since")[-1] == ("uids_since", reach)
    # The message copied before comes again under its new UID: its fingerprint will skip it.
    assert queued_uids(world)[1:] == [renumbered[1], renumbered[3], renumbered[4]]
    assert {ref.uidvalidity for ref in result.refs} == {new_uidvalidity}
    assert watermark(world) == (new_uidvalidity, max(renumbered.values()))


def test_a_uidvalidity_change_soon_after_the_last_scan_rescans_the_usual_window(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    scan(world)
    world.source_of("work").renumber("INBOX")

    scan(world, today=FIRST_SCAN_DAY + dt.timedelta(days=1))

    usual = FIRST_SCAN_DAY + dt.timedelta(days=1 - FALLBACK_DAYS)  # earlier than the day before the mark moved
    assert world.source_of("work").calls_to("uids_since")[-1] == ("uids_since", usual)


def test_a_uidvalidity_change_on_a_route_with_a_since_date_rescans_from_that_date(world):
    since = FIRST_SCAN_DAY - dt.timedelta(days=3)
    world.routes["work"] = make_route("work", since=since)
    arrive_on(world, "work", FIRST_SCAN_DAY)
    scan(world)
    world.clock.advance(30 * 86400)
    world.source_of("work").renumber("INBOX")

    scan(world, today=FIRST_SCAN_DAY + dt.timedelta(days=30))

    assert world.source_of("work").calls_to("uids_since")[-1] == ("uids_since", since)


# -- chunks and the watermark --------------------------------------------------------------------


def test_the_watermark_moves_only_after_a_chunk_was_sent(world):
    uids = arrive_on(world, "work", *[FIRST_SCAN_DAY] * (2 * CHUNK + 50))
    world.queue.fail_next("send_refs", QueueUnavailable("queue down"), after=1)

    with pytest.raises(QueueUnavailable):
        scan(world, cap=3 * CHUNK)

    # The first chunk was sent and committed; the second was not sent and the mark did not pass it.
    assert queued_uids(world) == uids[:CHUNK]
    assert watermark(world) == (uidvalidity(world), uids[CHUNK - 1])

    scan(world, cap=3 * CHUNK)  # the queue is back

    assert queued_uids(world) == uids
    assert watermark(world) == (uidvalidity(world), uids[-1])


def test_a_state_store_lost_after_a_send_leaves_the_watermark_behind_so_the_chunk_is_sent_again(world):
    uids = arrive_on(world, "work", *[FIRST_SCAN_DAY] * 3)
    world.state.fail("advance_watermark")

    with pytest.raises(StateStoreUnavailable):
        scan(world)

    assert queued_uids(world) == uids  # sent first
    assert watermark(world) is None
    assert world.state.inner.read_scan("work") is None  # the run ended; no route error recorded

    world.state.heal()
    scan(world)

    # Sent again (dropped as duplicates by the queue; the UID claim would stop them anyway).
    assert queued_uids(world) == uids
    assert watermark(world) == (uidvalidity(world), uids[-1])


def test_a_message_deleted_between_search_and_fetch_is_not_enqueued_and_not_searched_again(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    scan(world)
    new = arrive_on(world, "work", FIRST_SCAN_DAY, FIRST_SCAN_DAY, FIRST_SCAN_DAY)
    source = world.source_of("work")
    source.before_next("summaries", lambda: source.expunge("INBOX", new[-1]))

    [result] = scan(world)

    assert (result.found, result.enqueued) == (3, 2)
    assert queued_uids(world) == [1, *new[:2]]
    assert watermark(world) == (uidvalidity(world), new[-1])  # the chunk's last UID, not its last summary


# -- the cap per run -----------------------------------------------------------------------------


def test_the_cap_per_run_leaves_the_rest_for_the_next_runs_each_sent_once(world):
    uids = arrive_on(world, "work", *[FIRST_SCAN_DAY] * 5)

    runs = [scan(world, cap=2)[0] for _ in range(4)]

    assert [(run.found, run.enqueued, run.left_for_next_run) for run in runs] == [(5, 2, 3), (3, 2, 1), (1, 1, 0), (0, 0, 0)]
    assert [[ref.uid for ref in run.refs] for run in runs] == [uids[:2], uids[2:4], uids[4:], []]
    assert queued_uids(world) == uids
    assert [run.watermark.last_uid for run in runs] == [uids[1], uids[3], uids[4], uids[4]]


# -- a backfill: drain --since -------------------------------------------------------------------


def test_a_backfill_queues_the_older_messages_never_queued_once_and_leaves_the_watermark(world):
    day = FIRST_SCAN_DAY
    old = arrive_on(world, "work", day - dt.timedelta(days=40), day - dt.timedelta(days=20))
    too_old = arrive_on(world, "work", day - dt.timedelta(days=90))
    recent = arrive_on(world, "work", day)
    [first] = scan(world)
    assert (first.found, first.older) == (1, 3)
    world.copier().copy_messages(world.queue.refs())  # the recent one is copied
    mark = watermark(world)
    new = arrive_on(world, "work", day)

    [backfill] = scan(world, backfill_since=day - dt.timedelta(days=50))

    assert (backfill.since, backfill.backfilled, backfill.known) == (day - dt.timedelta(days=50), 2, 1)
    assert (backfill.found, backfill.enqueued, backfill.left_for_next_run) == (3, 3, 0)
    assert queued_uids(world) == [*recent, *old, *new]  # older ones first; the copied one not again
    assert too_old[0] not in queued_uids(world)
    assert watermark(world) == (mark[0], new[0])  # moved for the new one only
    # Never queued by this store: each is looked for in the destination before it is appended.
    assert world.state.inner.read_lookup_bound("work").last_uid >= max(old)
    world.copier().copy_messages(world.queue.refs()[1:])
    [again] = scan(world, backfill_since=day - dt.timedelta(days=50))
    assert (again.backfilled, again.known, again.enqueued) == (0, 4, 0)  # all copied now: none queued again


def test_a_backfill_keeps_to_the_cap_per_run_older_messages_first(world):
    day = FIRST_SCAN_DAY
    old = arrive_on(world, "work", *[day - dt.timedelta(days=30)] * 3)
    scan(world)
    new = arrive_on(world, "work", day, day)

    [run] = scan(world, cap=4, backfill_since=day - dt.timedelta(days=31))

    assert (run.found, run.enqueued, run.left_for_next_run) == (5, 4, 1)
    assert queued_uids(world)[-4:] == [*old, new[0]]


def test_a_first_scan_with_a_backfill_date_before_its_window_starts_there(world):
    day = FIRST_SCAN_DAY
    old = arrive_on(world, "work", day - dt.timedelta(days=30))
    older = arrive_on(world, "work", day - dt.timedelta(days=60))

    [first] = scan(world, backfill_since=day - dt.timedelta(days=31))

    assert (first.since, first.found, first.older) == (day - dt.timedelta(days=31), 1, 1)
    assert queued_uids(world) == old and older[0] not in queued_uids(world)


# -- dry runs ------------------------------------------------------------------------------------


def test_a_dry_run_lists_what_would_be_enqueued_and_writes_nothing(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    scan(world)
    mark, scan_record, sends = world.state.inner.read_watermark("work"), world.state.inner.read_scan("work"), len(world.queue.calls)
    writes = {write: world.state.calls_to(write) for write in ("advance_watermark", "record_scan")}
    world.clock.advance(60)
    new = arrive_on(world, "work", FIRST_SCAN_DAY, FIRST_SCAN_DAY)

    [result] = scan(world, dry_run=True)

    assert [ref.uid for ref in result.refs] == new and result.enqueued == 2
    # What a person reads in the listing: INTERNALDATE, From and Subject of each.
    assert [(m.uid, m.internaldate, bool(m.headline.subject)) for m in result.listed] == [
        (uid, noon(FIRST_SCAN_DAY), True) for uid in new
    ]
    assert result.watermark == mark
    assert len(world.queue.calls) == sends
    assert world.state.inner.read_watermark("work") == mark
    assert world.state.inner.read_scan("work") == scan_record
    assert {write: world.state.calls_to(write) for write in writes} == writes  # not even tried


def test_a_first_dry_run_leaves_the_route_without_a_watermark(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)

    [result] = scan(world, dry_run=True)

    assert (result.enqueued, result.watermark) == (1, None)
    assert (watermark(world), world.queue.refs()) == (None, [])


# -- several routes, failures and the gate -------------------------------------------------------


def test_one_routes_failure_is_recorded_and_the_other_routes_are_still_scanned(world):
    secret = "pw-9c1f44e0aa"  # a password an error text might carry
    register_secret(secret)
    [home_uid] = arrive_on(world, "home", FIRST_SCAN_DAY)
    arrive_on(world, "work", FIRST_SCAN_DAY)
    error = f"alice@gmail.test: EXAMINE 'INBOX': NO [UNAVAILABLE] (login {secret})"
    world.source_of("work").fail_next("examine", FakeMailboxError(error))

    work, home = scan(world, "work", "home")

    scrubbed = error.replace(secret, "[REDACTED]")
    assert work == RouteScan("work", error=scrubbed, watermark=None)
    assert world.state.inner.read_scan("work").error == scrubbed
    assert world.mailboxes.source_drops["work"] == 1  # the session that failed is not reused
    assert (home.error, home.enqueued, queued_uids(world, "home")) == (None, 1, [home_uid])
    assert world.state.inner.read_scan("home").error is None
    assert queued_uids(world, "work") == []

    [again] = scan(world, "work")  # the source is back

    assert again.error is None and again.enqueued == 1
    record = world.state.inner.read_scan("work")
    assert (record.error, record.failing_since) == (None, None)


def test_a_failed_routes_scan_keeps_its_watermark_where_it_was(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    scan(world)
    arrive_on(world, "work", FIRST_SCAN_DAY)
    world.source_of("work").fail_next("uids_above", FakeMailboxError("connection reset"))

    [result] = scan(world)

    assert (result.error, result.watermark) == ("connection reset", Watermark(uidvalidity(world), 1))
    assert watermark(world) == (uidvalidity(world), 1)


def test_the_gate_no_source_is_opened_when_the_state_store_fails_its_health_check(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    world.state.fail("check_health")

    with pytest.raises(StateStoreUnavailable, match="check_health"):
        scan(world, "work", "home")

    assert world.mailboxes.sources_opened == []
    assert world.source_of("work").calls == []
    assert world.queue.calls == []


def test_a_queue_down_ends_the_run_before_the_next_route(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    arrive_on(world, "home", FIRST_SCAN_DAY)
    world.queue.fail_next("send_refs", QueueUnavailable("queue down"))

    with pytest.raises(QueueUnavailable):
        scan(world, "work", "home")

    assert world.mailboxes.sources_opened == ["work"]  # every route would fail alike
    assert watermark(world, "work") is None


def test_a_paused_source_account_is_not_scanned_until_its_pause_ends(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    account = world.routes["work"].gmail_user
    world.state.inner.pause(f"source {account}", world.clock() + 600, "[OVERQUOTA] Account exceeded")

    (paused, other) = scan(world, "work", "home")

    assert paused.paused.startswith(f"source {account} paused until ") and paused.error is None
    assert "[OVERQUOTA]" in paused.paused
    assert world.source_of("work").calls == []  # not even a login
    assert queued_uids(world) == [] and other.enqueued == 0 and other.error is None
    world.clock.advance(601)
    assert scan(world)[0].enqueued == 1


def test_overquota_met_by_a_scan_pauses_the_account_for_its_window(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    world.source_of("work").quota_spent_next("examine")

    [scanned] = scan(world)

    account = world.routes["work"].gmail_user
    pause = world.state.inner.read_pause(f"source {account}")
    assert scanned.error is None and "waits for the daily download window" in scanned.paused
    # Nothing of ours in the window: it waits until this hour leaves it.
    assert pause.until == (world.clock() // HOUR_SECONDS + 24) * HOUR_SECONDS
    assert watermark(world) is None and queued_uids(world) == []


def test_scan_route_alone_records_no_scan(world):
    # Recording the outcome is scan_routes' part; scan_route is the per-route step.
    arrive_on(world, "work", FIRST_SCAN_DAY)

    result = scan_route(
        world.routes["work"], state=world.state, queue=world.queue, open_source=world.mailboxes.open_source, limits=limits()
    )

    assert result.enqueued == 1
    assert world.state.inner.read_scan("work") is None


# -- telling the CLI of new mail (it logs in to the destination meanwhile) ----------------------------


def scan_telling(world: FakeWorld) -> list[tuple]:
    """One scan of route work; what happened, in order: the source's calls and ("new mail",)."""
    source = world.source_of("work")
    told: list[tuple] = []
    scan_routes(
        [world.routes["work"]],
        state=world.state,
        queue=world.queue,
        open_source=world.mailboxes.open_source,
        limits=limits(),
        clock=world.clock,
        on_new_mail=lambda route: told.append(("new mail", len(source.calls))),
    )
    return [call[0] for call in source.calls[: told[0][1]]] + ["new mail"] if told else []


def test_new_mail_above_the_watermark_is_told_at_examine_before_the_search(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    scan(world)
    world.source_of("work").calls.clear()
    arrive_on(world, "work", FIRST_SCAN_DAY)

    assert scan_telling(world) == ["examine", "new mail"]


def test_a_first_scan_tells_of_mail_at_examine_and_nothing_new_tells_nothing(world):
    arrive_on(world, "work", FIRST_SCAN_DAY)
    assert scan_telling(world) == ["examine", "new mail"]
    world.source_of("work").calls.clear()
    assert scan_telling(world) == []
