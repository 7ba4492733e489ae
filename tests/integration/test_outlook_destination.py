"""The destination adapter, and `drain` as a user runs it, against the Outlook.com front
(tests/harness/outlook_front.py): Outlook's refusals by their real texts, its throttles, and its
folder names, which ignore case and show INBOX as "Inbox".

Through the adapter: what each refusal becomes. Through `drain` (the CLI in a subprocess, state
in SQLite, the destination reached through the front): what a user sees, the summary line, the
exit code, `status --json`, and what Dovecot behind the front stores.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from shared.errors import ImapFailure
from shared.mailbox.connections import MailboxConnections
from shared.mailbox.imap import ImapDestination
from shared.mailbox.port import AppendRejected, SourceMessage
from shared.mailbox.session import ImapAccount, ImapEndpoint, open_session
from tests.harness.figures import Row, record
from tests.harness.mail import connect, read_folder, seed
from tests.harness.outlook_front import LINE_TOO_LONG, SERVER_UNAVAILABLE, TOO_LARGE, OutlookFront

WHEN = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
TOO_LONG_REASON = "rejected by the destination: Command Error. 10 (a line longer than it accepts)"
CANNOT_PARSE_REASON = "rejected by the destination: Command Argument Error. 11 (a message it cannot parse)"


def message(subject: str, body: str = "Hello.") -> bytes:
    return (
        f"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.org>\r\nDate: Mon, 6 May 2024 07:08:09 +0200\r\n\r\n{body}\r\n"
    ).encode()


def long_line_message(subject: str) -> bytes:
    return message(subject, "a" * 10_000)  # one line of 10,000 characters: over Outlook's ~9,900


def big_message(subject: str, size: int) -> bytes:
    line = "b" * 76 + "\r\n"
    return message(subject, line * (size // len(line) + 1))


def front_account(front: OutlookFront, server, user: str) -> ImapAccount:
    endpoint = ImapEndpoint(front.host, front.port, ssl=True, ca_bundle=Path(server.ca_bundle_path), timeout=30)
    return ImapAccount(f"destination {user}", user, endpoint, password=SecretStr(server.password))


@pytest.fixture
def through_front(outlook_front, dovecot_pair):
    """through_front(**switches) -> (front, user, connections): a fresh Outlook user behind a new
    front, and MailboxConnections whose destination is that user through the front."""
    made: list[MailboxConnections] = []

    def make(**switches) -> tuple[OutlookFront, str, MailboxConnections]:
        outlook = dovecot_pair.outlook
        front = outlook_front(outlook, **switches)
        user = outlook.new_user("dest")
        made.append(MailboxConnections(lambda route: None, lambda: front_account(front, outlook, user)))
        return front, user, made[-1]

    yield make
    for connections in made:
        connections.close()


# ---- the adapter ----------------------------------------------------------------------------------
def test_each_refusal_through_the_front_becomes_what_a_retry_can_do(through_front):
    front, _, connections = through_front(max_message_size=20_000)
    destination = connections.destination()

    def refused(body: bytes) -> AppendRejected:
        with pytest.raises(AppendRejected) as rejected:
            destination.append("INBOX", SourceMessage(1, body, (), WHEN))
        return rejected.value

    too_large = refused(big_message("big", 30_000))
    assert (too_large.permanent, too_large.reason) == (True, "too large for the destination")
    assert front.refused[-1][1] == TOO_LARGE

    too_long = refused(long_line_message("long"))
    assert (too_long.permanent, too_long.final_after, too_long.reason) == (False, 2, TOO_LONG_REASON)
    assert front.refused[-1][1] == LINE_TOO_LONG

    front.cannot_parse()
    cannot_parse = refused(message("unparsable"))
    assert (cannot_parse.permanent, cannot_parse.final_after, cannot_parse.reason) == (False, 2, CANNOT_PARSE_REASON)

    front.throttle(backoff_ms=2500)
    throttled = refused(message("throttled"))
    assert (throttled.permanent, throttled.retry_after) == (False, 2.5)

    # Busy: tried again at once, and appended.
    front.unavailable()
    assert destination.append("INBOX", SourceMessage(1, message("busy"), (), WHEN)) is not None
    assert front.refused[-1][1] == SERVER_UNAVAILABLE


def test_a_bad_throttle_through_the_front_is_a_wait_and_a_new_session(through_front, dovecot_pair):
    front, user, connections = through_front()
    front.throttle(backoff_ms=1500, form="BAD")
    with pytest.raises(AppendRejected) as rejected:
        connections.destination().append("INBOX", SourceMessage(1, message("first"), (), WHEN))
    assert (rejected.value.permanent, rejected.value.retry_after) == (False, 1.5)
    assert front.appends == 0

    assert connections.destination().append("INBOX", SourceMessage(1, message("first"), (), WHEN)) is not None
    assert front.connections == 2
    assert [m.body for m in read_folder(dovecot_pair.outlook, user, "INBOX")] == [message("first")]


def test_folders_are_found_as_outlook_names_them(through_front, dovecot_pair):
    """INBOX in any case, a folder under it, and a folder that exists in another case: each is
    the folder Outlook means, none is created twice, and the copies land there."""
    outlook = dovecot_pair.outlook
    front, user, connections = through_front()
    seed(outlook, user, "Gmail/Work", [message("already there")])
    destination = connections.destination()
    for uid, folder in enumerate(["INBOX/Sub", "inbox", "gmail/work", "GMAIL/Work", "Inbox/sub"], start=1):
        destination.ensure_folder(folder)
        assert destination.uid_floor(folder) is not None
        destination.append(folder, SourceMessage(uid, message(f"to {folder}"), (), WHEN))

    assert [m.body for m in read_folder(outlook, user, "INBOX/Sub")] == [
        message("to INBOX/Sub"),
        message("to Inbox/sub"),
    ]
    assert [m.body for m in read_folder(outlook, user, "INBOX")] == [message("to inbox")]
    assert [m.body for m in read_folder(outlook, user, "Gmail/Work")] == [
        message("already there"),
        message("to gmail/work"),
        message("to GMAIL/Work"),
    ]
    client = connect(outlook, user)
    try:
        assert sorted(name for _, _, name in client.list_folders()) == ["Gmail", "Gmail/Work", "INBOX", "INBOX/Sub"]
    finally:
        client.logout()


def test_a_reserved_folder_name_through_the_front_is_a_clear_failure(through_front, dovecot_pair):
    front, user, _ = through_front()
    account = front_account(front, dovecot_pair.outlook, user)
    client = open_session(account)
    try:
        with pytest.raises(ImapFailure) as failure:
            ImapDestination(client, account).ensure_folder("Files")
    finally:
        client.logout()
    assert failure.value.step == "create folder"
    assert "create folder 'Files' failed: Folder name is reserved" in str(failure.value)
    assert "set the route's outlook_folder to another name" in str(failure.value)


# ---- drain, as a user runs it ---------------------------------------------------------------------
@pytest.fixture
def drain_through(sync_env, dovecot_pair, outlook_front):
    """drain_through(routes, **switches) -> (setup, front): the sync environment with its
    destination reached through a new Outlook front."""

    def make(routes=(("work", "INBOX", "Work"),), **switches):
        setup = sync_env(routes=routes)
        front = outlook_front(dovecot_pair.outlook, **switches)
        setup.env.update({"OUTLOOK_IMAP_HOST": front.host, "OUTLOOK_IMAP_PORT": str(front.port)})
        return setup, front

    return make


def figures(
    behaviour: str, setup, front: OutlookFront, done, outlook, wanted: dict[str, list[bytes]]
) -> tuple[Row, dict]:
    """Record the run's row (tests/harness/figures.py): `wanted`, per destination folder, the
    messages of the routes into it. Returns the row and the bytes each folder holds in `outlook`
    (the Dovecot behind the front)."""
    landed = {folder: [m.body for m in read_folder(outlook, setup.outlook_user, folder)] for folder in wanted}
    row = record(
        behaviour, "Outlook.com", wanted=wanted, landed=landed, drained=done.stdout, appends=front.append_attempts
    )
    return row, landed


def status_of(setup) -> dict:
    done = setup.cli("status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    (route,) = json.loads(done.stdout)["routes"]
    return route


def test_drain_skips_a_message_outlook_finds_too_large_at_once_and_goes_on(drain_through, dovecot_pair):
    setup, front = drain_through(max_message_size=20_000)
    user = setup.routes[0].gmail_user
    sent = [message("one"), big_message("big", 30_000), message("three")]
    seed(dovecot_pair.gmail, user, "INBOX", sent)

    done = setup.cli("drain")
    row, landed = figures(
        "too large at once (NO Maximum size)", setup, front, done, dovecot_pair.outlook, {"Work": sent}
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 2 copied, 1 skipped (too large for the destination: 1), 0 failed" in done.stdout
    assert landed["Work"] == [message("one"), message("three")]
    # Refused once: skipped on the first try, not retried into the dead letters.
    assert [reply for _, reply in front.refused] == [TOO_LARGE]
    assert "failed (attempt" not in done.stderr
    route = status_of(setup)
    assert route["claims"] == {"done": 2, "skipped": 1}
    assert route["skipped_reasons"] == {"too large for the destination": 1}
    assert row.clean, row


def test_drain_skips_a_message_over_max_message_bytes_without_sending_it(drain_through, dovecot_pair):
    setup, front = drain_through()
    setup.env["MAX_MESSAGE_BYTES"] = "20000"
    user = setup.routes[0].gmail_user
    sent = [message("one"), big_message("big", 30_000), message("three")]
    seed(dovecot_pair.gmail, user, "INBOX", sent)
    size = len(read_folder(dovecot_pair.gmail, user, "INBOX")[1].body)  # its RFC822.SIZE

    done = setup.cli("drain")
    row, _ = figures("over MAX_MESSAGE_BYTES (never sent)", setup, front, done, dovecot_pair.outlook, {"Work": sent})

    reason = f"too large for the destination ({size} bytes, limit 20000)"
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"route work: 2 copied, 1 skipped ({reason}: 1), 0 failed" in done.stdout
    assert front.sent(b" APPEND ") == 2 and front.refused == []
    assert status_of(setup)["skipped_reasons"] == {reason: 1}
    assert row.clean, row


def test_drain_skips_a_10000_character_line_after_two_tries(drain_through, dovecot_pair):
    setup, front = drain_through()
    user = setup.routes[0].gmail_user
    sent = [message("one"), long_line_message("long"), message("three")]
    seed(dovecot_pair.gmail, user, "INBOX", sent)

    done = setup.cli("drain")
    row, landed = figures(
        "a 10,000-character line (Command Error. 10)", setup, front, done, dovecot_pair.outlook, {"Work": sent}
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"route work: 2 copied, 1 skipped ({TOO_LONG_REASON}: 1), 0 failed" in done.stdout
    assert [reply for _, reply in front.refused] == [LINE_TOO_LONG] * 2  # the first may have been a glitch
    assert "UID 2 failed (attempt 1)" in done.stderr
    assert landed["Work"] == [message("one"), message("three")]
    route = status_of(setup)
    assert route["claims"] == {"done": 2, "skipped": 1}
    assert route["skipped_reasons"] == {TOO_LONG_REASON: 1}
    assert not route["failures"]  # the failure record went with the skip
    assert row.clean, row


def test_drain_copies_after_server_unavailable(drain_through, dovecot_pair):
    setup, front = drain_through()
    user = setup.routes[0].gmail_user
    sent = [message("one"), message("two"), message("three")]
    seed(dovecot_pair.gmail, user, "INBOX", sent)
    front.unavailable(times=2)

    done = setup.cli("drain")
    row, landed = figures("NO Server Unavailable. 15, twice", setup, front, done, dovecot_pair.outlook, {"Work": sent})

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    assert [reply for _, reply in front.refused] == [SERVER_UNAVAILABLE] * 2
    assert front.sent(b" APPEND ") == 5
    # Tried again at once within the same try (a tagged NO: nothing landed), not failed and
    # left to the queue's growing delays.
    assert "failed (attempt" not in done.stderr
    assert not status_of(setup)["failures"]
    assert len(landed["Work"]) == 3
    assert row.clean, row


def test_drain_into_inbox_sub_and_a_folder_differing_only_in_case(drain_through, dovecot_pair):
    routes = (("sub", "INBOX", "INBOX/Sub"), ("lower", "INBOX", "inbox"), ("case", "INBOX", "gmail/work"))
    setup, front = drain_through(routes)
    outlook = dovecot_pair.outlook
    seed(outlook, setup.outlook_user, "Gmail/Work", [message("already there")])
    sent = {route.name: [message(f"{route.name} 1"), message(f"{route.name} 2")] for route in setup.routes}
    for route in setup.routes:
        seed(dovecot_pair.gmail, route.gmail_user, "INBOX", sent[route.name])

    done = setup.cli("drain")
    wanted = {"INBOX/Sub": sent["sub"], "INBOX": sent["lower"], "Gmail/Work": sent["case"]}  # as Dovecot names them
    row, landed = figures("INBOX/Sub, inbox, gmail/work (case differs)", setup, front, done, outlook, wanted)

    assert done.returncode == 0, done.stdout + done.stderr
    for route in setup.routes:
        assert f"route {route.name}: 2 copied, 0 skipped, 0 failed" in done.stdout
    assert landed["INBOX/Sub"] == [message("sub 1"), message("sub 2")]
    assert landed["INBOX"] == [message("lower 1"), message("lower 2")]
    assert landed["Gmail/Work"] == [
        message("already there"),
        message("case 1"),
        message("case 2"),
    ]
    client = connect(outlook, setup.outlook_user)
    try:
        assert sorted(name for _, _, name in client.list_folders()) == ["Gmail", "Gmail/Work", "INBOX", "INBOX/Sub"]
    finally:
        client.logout()
    assert row.clean, row


def test_drain_waits_out_a_bad_throttle_and_its_closed_connection(drain_through, dovecot_pair):
    setup, front = drain_through()
    user = setup.routes[0].gmail_user
    # A route already running: its new messages need no lookup in the destination (a first
    # scan's would: shared.pipeline.scan), so every EXAMINE counted below would be the throttle's.
    assert setup.cli("drain").returncode == 0
    sent = [message("one"), message("two"), message("three")]
    seed(dovecot_pair.gmail, user, "INBOX", sent)
    front.throttle(times=2, backoff_ms=1500, form="BAD")  # each: BAD, "* BYE Connection closed. 14", the close

    done = setup.cli("drain")
    row, landed = figures(
        "BAD throttle + BYE Connection closed. 14, twice", setup, front, done, dovecot_pair.outlook, {"Work": sent}
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    assert len(front.refused_at) == 2
    assert front.refused_at[1] - front.refused_at[0] >= 1.5  # the suggested backoff, waited out
    # Each throttle paused the destination; neither counts as a failed attempt of the message.
    # The log says so once for each, and the run says what it waits for while it waits.
    assert done.stderr.count("mail_syncer.copy: route work UID 1: destination paused until ") == 2, done.stderr
    waits = re.findall(r"^waiting until \d\d:\d\d:\d\d \(in \d s\) for route work UID 1: destination paused until ", done.stderr, re.M)
    assert len(waits) == 2, done.stderr
    assert "failed (attempt" not in done.stderr
    assert "answered BAD Request is throttled. Suggested Backoff Time: 1500 milliseconds" in done.stderr
    # UID 1 is known not to have landed (the BAD was its APPEND's answer): never looked for. UIDs
    # 2 and 3 went out behind it in the same batch and the close left them unanswered: each is
    # looked for once after each of the two throttles, and paused with it, not charged.
    assert done.stderr.count("mail_syncer.copy: route work UID 2: destination paused until ") == 2, done.stderr
    assert front.sent(b" EXAMINE ") == front.sent(b"UID SEARCH") == 4
    assert landed["Work"] == [
        message("one"),
        message("two"),
        message("three"),
    ]
    assert row.clean, row


def test_a_throttle_pauses_every_route_into_the_mailbox_and_dead_letters_nothing(drain_through, dovecot_pair):
    """Outlook's throttle is the mailbox's budget: while one route waits out the suggested
    backoff, the other does not send APPENDs that would be refused again. Throttles are not
    failures of a message: with MAX_ATTEMPTS 2, three in a row dead-letter nothing."""
    setup, front = drain_through(routes=(("alpha", "INBOX", "Alpha"), ("beta", "INBOX", "Beta")))
    setup.env["MAX_ATTEMPTS"] = "2"
    # One route after the other, so that the bursts below are one batch's each (two accounts
    # copied at once would send their first batches together, before either is refused).
    setup.env["OUTLOOK_MAX_CONNECTIONS"] = "1"
    sent = {route.name: [message(f"{route.name} {n}") for n in range(3)] for route in setup.routes}
    for route in setup.routes:
        seed(dovecot_pair.gmail, route.gmail_user, "INBOX", sent[route.name])
    # A route's three APPENDs go out together: seven refusals throttle each of alpha's messages
    # two or three times.
    front.throttle(times=7, backoff_ms=2000)

    done = setup.cli("drain")
    wanted = {"Alpha": sent["alpha"], "Beta": sent["beta"]}
    row, landed = figures(
        "NO throttle x7, two routes, MAX_ATTEMPTS 2", setup, front, done, dovecot_pair.outlook, wanted
    )

    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("alpha", "beta"):
        assert f"route {name}: 3 copied, 0 skipped, 0 failed" in done.stdout
    gaps = [later - earlier for earlier, later in zip(front.refused_at, front.refused_at[1:])]
    # Refused in bursts (the APPENDs of one batch), and nothing sent in a pause: a burst comes
    # the suggested backoff after the one before.
    assert len(front.refused_at) == 7, gaps
    assert all(gap < 0.5 or gap >= 2.0 for gap in gaps) and sum(gap >= 2.0 for gap in gaps) == 2, gaps
    assert front.sent(b" APPEND ") == 6 + 7  # one per message, and the seven refused
    status = json.loads(setup.cli("status", "--json").stdout)
    assert status["queue"]["dead"] == 0 and status["pauses"] == []  # run out by now
    assert sorted(landed["Alpha"]) == sorted(message(f"alpha {n}") for n in range(3))
    assert row.clean, row
