"""Gmail's labels as the pipeline meets them through the Gmail front (tests/harness/gmail_front.py):
one message in several folders under one X-GM-MSGID, and system folders named by SPECIAL-USE in
any language. `drain` runs as a user runs it; the destination Dovecot is read directly."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from shared.mailbox.session import ImapAccount, ImapEndpoint, ImapThrottled, open_session
from shared.tokens.sources import GoogleTokenSource
from tests.harness.figures import Row, record, stored_appends
from tests.harness.mail import read_folder, seed

UTC = dt.timezone.utc


def message(subject: str) -> bytes:
    return (
        f"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.org>\r\nDate: Mon, 6 May 2024 07:08:09 +0200\r\n\r\nHi.\r\n"
    ).encode()


def one_account_routes(setup, routes: list[tuple[str, str, str]]) -> None:
    """Routes of one Gmail account (the first route's user and refresh token)."""
    account = setup.routes[0]
    setup.set_routes(
        [
            {
                "name": name,
                "gmail_user": account.gmail_user,
                "gmail_refresh_token": account.refresh_token,
                "gmail_folder": source,
                "outlook_folder": destination,
            }
            for name, source, destination in routes
        ]
    )


def through_gmail_front(setup, front) -> None:
    setup.env.update({"GMAIL_IMAP_HOST": front.host, "GMAIL_IMAP_PORT": str(front.port)})


def figures(behaviour: str, setup, done, outlook, wanted: dict[str, list[bytes]]) -> tuple[Row, dict]:
    """Record the run's row (tests/harness/figures.py): `wanted`, per destination folder, the
    messages of the routes into it. Returns the row and the bytes each folder holds in `outlook`
    (Dovecot, reached directly: the APPENDs counted are those it stored)."""
    landed = {folder: [m.body for m in read_folder(outlook, setup.outlook_user, folder)] for folder in wanted}
    appends = stored_appends(outlook, setup.outlook_user, list(wanted))
    row = record(behaviour, "Gmail", wanted=wanted, landed=landed, drained=done.stdout, appends=appends)
    return row, landed


def test_a_message_under_two_labels_is_copied_once_per_destination_folder(sync_env, dovecot_pair, gmail_front):
    """INBOX and the label "Clients" hold one message (one X-GM-MSGID): routes of both into one
    destination folder copy it once; a route into another folder copies it there too."""
    setup = sync_env()
    front = gmail_front(dovecot_pair.gmail)
    through_gmail_front(setup, front)
    user = setup.routes[0].gmail_user
    when = dt.datetime.now(UTC).replace(microsecond=0)
    both = front.deliver(user, message("in both"), labels=("Clients",), internaldate=when)
    front.deliver(user, message("inbox only"), internaldate=when + dt.timedelta(minutes=1))
    one_account_routes(
        setup, [("inbox", "INBOX", "Mail"), ("clients", "Clients", "Mail"), ("archive", "Clients", "Clients")]
    )

    done = setup.cli("drain")
    # Routes inbox and clients into Mail, archive into Clients.
    wanted = {"Mail": [message("in both"), message("inbox only"), message("in both")], "Clients": [message("in both")]}
    row, landed = figures("a message under two labels, three routes", setup, done, dovecot_pair.outlook, wanted)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route inbox: 2 copied, 0 skipped, 0 failed" in done.stdout
    assert "route clients: 0 copied, 1 skipped (duplicate of route inbox UID 1: 1), 0 failed" in done.stdout
    assert "route archive: 1 copied, 0 skipped, 0 failed" in done.stdout
    assert sorted(landed["Mail"]) == sorted([message("in both"), message("inbox only")])
    assert landed["Clients"] == [message("in both")]
    assert both > 0
    assert row.clean, row


def test_a_route_names_a_system_folder_by_its_special_use_in_any_language(sync_env, dovecot_pair, gmail_front):
    setup = sync_env()
    front = gmail_front(dovecot_pair.gmail, locale="de")
    through_gmail_front(setup, front)
    user = setup.routes[0].gmail_user
    when = dt.datetime.now(UTC).replace(microsecond=0)
    front.deliver(user, message("archived"), archived=True, internaldate=when)  # in All Mail only
    front.deliver(user, message("sent"), sent=True, internaldate=when + dt.timedelta(minutes=1))
    one_account_routes(setup, [("all", "\\All", "All"), ("sent", "\\Sent", "Sent")])

    done = setup.cli("drain")
    wanted = {"All": [message("archived"), message("sent")], "Sent": [message("sent")]}
    row, landed = figures("SPECIAL-USE \\All and \\Sent, German names", setup, done, dovecot_pair.outlook, wanted)

    assert done.returncode == 0, done.stdout + done.stderr
    assert front.folder("\\All").startswith("[Google Mail]/")  # the German account's name
    all_mail = sorted(landed["All"])
    assert all_mail == sorted([message("archived"), message("sent")])
    assert landed["Sent"] == [message("sent")]
    status = json.loads(setup.cli("status", "--json").stdout)
    assert {route["route"]: route["claims"] for route in status["routes"]} == {"all": {"done": 2}, "sent": {"done": 1}}
    assert row.clean, row


def test_too_many_connections_is_waited_out_not_answered_with_a_token_refresh(
    sync_env, dovecot_pair, gmail_front, oauth_server, trust_test_ca
):
    """Gmail refuses a login past 15 sessions of one account with "[ALERT] Too many simultaneous
    connections": a throttle (the account is paused), not a revoked token to refresh."""
    setup = sync_env()
    front = gmail_front(dovecot_pair.gmail, max_connections=1)
    account = setup.routes[0]
    tokens = GoogleTokenSource(
        account=account.gmail_user,
        refresh_token=account.refresh_token,
        client_id=oauth_server.google_client_id,
        client_secret=oauth_server.google_client_secret,
        token_uri=oauth_server.google_token_uri,
    )
    endpoint = ImapEndpoint(front.host, front.port, ca_bundle=Path(dovecot_pair.gmail.ca_bundle_path), timeout=30)
    imap_account = ImapAccount(
        f"route work source {account.gmail_user}", account.gmail_user, endpoint, token_source=tokens
    )
    held = open_session(imap_account)  # the account's one session
    refreshes = oauth_server.refresh_count("google")
    try:
        with pytest.raises(ImapThrottled) as refused:
            open_session(imap_account)
    finally:
        held.logout()

    assert "Too many simultaneous connections" in str(refused.value)
    assert refused.value.retry_after > 0
    assert oauth_server.refresh_count("google") == refreshes  # the cached token was not thrown away


def test_more_routes_of_one_account_than_it_has_sessions_are_all_copied(sync_env, dovecot_pair, gmail_front):
    """Seen with 20 routes and Gmail's 15: the routes past the limit were never copied. The
    routes of one account share GMAIL_MAX_CONNECTIONS sessions, least recently used out first."""
    setup = sync_env()
    front = gmail_front(dovecot_pair.gmail, max_connections=3)
    through_gmail_front(setup, front)
    setup.env["GMAIL_MAX_CONNECTIONS"] = "3"
    user = setup.routes[0].gmail_user
    when = dt.datetime.now(UTC).replace(microsecond=0)
    labels = [f"Label{n}" for n in range(6)]
    for n, label in enumerate(labels):
        front.deliver(
            user, message(f"under {label}"), labels=(label,), archived=True, internaldate=when + dt.timedelta(minutes=n)
        )
    one_account_routes(setup, [(label.lower(), label, label) for label in labels])

    done = setup.cli("drain")
    wanted = {label: [message(f"under {label}")] for label in labels}
    row, landed = figures("6 routes of one account, 3 sessions", setup, done, dovecot_pair.outlook, wanted)

    assert done.returncode == 0, done.stdout + done.stderr
    for label in labels:
        assert f"route {label.lower()}: 1 copied, 0 skipped, 0 failed" in done.stdout
        assert landed[label] == [message(f"under {label}")]
    assert front.peak_sessions[user] <= 3
    assert not any(b"Too many simultaneous" in reply for _, reply in front.refused)
    assert row.clean, row


def test_check_warns_when_a_folder_shows_exactly_a_folder_size_limit(sync_env, dovecot_pair, gmail_front):
    """Gmail's "Folder size limits" make IMAP show a folder's newest 1,000 (2,000, ...) messages
    only: the rest would never be copied, without a word. check says so."""
    setup = sync_env()
    front = gmail_front(dovecot_pair.gmail, folder_size_limit=1000)
    through_gmail_front(setup, front)
    user = setup.routes[0].gmail_user
    when = dt.datetime(2024, 1, 1, tzinfo=UTC)
    seed(
        dovecot_pair.gmail, user, "INBOX", [(message(f"n{n}"), (), when + dt.timedelta(minutes=n)) for n in range(1003)]
    )
    one_account_routes(setup, [("inbox", "INBOX", "Mail"), ("all", "\\All", "All")])

    done = setup.cli("check")

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("ok    route inbox") and "1000 messages" in line for line in lines), lines
    [warning] = [line for line in lines if line.startswith("warn")]
    assert warning.startswith("warn  route inbox") and "shows exactly 1000 messages" in warning
    assert "Folder size limits" in warning and "Do not limit" in warning
    assert any(line.startswith("ok    route all") and "folder '\\\\All'" in line for line in lines), lines


def test_a_session_gmail_expires_mid_run_is_reopened_and_nothing_fails(sync_env, dovecot_pair, gmail_front):
    """ "* BYE Session expired, please login again." at a FETCH: a new session, the same FETCH."""
    setup = sync_env()
    front = gmail_front(dovecot_pair.gmail)
    through_gmail_front(setup, front)
    user = setup.routes[0].gmail_user
    when = dt.datetime.now(UTC).replace(microsecond=0)
    seed(dovecot_pair.gmail, user, "INBOX", [(message(f"m{n}"), (), when + dt.timedelta(minutes=n)) for n in range(3)])
    front.expire_session(b"BODY.PEEK[]", nth=1)  # the download of the batch of three

    done = setup.cli("drain")
    wanted = {"Work": [message(f"m{n}") for n in range(3)]}
    row, landed = figures("BYE Session expired at a FETCH", setup, done, dovecot_pair.outlook, wanted)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    assert front.logins[user] >= 2  # logged in again
    assert "failed (attempt" not in done.stderr  # within the same try, not a failure of the message
    assert sorted(landed["Work"]) == sorted(message(f"m{n}") for n in range(3))
    assert row.clean, row


def test_a_gmail_session_asks_for_capabilities_once(sync_env, dovecot_pair, gmail_front):
    """Gmail sends its post-login capabilities with the login's answer. imaplib forgets them at
    the first EXAMINE, so asking after it (for X-GM-EXT-1) cost every scan a round trip: kept
    from the login, only imaplib's own CAPABILITY before login goes out."""
    setup = sync_env()
    front = gmail_front(dovecot_pair.gmail)
    through_gmail_front(setup, front)
    user = setup.routes[0].gmail_user
    front.deliver(user, message("one capability"), internaldate=dt.datetime.now(UTC).replace(microsecond=0))

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 copied, 0 skipped, 0 failed" in done.stdout
    logins = front.sent(b" AUTHENTICATE XOAUTH2")
    assert logins >= 1
    assert front.sent(b" CAPABILITY") == logins
