"""The redrive use case and the dead-letter report, on a real SQLite queue and state store.

The queue contract suite proves both queue adapters move what they are told to; this proves
what `redrive` tells them: which dead letters go back (route, count, malformed bodies) and what
`status` says about each one."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid

import pytest

from shared.message_ref import MessageRef
from shared.pipeline.redrive import redrive_dead_letters, report_dead_letters
from shared.queue.sqlite import SqliteQueue
from shared.settings import Route
from shared.state import ClaimStatus
from shared.state.sqlite import SqliteStateStore

ROUTES = {
    name: Route(name=name, gmail_user=f"{name}@gmail.test", gmail_password="x", outlook_folder=name.title())
    for name in ("work", "home")
}
NOT_JSON = "queue body: not JSON (Expecting value: line 1 column 1 (char 0))"


@pytest.fixture
def db(tmp_path):
    return tmp_path / "state.db"


@pytest.fixture
def queue(db) -> SqliteQueue:
    return SqliteQueue(db, max_receive_count=1)


def ref(route: str, uid: int) -> MessageRef:
    return MessageRef(route, 7, uid, fingerprint=f"fp-{uid}", size=100)


def send_raw(db, group: str, body: str) -> None:
    """A body no producer of ours sends, as a foreign or broken sender would."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "INSERT INTO queue_messages (message_id, group_id, body, sent_at) VALUES (?, ?, ?, 0)",
            (uuid.uuid4().hex, group, body),
        )


def consume_failing(queue: SqliteQueue) -> None:
    """Receive everything as a consumer would: malformed bodies quarantined, every copy failing."""
    while batch := queue.receive():
        for message in batch:
            try:
                MessageRef.from_body(message.body)
            except Exception as exc:  # noqa: BLE001 - what copy_batch quarantines
                queue.quarantine(message, str(exc))
            else:
                queue.extend_visibility(message, 0)  # failed; its last receive: dead-lettered


@pytest.fixture
def dead(db, queue):
    """Dead letters: work 1, 2 and home 1 (receive count ran out), a malformed body in group
    work, and a reference to a route that is not configured."""
    queue.depths()  # creates the tables
    send_raw(db, "work", "garbage")
    queue.send_refs([ref("work", 1), ref("work", 2), ref("home", 1), ref("gone", 1)])
    consume_failing(queue)
    assert queue.depths().dead == 5
    return queue


def moved_keys(queue: SqliteQueue) -> list[tuple[str, int]]:
    received = []
    while batch := queue.receive():
        for message in batch:
            parsed = MessageRef.from_body(message.body)
            received.append((parsed.route, parsed.uid))
            queue.delete(message)
    return received


def test_redrive_moves_every_reference_of_a_configured_route_and_lists_the_rest(dead):
    report = redrive_dead_letters(dead, ROUTES)

    assert dict(report.moved_by_route) == {"work": 2, "home": 1}
    assert report.total == 3
    assert sorted((d.group_id, why) for d, why in report.skipped) == [
        ("gone", "queue body.route: route 'gone' is not configured"),
        ("work", NOT_JSON),
    ]
    assert sorted(moved_keys(dead)) == [("home", 1), ("work", 1), ("work", 2)]
    assert sorted(d.body for d in dead.dead_letters()) == sorted(["garbage", ref("gone", 1).to_body()])


def test_redrive_of_one_route_at_most_n(dead):
    report = redrive_dead_letters(dead, ROUTES, route="work", max_messages=1)

    assert dict(report.moved_by_route) == {"work": 1}
    assert [why for _, why in report.skipped] == [NOT_JSON]  # only its own route's are listed
    assert moved_keys(dead) == [("work", 1)]
    assert dead.depths().dead == 4


def test_include_malformed_moves_them_too(dead):
    report = redrive_dead_letters(dead, ROUTES, route="work", include_malformed=True)

    assert dict(report.moved_by_route) == {"work": 2, "group work, not a reference": 1}
    assert report.skipped == ()
    assert dead.depths().dead == 2  # home 1 and the unconfigured route's


def test_a_dry_run_says_what_would_move_and_moves_nothing(dead):
    report = redrive_dead_letters(dead, ROUTES, dry_run=True)

    assert (dict(report.moved_by_route), len(report.skipped), report.dry_run, report.complete) == (
        {"work": 2, "home": 1},
        2,
        True,
        True,
    )
    assert dead.depths().dead == 5


def test_an_unknown_route_is_refused(dead):
    with pytest.raises(ValueError, match=r"^unknown route 'nosuch' \(routes: work, home\)$"):
        redrive_dead_letters(dead, ROUTES, route="nosuch")


def test_the_report_gives_each_dead_letter_the_reason_recorded_for_it(db, dead):
    state = SqliteStateStore(db)
    state.record_failure(ref("work", 1).key, "ImapFailure", "create folder 'Work' failed")
    state.claim_uid(ref("home", 1).key, "someone", lease_until=0)
    state.finalize(ref("home", 1).key, "someone", ClaimStatus.DONE, dest_uid=5)

    report = report_dead_letters(dead, state, ROUTES)

    assert report.by_route["work"].count == 2
    assert report.by_route["work"].reasons == {
        "ImapFailure: create folder 'Work' failed": 1,
        "max receive count 1 exceeded without a failure of its own "
        "(held back behind a failing message of its route, or its consumer stopped)": 1,
    }
    assert dict(report.by_route["home"].reasons) == {
        "max receive count 1 exceeded; since then done (a redrive just acknowledges it)": 1
    }
    assert report.not_routed.count == 2
    assert dict(report.not_routed.reasons) == {NOT_JSON: 1, "max receive count 1 exceeded": 1}
    assert report.complete
    assert not report_dead_letters(dead, state, ROUTES, limit=2).complete
    state.close()
