"""The Outlook.com front (tests/harness/outlook_front.py): what a client sees through it, and
that Dovecot behind it keeps exactly what was appended."""

from __future__ import annotations

import base64
import re
import socket
import ssl
from datetime import datetime, timedelta, timezone
from email.utils import getaddresses, parsedate_to_datetime

import msal
import pytest
import requests
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from tests.harness.mail import AppendRefused, append, connect, corpus, read_folder, seed, wait_for
from tests.harness.oauth import MS_SCOPE
from tests.harness.outlook_front import (
    CAPABILITIES,
    OutlookFront,
    estimated_size,
    header_text,
    header_value,
    render_exchange_mime,
)

CORPUS = corpus()
LONG_LINE = "093-phpmime-24k-char-line.eml"  # its 24,340-character line is over Outlook's 9,900


def stored_form(message: bytes) -> bytes:
    """What Dovecot keeps of an APPENDed message (test_harness: bare LF -> CRLF, NUL -> 0x80)."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", message).replace(b"\0", b"\x80")


def client_of(front: OutlookFront, server) -> IMAPClient:
    """Not logged in; IMAPS verified with the test CA, as the code under test connects."""
    return IMAPClient(front.host, port=front.port, ssl=True, ssl_context=server.ssl_context(), timeout=30)


def refusal(client: IMAPClient, folder: str, message: bytes) -> str:
    """``"<status> <text>"`` of the tagged reply to an APPEND of ``message`` (imaplib raises on
    BAD before the harness's ``append`` could say which)."""
    imap = client._imap
    tag = imap._new_tag()
    imap.send(b"%s APPEND %s {%d+}\r\n%s\r\n" % (tag, client._normalise_folder(folder), len(message), message))
    status, data = imap._get_tagged_response(tag)
    return f"{status} {data[0].decode()}"


def login(front: OutlookFront, server, user: str) -> IMAPClient:
    client = client_of(front, server)
    client.login(user, server.password)
    return client


class Raw:
    """A raw IMAPS connection to the front, for what imapclient cannot send or would hide."""

    def __init__(self, front: OutlookFront, server):
        sock = socket.create_connection((front.host, front.port), timeout=30)
        self.sock = server.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()
        self.count = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline()

    def command(self, text: bytes) -> list[bytes]:
        """Send ``<tag> text`` and return every line up to and with the tagged one (or a "+")."""
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
            if line.startswith((tag + b" ", b"+")):  # the tagged reply, or a continuation request
                return lines

    def closed(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.sock.close()


# ---- the corpus, appended once through a faithful front --------------------------------------------
@pytest.fixture(scope="module")
def corpus_box(dovecot_pair, test_ca):
    """Every corpus message APPENDed through a default front into one folder: the UIDs of those
    stored (by corpus name), and the replies of those refused."""
    outlook = dovecot_pair.outlook
    front = OutlookFront(outlook, test_ca.server_context)
    user = outlook.new_user("corpus")
    client = login(front, outlook, user)
    uids, refused = {}, {}
    for message in CORPUS:
        try:
            uids[message.name] = append(client, "INBOX", message.bytes)
        except (AppendRefused, IMAPClientError) as refusal:  # imaplib raises on BAD itself
            refused[message.name] = str(refusal)
    client.logout()
    try:
        yield front, user, uids, refused
    finally:
        front.close()


def test_corpus_is_stored_behind_the_front_exactly_as_appended(corpus_box, dovecot_pair):
    """All but the message with a 24,340-character line are accepted (with APPENDUID), and
    Dovecot behind holds each one's bytes as it keeps any APPEND (bare LF as CRLF, NUL as 0x80)."""
    front, user, uids, refused = corpus_box
    assert set(refused) == {LONG_LINE} and "BAD [b'Command Error. 10']" in refused[LONG_LINE]
    stored = {s.uid: s.body for s in read_folder(dovecot_pair.outlook, user, "INBOX")}
    assert sorted(stored) == sorted(uids.values()) and len(stored) == 106
    for message in CORPUS:
        if message.name in uids:
            assert stored[uids[message.name]] == stored_form(message.bytes), message.name
    assert front.appends == 106 and front.appended == [m.bytes for m in CORPUS if m.name in uids]


def test_fetch_through_the_front_gives_rebuilt_mime_with_the_same_identity(corpus_box, dovecot_pair):
    """BODY[], BODY.PEEK[] and RFC822 answer the re-rendered message, never the stored bytes,
    the same each time; its Message-ID, Date instant, From addresses and Subject text are the
    stored message's (a Message-ID is added where there was none)."""
    front, user, uids, _ = corpus_box
    client = login(front, dovecot_pair.outlook, user)
    client.select_folder("INBOX", readonly=True)
    by_uid = {uid: name for name, uid in uids.items()}
    peeked = client.fetch(list(by_uid), [b"BODY.PEEK[]"])
    again = client.fetch(list(by_uid), [b"RFC822"])
    client.logout()
    originals = {m.name: stored_form(m.bytes) for m in CORPUS}
    for uid, name in by_uid.items():
        original, seen = originals[name], peeked[uid][b"BODY[]"]
        assert seen != original, name
        assert again[uid][b"RFC822"] == seen == render_exchange_mime(original), name
        assert not re.search(rb"(?<!\r)\n|\r(?!\n)", seen), f"{name}: bare CR or LF"
        message_id = header_value(original, "Message-ID")
        assert header_value(seen, "Message-ID") == message_id if message_id else header_value(seen, "Message-ID"), name
        if (date := header_value(original, "Date")) is not None:
            try:
                instant = parsedate_to_datetime(date.decode("latin-1"))
            except (TypeError, ValueError):
                instant = None
            if instant is not None and instant.tzinfo is not None:
                assert parsedate_to_datetime(header_value(seen, "Date").decode()) == instant, name
        if (sender := header_value(original, "From")) is not None and sender.isascii():
            assert addresses(header_value(seen, "From")) == addresses(sender), name
        if (subject := header_value(original, "Subject")) is not None:
            assert header_text(header_value(seen, "Subject")) == header_text(subject), name


def addresses(value: bytes) -> list[str]:
    return [address for _, address in getaddresses([value.decode("utf-8", "replace")])]


def test_rebuilt_mime_makes_exchanges_kinds_of_changes(corpus_box):
    """Across the corpus: refolded headers, RFC 2047 where there was raw 8-bit, Dates in +0000,
    quoted display names, added Message-IDs, new boundaries, 8bit parts re-encoded,
    MIME-Version and X-MS- headers added."""
    _, _, uids, _ = corpus_box
    rendered = {
        m.name: (stored_form(m.bytes), render_exchange_mime(stored_form(m.bytes))) for m in CORPUS if m.name in uids
    }
    traits = {m.name: m.traits for m in CORPUS}

    def count(condition) -> int:
        return sum(1 for name, (old, new) in rendered.items() if condition(name, old, new))

    assert count(lambda n, o, r: header_value(r, "Date") and header_value(r, "Date").endswith(b"+0000")) >= 60
    assert count(lambda n, o, r: header_value(o, "Message-ID") is None) >= 25  # ...and each has one now
    assert all(header_value(r, "Message-ID") for _, r in rendered.values())
    assert all(header_value(r, "MIME-Version") == b"1.0" and b"\r\nX-MS-Has-Attach:" in r for _, r in rendered.values())
    raw_8bit = [
        n
        for n in rendered
        if "utf8-header" in traits[n] and (s := header_value(rendered[n][0], "Subject")) and not s.isascii()
    ]
    assert raw_8bit and all(header_value(rendered[n][1], "Subject").startswith(b"=?utf-8?B?") for n in raw_8bit)
    assert count(lambda n, o, r: re.search(rb'^From: "[^"\r\n]+" <', r, re.M) is not None) >= 20
    multipart = [n for n in rendered if "multipart" in traits[n]]
    assert sum(b'boundary="_0' in rendered[n][1] for n in multipart) >= 60 and len(multipart) == 71
    eight_bit = [n for n in rendered if "8bit" in traits[n]]
    assert (
        sum(
            b"Content-Transfer-Encoding: 8bit" not in rendered[n][1] and b"quoted-printable" in rendered[n][1]
            for n in eight_bit
        )
        >= 10
    )


def test_header_sections_come_from_the_rebuilt_message(corpus_box, dovecot_pair):
    front, user, uids, _ = corpus_box
    uid = uids["001-cpython-mailman-digest.eml"]
    rendered = render_exchange_mime(stored_form(CORPUS[0].bytes))
    header, _, text = rendered.partition(b"\r\n\r\n")
    client = login(front, dovecot_pair.outlook, user)
    client.select_folder("INBOX", readonly=True)
    got = client.fetch(
        [uid],
        [
            b"BODY.PEEK[HEADER]",
            b"BODY.PEEK[TEXT]",
            b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT)]",
            b"BODY.PEEK[]<0.40>",
        ],
    )[uid]
    client.logout()
    assert got[b"BODY[HEADER]"] == header + b"\r\n\r\n"
    assert got[b"BODY[TEXT]"] == text
    fields = got[b"BODY[HEADER.FIELDS (MESSAGE-ID SUBJECT)]"]
    assert fields.startswith(b"Subject: ") and b"\r\nMessage-ID: <" in fields and fields.endswith(b"\r\n\r\n")
    assert got[b"BODY[]<0>"] == rendered[:40]


def test_rfc822_size_is_an_estimate_and_search_follows_it(corpus_box, dovecot_pair):
    """RFC822.SIZE through the front is neither the appended, the stored nor the rendered size;
    SEARCH LARGER/SMALLER select by it, so the size of the bytes sent finds nothing."""
    front, user, uids, _ = corpus_box
    originals = {m.name: m.bytes for m in CORPUS}
    client = login(front, dovecot_pair.outlook, user)
    client.select_folder("INBOX", readonly=True)
    sizes = client.fetch(list(uids.values()), [b"RFC822.SIZE"])
    for name, uid in uids.items():
        size, stored = sizes[uid][b"RFC822.SIZE"], stored_form(originals[name])
        assert size == estimated_size(len(stored)), name
        assert size not in (len(originals[name]), len(stored), len(render_exchange_mime(stored))), name
    name = "045-mail-trailing-dot.eml"  # CRLF already: appended size == stored size
    sent, estimate = len(originals[name]), sizes[uids[name]][b"RFC822.SIZE"]
    assert uids[name] not in client.search(["LARGER", sent - 1, "SMALLER", sent + 1])
    assert uids[name] in client.search(["LARGER", estimate - 1, "SMALLER", estimate + 1])
    larger = set(client.search(["LARGER", 5000]))
    assert larger == {uid for uid in uids.values() if sizes[uid][b"RFC822.SIZE"] > 5000}
    assert set(client.search(["NOT", "LARGER", 5000])) == set(uids.values()) - larger
    assert set(client.search(["SMALLER", 3000])) == {uid for uid in uids.values() if sizes[uid][b"RFC822.SIZE"] < 3000}
    client.logout()


# ---- capabilities and what Outlook lacks ------------------------------------------------------------
def test_capability_is_outlooks_before_and_after_login(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    raw = Raw(front, outlook)
    assert (
        raw.greeting.startswith(b"* OK The Microsoft Exchange IMAP4 service is ready.")
        and b"CAPABILITY" not in raw.greeting
    )
    assert raw.command(b"CAPABILITY") == [b"* CAPABILITY " + CAPABILITIES, b"R1 OK CAPABILITY completed."]
    login_reply = raw.command(b'LOGIN %s "%s"' % (outlook.new_user("caps").encode(), outlook.password.encode()))
    assert login_reply == [b"R2 OK LOGIN completed."]
    assert raw.command(b"CAPABILITY")[0] == b"* CAPABILITY " + CAPABILITIES
    raw.close()
    assert (
        CAPABILITIES.decode()
        == "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+"
    )
    client = login(front, outlook, outlook.new_user("caps"))
    assert set(client.capabilities()) == set(CAPABILITIES.upper().split())  # imapclient upper-cases
    client.logout()


def test_what_outlook_lacks_gets_command_error_12(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    user = outlook.new_user("lacks")
    raw = Raw(front, outlook)
    raw.command(b'LOGIN %s "%s"' % (user.encode(), outlook.password.encode()))
    message = b"Subject: x\r\n\r\nbody\r\n"
    raw.send(b"A1 APPEND INBOX ~{%d+}\r\n%s\r\n" % (len(message), message))  # literal8 (BINARY)
    assert raw.until(b"A1") == [b"A1 BAD Command Error. 12"]
    raw.send(b"A2 APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(message), message, len(message), message))
    assert raw.until(b"A2") == [b"A2 BAD Command Error. 12"]  # MULTIAPPEND
    assert raw.command(b"STATUS INBOX (APPENDLIMIT)")[-1].endswith(b"BAD Command Error. 12")
    assert raw.command(b"STATUS INBOX (MESSAGES UIDNEXT)")[-1].endswith(b"OK STATUS completed.")
    assert raw.command(b"ENABLE CONDSTORE")[-1].endswith(b"BAD Command Error. 12")
    assert raw.command(b"ENABLE QRESYNC")[-1].endswith(b"BAD Command Error. 12")
    assert raw.command(b"SELECT INBOX (CONDSTORE)")[-1].endswith(b"BAD Command Error. 12")
    assert raw.command(b"SELECT INBOX")[-1].endswith(b"OK [READ-WRITE] SELECT completed.")
    assert raw.command(b"UID SEARCH RETURN (MIN MAX) ALL")[-1].endswith(b"BAD Command Error. 12")
    assert raw.command(b"UID FETCH 1:* (BINARY.PEEK[])")[-1].endswith(b"BAD Command Error. 12")
    assert raw.command(b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1)")[-1].endswith(b"BAD Command Error. 12")
    assert raw.command(b"SORT (DATE) UTF-8 ALL")[-1].endswith(b"BAD Command Error. 12")
    assert raw.command(b"GETQUOTAROOT INBOX")[-1].endswith(b"BAD Command Error. 12")
    raw.close()
    assert read_folder(outlook, user, "INBOX") == []  # nothing of those reached Dovecot
    assert sum(reply == b"BAD Command Error. 12" for _, reply in front.refused) == 11


def test_switched_off_the_front_shows_dovecots_capabilities(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook, capabilities=False)
    client = login(front, outlook, outlook.new_user("plain"))
    assert b"BINARY" in client.capabilities() and b"MULTIAPPEND" in client.capabilities()
    client.logout()


# ---- logins, APPEND and SELECT pass through -----------------------------------------------------------
def test_xoauth2_with_sasl_ir_and_without_reaches_dovecot(outlook_front, dovecot_pair, oauth_server):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    user = outlook.new_user("oauth")
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE wins over verify= (test_harness.verifying_session)
    session.verify = oauth_server.ca_bundle_path
    app = msal.PublicClientApplication(
        oauth_server.ms_client_id, authority=oauth_server.ms_authority, instance_discovery=False, http_client=session
    )
    token = app.acquire_token_by_refresh_token(oauth_server.issue_refresh_token(user, "microsoft"), scopes=[MS_SCOPE])
    client = client_of(front, outlook)
    client.oauth2_login(user, token["access_token"])  # imaplib: AUTHENTICATE, "+", then the response
    assert client.list_folders("", "INBOX")[0][2] == "Inbox"
    client.logout()
    initial = base64.b64encode(f"user={user}\x01auth=Bearer {token['access_token']}\x01\x01".encode())
    raw = Raw(front, outlook)
    assert raw.command(b"AUTHENTICATE XOAUTH2 " + initial) == [b"R1 OK AUTHENTICATE completed."]
    raw.close()
    bad = Raw(front, outlook)
    refused = bad.command(
        b"AUTHENTICATE XOAUTH2 " + base64.b64encode(f"user={user}\x01auth=Bearer nope\x01\x01".encode())
    )
    if refused[-1].startswith(b"+"):  # Dovecot's error challenge: the client answers empty
        bad.send(b"\r\n")
        refused += bad.until(b"R1")
    assert refused[-1] == b"R1 NO AUTHENTICATE failed."
    bad.close()
    assert outlook.logins(user) == 2


def test_append_and_select_keep_appenduid_uidnext_uidvalidity(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    user = outlook.new_user("uids")
    client = login(front, outlook, user)
    client.create_folder("Work")
    selected = client.select_folder("Work")
    assert selected[b"UIDNEXT"] == 1
    assert selected[b"PERMANENTFLAGS"] == (
        b"\\Seen",
        b"\\Answered",
        b"\\Flagged",
        b"\\Deleted",
        b"\\Draft",
        b"$MDNSent",
    )
    assert selected[b"FLAGS"] == selected[b"PERMANENTFLAGS"]
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    uid = append(
        client, "Work", b"Subject: one\r\n\r\nbody\r\n", ["\\Seen", "\\Flagged", "$MDNSent", "$Label1", "Junk"], when
    )
    assert uid == 1
    again = client.select_folder("Work")
    assert (again[b"UIDNEXT"], again[b"UIDVALIDITY"]) == (2, selected[b"UIDVALIDITY"])
    client.logout()
    direct = connect(outlook, user)
    assert direct.folder_status("Work", [b"UIDVALIDITY"])[b"UIDVALIDITY"] == selected[b"UIDVALIDITY"]
    direct.logout()
    (stored,) = read_folder(outlook, user, "Work")
    assert stored.flags == {b"\\Seen", b"\\Flagged", b"$MDNSent"}  # the other keywords dropped, silently
    assert stored.internaldate == when


# ---- refusals ---------------------------------------------------------------------------------------
def test_append_over_the_size_limit_is_refused_with_outlooks_text(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook, max_message_size=1000)
    user = outlook.new_user("size")
    client = login(front, outlook, user)
    assert (
        refusal(client, "INBOX", b"Subject: big\r\n\r\n" + b"x" * 1000 + b"\r\n")
        == "NO Maximum size of appendable message has been exceeded"
    )
    assert append(client, "INBOX", b"Subject: small\r\n\r\nsmall\r\n") == 1
    client.logout()
    raw = Raw(front, outlook)  # a synchronising literal is refused before its "+"
    raw.command(b'LOGIN %s "%s"' % (user.encode(), outlook.password.encode()))
    raw.send(b"S1 APPEND INBOX {5000}\r\n")
    assert raw.line() == b"S1 NO Maximum size of appendable message has been exceeded\r\n"
    assert raw.command(b"NOOP")[-1].endswith(b"OK NOOP completed.")
    raw.close()
    assert len(read_folder(outlook, user, "INBOX")) == 1


def test_long_lines_and_long_commands_get_command_error_10(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    user = outlook.new_user("lines")
    client = login(front, outlook, user)
    assert refusal(client, "INBOX", b"Subject: long\r\n\r\n" + b"y" * 9901 + b"\r\n") == "BAD Command Error. 10"
    assert append(client, "INBOX", b"Subject: fits\r\n\r\n" + b"y" * 9900 + b"\r\n") == 1
    client.select_folder("INBOX")
    with pytest.raises(IMAPClientError, match="Command Error. 10"):
        client.fetch(list(range(1, 8000, 2)), [b"FLAGS"])  # a 10,240+ character command line
    client.logout()


def test_scripted_refusals_argument_error_11_and_server_unavailable_15(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    user = outlook.new_user("scripted")
    client = login(front, outlook, user)
    front.cannot_parse()
    assert refusal(client, "INBOX", b"Subject: a\r\n\r\na\r\n") == "BAD Command Argument Error. 11"
    front.unavailable(times=2)
    for _ in range(2):
        assert refusal(client, "INBOX", b"Subject: b\r\n\r\nb\r\n") == "NO Server Unavailable. 15"
    front.refuse_messages(lambda message: b"X-Poison:" in message)
    for _ in range(2):
        assert refusal(client, "INBOX", b"X-Poison: 1\r\nSubject: c\r\n\r\nc\r\n") == "BAD Command Argument Error. 11"
    assert append(client, "INBOX", b"Subject: d\r\n\r\nd\r\n") == 1
    front.clear_message_refusals()
    assert append(client, "INBOX", b"X-Poison: 1\r\nSubject: c\r\n\r\nc\r\n") == 2
    client.logout()
    assert [reply for _, reply in front.refused] == [
        b"BAD Command Argument Error. 11",
        b"NO Server Unavailable. 15",
        b"NO Server Unavailable. 15",
        b"BAD Command Argument Error. 11",
        b"BAD Command Argument Error. 11",
    ]
    assert front.appends == 2 and len(read_folder(outlook, user, "INBOX")) == 2


def test_reserved_folder_name_is_refused(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    raw = Raw(front, outlook)
    raw.command(b'LOGIN %s "%s"' % (outlook.new_user("files").encode(), outlook.password.encode()))
    assert raw.command(b"CREATE Files") == [b"R2 NO Folder name is reserved"]
    assert raw.command(b"CREATE files") == [b"R3 NO Folder name is reserved"]
    assert raw.command(b"CREATE Files2") == [b"R4 OK CREATE completed."]
    raw.close()


# ---- throttling ---------------------------------------------------------------------------------------
def test_throttle_no_form_then_the_append_goes_through(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    user = outlook.new_user("throttle")
    client = login(front, outlook, user)
    front.throttle(times=1, backoff_ms=299609)
    assert (
        refusal(client, "INBOX", b"Subject: t\r\n\r\nt\r\n")
        == "NO Request is throttled. Suggested Backoff Time: 299609 milliseconds"
    )
    assert append(client, "INBOX", b"Subject: t\r\n\r\nt\r\n") == 1
    client.logout()


def test_throttle_bad_form_is_followed_by_bye_and_the_close(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    raw = Raw(front, outlook)
    raw.command(b'LOGIN %s "%s"' % (outlook.new_user("bye").encode(), outlook.password.encode()))
    front.throttle(backoff_ms=89117, form="BAD", match=b"SELECT")
    assert raw.command(b"SELECT INBOX") == [b"R2 BAD Request is throttled. Suggested Backoff Time: 89117 milliseconds"]
    assert raw.line() == b"* BYE Connection closed. 14\r\n"
    assert raw.closed()
    raw.close()


# ---- folder names -----------------------------------------------------------------------------------
def test_folder_names_are_case_insensitive_and_inbox_is_listed_as_inbox(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    user = outlook.new_user("case")
    seed(outlook, user, "Archive/2024", [b"Subject: old\r\n\r\nold\r\n"])
    client = login(front, outlook, user)
    names = {name for _, _, name in client.list_folders()}
    assert "Inbox" in names and "INBOX" not in names and {"Archive", "Archive/2024"} <= names
    assert [name for _, _, name in client.list_folders("", "inbox")] == ["Inbox"]
    assert [name for _, _, name in client.list_folders("", "archive/%")] == ["Archive/2024"]
    assert client.select_folder("archive/2024")[b"EXISTS"] == 1
    assert client.folder_status("ARCHIVE/2024", [b"MESSAGES"])[b"MESSAGES"] == 1
    assert client.select_folder("inbox")[b"EXISTS"] == 0
    assert append(client, "aRcHiVe/2024", b"Subject: new\r\n\r\nnew\r\n") == 2
    for existing in ("archive", "ARCHIVE/2024", "inbox", "Inbox"):
        with pytest.raises(IMAPClientError, match="Mailbox already exists"):
            client.create_folder(existing)
    client.logout()
    raw = Raw(front, outlook)
    raw.command(b'LOGIN %s "%s"' % (user.encode(), outlook.password.encode()))
    assert raw.command(b"CREATE archive") == [b"R2 NO Mailbox already exists"]  # no response code
    raw.close()
    assert len(read_folder(outlook, user, "Archive/2024")) == 2
    direct = connect(outlook, user)
    assert {name for _, _, name in direct.list_folders()} == {"INBOX", "Archive", "Archive/2024"}
    direct.logout()


# ---- sessions -----------------------------------------------------------------------------------------
def test_an_idle_session_is_dropped_without_bye(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook, idle_timeout=0.3)
    raw = Raw(front, outlook)
    raw.command(b'LOGIN %s "%s"' % (outlook.new_user("idle").encode(), outlook.password.encode()))
    assert raw.closed()  # the read returns when the front closes (no BYE line first)
    assert front.idle_drops == 1
    raw.close()
    busy = login(front, outlook, outlook.new_user("busy"))
    for _ in range(3):
        busy.noop()  # commands within the timeout keep a session
    busy.logout()


def test_sessions_over_the_per_mailbox_limit_are_not_connected(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook, max_sessions=2)
    user = outlook.new_user("limit")
    first, second = login(front, outlook, user), login(front, outlook, user)
    third = login(front, outlook, user)  # the login itself is accepted
    with pytest.raises(IMAPClientError, match="User is authenticated but not connected"):
        third.select_folder("INBOX")
    other = login(front, outlook, outlook.new_user("other"))  # the limit is per mailbox
    other.select_folder("INBOX")
    for client in (third, second, other):
        client.logout()
    wait_for(lambda: front.sessions(user) == 1, timeout=10, what="two sessions of the mailbox to end")
    fourth = login(front, outlook, user)
    fourth.select_folder("INBOX")
    for client in (first, fourth):
        client.logout()


def test_one_shot_connection_drop_after_the_append_reply(outlook_front, dovecot_pair):
    outlook = dovecot_pair.outlook
    front = outlook_front(outlook)
    user = outlook.new_user("drop")
    client = login(front, outlook, user)
    front.drop_connection(b" APPEND ", when="reply_lost")
    with pytest.raises((OSError, IMAPClientError, ssl.SSLError)):
        append(client, "INBOX", b"Subject: lost\r\n\r\nreply lost\r\n")
    assert len(read_folder(outlook, user, "INBOX")) == 1  # Dovecot stored it all the same


def test_each_behaviour_switches_off_alone(outlook_front, dovecot_pair):
    """rebuilt_mime=False: BODY[] is the stored bytes, sizes still estimated; estimated_size=False:
    RFC822.SIZE is the stored size, bodies still rebuilt; outlook_flags=False keeps keywords;
    case_insensitive_folders=False lists INBOX as INBOX."""
    outlook = dovecot_pair.outlook
    message = CORPUS[0].bytes
    for switches in (
        {"rebuilt_mime": False},
        {"estimated_size": False},
        {"outlook_flags": False},
        {"case_insensitive_folders": False},
    ):
        front = outlook_front(outlook, **switches)
        user = outlook.new_user("switch")
        client = login(front, outlook, user)
        uid = append(client, "INBOX", message, ["$Label1"])
        client.select_folder("INBOX")
        got = client.fetch([uid], [b"BODY.PEEK[]", b"RFC822.SIZE", b"FLAGS"])[uid]
        folders = [name for _, _, name in client.list_folders()]
        client.logout()
        stored = stored_form(message)
        rebuilt = switches.get("rebuilt_mime", True)
        assert got[b"BODY[]"] == (render_exchange_mime(stored) if rebuilt else stored), switches
        assert got[b"RFC822.SIZE"] == (
            estimated_size(len(stored)) if switches.get("estimated_size", True) else len(stored)
        )
        assert (b"$Label1" in got[b"FLAGS"]) == (not switches.get("outlook_flags", True)), switches
        assert folders == (["Inbox"] if switches.get("case_insensitive_folders", True) else ["INBOX"]), switches


def test_numbered_parts_come_from_the_rebuilt_message(corpus_box, dovecot_pair):
    front, user, uids, _ = corpus_box
    name = "003-cpython-multipart-images.eml"
    rendered = render_exchange_mime(stored_form(next(m.bytes for m in CORPUS if m.name == name)))
    boundary = re.search(rb'boundary="([^"]+)"', rendered).group(1)
    parts = rendered.split(b"--" + boundary)
    first_header, _, first_body = parts[1][2:].partition(b"\r\n\r\n")
    client = login(front, dovecot_pair.outlook, user)
    client.select_folder("INBOX", readonly=True)
    got = client.fetch([uids[name]], [b"BODY.PEEK[1]", b"BODY.PEEK[1.MIME]", b"BODY.PEEK[9]"])[uids[name]]
    client.logout()
    assert got[b"BODY[1]"] == first_body[:-2]  # without the CRLF that belongs to the next delimiter
    assert got[b"BODY[1.MIME]"] == first_header + b"\r\n\r\n"
    assert got[b"BODY[9]"] == b""
