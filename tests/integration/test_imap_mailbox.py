"""ImapSource and ImapDestination against the harness's real Dovecot servers, and against a
scripted IMAP server for the replies Dovecot cannot be made to give (Outlook's throttling,
TOOBIG, no LITERAL+, no BINARY, APPENDLIMIT, X-GM-MSGID, a dropped connection)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import socket
import threading
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from imapclient import IMAPClient
from pydantic import SecretStr

from shared.errors import ImapFailure
from shared.mailbox.connections import MailboxConnections
from shared.mailbox.imap import SUMMARY_SET_CHARS, ImapDestination, ImapSource
from shared.mailbox.port import AppendRejected, SourceMessage, UidFloor, fingerprint
from shared.mailbox.session import ImapAccount, ImapEndpoint, open_session
from tests.harness.mail import connect, corpus, expunge, read_folder, seed

CORPUS = corpus()
UTC = dt.timezone.utc


def zone(hours: int, minutes: int = 0) -> dt.timezone:
    sign = -1 if hours < 0 else 1
    return dt.timezone(sign * dt.timedelta(hours=abs(hours), minutes=minutes))


# Whole hours from -12 to +14 and the half and quarter hours of India, Nepal and Newfoundland.
ZONES = [zone(h) for h in range(-12, 15)] + [zone(5, 30), zone(5, 45), zone(-3, 30), zone(9, 30)]
FLAG_SETS = [
    (),
    ("\\Seen",),
    ("\\Seen", "\\Flagged"),
    ("\\Answered", "$Label1"),
    ("Work", "\\Draft"),
    ("\\Seen", "\\Answered", "\\Flagged", "\\Draft"),
]


def account(server, user: str) -> ImapAccount:
    endpoint = ImapEndpoint(server.host, server.imaps_port, ssl=True, ca_bundle=Path(server.ca_bundle_path), timeout=30)
    return ImapAccount(f"test account {user}", user, endpoint, password=SecretStr(server.password))


@pytest.fixture
def sessions():
    """open(server, user) -> a logged-in IMAPClient through open_session, logged out afterwards."""
    opened: list[IMAPClient] = []

    def open_(server, user: str) -> tuple[IMAPClient, ImapAccount]:
        acct = account(server, user)
        client = open_session(acct)
        opened.append(client)
        return client, acct

    yield open_
    for client in opened:
        try:
            client.logout()
        except Exception:  # noqa: BLE001 - a test may have left it broken on purpose
            client.shutdown()


@pytest.fixture
def source_of(sessions):
    def make(server, user: str, folder: str | None = "INBOX") -> ImapSource:
        source = ImapSource(*sessions(server, user))
        if folder is not None:
            source.examine(folder)
        return source

    return make


@pytest.fixture
def destination_of(sessions):
    return lambda server, user: ImapDestination(*sessions(server, user))


def message(subject: str, message_id: str | None = None, body: str = "text") -> bytes:
    header = f"Message-ID: {message_id}\r\n" if message_id else ""
    return f"{header}Subject: {subject}\r\nFrom: a@example.org\r\n\r\n{body}\r\n".encode()


# ---- the copy itself ---------------------------------------------------------------------------
def test_corpus_copied_byte_for_byte_with_flags_and_dates(dovecot_pair, source_of, destination_of):
    gmail, outlook = dovecot_pair.gmail, dovecot_pair.outlook
    user = gmail.new_user("corpus")
    base = dt.datetime(2019, 12, 31, 23, 59, 58, tzinfo=UTC)
    seeds = [
        (
            m.bytes,
            FLAG_SETS[i % len(FLAG_SETS)],
            (base + dt.timedelta(days=i, seconds=7 * i)).astimezone(ZONES[i % len(ZONES)]),
        )
        for i, m in enumerate(CORPUS)
    ]
    source_uids = seed(gmail, user, "INBOX", seeds)
    before = read_folder(gmail, user, "INBOX")

    source = source_of(gmail, user)
    dest_user = outlook.new_user("corpus")
    destination = destination_of(outlook, dest_user)
    destination.ensure_folder("Archive/From Gmail")
    appended_uids = []
    for uid in source_uids:
        fetched = source.fetch(uid)
        assert fetched is not None
        assert fetched.internaldate.tzinfo is not None
        appended_uids.append(destination.append("Archive/From Gmail", fetched))

    after = read_folder(gmail, user, "INBOX")
    copied = read_folder(outlook, dest_user, "Archive/From Gmail")
    assert appended_uids == [c.uid for c in copied]
    assert len(copied) == len(CORPUS)
    for original, copy, (_, flags, when), m in zip(after, copied, seeds, CORPUS, strict=True):
        assert copy.body == original.body, m.name
        assert copy.flags == original.flags == {f.encode() for f in flags}, m.name
        assert copy.internaldate == original.internaldate == when, m.name
    # The source was only read: no \Seen (or anything else) added.
    assert [s.flags for s in after] == [s.flags for s in before]
    assert [s.body for s in after] == [s.body for s in before]


def test_the_corpus_fetched_in_batches_and_appended_pipelined_byte_for_byte(dovecot_pair, source_of, destination_of):
    """The batched copy path's two commands (fetch_many, append_many) keep every byte, flag and
    date, and each answer is the one of its own message."""
    gmail, outlook = dovecot_pair.gmail, dovecot_pair.outlook
    user = gmail.new_user("batched")
    base = dt.datetime(2021, 3, 1, 8, 0, 0, tzinfo=UTC)
    seeds = [(m.bytes, FLAG_SETS[i % len(FLAG_SETS)], base + dt.timedelta(hours=i)) for i, m in enumerate(CORPUS)]
    source_uids = seed(gmail, user, "INBOX", seeds)
    source = source_of(gmail, user)
    dest_user = outlook.new_user("batched")
    destination = destination_of(outlook, dest_user)
    destination.ensure_folder("Batched")

    answers = []
    for start in range(0, len(source_uids), 25):
        uids = source_uids[start : start + 25]
        fetched = source.fetch_many(uids)
        assert sorted(fetched) == uids
        answers += destination.append_many("Batched", [fetched[uid] for uid in uids])

    copied = read_folder(outlook, dest_user, "Batched")
    assert [answer.landed for answer in answers] == [True] * len(CORPUS)
    assert [answer.uid for answer in answers] == [copy.uid for copy in copied]
    originals = read_folder(gmail, user, "INBOX")
    for original, copy, m in zip(originals, copied, CORPUS, strict=True):
        assert (copy.body, copy.flags, copy.internaldate) == (original.body, original.flags, original.internaldate), m.name


def test_fetch_many_leaves_out_what_is_not_there(dovecot_pair, source_of):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("fetchmany")
    uids = seed(gmail, user, "INBOX", [(message(f"m{i}"), (), WHEN) for i in range(4)])
    expunge(gmail, user, uids[1])
    source = source_of(gmail, user)
    assert sorted(source.fetch_many([*uids, 999])) == [uids[0], uids[2], uids[3]]


def test_nul_bytes_go_as_a_binary_literal_where_the_server_has_binary(dovecot_pair, destination_of):
    outlook = dovecot_pair.outlook
    user = outlook.new_user("nul")
    with_nul = next(m for m in CORPUS if b"\0" in m.bytes)
    when = dt.datetime(2024, 2, 29, 12, 0, 1, tzinfo=zone(5, 30))
    destination = destination_of(outlook, user)
    uid = destination.append("INBOX", SourceMessage(1, with_nul.bytes, ("\\Flagged",), when))
    (stored,) = read_folder(outlook, user, "INBOX")
    assert uid == stored.uid
    # Dovecot keeps the NULs and serves them as 0x80 in BODY[] (and bare LFs as CRLF).
    assert stored.body == re.sub(rb"(?<!\r)\n", b"\r\n", with_nul.bytes).replace(b"\0", b"\x80")
    assert stored.flags == {b"\\Flagged"} and stored.internaldate == when


# ---- source ------------------------------------------------------------------------------------
def test_examine_gives_the_folder_state_and_names_a_missing_folder(dovecot_pair, source_of):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("examine")
    seed(gmail, user, "Work/Mail", [message("a"), message("b")])
    source = source_of(gmail, user, folder=None)
    state = source.examine("Work/Mail")
    assert (state.exists, state.uidnext) == (2, 3) and state.uidvalidity > 0

    with pytest.raises(ImapFailure) as missing:
        source.examine("No/Such Folder")
    assert missing.value.step == "examine"
    assert str(missing.value).startswith(
        f"test account {user} at 127.0.0.1:{gmail.imaps_port}: examine 'No/Such Folder' failed: "
    )


def test_uids_above_leaves_out_the_highest_uid_that_star_always_matches(dovecot_pair, source_of):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("above")
    uids = seed(gmail, user, "INBOX", [message(str(i)) for i in range(5)])
    source = source_of(gmail, user)
    assert source.uids_above(0) == uids == [1, 2, 3, 4, 5]
    assert source.uids_above(3) == [4, 5]
    assert source.uids_above(5) == []  # "6:*" is answered with UID 5
    assert source.uids_above(99) == []


def test_uids_since_goes_by_internaldate(dovecot_pair, source_of):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("since")
    days = [dt.date(2024, 3, d) for d in (1, 5, 9, 5)]
    seed(gmail, user, "INBOX", [(message(str(d)), (), dt.datetime.combine(d, dt.time(12), UTC)) for d in days])
    source = source_of(gmail, user)
    assert source.uids_since(dt.date(2024, 3, 5)) == [2, 3, 4]
    assert source.uids_since(dt.date(2024, 3, 10)) == []
    assert source.uids_since(dt.date(2024, 1, 1)) == [1, 2, 3, 4]


def test_summaries_parse_message_id_and_report_the_body_size(dovecot_pair, source_of):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("summary")
    when = dt.datetime(2023, 7, 1, 8, 9, 10, tzinfo=zone(-7))
    seed(
        gmail,
        user,
        "INBOX",
        [
            (message("plain", "<plain@example.org>"), (), when),
            message("none"),
            b"Subject: folded\r\nMessage-Id:\r\n   <folded.id@example.org>  \r\n\r\nbody\n",
            b"Message-ID:   \r\nSubject: empty\r\n\r\nbody\r\n",
            b"MESSAGE-ID: <first@x>\r\nMessage-ID: <second@x>\r\n\r\n",
        ],
    )
    source = source_of(gmail, user)
    summaries = source.summaries([5, 3, 1, 2, 4, 2, 77])  # unordered, a repeat, one that never was
    stored = read_folder(gmail, user, "INBOX")
    assert [s.uid for s in summaries] == [1, 2, 3, 4, 5]
    assert [s.message_id for s in summaries] == [
        "<plain@example.org>",
        None,
        "<folded.id@example.org>",
        None,
        "<first@x>",
    ]
    assert [s.size for s in summaries] == [len(s.body) for s in stored]
    assert summaries[0].internaldate == when and summaries[0].internaldate.tzinfo is not None
    assert all(s.gmail_msgid is None for s in summaries)  # Dovecot has no X-GM-EXT-1
    # The whole header block's hash, for the messages with no Message-ID only (UIDs 2 and 4).
    headers = [body.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" for body in (s.body for s in stored)]
    assert [s.header_sha256 for s in summaries] == [
        None,
        hashlib.sha256(headers[1]).hexdigest(),
        None,
        hashlib.sha256(headers[3]).hexdigest(),
        None,
    ]
    assert source.summaries([]) == []


def test_fingerprints_without_message_id_tell_headers_apart_and_stay_stable(dovecot_pair, source_of):
    """Renumbering keeps them: the same message gives the same fingerprint under any UID; two
    messages alike but for one header field (or the INTERNALDATE) get different ones."""
    gmail = dovecot_pair.gmail
    user = gmail.new_user("fpnoid")
    when = dt.datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC)
    first = b"Subject: no id\r\nDate: Sat, 03 Feb 2024 04:05:06 +0000\r\n\r\nbody\r\n"
    other_header = first.replace(b"04:05:06", b"04:05:07")  # same size, one header differs
    later = when + dt.timedelta(seconds=1)
    seed(gmail, user, "INBOX", [(first, (), when), (other_header, (), when), (first, (), later), (first, (), when)])
    summaries = source_of(gmail, user).summaries([1, 2, 3, 4])
    prints = [fingerprint(s) for s in summaries]

    assert all(p is not None and p.startswith("hh:") for p in prints)
    assert prints[0] == prints[3]  # the same message at another UID
    assert len({prints[0], prints[1], prints[2]}) == 3


def test_fetch_of_an_expunged_or_unknown_uid_is_none(dovecot_pair, source_of):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("gone")
    seed(gmail, user, "INBOX", [message("keep"), message("drop")])
    source = source_of(gmail, user)  # its view of the folder still lists UID 2 after the expunge
    other = connect(gmail, user)
    other.select_folder("INBOX")
    other.delete_messages([2])
    other.expunge()
    other.logout()

    assert source.fetch(2) is None
    assert source.fetch(3) is None
    kept = source.fetch(1)
    assert kept is not None and kept.body == message("keep")
    assert set(kept.flags) <= {"\\Recent"}  # as served: \Recent is the destination's to drop


def test_the_source_is_only_examined_and_peeked(scripted_imap):
    """On an EXAMINEd folder even BODY[] leaves \\Seen alone (so the corpus test cannot tell):
    each safeguard is checked on the wire."""
    server = scripted_imap()
    server.replies["UID FETCH"] = [
        '* 1 FETCH (UID 1 FLAGS (\\Seen) INTERNALDATE "01-Feb-2024 10:11:12 +0100" BODY[] {3}\r\nabc)\r\nOK done',
        '* 1 FETCH (UID 1 RFC822.SIZE 3 INTERNALDATE "01-Feb-2024 10:11:12 +0100" BODY[HEADER.FIELDS (MESSAGE-ID)] {2}\r\n\r\n)\r\nOK done',
        "* 1 FETCH (UID 1 BODY[HEADER] {2}\r\n\r\n)\r\nOK done",
    ]
    source = ImapSource(*server.login())
    assert source.examine("INBOX").uidvalidity == 9
    assert source.fetch(1).body == b"abc"
    assert source.summaries([1])[0].message_id is None
    commands = [line.split(b" ", 1)[1] for line, _ in server.received]
    commands = [c for c in commands if not c.startswith((b"CAPABILITY", b"LOGIN"))]
    assert [c.split(b" ")[0] for c in commands] == [b"EXAMINE", b"UID", b"UID", b"UID"]
    assert b"BODY.PEEK[] " in commands[1] and b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]" in commands[2]
    assert b"BODY.PEEK[HEADER]" in commands[3]  # no Message-ID: the header block, for its fingerprint
    assert b"X-GM-MSGID" not in commands[2]


def test_summaries_ask_for_gmail_ids_only_where_the_server_has_them(scripted_imap):
    server = scripted_imap(capabilities="IMAP4rev1 LITERAL+ X-GM-EXT-1")
    server.replies["UID FETCH"] = [
        '* 1 FETCH (UID 7 RFC822.SIZE 21 INTERNALDATE "01-Feb-2024 10:11:12 +0100" X-GM-MSGID 1278455344230334865 '
        "BODY[HEADER.FIELDS (MESSAGE-ID)] {21}\r\nMessage-ID: <g@x>\r\n\r\n)\r\nOK done",
        *["OK done"] * 2,
    ]
    source = ImapSource(*server.login())
    source.examine("INBOX")
    # Every other UID: no runs to write as ranges, so the set is split to keep lines short.
    (summary,) = source.summaries(range(1, 4000, 2))
    assert (summary.uid, summary.size, summary.message_id, summary.gmail_msgid) == (7, 21, "<g@x>", 1278455344230334865)
    assert summary.internaldate == dt.datetime(2024, 2, 1, 9, 11, 12, tzinfo=UTC)
    fetches = [line for line, _ in server.received if b" UID FETCH " in line]
    assert len(fetches) == 3  # in chunks
    assert all(len(line) < SUMMARY_SET_CHARS + 200 for line in fetches)
    assert all(b"X-GM-MSGID" in line and b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]" in line for line in fetches)


# ---- destination: folders ------------------------------------------------------------------------
def test_ensure_folder_creates_parents_and_is_idempotent(dovecot_pair, destination_of):
    outlook = dovecot_pair.outlook
    user = outlook.new_user("folders")
    seed(outlook, user, "A", [message("already there")])
    nested = "A/B/Ünïcode & Co"  # modified UTF-7 on the wire, "&" included
    destination = destination_of(outlook, user)
    destination.ensure_folder(nested)
    destination.ensure_folder(nested)
    destination_of(outlook, user).ensure_folder(nested)  # another session: nothing cached
    client = connect(outlook, user)
    listed = {name: flags for flags, _, name in client.list_folders()}
    client.logout()
    assert {"A", "A/B", nested} <= set(listed)
    assert all(b"\\Noselect" not in listed[name] for name in ("A", "A/B", nested))
    assert len(read_folder(outlook, user, "A")) == 1
    uid = destination.append(nested, SourceMessage(1, message("x"), (), dt.datetime(2024, 1, 1, tzinfo=UTC)))
    assert [s.uid for s in read_folder(outlook, user, nested)] == [uid]


def test_on_a_server_that_tells_case_apart_names_are_used_as_written(dovecot_pair, destination_of):
    """Dovecot is case-sensitive (but for INBOX): "Work" and "work" are two folders, each gets
    its own copies; "inbox" is INBOX, and a folder under it is created there."""
    outlook = dovecot_pair.outlook
    user = outlook.new_user("cases")
    destination = destination_of(outlook, user)
    for uid, folder in enumerate(["Work", "work", "inbox", "INBOX/Sub", "inbox/Sub", "Work"], start=1):
        destination.ensure_folder(folder)
        destination.append(folder, SourceMessage(uid, message(f"to {folder}"), (), dt.datetime(2024, 1, 1, tzinfo=UTC)))
    assert [m.body for m in read_folder(outlook, user, "Work")] == [message("to Work")] * 2
    assert [m.body for m in read_folder(outlook, user, "work")] == [message("to work")]
    assert [m.body for m in read_folder(outlook, user, "INBOX")] == [message("to inbox")]
    assert [m.body for m in read_folder(outlook, user, "INBOX/Sub")] == [message("to INBOX/Sub"), message("to inbox/Sub")]


def test_a_folder_created_by_another_session_meanwhile_is_fine(scripted_imap):
    server = scripted_imap()
    server.replies["CREATE"] = ["OK created", "NO [ALREADYEXISTS] Mailbox already exists"]
    ImapDestination(*server.login()).ensure_folder("Outer/Inner")
    assert [line.split(b" ", 1)[1] for line, _ in server.received if b" CREATE " in line] == [
        b'CREATE "Outer"',
        b'CREATE "Outer/Inner"',
    ]


def test_a_folder_that_cannot_be_created_is_an_imap_failure(scripted_imap):
    server = scripted_imap()
    server.replies["CREATE"] = ["NO [NOPERM] Permission denied"]
    with pytest.raises(ImapFailure) as failure:
        ImapDestination(*server.login()).ensure_folder("Forbidden")
    assert failure.value.step == "create folder"
    assert "'Forbidden'" in str(failure.value) and "[NOPERM] Permission denied" in str(failure.value)


def test_a_folder_exchange_says_already_exists_without_a_code_is_fine(scripted_imap):
    server = scripted_imap()
    server.replies["CREATE"] = ["NO Mailbox already exists"]
    ImapDestination(*server.login()).ensure_folder("Trash")
    assert [line.split(b" ", 1)[1] for line, _ in server.received if b" CREATE " in line] == [b'CREATE "Trash"']


def test_a_reserved_folder_name_is_a_clear_failure(scripted_imap):
    server = scripted_imap()
    server.replies["CREATE"] = ["NO Folder name is reserved"]
    with pytest.raises(ImapFailure) as failure:
        ImapDestination(*server.login()).ensure_folder("Files")
    assert failure.value.step == "create folder"
    assert "create folder 'Files' failed: " in str(failure.value)
    assert "Folder name is reserved" in str(failure.value)
    assert "set the route's outlook_folder to another name" in str(failure.value)


def test_on_a_server_that_ignores_case_a_folder_is_known_in_any_case(scripted_imap):
    """Exchange lists "Gmail/Work" for "gmail/work": it exists, nothing is created, and the
    session's caches know it in every case (one SELECT for three spellings)."""
    server = scripted_imap()
    server.case_insensitive = True
    server.folders |= {"Gmail", "Gmail/Work"}
    server.replies["APPEND"] = [f"OK [APPENDUID 9 {uid}] APPEND completed" for uid in (1, 2, 3)]
    destination = ImapDestination(*server.login())
    for uid, spelling in enumerate(["gmail/work", "Gmail/Work", "GMAIL/work"], start=1):
        destination.ensure_folder(spelling)
        assert destination.append(spelling, SourceMessage(uid, message(str(uid)), (), WHEN)) == uid
        assert destination.uid_floor(spelling) == UidFloor(9, uid + 1)
    names = [line.split(b" ", 1)[1].split(b" ")[0] for line, _ in server.received]
    assert b"CREATE" not in names
    assert names.count(b"SELECT") == 1


# ---- destination: append -----------------------------------------------------------------------
WHEN = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=zone(-4))


@pytest.mark.parametrize(
    "reply, permanent, reason",
    [
        ("NO [TOOBIG] APPEND failed", True, "too large for the destination"),
        ("NO APPEND failed: message size exceeds the maximum allowed", True, "too large for the destination"),
        ("BAD Line is too long", True, "rejected by the destination: Line is too long"),
        ("NO [LIMIT] Too many keywords", True, "rejected by the destination: [LIMIT] Too many keywords"),
        (
            "NO Request is throttled. Suggested Backoff Time: 2500 milliseconds",
            False,
            "throttled by the destination (suggested backoff 2500 ms)",
        ),
        (
            "NO [UNAVAILABLE] Try again later",
            False,
            "refused for now by the destination: [UNAVAILABLE] Try again later",
        ),
        ("NO [SERVERBUG] Internal error", False, "refused for now by the destination: [SERVERBUG] Internal error"),
        ("NO [INUSE] Mailbox is locked", False, "refused for now by the destination: [INUSE] Mailbox is locked"),
        (
            "NO Something nobody has seen before",
            False,
            "refused for now by the destination: Something nobody has seen before",
        ),
        ("BAD Command Error. 12", False, "refused for now by the destination: Command Error. 12"),
        # Codes and throttling win over words about size; a rate limit is not a size limit.
        (
            "NO [UNAVAILABLE] Message too large to scan now",
            False,
            "refused for now by the destination: [UNAVAILABLE] Message too large to scan now",
        ),
        (
            "NO [LIMIT] Request is throttled. Suggested Backoff Time: 120 milliseconds",
            False,
            "throttled by the destination (suggested backoff 120 ms)",
        ),
        (
            "NO Request exceeds the limit of 10 per second",
            False,
            "refused for now by the destination: Request exceeds the limit of 10 per second",
        ),
        ("NO Message exceeds the maximum allowed size", True, "too large for the destination"),
        # Outlook.com's own texts (tests/harness/outlook_front.py has their sources).
        ("NO Maximum size of appendable message has been exceeded", True, "too large for the destination"),
        ("BAD Command Error. 10", False, "rejected by the destination: Command Error. 10 (a line longer than it accepts)"),
        (
            "BAD Command Argument Error. 11",
            False,
            "rejected by the destination: Command Argument Error. 11 (a message it cannot parse)",
        ),
        ("NO Server Unavailable. 15", False, "refused for now by the destination: Server Unavailable. 15"),
        (
            "BAD Request is throttled. Suggested Backoff Time: 299609 milliseconds",
            False,
            "throttled by the destination (suggested backoff 299609 ms)",
        ),
    ],
)
def test_refusals_are_permanent_only_when_a_retry_cannot_help(scripted_imap, reply, permanent, reason):
    server = scripted_imap()
    server.replies["APPEND"] = [reply, "OK [APPENDUID 9 41] APPEND completed"]
    destination = ImapDestination(*server.login())
    with pytest.raises(AppendRejected) as rejected:
        destination.append("INBOX", SourceMessage(3, message("big"), (), WHEN))
    assert (rejected.value.permanent, rejected.value.reason) == (permanent, reason)
    assert reply.split(" ", 1)[1] in str(rejected.value)
    # A refusal leaves the session usable.
    assert destination.append("INBOX", SourceMessage(4, message("next"), (), WHEN)) == 41


@pytest.mark.parametrize(
    "reply, final_after, retry_after",
    [
        # A line too long, a message Exchange cannot parse: final after the second failure.
        ("BAD Command Error. 10", 2, None),
        ("BAD Command Argument Error. 11", 2, None),
        # Busy or over quota: tried again, never final by itself.
        ("NO Server Unavailable. 15", None, None),
        # Throttles, both forms: waited out as the server asks.
        ("NO Request is throttled. Suggested Backoff Time: 1500 milliseconds", None, 1.5),
        ("BAD Request is throttled. Suggested Backoff Time: 1500 milliseconds", None, 1.5),
        ("BAD Command Error. 12", None, None),  # what Outlook lacks: not about the message
    ],
)
def test_outlook_refusals_say_when_they_become_final(scripted_imap, reply, final_after, retry_after):
    server = scripted_imap()
    server.replies["APPEND"] = [reply]
    with pytest.raises(AppendRejected) as rejected:
        ImapDestination(*server.login()).append("INBOX", SourceMessage(3, message("m"), (), WHEN))
    assert not rejected.value.permanent
    assert (rejected.value.final_after, rejected.value.retry_after) == (final_after, retry_after)


def password_account(server: ScriptedImapServer) -> ImapAccount:
    endpoint = ImapEndpoint("127.0.0.1", server.port, ssl=False, timeout=10)
    return ImapAccount("fake account", "fake", endpoint, password=SecretStr("fake-password"))


@pytest.fixture
def connections_to():
    """connections_to(server) -> MailboxConnections whose destination is the scripted server."""
    made: list[MailboxConnections] = []

    def make(server: ScriptedImapServer) -> MailboxConnections:
        made.append(MailboxConnections(lambda route: None, lambda: password_account(server)))
        return made[-1]

    yield make
    for connections in made:
        connections.close()


def logins(server: ScriptedImapServer) -> int:
    return sum(b" LOGIN " in line for line, _ in server.received)


def test_server_unavailable_is_tried_again_at_once_and_appended(scripted_imap, connections_to):
    server = scripted_imap()
    server.replies["APPEND"] = ["NO Server Unavailable. 15", "OK [APPENDUID 9 7] APPEND completed"]
    connections = connections_to(server)
    assert connections.destination().append("INBOX", SourceMessage(1, message("busy"), (), WHEN)) == 7
    assert sum(b" APPEND " in line for line, _ in server.received) == 2


@pytest.mark.parametrize("then", ["\r\n* BYE Connection closed. 14\r\nCLOSE", ""])
def test_a_bad_throttle_is_not_retried_and_the_next_use_opens_a_new_session(scripted_imap, connections_to, then):
    """Outlook's BAD throttle is followed by "* BYE Connection closed. 14" and the close. It is
    the APPEND's tagged answer, so nothing was stored: a throttle to wait out (not a connection
    lost mid-APPEND), and the next use of the destination logs in again, whether or not the BYE
    has been read by then."""
    server = scripted_imap()
    server.replies["APPEND"] = [
        "BAD Request is throttled. Suggested Backoff Time: 1500 milliseconds" + then,
        "OK [APPENDUID 9 8] APPEND completed",
    ]
    connections = connections_to(server)
    with pytest.raises(AppendRejected) as rejected:
        connections.destination().append("INBOX", SourceMessage(1, message("t"), (), WHEN))
    assert (rejected.value.permanent, rejected.value.retry_after) == (False, 1.5)
    assert (sum(b" APPEND " in line for line, _ in server.received), logins(server)) == (1, 1)
    assert connections.destination().append("INBOX", SourceMessage(1, message("t"), (), WHEN)) == 8
    assert logins(server) == 2


def test_exact_bytes_flags_and_date_over_a_synchronising_literal(scripted_imap):
    server = scripted_imap(
        capabilities="IMAP4rev1 UIDPLUS", permanent_flags="\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent"
    )
    server.replies["APPEND"] = ["OK [APPENDUID 9 12] APPEND completed"]
    body = b"Subject: mixed\nline ends\r\nbare\rcr\r\n"
    flags = ("\\Seen", "\\Recent", "\\Deleted", "$Label1", "$mdnsent", "\\flagged", "Bad]Keyword")
    assert ImapDestination(*server.login()).append("Sent Items", SourceMessage(1, body, flags, WHEN)) == 12
    ((line, literal),) = [(line, literal) for line, literal in server.received if b" APPEND " in line]
    # No \Recent or \Deleted; keywords only those PERMANENTFLAGS names (no \*); system flags
    # canonically spelt.
    assert line.split(b" ", 1)[
        1
    ] == b'APPEND "Sent Items" (\\Seen $mdnsent \\Flagged) "06-May-2024 07:08:09 -0400" {%d}' % len(body)
    assert literal == body
    assert server.continuations_sent == 1


def test_a_refusal_instead_of_the_continuation_sends_no_literal(scripted_imap):
    server = scripted_imap(capabilities="IMAP4rev1 UIDPLUS")
    server.refuse_literal_with = "NO [TOOBIG] Message too big"
    server.replies["APPEND"] = ["OK [APPENDUID 9 13] APPEND completed"]
    destination = ImapDestination(*server.login())
    with pytest.raises(AppendRejected) as rejected:
        destination.append("INBOX", SourceMessage(1, b"x" * 1000, (), WHEN))
    assert rejected.value.permanent and rejected.value.reason == "too large for the destination"
    server.refuse_literal_with = None
    assert destination.append("INBOX", SourceMessage(2, message("small"), (), WHEN)) == 13
    assert [literal for line, literal in server.received if b" APPEND " in line] == [None, message("small")]


def test_no_appenduid_without_uidplus(scripted_imap):
    server = scripted_imap(capabilities="IMAP4rev1 LITERAL+")
    server.replies["APPEND"] = ["OK APPEND completed"]
    assert ImapDestination(*server.login()).append("INBOX", SourceMessage(1, message("a"), (), WHEN)) is None


def test_nul_bytes_without_binary_are_refused_for_good_without_sending(scripted_imap):
    server = scripted_imap(capabilities="IMAP4rev1 LITERAL+ UIDPLUS")
    with pytest.raises(AppendRejected) as rejected:
        ImapDestination(*server.login()).append("INBOX", SourceMessage(1, b"Subject: n\r\n\r\na\0b\r\n", (), WHEN))
    assert rejected.value.permanent
    assert rejected.value.reason == "contains NUL bytes and the destination has no BINARY extension"
    assert not [line for line, _ in server.received if b" APPEND " in line]


def test_nul_bytes_go_as_literal8_and_other_bodies_as_plain_literals(scripted_imap):
    server = scripted_imap(capabilities="IMAP4rev1 LITERAL+ UIDPLUS BINARY")
    server.replies["APPEND"] = ["OK [APPENDUID 9 1] done", "OK [APPENDUID 9 2] done"]
    destination = ImapDestination(*server.login())
    with_nul, without = b"Subject: n\r\n\r\na\0b\r\n", message("plain")
    assert destination.append("INBOX", SourceMessage(1, with_nul, (), WHEN)) == 1
    assert destination.append("INBOX", SourceMessage(2, without, (), WHEN)) == 2
    sent = [(line, literal) for line, literal in server.received if b" APPEND " in line]
    assert sent[0][0].endswith(b" ~{%d+}" % len(with_nul)) and sent[0][1] == with_nul
    assert sent[1][0].endswith(b'"06-May-2024 07:08:09 -0400" {%d+}' % len(without))
    assert sent[1][1] == without
    assert server.continuations_sent == 0


@pytest.mark.parametrize(
    "capabilities", ["IMAP4rev1 LITERAL+ UIDPLUS APPENDLIMIT=100", "IMAP4rev1 LITERAL+ UIDPLUS APPENDLIMIT"]
)
def test_appendlimit_is_checked_before_sending(scripted_imap, capabilities):
    server = scripted_imap(capabilities=capabilities)
    server.replies["STATUS"] = ['* STATUS "INBOX" (APPENDLIMIT 100)\r\nOK done']
    server.replies["APPEND"] = ["OK [APPENDUID 9 5] done"]
    destination = ImapDestination(*server.login())
    with pytest.raises(AppendRejected) as rejected:
        destination.append("INBOX", SourceMessage(1, b"x" * 101, (), WHEN))
    assert rejected.value.permanent and rejected.value.reason == "too large for the destination"
    assert destination.append("INBOX", SourceMessage(2, b"x" * 100, (), WHEN)) == 5
    assert [len(literal) for line, literal in server.received if b" APPEND " in line] == [100]


def test_a_connection_lost_during_append_is_an_imap_failure(scripted_imap):
    server = scripted_imap()
    server.replies["APPEND"] = ["DISCONNECT"]
    with pytest.raises(ImapFailure) as failure:
        ImapDestination(*server.login()).append("INBOX", SourceMessage(1, message("a"), (), WHEN))
    assert failure.value.step == "append"
    assert str(failure.value).startswith("fake account at 127.0.0.1:")


def test_pipelined_appends_go_out_without_waiting_and_each_answer_is_its_own(scripted_imap):
    server = scripted_imap()
    server.replies["APPEND"] = ["OK [APPENDUID 9 5] done", "NO [UNAVAILABLE] try later", "OK [APPENDUID 9 6] done"]
    bodies = [message(f"m{i}") for i in range(3)]
    destination = ImapDestination(*server.login())

    answers = destination.append_many("INBOX", [SourceMessage(i, body, (), WHEN) for i, body in enumerate(bodies)])

    assert [(answer.landed, answer.uid) for answer in answers] == [(True, 5), (False, None), (True, 6)]
    refused = answers[1].refused
    assert refused is not None and not refused.permanent and "[UNAVAILABLE] try later" in str(refused)
    assert [literal for line, literal in server.received if b" APPEND " in line] == bodies
    assert server.continuations_sent == 0  # LITERAL+: no command waited for a "+"


def test_a_session_lost_midway_through_pipelined_appends_leaves_the_rest_unanswered(scripted_imap):
    server = scripted_imap()
    server.replies["APPEND"] = ["OK [APPENDUID 9 5] done", "DISCONNECT"]
    destination = ImapDestination(*server.login())

    answers = destination.append_many("INBOX", [SourceMessage(i, message(f"m{i}"), (), WHEN) for i in range(3)])

    assert answers[0].landed and answers[0].uid == 5
    # Sent, and the server may have stored them before it went: unknown, not refused.
    assert [(answer.landed, answer.refused, answer.sent) for answer in answers[1:]] == [(False, None, True)] * 2
    assert all(isinstance(answer.failed, ImapFailure) and answer.failed.step == "append" for answer in answers[1:])


def test_without_literal_plus_appends_go_one_by_one_and_a_loss_leaves_the_rest_unsent(scripted_imap):
    server = scripted_imap(capabilities="IMAP4rev1 UIDPLUS")
    server.replies["APPEND"] = ["OK [APPENDUID 9 5] done", "DISCONNECT"]
    destination = ImapDestination(*server.login())

    answers = destination.append_many("INBOX", [SourceMessage(i, message(f"m{i}"), (), WHEN) for i in range(3)])

    assert answers[0].uid == 5
    assert [(answer.landed, answer.sent) for answer in answers[1:]] == [(False, True), (False, False)]
    assert server.continuations_sent == 2


def test_a_long_session_does_not_pile_up_what_appends_answer(dovecot_pair, sessions):
    """imaplib keeps untagged data until the next SELECT: EXISTS and RECENT (the folder is
    selected for its PERMANENTFLAGS) and the APPENDUID it copies out of each tagged OK."""
    outlook = dovecot_pair.outlook
    user = outlook.new_user("pileup")
    client, acct = sessions(outlook, user)
    destination = ImapDestination(client, acct)
    for uid in range(1, 4):
        assert destination.append("INBOX", SourceMessage(uid, message(str(uid)), (), WHEN)) == uid
    assert not {"EXISTS", "RECENT", "APPENDUID"} & set(client._imap.untagged_responses)


# ---- destination: find_copies --------------------------------------------------------------------
def test_find_copies_looks_from_the_floor_by_instant_and_identity_not_bytes(dovecot_pair, destination_of):
    outlook = dovecot_pair.outlook
    user = outlook.new_user("find")
    when = dt.datetime(2024, 4, 1, 23, 30, 0, tzinfo=zone(-8))  # 07:30 the next day in UTC
    copy = message("x", "<copy@example.org>", "body A")
    # As Exchange serves it: rebuilt, so other bytes and size, the same properties.
    rendered = b"From: <A@example.org>\r\nSubject: =?utf-8?q?x?=\r\nMessage-ID: <copy@example.org>\r\n\r\nbody A, re-encoded\r\n"
    seed(
        outlook,
        user,
        "Work",
        [
            (copy, (), when),  # 1: an earlier copy, below the floor
            (rendered, ("\\Seen",), when),  # 2: the copy
            (copy, (), when + dt.timedelta(seconds=1)),  # 3: another INTERNALDATE
            (message("y", "<copy@example.org>"), (), when),  # 4: shares the Message-ID, not the subject
            (message("x", "<other@example.org>", "body A"), (), when),  # 5: another Message-ID
            (rendered, (), when.astimezone(zone(9))),  # 6: the same instant written in another zone
        ],
    )
    destination = destination_of(outlook, user)
    floor = destination.uid_floor("Work")
    assert floor.uid == 7
    found_from = UidFloor(floor.uidvalidity, 2)
    assert destination.find_copies("Work", SourceMessage(7, copy, (), when), found_from) == [2, 6]
    assert destination.find_copies("Work", SourceMessage(7, copy, (), when.astimezone(UTC)), found_from) == [2, 6]
    assert destination.find_copies("Work", SourceMessage(7, copy, (), when), floor) == []  # nothing at 7 yet
    # Where the APPEND landed is not known (no floor, or the folder was renumbered since): the
    # days around its INTERNALDATE.
    assert destination.find_copies("Work", SourceMessage(7, copy, (), when), None) == [1, 2, 6]
    renumbered = UidFloor(floor.uidvalidity + 1, 2)
    assert destination.find_copies("Work", SourceMessage(7, copy, (), when), renumbered) == [1, 2, 6]
    assert destination.find_copies("Not There", SourceMessage(7, copy, (), when), None) == []


def test_find_copies_without_message_id_uses_the_rest_of_the_identity(dovecot_pair, destination_of):
    outlook = dovecot_pair.outlook
    user = outlook.new_user("findnoid")
    when = dt.datetime(2024, 4, 1, 23, 30, 0, tzinfo=zone(-8))
    copy = message("no id")
    with_added_id = b"Message-ID: <added.by.server@outlook.test>\r\n" + copy  # Exchange gives it one
    seed(
        outlook,
        user,
        "INBOX",
        [
            (copy, (), when - dt.timedelta(days=3)),  # outside the searched days
            (with_added_id, (), when),  # the copy
            (message("no iD, another subject"), (), when),  # same date, another subject
            (copy, (), when + dt.timedelta(hours=1)),  # another INTERNALDATE
        ],
    )
    destination = destination_of(outlook, user)
    assert destination.find_copies("INBOX", SourceMessage(1, copy, (), when), None) == [2]
    assert destination.find_copies("INBOX", SourceMessage(1, copy, (), when - dt.timedelta(days=3)), None) == [1]
    later = when + dt.timedelta(minutes=1)
    assert destination.find_copies("INBOX", SourceMessage(1, copy, (), later), None) == []
    # It searches the folder afresh each time.
    (uid,) = seed(outlook, user, "INBOX", [(copy, (), later)])
    assert destination.find_copies("INBOX", SourceMessage(1, copy, (), later), None) == [uid]


def test_the_uid_floor_follows_each_append(dovecot_pair, destination_of):
    outlook = dovecot_pair.outlook
    user = outlook.new_user("floor")
    seed(outlook, user, "INBOX", [(message("one"), (), dt.datetime(2024, 1, 1, tzinfo=UTC))])
    destination = destination_of(outlook, user)
    before = destination.uid_floor("INBOX")
    assert before.uid == 2
    appended = destination.append("INBOX", SourceMessage(1, message("two"), (), dt.datetime(2024, 1, 2, tzinfo=UTC)))
    assert appended == 2 and destination.uid_floor("INBOX") == UidFloor(before.uidvalidity, 3)
    # Another session appends meanwhile: the floor is a lower bound, still below its UID.
    seed(outlook, user, "INBOX", [(message("three"), (), dt.datetime(2024, 1, 3, tzinfo=UTC))])
    assert destination.uid_floor("INBOX").uid <= 3


def test_after_a_crash_each_corpus_copy_is_found_behind_the_outlook_front(dovecot_pair, outlook_front, sessions):
    """Through a front that serves rebuilt MIME and estimated sizes, as Exchange Online does, each
    copy is still found from the floor recorded before its APPEND, and only it: not its
    byte-identical twin in the corpus, not the messages appended after it."""
    outlook = dovecot_pair.outlook
    user = outlook.new_user("frontfind")
    front = outlook_front(outlook)
    via_front = SimpleNamespace(
        host=front.host, imaps_port=front.port, ca_bundle_path=outlook.ca_bundle_path, password=outlook.password
    )
    destination = ImapDestination(*sessions(via_front, user))
    destination.ensure_folder("Copies")
    base = dt.datetime(2024, 2, 1, 12, 0, 0, tzinfo=UTC)
    appended, refused = [], []
    for i, corpus_message in enumerate(CORPUS):
        message = SourceMessage(i + 1, corpus_message.bytes, (), (base + dt.timedelta(minutes=i)).astimezone(ZONES[i % len(ZONES)]))
        floor = destination.uid_floor("Copies")
        try:
            uid = destination.append("Copies", message)
        except AppendRejected:
            refused.append(corpus_message.name)
            continue
        appended.append((corpus_message.name, message, floor, uid))

    # NUL bytes and no BINARY on Outlook; Command Error. 10 for a line over 9,900 characters.
    assert refused == ["077-mimekit-as2-smime-binary-nul.eml", "093-phpmime-24k-char-line.eml"]
    after_crash = ImapDestination(*sessions(via_front, user))  # knows nothing but the floors
    found = {name: after_crash.find_copies("Copies", message, floor) for name, message, floor, _ in appended}
    assert found == {name: [uid] for name, _, _, uid in appended}


# ---- a scripted IMAP server ----------------------------------------------------------------------
class ScriptedImapServer:
    """Just enough IMAP on 127.0.0.1 for replies Dovecot cannot give.

    Built in: the greeting, CAPABILITY, LOGIN, SELECT/EXAMINE, LIST (of the folders it has),
    CREATE, NOOP, LOGOUT. Any other command (by name, "UID FETCH" for UID commands), and CREATE
    when scripted, is answered by the next of ``replies[name]``: lines joined by CRLF, untagged
    first, then the tagged status without its tag; "DISCONNECT" closes the connection. A last
    line "CLOSE" closes it after the reply, and the untagged lines just before it are sent after
    the tagged one (Outlook's "BAD ... throttled", "* BYE Connection closed. 14", the close).
    ``case_insensitive``: LIST matches names in any case (as Exchange does) and answers the
    stored name. ``received`` holds each command line (without its literal) and its literal (or
    None).
    """

    def __init__(self, capabilities: str, permanent_flags: str):
        self.capabilities = capabilities
        self.permanent_flags = permanent_flags
        self.folders = {"INBOX"}
        self.case_insensitive = False
        self.replies: dict[str, list[str]] = defaultdict(list)
        self.received: list[tuple[bytes, bytes | None]] = []
        self.refuse_literal_with: str | None = None  # instead of "+" for a synchronising literal
        self.continuations_sent = 0
        self._clients: list[IMAPClient] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._start(self._accept)

    def login(self) -> tuple[IMAPClient, ImapAccount]:
        client = IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=10)
        self._clients.append(client)
        client.login("fake", "fake-password")
        return client, ImapAccount("fake account", "fake", ImapEndpoint("127.0.0.1", self.port, ssl=False))

    def close(self) -> None:
        for client in self._clients:  # ends each connection's thread: it reads EOF
            try:
                client.shutdown()
            except OSError:
                pass
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=10)
            assert not thread.is_alive(), "the scripted IMAP server did not stop"

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # shut down by close()
                return
            self._start(self._serve, connection)

    def _serve(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as rfile:
            send = connection.sendall
            send(b"* OK scripted IMAP ready\r\n")
            while line := rfile.readline():
                tag, _, command = line.rstrip(b"\r\n").partition(b" ")
                literal = None
                announced = re.search(rb"(~?)\{(\d+)(\+?)\}$", command)
                if announced:
                    if not announced.group(3):
                        if self.refuse_literal_with:
                            self.received.append((line.rstrip(b"\r\n"), None))
                            send(b"%s %s\r\n" % (tag, self.refuse_literal_with.encode()))
                            continue
                        self.continuations_sent += 1
                        send(b"+ go ahead\r\n")
                    literal = rfile.read(int(announced.group(2)))
                    rfile.readline()  # the CRLF that ends the command
                self.received.append((line.rstrip(b"\r\n"), literal))
                reply = self._answer(tag, command)
                if reply is None:
                    return
                send(reply.removesuffix(b"CLOSE\r\n"))
                if command.upper() == b"LOGOUT" or reply.endswith(b"CLOSE\r\n"):
                    return

    def _answer(self, tag: bytes, command: bytes) -> bytes | None:
        words = command.split(b" ")
        name = words[0].upper().decode()
        if name == "UID":
            name = f"UID {words[1].upper().decode()}"
        if self.replies.get(name):
            scripted = self.replies[name].pop(0)
            if scripted == "DISCONNECT":
                return None
            *before, status = scripted.split("\r\n")
            after = []
            if status == "CLOSE":  # "... tagged\r\n* BYE ...\r\nCLOSE"
                after = ["CLOSE"]
                *before, status = before
                while status.startswith("* "):
                    after.insert(0, status)
                    *before, status = before
            return (
                b"".join(line.encode() + b"\r\n" for line in before)
                + b"%s %s\r\n" % (tag, status.encode())
                + b"".join(line.encode() + b"\r\n" for line in after)
            )
        if name == "CAPABILITY":
            return b"* CAPABILITY %s\r\n%s OK done\r\n" % (self.capabilities.encode(), tag)
        if name in ("LOGIN", "NOOP"):
            return b"%s OK done\r\n" % tag
        if name == "LOGOUT":
            return b"* BYE bye\r\n%s OK done\r\n" % tag
        if name in ("SELECT", "EXAMINE"):
            permanent = self.permanent_flags if name == "SELECT" else ""
            access = b"READ-WRITE" if name == "SELECT" else b"READ-ONLY"
            return (
                b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
                b"* OK [PERMANENTFLAGS (%s)] flags\r\n* 0 EXISTS\r\n* 0 RECENT\r\n"
                b"* OK [UIDVALIDITY 9] uids\r\n* OK [UIDNEXT 1] next\r\n%s OK [%s] done\r\n"
            ) % (permanent.encode(), tag, access)
        if name == "LIST":
            pattern = re.fullmatch(rb'LIST "" "(.*)"', command).group(1).decode()
            matches = (lambda f: f.lower() == pattern.lower()) if self.case_insensitive else (lambda f: f == pattern)
            found = b"".join(b'* LIST () "/" "%s"\r\n' % f.encode() for f in sorted(self.folders) if matches(f))
            return found + b"%s OK done\r\n" % tag
        if name == "CREATE":
            self.folders.add(re.fullmatch(rb'CREATE "(.*)"', command).group(1).decode())
            return b"%s OK created\r\n" % tag
        return b"%s BAD unexpected command\r\n" % tag


@pytest.fixture
def scripted_imap():
    servers: list[ScriptedImapServer] = []

    def start(
        capabilities: str = "IMAP4rev1 LITERAL+ UIDPLUS",
        permanent_flags: str = "\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*",
    ) -> ScriptedImapServer:
        servers.append(ScriptedImapServer(capabilities, permanent_flags))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
