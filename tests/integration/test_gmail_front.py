"""The Gmail front (tests/harness/gmail_front.py): what a client sees through it, one behaviour at a
time, and the project's own source adapter working through it."""

from __future__ import annotations

import base64
import re
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from google.auth.transport.requests import Request
from google.oauth2.credentials import Credentials
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError
from pydantic import SecretStr

from shared.mailbox.imap import ImapSource
from shared.mailbox.session import ImapAccount, ImapEndpoint, open_session
from tests.harness.gmail_front import (
    CAPABILITIES,
    CAPABILITIES_BEFORE_LOGIN,
    OVERQUOTA,
    SESSION_EXPIRED,
    TOO_MANY_CONNECTIONS,
    GmailFront,
)
from tests.harness.mail import corpus, read_folder, seed, wait_for

UTC = timezone.utc


def message(subject: str, *, message_id: str | None = None, extra: str = "") -> bytes:
    mid = message_id or f"<{re.sub(r'[^a-z0-9]', '', subject.lower())}@example.test>"
    return (
        f"From: Ann <ann@example.test>\r\nTo: bob@gmail.test\r\nSubject: {subject}\r\n"
        f"Date: Mon, 3 Mar 2025 10:00:00 +0000\r\nMessage-ID: {mid}\r\n{extra}\r\nBody of {subject}.\r\n"
    ).encode()


def client_of(front: GmailFront, server) -> IMAPClient:
    """Not logged in; IMAPS verified with the test CA, as the code under test connects."""
    return IMAPClient(front.host, port=front.port, ssl=True, ssl_context=server.ssl_context(), timeout=30)


def login(front: GmailFront, server, user: str) -> IMAPClient:
    client = client_of(front, server)
    client.login(user, server.password)
    return client


class Raw:
    """A raw IMAPS connection to the front, for the exact lines imapclient would hide."""

    def __init__(self, front: GmailFront, server):
        sock = socket.create_connection((front.host, front.port), timeout=30)
        self.sock = server.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline().rstrip(b"\r\n")
        self.count = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: bytes) -> list[bytes]:
        """Send ``<tag> text``; every line up to and with the tagged one (or a "+")."""
        self.count += 1
        tag = b"R%d" % self.count
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return lines
            lines.append(line.rstrip(b"\r\n"))
            if line.startswith((tag + b" ", b"+")):
                return lines

    def login(self, user: str, password: str) -> list[bytes]:
        return self.command(b'LOGIN %s "%s"' % (user.encode(), password.encode()))

    def closed(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.sock.close()


def msgids(client: IMAPClient, folder: str) -> dict[int, int]:
    client.select_folder(folder, readonly=True)
    return {uid: data[b"X-GM-MSGID"] for uid, data in client.fetch(client.search("ALL"), [b"X-GM-MSGID"]).items()}


def google_token(oauth_server, user: str) -> str:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE must not win over verify=
    session.verify = oauth_server.ca_bundle_path
    creds = Credentials(
        None,
        refresh_token=oauth_server.issue_refresh_token(user, "google"),
        token_uri=oauth_server.google_token_uri,
        client_id=oauth_server.google_client_id,
        client_secret=oauth_server.google_client_secret,
    )
    creds.refresh(Request(session))
    return creds.token


# ---- 1. CAPABILITY and Gmail's words ----------------------------------------------------------------
def test_capability_is_gmails_before_and_after_login(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    raw = Raw(front, gmail)
    assert raw.greeting.startswith(b"* OK Gimap ready for requests from ")
    assert raw.command(b"CAPABILITY") == [b"* CAPABILITY " + CAPABILITIES_BEFORE_LOGIN, b"R1 OK Thats all she wrote!"]
    user = gmail.new_user("caps")
    assert raw.login(user, gmail.password) == [
        b"* CAPABILITY " + CAPABILITIES,
        b"R2 OK %s authenticated (Success)" % user.encode(),
    ]
    assert raw.command(b"CAPABILITY") == [b"* CAPABILITY " + CAPABILITIES, b"R3 OK Thats all she wrote!"]
    assert raw.command(b"NOOP") == [b"R4 OK Success"]
    assert raw.command(b"LOGOUT") == [b"* BYE LOGOUT Requested", b"R5 OK 73 good day (Success)"]
    raw.close()
    client = login(front, gmail, user)  # imapclient takes the untagged CAPABILITY of the login
    capabilities = client.capabilities()
    assert b"X-GM-EXT-1" in capabilities and b"LITERAL-" in capabilities and b"LITERAL+" not in capabilities
    assert b"APPENDLIMIT=35651584" in capabilities and b"SPECIAL-USE" in capabilities
    client.logout()


def test_a_refused_login_gets_gmails_text(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    raw = Raw(front, gmail)
    assert raw.login(gmail.new_user("wrong"), "not-the-password") == [
        b"R1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
    ]
    assert raw.command(b"SELECT INBOX")[-1].startswith(b"R2 BAD ")  # still logged out
    raw.close()


def test_xoauth2_with_sasl_ir_and_without_reaches_dovecot(gmail_front, dovecot_pair, oauth_server):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("oauth")
    token = google_token(oauth_server, user)
    client = client_of(front, gmail)
    client.oauth2_login(user, token)  # imaplib: AUTHENTICATE, "+", then the response
    assert b"X-GM-EXT-1" in client.capabilities()
    client.logout()
    raw = Raw(front, gmail)
    initial = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
    assert raw.command(b"AUTHENTICATE XOAUTH2 " + initial) == [
        b"* CAPABILITY " + CAPABILITIES,
        b"R1 OK %s authenticated (Success)" % user.encode(),
    ]
    raw.close()
    bad = Raw(front, gmail)
    refused = bad.command(
        b"AUTHENTICATE XOAUTH2 " + base64.b64encode(f"user={user}\x01auth=Bearer no\x01\x01".encode())
    )
    if refused[-1].startswith(b"+"):  # the error challenge: the client answers empty
        bad.send(b"\r\n")
        refused += bad.until(b"R1")
    assert refused[-1] == b"R1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
    bad.close()
    assert front.logins[user] == 2


def test_literal_minus_refuses_a_large_non_synchronising_literal(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    raw = Raw(front, gmail)
    user = gmail.new_user("literal")
    raw.login(user, gmail.password)
    body = message("big", extra="X-Pad: " + "x" * 5000 + "\r\n")
    raw.send(b"R9 APPEND INBOX {%d+}\r\n%s\r\n" % (len(body), body))
    assert raw.until(b"R9") == [b"R9 BAD [TOOBIG] Non-synchronizing literal over 4096 bytes (Failure)"]
    small = message("small")
    raw.send(b"R10 APPEND INBOX {%d+}\r\n%s\r\n" % (len(small), small))
    assert re.fullmatch(rb"R10 OK \[APPENDUID \d+ 1\] Success", raw.until(b"R10")[-1])
    raw.send(b"R11 APPEND INBOX {%d}\r\n" % len(body))  # synchronising: any size
    assert raw.until(b"R11") == [b"+ go ahead"]
    raw.send(body + b"\r\n")
    assert re.fullmatch(rb"R11 OK \[APPENDUID \d+ 2\] Success", raw.until(b"R11")[-1])
    raw.close()
    assert [m.body for m in read_folder(gmail, user, "INBOX")] == [small, body]


# ---- 2. X-GM-EXT-1 --------------------------------------------------------------------------------
def test_x_gm_msgid_is_one_id_per_message_in_every_folder(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("msgid")
    first = front.deliver(user, message("first"), labels=["Work"])
    second = front.deliver(user, message("second"), labels=["Work", "\\Important"])
    assert first != second and 2**60 < first < 2**63 and second > first  # 64-bit, later is larger
    client = login(front, gmail, user)
    inbox, work, everything = (msgids(client, f) for f in ("INBOX", "Work", "[Gmail]/All Mail"))
    important = msgids(client, "[Gmail]/Important")
    assert sorted(inbox.values()) == sorted(work.values()) == sorted(everything.values()) == [first, second]
    assert list(important.values()) == [second]
    client.logout()


def test_x_gm_labels_and_thrid(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("labels")
    root = front.deliver(user, message("Plans"), labels=["Work", "Projekt Ä", "\\Starred"])
    reply = front.deliver(
        user, message("Re: Plans", extra="In-Reply-To: <plans@example.test>\r\n"), labels=["Work"], archived=True
    )
    sent = front.deliver(user, message("Other"), sent=True)
    client = login(front, gmail, user)
    client.select_folder("[Gmail]/All Mail", readonly=True)
    found = client.fetch(client.search("ALL"), [b"X-GM-MSGID", b"X-GM-THRID", b"X-GM-LABELS"])
    by_id = {data[b"X-GM-MSGID"]: data for data in found.values()}
    assert set(by_id[root][b"X-GM-LABELS"]) == {b"\\Inbox", b"\\Starred", b"Work", b"Projekt &AMQ-"}  # mUTF-7
    root_uid = next(uid for uid, data in found.items() if data[b"X-GM-MSGID"] == root)
    assert "Projekt Ä" in client.get_gmail_labels([root_uid])[root_uid]
    assert by_id[reply][b"X-GM-LABELS"] == (b"Work",)  # archived: not in INBOX
    assert by_id[sent][b"X-GM-LABELS"] == (b"\\Sent",)
    assert by_id[root][b"X-GM-THRID"] == by_id[reply][b"X-GM-THRID"] == root
    assert by_id[sent][b"X-GM-THRID"] == sent
    # Fetched from a label's folder, that label is left out (and the switch puts it back).
    client.select_folder("Work", readonly=True)
    labels = {
        data[b"X-GM-MSGID"]: data[b"X-GM-LABELS"]
        for data in client.fetch(client.search("ALL"), [b"X-GM-MSGID", b"X-GM-LABELS"]).values()
    }
    assert b"Work" not in labels[root] and b"\\Inbox" in labels[root]
    front.behaviours.omit_selected_label = False
    again = client.fetch(client.search("ALL"), [b"X-GM-MSGID", b"X-GM-LABELS"])
    assert all(b"Work" in data[b"X-GM-LABELS"] for data in again.values())
    client.logout()


def test_search_by_x_gm_msgid_thrid_and_labels(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("search")
    first = front.deliver(user, message("one"), labels=["Work"])
    front.deliver(user, message("two"))
    third = front.deliver(user, message("three"), labels=["Work"])
    client = login(front, gmail, user)
    client.select_folder("INBOX", readonly=True)
    uids = {data[b"X-GM-MSGID"]: uid for uid, data in client.fetch(client.search("ALL"), [b"X-GM-MSGID"]).items()}
    assert client.search(["X-GM-MSGID", first]) == [uids[first]]
    assert client.search(["X-GM-MSGID", 12345]) == []
    assert client.search(["X-GM-THRID", third]) == [uids[third]]
    assert sorted(client.search(["X-GM-LABELS", "Work"])) == sorted([uids[first], uids[third]])
    assert client.search(["NOT", "X-GM-MSGID", first, "SINCE", datetime(2000, 1, 1).date()]) == sorted(
        uid for msgid, uid in uids.items() if msgid != first
    )
    client.logout()


def test_messages_not_delivered_get_an_id_from_their_bytes(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("seeded")
    # One INTERNALDATE for both copies of "b": Gmail's copies share it, and the id is made from it.
    when = datetime(2025, 3, 3, 10, 0, 5, tzinfo=UTC)
    seed(gmail, user, "INBOX", [message("a"), (message("b"), (), when)])
    seed(gmail, user, "Later", [(message("b"), (), when)])  # straight into Dovecot, behind the front
    client = login(front, gmail, user)
    inbox, later = msgids(client, "INBOX"), msgids(client, "Later")
    assert len(set(inbox.values())) == 2 and list(later.values())[0] == inbox[2]
    client.select_folder("INBOX", readonly=True)
    assert client.fetch([2], [b"X-GM-LABELS"])[2][b"X-GM-LABELS"] == (b"Later",)  # found in both
    client.logout()
    assert front.served.get(user, 0) == 0  # the front's own reads are not downloads


# ---- 3. Labels are folders; SPECIAL-USE ------------------------------------------------------------
SPECIAL = {
    "\\All": "All Mail", "\\Drafts": "Drafts", "\\Important": "Important", "\\Sent": "Sent Mail",
    "\\Junk": "Spam", "\\Flagged": "Starred", "\\Trash": "Trash",
}  # fmt: skip


@pytest.mark.parametrize(
    "locale, root, names",
    [
        ("en", "[Gmail]", SPECIAL),
        (
            "de",
            "[Google Mail]",
            {"\\All": "Alle Nachrichten", "\\Drafts": "Entwürfe", "\\Important": "Wichtig", "\\Sent": "Gesendet",
             "\\Junk": "Spam", "\\Flagged": "Markiert", "\\Trash": "Papierkorb"},
        ),
        (
            "ru",
            "[Gmail]",
            {"\\All": "Вся почта", "\\Drafts": "Черновики", "\\Important": "Важное", "\\Sent": "Отправленные",
             "\\Junk": "Спам", "\\Flagged": "Помеченные", "\\Trash": "Корзина"},
        ),
    ],
)  # fmt: skip
def test_list_has_special_use_attributes_whatever_the_names(gmail_front, dovecot_pair, locale, root, names):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail, locale=locale)
    user = gmail.new_user("list")
    front.deliver(user, message("labelled"), labels=["Work"], sent=True)
    client = login(front, gmail, user)
    listed = {name: set(flags) for flags, _, name in client.list_folders()}
    assert listed[root] == {b"\\HasChildren", b"\\Noselect"}
    for use, name in names.items():
        assert use.encode() in listed[f"{root}/{name}"], (use, listed)
        assert client.find_special_folder(use.encode()) == f"{root}/{name}"
    assert listed["INBOX"] == {b"\\HasNoChildren"} and listed["Work"] == {b"\\HasNoChildren"}
    assert msgids(client, front.folder("\\Sent")) == msgids(client, front.folder("\\All"))
    client.logout()
    raw = Raw(front, gmail)
    raw.login(user, gmail.password)
    special = raw.command(b'LIST (SPECIAL-USE) "" "*"')  # LIST-EXTENDED: only the special ones
    assert len(special) == 8 and all(
        re.search(rb"\\(All|Drafts|Important|Sent|Junk|Flagged|Trash)\b", s) for s in special[:-1]
    )
    xlist = raw.command(b'XLIST "" "*"')
    assert b'* XLIST (\\HasNoChildren \\Inbox) "/" "INBOX"' in xlist
    assert any(b"\\AllMail" in line for line in xlist) and xlist[-1] == b"R3 OK Success"
    raw.close()


def test_examine_answers_as_gmail_does(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("examine")
    front.deliver(user, message("x"))
    raw = Raw(front, gmail)
    raw.login(user, gmail.password)
    lines = raw.command(b"EXAMINE INBOX")
    assert lines[0] == b"* FLAGS (\\Answered \\Flagged \\Draft \\Deleted \\Seen $NotPhishing $Phishing)"
    assert b"* OK [PERMANENTFLAGS ()] Flags permitted." in lines and b"* 1 EXISTS" in lines
    assert lines[-1] == b"R2 OK [READ-ONLY] INBOX selected. (Success)"
    selected = raw.command(b'SELECT "[Gmail]/All Mail"')
    assert any(b"[PERMANENTFLAGS (\\Answered" in line and b"\\*)]" in line for line in selected)
    assert selected[-1] == b"R3 OK [READ-WRITE] [Gmail]/All Mail selected. (Success)"
    assert raw.command(b'SELECT "[Gmail]"')[-1].endswith(b"(Failure)")  # \Noselect
    raw.close()


# ---- 4. The download limit --------------------------------------------------------------------------
def test_past_the_download_budget_every_command_is_over_quota(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail, download_budget=2_000)
    user = gmail.new_user("quota")
    for index in range(4):
        front.deliver(user, message(f"m{index}", extra="X-Pad: " + "p" * 600 + "\r\n"))
    client = login(front, gmail, user)
    client.select_folder("INBOX", readonly=True)
    with pytest.raises(IMAPClientError, match=re.escape("[OVERQUOTA] Account exceeded command or bandwidth limits.")):
        for uid in client.search("ALL"):
            client.fetch([uid], [b"BODY.PEEK[]"])
    assert front.served[user] > 2_000
    raw = Raw(front, gmail)
    raw.login(user, gmail.password)  # a new session of the account is over quota too
    assert raw.command(b"EXAMINE INBOX") == [b"R2 " + OVERQUOTA]
    other = login(front, gmail, gmail.new_user("other"))  # the budget is per account
    other.select_folder("INBOX")
    other.logout()
    front.clock = lambda: time.monotonic() + 24 * 3600  # a day later
    assert raw.command(b"EXAMINE INBOX")[-1] == b"R3 OK [READ-ONLY] INBOX selected. (Success)"
    front.exceed_quota(user)
    assert raw.command(b"NOOP") == [b"R4 " + OVERQUOTA]
    front.reset_quota(user)
    assert raw.command(b"NOOP") == [b"R5 OK Success"]
    raw.close()
    client.shutdown()


# ---- 5. The connection limit ------------------------------------------------------------------------
def test_the_sixteenth_login_of_an_account_is_refused(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("many")
    clients = [login(front, gmail, user) for _ in range(15)]
    extra = client_of(front, gmail)
    with pytest.raises(LoginError, match=re.escape("[ALERT] Too many simultaneous connections. (Failure)")):
        extra.login(user, gmail.password)
    raw = Raw(front, gmail)
    assert raw.login(user, gmail.password) == [b"R1 " + TOO_MANY_CONNECTIONS]
    assert raw.command(b"EXAMINE INBOX")[-1].startswith(b"R2 BAD ")  # not logged in
    login(front, gmail, gmail.new_user("another")).logout()  # per account
    clients.pop().logout()
    wait_for(lambda: front.sessions(user) == 14, timeout=10, what="a session of the account to end")
    assert raw.login(user, gmail.password)[-1] == b"R3 OK %s authenticated (Success)" % user.encode()
    assert front.peak_sessions[user] == 15 and front.logins[user] == 16
    raw.close()
    for client in clients:
        client.logout()
    extra.shutdown()


# ---- 6. Session expired, THROTTLED, folder size limits --------------------------------------------
def test_session_expired_bye_at_a_command_and_now(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("bye")
    raw = Raw(front, gmail)
    raw.login(user, gmail.password)
    front.expire_session(b"EXAMINE")
    assert raw.command(b"EXAMINE INBOX") == [SESSION_EXPIRED]
    assert raw.closed()
    raw.close()
    front.deliver(user, message("expiring"))
    client = login(front, gmail, user)
    front.expire_session(b"FETCH")
    client.select_folder("INBOX")
    with pytest.raises(IMAPClientError, match="Session expired, please login again"):
        client.fetch(client.search("ALL"), [b"UID"])
    quiet = Raw(front, gmail)
    quiet.login(user, gmail.password)
    assert front.expire_sessions(user) == 1
    assert quiet.file.readline().rstrip(b"\r\n") == SESSION_EXPIRED and quiet.closed()
    quiet.close()
    wait_for(lambda: front.sessions(user) == 0, timeout=10, what="the expired sessions to end")


def test_throttled_account_says_so_on_every_ok(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail, throttled=True)
    user = gmail.new_user("throttled")
    front.deliver(user, message("slow"))
    raw = Raw(front, gmail)
    assert raw.login(user, gmail.password)[-1] == b"R1 OK %s authenticated (Success) [THROTTLED]" % user.encode()
    assert raw.command(b"NAMESPACE") == [b'* NAMESPACE (("" "/")) NIL NIL', b"R2 OK Success [THROTTLED]"]
    raw.close()
    client = login(front, gmail, user)  # clients read it as an OK
    client.select_folder("INBOX", readonly=True)
    assert len(client.fetch(client.search("ALL"), [b"BODY.PEEK[]"])) == 1
    client.logout()


def test_folder_size_limit_shows_only_the_newest_messages(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail, folder_size_limit=5)
    user = gmail.new_user("capped")
    uids = seed(gmail, user, "INBOX", [message(f"n{index}") for index in range(12)])
    client = login(front, gmail, user)
    assert client.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"] == 5
    assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 5
    assert client.search("ALL") == uids[7:]
    assert client.search(["UID", f"{uids[0]}:*"]) == uids[7:]
    fetched = client.fetch(client.search("ALL"), [b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
    assert sorted(fetched) == uids[7:]
    assert fetched[uids[7]][b"BODY[HEADER.FIELDS (SUBJECT)]"].strip() == b"Subject: n7"
    assert client.fetch([uids[0]], [b"UID"]) == {}  # hidden, even by UID
    client.use_uid = False
    assert sorted(client.fetch([1], [b"UID"])) == [1]  # sequence 1 is the sixth oldest
    assert client.fetch([1], [b"UID"])[1][b"UID"] == uids[7]
    client.logout()


def test_idle_relays_new_mail(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("idle")
    front.deliver(user, message("before"))
    client = login(front, gmail, user)
    client.select_folder("INBOX", readonly=True)
    client.idle()
    front.deliver(user, message("during"))
    seen = []
    wait_for(lambda: seen.extend(client.idle_check(timeout=0.2)) or (2, b"EXISTS") in seen, timeout=10, what="EXISTS")
    client.idle_done()
    assert len(client.search("ALL")) == 2
    client.logout()


# ---- 7. Scripted refusals, switches ----------------------------------------------------------------
def test_one_shot_refusal(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    raw = Raw(front, gmail)
    raw.login(gmail.new_user("refused"), gmail.password)
    front.refuse(b"EXAMINE", "NO [UNAVAILABLE] Temporary System Error (Failure)")
    assert raw.command(b"EXAMINE INBOX") == [b"R2 NO [UNAVAILABLE] Temporary System Error (Failure)"]
    assert raw.command(b"EXAMINE INBOX")[-1] == b"R3 OK [READ-ONLY] INBOX selected. (Success)"
    assert front.refused == [(b"R2 EXAMINE INBOX", b"NO [UNAVAILABLE] Temporary System Error (Failure)")]
    raw.close()


def test_each_behaviour_switches_off_alone(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("plain")
    plain = gmail_front(gmail, capabilities=False, gmail_replies=False, x_gm_ext=False, special_use=False)
    plain.deliver(user, message("plain"))
    client = login(plain, gmail, user)
    assert b"X-GM-EXT-1" not in client.capabilities() and b"LITERAL+" in client.capabilities()  # Dovecot's
    assert b"\\All" not in dict((n, f) for f, _, n in client.list_folders())["[Gmail]/All Mail"]
    client.select_folder("INBOX")
    with pytest.raises(IMAPClientError):
        client.fetch([1], [b"X-GM-MSGID"])  # Dovecot does not know it
    client.logout()
    raw = Raw(plain, gmail)
    assert not raw.greeting.startswith(b"* OK Gimap")
    raw.close()
    unlimited = gmail_front(gmail, download_budget=None, max_connections=None)
    many = [login(unlimited, gmail, user) for _ in range(16)]
    for each in many:
        each.logout()


# ---- the project's source adapter through the front ---------------------------------------------------
def test_imap_source_reads_gmail_through_the_front(gmail_front, dovecot_pair):
    gmail = dovecot_pair.gmail
    front = gmail_front(gmail)
    user = gmail.new_user("source")
    now = datetime.now(UTC).replace(microsecond=0)
    delivered = {}
    for index, item in enumerate(corpus()[:25]):
        when = (now - timedelta(minutes=index)).astimezone(timezone(timedelta(hours=index % 5)))
        delivered[front.deliver(user, item.bytes, labels=["Work"] if index % 3 == 0 else (), internaldate=when)] = item
    endpoint = ImapEndpoint(front.host, front.port, ssl=True, ca_bundle=Path(gmail.ca_bundle_path), timeout=30)
    account = ImapAccount(f"test account {user}", user, endpoint, password=SecretStr(gmail.password))
    client = open_session(account)
    try:
        source = ImapSource(client, account)
        state = source.examine("INBOX")
        assert state.exists == 25
        uids = source.uids_above(0)
        summaries = source.summaries(uids)
        assert sorted(s.gmail_msgid for s in summaries) == sorted(delivered)
        stored = {m.uid: m for m in read_folder(gmail, user, "INBOX")}  # behind the front
        for summary in summaries:
            fetched = source.fetch(summary.uid)
            assert fetched.body == stored[summary.uid].body  # exactly the stored bytes
            assert fetched.internaldate == stored[summary.uid].internaldate
            assert summary.size == len(stored[summary.uid].body)
        # The same message read from a label's folder has the same id: one fingerprint.
        work = {s.gmail_msgid for s in (source.examine("Work") and source.summaries(source.uids_above(0)))}
        assert work == {msgid for msgid, item in delivered.items() if corpus().index(item) % 3 == 0}
    finally:
        client.logout()
    assert front.served[user] >= sum(len(m.body) for m in stored.values())
