"""The mailbox ports over IMAP: `ImapSource` reads a Gmail folder, `ImapDestination` writes to
Outlook.com. Both wrap a logged-in `IMAPClient` (see `shared.mailbox.session.open_session`) and take over
its `normalise_times` setting, so every INTERNALDATE they see is timezone-aware.

The source is never changed (DESIGN.md guarantee 3): folders are EXAMINEd, bodies and headers
are fetched with BODY.PEEK, and nothing is stored.

APPEND does not go through imapclient: its `append()` passes the message to imaplib, which
rewrites every CR, LF and CRLF into CRLF, and `multiappend()` sends exact bytes but cannot send a
literal8 and does not report a NO. `_run_with_literal` is the one place that speaks the
protocol itself; `ImapSource._uid_fetch` sends through imaplib (imapclient's `fetch` keys a
response without a UID item by its sequence number, so another message's answer could pass for
the one asked) and parses plain answers itself, the rest with imapclient's parser. Everything
else uses imapclient's public API.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import imaplib
import re
import select
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from imapclient import IMAPClient
from imapclient.datetime_util import datetime_to_INTERNALDATE, parse_to_datetime
from imapclient.imap_utf7 import encode as encode_mailbox_name
from imapclient.response_parser import parse_fetch_response

from shared.errors import ImapFailure
from shared.mailbox import retry
from shared.mailbox.identity import FIELDS as IDENTITY_FIELDS
from shared.mailbox.identity import Headline, Identity
from shared.mailbox.port import (
    SYSTEM_FLAGS_COPIED,
    AppendAnswer,
    AppendRejected,
    FolderState,
    ListedMessage,
    MessageSummary,
    SourceMessage,
    UidFloor,
    copies_in,
)
from shared.mailbox.session import ImapAccount, classified_failure, close_quietly, open_session
from shared.redaction import scrub
from shared.settings import FOLDER_SEPARATOR

# The longest UID set one UID FETCH of `summaries` or a listing sends, in characters: servers
# cap a command line's length (RFC 7162 3.2.3 asks clients to keep it under 8192 octets), so
# a long set is split, while runs of UIDs written as ranges ("1:1000") take one round trip.
SUMMARY_SET_CHARS = 4000
# RFC 7888: LITERAL- allows non-synchronising literals only up to this size.
LITERAL_MINUS_MAX = 4096

_HEADER_FIELDS_KEY_PREFIX = b"BODY[HEADER.FIELDS"
_IDENTITY_FIELDS = b"BODY.PEEK[HEADER.FIELDS (" + " ".join(IDENTITY_FIELDS).encode("ascii") + b")]"
_SYSTEM_FLAG_BY_LOWER = {flag.lower(): flag for flag in SYSTEM_FLAGS_COPIED}
# A keyword is an IMAP atom: printable ASCII without atom-specials. Anything else would make the
# whole APPEND a syntax error, retried forever.
_KEYWORD = re.compile(r'[^(){%*"\\\]\x00-\x20\x7f-\U0010ffff]+')
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)
_RESPONSE_CODE = re.compile(r"^\[([A-Za-z0-9.-]+)")
# How servers without the RFC 5530 codes say it ("message size exceeds ...", "Line is too
# long"; Exchange Online: "NO Maximum size of appendable message has been exceeded", imapsync
# FAQ.d/FAQ.Office365.txt and FAQ.Exchange.txt). Only about size: "exceeds the limit" alone may be
# a rate limit.
_TOO_LARGE_TEXT = re.compile(
    r"too (?:large|big)|size exceeds|exceeds? the (?:maximum |max |allowed )*(?:message )?size"
    r"|maximum size of appendable message",
    re.IGNORECASE,
)
_LINE_TOO_LONG_TEXT = re.compile(r"line (?:is )?too long|too long line", re.IGNORECASE)
_TOO_LARGE = "too large for the destination"
# Exchange Online's BAD refusals of a message, numbered, without a code: "Command Error. 10" for
# a line longer than about 9,900 characters (imapsync FAQ.d/FAQ.Exchange.txt: "Exchange supports
# 9900 characters line length"; https://github.com/nextcloud/mail/issues/6038) and "Command
# Argument Error. 11" for a message it cannot take (FAQ.Office365.txt: "when it encounters any
# problem", most often size or long lines). Most likely about the message, but the same texts
# answer a command the server could not read, and 11 also a full mailbox: so a message is
# skipped for them only after it failed REFUSED_FINAL_AFTER times, the first of which may have
# been a glitch.
_EXCHANGE_MESSAGE_REFUSALS = (
    (re.compile(r"^Command Error\.? *10\b", re.IGNORECASE), "a line longer than it accepts"),
    (re.compile(r"^Command Argument Error\.? *11\b", re.IGNORECASE), "a message it cannot parse"),
)
REFUSED_FINAL_AFTER = 2
# CREATE of a name Exchange Online keeps for itself (imapsync FAQ.d/FAQ.Office365.txt: "Files").
_RESERVED_TEXT = re.compile(r"folder name is reserved", re.IGNORECASE)
# CREATE of a folder that is there: RFC 5530's code, or Exchange's text without one, which it also
# gives for a name that exists in another case (imapsync FAQ.d/FAQ.Office365.txt, "Couldn't
# create folder [trash] \"Mailbox already exists\"").
_ALREADY_EXISTS_TEXT = re.compile(r"\[ALREADYEXISTS\]|\balready exists\b", re.IGNORECASE)

# What a broken or closed connection raises: socket errors and timeouts are OSError; imaplib
# raises IMAP4.abort (a subclass of IMAP4.error, which imapclient calls IMAPClientError) on EOF,
# BYE or a reply it cannot parse, and IMAP4.error for a NO or BAD to imapclient's commands.
_IMAP_ERRORS = (OSError, imaplib.IMAP4.error)


class ImapSource:
    """`SourceMailbox` over IMAP. Call `examine` first; the other methods read that folder."""

    def __init__(self, client: IMAPClient, account: ImapAccount):
        self._client = client
        self._account = account
        self._folder: str | None = None  # for error texts; the session may have it EXAMINEd already
        self._examined: tuple[str, FolderState] | None = None  # the folder as named, and its state
        client.normalise_times = False  # aware datetimes: the zone is part of INTERNALDATE

    def examine(self, folder: str) -> FolderState:
        self._folder, self._examined = folder, None
        with _failures_as_imap_failure(self._account, "examine", folder):
            named = self._folder = self.folder_named(folder)
            response = self._client.select_folder(named, readonly=True)
        state = FolderState(
            uidvalidity=int(response[b"UIDVALIDITY"]),
            uidnext=int(response[b"UIDNEXT"]) if b"UIDNEXT" in response else None,
            exists=int(response[b"EXISTS"]),
        )
        self._examined = (folder, state)
        return state

    def examined(self, folder: str) -> FolderState | None:
        """`folder`'s state as this session last EXAMINEd it, if it is the one open now."""
        if self._examined is not None and self._examined[0] == folder:
            return self._examined[1]
        return None

    def folder_named(self, folder: str) -> str:
        """The folder a route names: itself, or for a SPECIAL-USE attribute (RFC 6154) the folder
        that has it, whatever the account's language calls it: \\All is Gmail's "[Gmail]/All
        Mail", "[Google Mail]/Alle Nachrichten", ... (imapsync's FAQ.Gmail.txt)."""
        if not folder.startswith("\\"):
            return folder
        for flags, _, name in self._client.list_folders():
            if any(flag.decode("ascii", "replace").lower() == folder.lower() for flag in flags):
                return name
        raise imaplib.IMAP4.error(f"no folder has the SPECIAL-USE attribute {folder}")

    def uids_above(self, last_uid: int) -> list[int]:
        # "n:*" always includes the highest UID, even one below n (RFC 3501 6.4.8): filter it.
        with _failures_as_imap_failure(self._account, "search", self._folder):
            found = self._client.search(["UID", f"{last_uid + 1}:*"])
        return sorted(uid for uid in found if uid > last_uid)

    def uids_since(self, day: dt.date) -> list[int]:
        with _failures_as_imap_failure(self._account, "search", self._folder):
            return sorted(self._client.search(["SINCE", day]))

    def summaries(self, uids: Sequence[int]) -> list[MessageSummary]:
        items = [b"RFC822.SIZE", b"INTERNALDATE", b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]
        with _failures_as_imap_failure(self._account, "fetch summaries", self._folder):
            with_gmail_ids = self._client.has_capability("X-GM-EXT-1")
            if with_gmail_ids:
                items.append(b"X-GM-MSGID")
            summaries = []
            for asked in _uid_chunks(uids):
                fetched = self._uid_fetch(asked, b"(" + b" ".join(items) + b")")
                chunk = []
                for uid, data in fetched.items():
                    if b"RFC822.SIZE" not in data:  # an unsolicited FETCH (a flag change) only
                        continue
                    chunk.append(
                        MessageSummary(
                            uid=uid,
                            size=int(data[b"RFC822.SIZE"]),
                            internaldate=data[b"INTERNALDATE"],
                            message_id=_message_id(_header_fields(data)),
                            gmail_msgid=int(data[b"X-GM-MSGID"]) if with_gmail_ids and b"X-GM-MSGID" in data else None,
                        )
                    )
                summaries.extend(self._with_header_hashes(chunk))
        return sorted(summaries, key=lambda summary: summary.uid)

    def identities(self, uids: Sequence[int]) -> list[ListedMessage]:
        with _failures_as_imap_failure(self._account, "fetch identities", self._folder):
            return _listed(self._client, uids)

    def _with_header_hashes(self, summaries: list[MessageSummary]) -> list[MessageSummary]:
        """The header block's hash for the messages that have no other identity to fingerprint
        (a second FETCH, for those only: the whole header is far bigger than one field)."""
        anonymous = {s.uid for s in summaries if s.message_id is None and s.gmail_msgid is None}
        if not anonymous:
            return summaries
        headers = self._client.fetch(sorted(anonymous), [b"BODY.PEEK[HEADER]"])
        hashed = []
        for summary in summaries:
            header = headers.get(summary.uid, {}).get(b"BODY[HEADER]")
            if summary.uid in anonymous and isinstance(header, bytes):
                summary = replace(summary, header_sha256=hashlib.sha256(header).hexdigest())
            hashed.append(summary)
        return hashed

    def fetch(self, uid: int) -> SourceMessage | None:
        with _failures_as_imap_failure(self._account, f"fetch UID {uid}", self._folder):
            return self._fetched([uid]).get(uid)

    def fetch_many(self, uids: Sequence[int]) -> dict[int, SourceMessage]:
        what = f"fetch UIDs {_uid_set(uids)[:60]}"
        with _failures_as_imap_failure(self._account, what, self._folder):
            return self._fetched(uids)

    def _fetched(self, uids: Sequence[int]) -> dict[int, SourceMessage]:
        """One `UID FETCH` of the whole set: the messages served in full, by UID."""
        messages = {}
        for uid, data in self._uid_fetch(uids, b"(BODY.PEEK[] FLAGS INTERNALDATE)").items():
            body, internaldate = data.get(b"BODY[]"), data.get(b"INTERNALDATE")
            # No answer for this UID, or Dovecot's "BODY[] NIL" for a message another session
            # expunged ([EXPUNGEISSUED]), or a server's slip: left out; only has_uid in a new
            # session tells them apart.
            if not isinstance(body, bytes) or internaldate is None:
                continue
            flags = tuple(flag.decode("utf-8", "replace") for flag in data.get(b"FLAGS", ()))
            messages[uid] = SourceMessage(uid=uid, body=body, flags=flags, internaldate=internaldate)
        return messages

    def has_uid(self, uid: int) -> bool:
        with _failures_as_imap_failure(self._account, f"search UID {uid}", self._folder):
            found = self._client.search(["UID", str(uid)])
            # Only `uid` can match `UID uid` (RFC 3501 6.4.4): an answer naming others is garbled,
            # and reading it as "not there" would skip the message as gone (found by
            # tests/integration/test_fuzz_imap_replies.py).
            if any(other != uid for other in found):
                raise imaplib.IMAP4.error(f"search answered UIDs not asked for: {sorted(found)[:5]}")
            return uid in found

    def _uid_fetch(self, uids: Sequence[int], items: bytes) -> dict[int, dict[bytes, object]]:
        return _uid_fetch(self._client, uids, items)


class ImapFolderWatch:
    """`FolderWatch` over IMAP: a session of its own with the folder EXAMINEd (read-only, as by
    ImapSource), waiting in IDLE (RFC 2177). `open_folder_watch` opens one."""

    def __init__(self, client: IMAPClient, account: ImapAccount, folder: str):
        self._client = client
        self._account = account
        self._folder = folder

    def wait_for_change(self, timeout: float) -> bool:
        """One IDLE command: IDLE, wait until the server speaks or `timeout` passes, DONE. Every
        call is a new IDLE, so calling it again is the re-IDLE servers expect. A lost session
        (EOF, reset, BYE, no answer to DONE within IMAP_TIMEOUT) raises ImapFailure."""
        with _failures_as_imap_failure(self._account, "IDLE", self._folder):
            self._client.idle()
            _server_speaks_within(self._client, timeout)
            _, responses = self._client.idle_done()
        # An untagged OK is a keep-alive ("* OK Still here"), not a change.
        return any(not (isinstance(r, tuple) and r and r[0] in (b"OK", b"NO", b"BAD")) for r in responses)

    def close(self) -> None:
        close_quietly(self._client)


def open_folder_watch(account: ImapAccount, folder: str) -> ImapFolderWatch:
    """Log in (a fresh access token when the cached one is near expiry), EXAMINE `folder`."""
    client = open_session(account)
    try:
        source = ImapSource(client, account)
        with _failures_as_imap_failure(account, "examine", folder):
            named = source.folder_named(folder)  # a SPECIAL-USE name looked up once, not again by examine
        source.examine(named)
        if b"IDLE" not in client.capabilities():
            raise ImapFailure(scrub(f"{account.label} at {account.endpoint}: the server does not offer IDLE"), step="IDLE")
        return ImapFolderWatch(client, account, named)
    except BaseException:
        close_quietly(client)
        raise


def _server_speaks_within(client: IMAPClient, timeout: float) -> bool:
    """Whether the server sent something within `timeout` seconds: already read into imaplib's
    buffer (it reads ahead of the line it was asked for), held by TLS, or on the socket. An EOF
    counts as something: the DONE after it fails and says so (imapclient's idle_check reads
    an EOF or a reset as "nothing yet")."""
    sock = client.socket()
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    previous = sock.gettimeout()
    sock.setblocking(False)
    try:
        if client._imap.file.peek(1):
            return True
    except (BlockingIOError, ssl.SSLWantReadError):
        pass  # nothing buffered, nothing on the wire yet
    finally:
        sock.settimeout(previous)
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


@dataclass(frozen=True)
class _FolderFacts:
    """What the destination says about a folder that decides how to APPEND to it."""

    any_keyword: bool  # PERMANENTFLAGS has \*: new keywords can be stored
    known_keywords: frozenset[str]  # lower case; keywords PERMANENTFLAGS lists by name
    append_limit: int | None  # bytes, from STATUS (APPENDLIMIT) where the limit is per folder


class ImapDestination:
    """`DestinationMailbox` over IMAP.

    Folder names are matched as the server matches them: INBOX in any case is INBOX everywhere
    (RFC 3501 5.1); any other name exactly, until the server shows it ignores case (Exchange
    Online: LIST answers "Inbox" for INBOX and "Gmail" for "gmail", and CREATE of a name that
    exists in another case answers "NO Mailbox already exists"), and from then on in any case.
    What this session caches per folder is keyed the same way.

    After an ImapFailure the session may be in the middle of a command: drop it and reconnect.
    """

    def __init__(self, client: IMAPClient, account: ImapAccount):
        self._client = client
        self._account = account
        self._case_insensitive = False  # learnt from the server's answers (see _folder_exists)
        # The server said it closes this session (Outlook.com's BAD throttle is followed by
        # "* BYE Connection closed. 14" and the close): the next use opens a new one.
        self.closing = False
        # Keyed by _key(folder).
        self._ensured: set[str] = set()
        self._folder_facts: dict[str, _FolderFacts] = {}
        # Per folder, a lower bound of the UID its next APPEND gets: UIDNEXT when this session
        # SELECTed it, then one past each APPENDUID. No extra round trip per message.
        self._floors: dict[str, UidFloor] = {}
        self._selected: str | None = None  # _key of the folder SELECTed (not EXAMINEd) last
        client.normalise_times = False

    # ---- folders -----------------------------------------------------------------------------
    def ensure_folder(self, folder: str) -> None:
        if self._key(folder) in self._ensured:
            return
        parts = folder.split(FOLDER_SEPARATOR)
        # Parents first: not every server creates them (and some make them \Noselect).
        for depth in range(1, len(parts) + 1):
            self._create_if_missing(FOLDER_SEPARATOR.join(parts[:depth]))
        self._ensured.add(self._key(folder))

    def _create_if_missing(self, folder: str) -> None:
        with _failures_as_imap_failure(self._account, "create folder", folder):
            if self._folder_exists(folder):
                return
            try:
                self._client.create_folder(folder)
            except imaplib.IMAP4.abort:
                raise
            except imaplib.IMAP4.error as refused:
                text = _describe_refusal(refused)
                if _ALREADY_EXISTS_TEXT.search(text):
                    # Another session created it since the LIST ([ALREADYEXISTS], RFC 5530), or
                    # (Exchange, no code) it exists in another case. The LIST tells which.
                    self._folder_exists(folder)
                    return
                if self._folder_exists(folder):  # a server without either that lists it now
                    return
                if _RESERVED_TEXT.search(text):
                    raise ImapFailure(
                        self._text(
                            f"create folder {folder!r} failed: {text}: the destination keeps this name for "
                            "itself (Outlook.com: Files); set the route's outlook_folder to another name"
                        ),
                        step="create folder",
                    ) from None
                raise

    def _folder_exists(self, folder: str) -> bool:
        """Whether LIST names `folder`. Our names have no wildcards (settings refuse "%" and
        "*"), so what it answers is the folder the server takes the name to mean: the name
        itself, INBOX in another case, or (a server that ignores case) the name in another case,
        which is remembered."""
        for _, _, name in self._client.list_folders("", folder):
            if not isinstance(name, str):
                continue
            if name == folder or _inbox_normalised(name) == _inbox_normalised(folder):
                return True
            if name.casefold() == folder.casefold():
                self._learn_case_insensitive()
                return True
        return False

    def _key(self, folder: str) -> str:
        """The key of `folder` in this session's caches: one key per folder of the server."""
        name = _inbox_normalised(folder)
        return name.casefold() if self._case_insensitive else name

    def _learn_case_insensitive(self) -> None:
        if self._case_insensitive:
            return
        self._case_insensitive = True
        # Keys made before now are re-made; of two that become one, either entry holds (a floor
        # is a lower bound, and the facts are of the same folder).
        self._ensured = {key.casefold() for key in self._ensured}
        self._folder_facts = {key.casefold(): facts for key, facts in self._folder_facts.items()}
        self._floors = {key.casefold(): floor for key, floor in self._floors.items()}

    # ---- append ------------------------------------------------------------------------------
    def append(self, folder: str, message: SourceMessage) -> int | None:
        (answer,) = self.append_many(folder, [message])
        return answer.uid_or_raise()

    def append_many(self, folder: str, messages: Sequence[SourceMessage]) -> list[AppendAnswer]:
        capabilities = self._capabilities()
        facts = self._facts(folder)  # a failure up to here is before anything was sent
        answers: list[AppendAnswer | None] = [None] * len(messages)
        sendable = []
        for index, message in enumerate(messages):
            refused = self._refused_unsent(folder, message, capabilities, facts)
            if refused is not None:
                answers[index] = AppendAnswer(refused=refused)
            else:
                sendable.append(index)
        replies = self._send_appends(folder, [messages[index] for index in sendable], facts, capabilities)
        refused_with_no = [k for k, reply in enumerate(replies) if isinstance(reply, tuple) and reply[0] == "NO"]
        if refused_with_no and self._made_again(folder, replies[refused_with_no[0]][1]):
            # Deleted or renamed by its owner mid-run: refused APPENDs did not land, so they are
            # sent again at once, into the folder made again.
            again = [messages[sendable[k]] for k in refused_with_no]
            for k, reply in zip(refused_with_no, self._send_appends(folder, again, self._facts(folder), capabilities)):
                replies[k] = reply
        for k, reply in enumerate(replies):
            answers[sendable[k]] = self._answer(folder, messages[sendable[k]], reply)
        assert all(answer is not None for answer in answers)
        return answers  # type: ignore[return-value]

    def _refused_unsent(
        self, folder: str, message: SourceMessage, capabilities: Sequence[bytes], facts: _FolderFacts
    ) -> AppendRejected | None:
        """The refusal of a message the server cannot take, known without sending it."""
        body = message.body
        if b"\0" in body and b"BINARY" not in capabilities:
            return AppendRejected(
                self._text(f"APPEND to {folder!r}: UID {message.uid} contains NUL bytes; the server has no BINARY"),
                permanent=True,
                reason="contains NUL bytes and the destination has no BINARY extension",
            )
        limit = _global_append_limit(capabilities)
        if limit is None:
            limit = facts.append_limit
        if limit is not None and len(body) > limit:
            return AppendRejected(
                self._text(f"APPEND to {folder!r}: {len(body)} bytes is above the server's APPENDLIMIT of {limit}"),
                permanent=True,
                reason=_TOO_LARGE,
            )
        return None

    def _send_appends(
        self, folder: str, messages: Sequence[SourceMessage], facts: _FolderFacts, capabilities: Sequence[bytes]
    ) -> list[tuple[str, bytes] | _NoAnswer]:
        """Each message's tagged (status, text), or why it has none. With non-synchronising
        literals for all, every APPEND goes out before the first answer is read (one round trip
        for the lot); else one after the other, each waiting for the server's "+"."""
        commands = [(self._append_command(folder, message, facts), message.body) for message in messages]
        if all(_non_synchronising(capabilities, len(body)) for _, body in commands):
            replies = _run_pipelined(self._client, commands)
        else:
            replies = []
            for command, body in commands:
                try:
                    replies.append(_run_with_literal(self._client, command, body, binary=b"\0" in body))
                except _IMAP_ERRORS as exc:
                    replies.append(_NoAnswer(exc, sent=True))
                    break
        if len(replies) < len(commands) or any(isinstance(reply, _NoAnswer) for reply in replies):
            cause = next(reply.cause for reply in replies if isinstance(reply, _NoAnswer))
            failure = _imap_failure(self._account, "append", folder, cause)
            replies = [_NoAnswer(failure, reply.sent) if isinstance(reply, _NoAnswer) else reply for reply in replies]
            replies += [_NoAnswer(failure, sent=False)] * (len(commands) - len(replies))
        return replies

    def _append_command(self, folder: str, message: SourceMessage, facts: _FolderFacts) -> bytes:
        flags = _flags_to_copy(message.flags, facts)
        return b'APPEND %s (%s) "%s"' % (
            _quoted_mailbox(folder),
            " ".join(flags).encode("ascii"),
            datetime_to_INTERNALDATE(message.internaldate).encode("ascii"),
        )

    def _answer(self, folder: str, message: SourceMessage, reply: tuple[str, bytes] | _NoAnswer) -> AppendAnswer:
        if isinstance(reply, _NoAnswer):
            return AppendAnswer(failed=reply.cause, sent=reply.sent)
        status, text = reply
        if status == "OK":
            appended = _APPENDUID.search(text)
            if appended is None:
                return AppendAnswer(landed=True)
            uidvalidity, uid = int(appended.group(1)), int(appended.group(2))
            floor = self._floors.get(self._key(folder))
            if floor is None or floor.uidvalidity != uidvalidity or uid + 1 > floor.uid:
                self._floors[self._key(folder)] = UidFloor(uidvalidity, uid + 1)
            return AppendAnswer(landed=True, uid=uid)
        refusal = _refusal(self._text(f"APPEND to {folder!r} ({len(message.body)} bytes)"), status, text)
        if status == "BAD" and refusal.retry_after is not None:
            self.closing = True
        return AppendAnswer(refused=refusal)

    def _made_again(self, folder: str, refusal: bytes) -> bool:
        """After an APPEND refused with NO: whether the folder had gone (`[TRYCREATE]`, RFC 3501
        6.3.11; or no longer listed: Dovecot answers "[SERVERBUG] Internal error" when the folder
        selected in this session was deleted) and was made again. What this session knew of it
        is forgotten either way."""
        key = self._key(folder)
        if b"[TRYCREATE]" not in refusal.upper():
            with _failures_as_imap_failure(self._account, "list folders", folder):
                if key not in self._ensured or self._folder_exists(folder):
                    return False
        self._ensured.discard(key)
        self._folder_facts.pop(key, None)
        self._floors.pop(key, None)
        self.ensure_folder(folder)
        return True

    def _capabilities(self) -> tuple[bytes, ...]:
        with _failures_as_imap_failure(self._account, "capability"):
            return self._client.capabilities()

    def _facts(self, folder: str) -> _FolderFacts:
        facts = self._folder_facts.get(self._key(folder))
        if facts is not None:
            return facts
        # "select", not "append": a failure here is before the APPEND was sent, so it is safe to
        # retry (shared.mailbox.connections tells the two apart by the step).
        with _failures_as_imap_failure(self._account, "select", folder):
            append_limit = None
            if b"APPENDLIMIT" in self._client.capabilities():  # a limit per folder (RFC 7889)
                # Before the SELECT: STATUS of the selected folder is discouraged (RFC 3501).
                append_limit = self._client.folder_status(folder, [b"APPENDLIMIT"]).get(b"APPENDLIMIT")
            # SELECT, not EXAMINE: a read-only folder reports PERMANENTFLAGS () (Dovecot does).
            selected = self._client.select_folder(folder)
            self._selected = self._key(folder)
        if b"UIDVALIDITY" in selected and b"UIDNEXT" in selected:
            self._floors[self._key(folder)] = UidFloor(int(selected[b"UIDVALIDITY"]), int(selected[b"UIDNEXT"]))
        permanent = [flag.decode("ascii", "replace") for flag in selected.get(b"PERMANENTFLAGS", ())]
        facts = _FolderFacts(
            any_keyword="\\*" in permanent,
            known_keywords=frozenset(flag.lower() for flag in permanent if not flag.startswith("\\")),
            append_limit=int(append_limit) if append_limit is not None else None,
        )
        self._folder_facts[self._key(folder)] = facts
        return facts

    # ---- crash recovery ----------------------------------------------------------------------
    def uid_floor(self, folder: str) -> UidFloor | None:
        self._facts(folder)  # SELECTs it once a session, which tells its UIDNEXT
        return self._floors.get(self._key(folder))

    def find_copies(self, folder: str, message: SourceMessage, since: UidFloor | None) -> list[int]:
        """UIDs in `folder` holding a copy of `message` appended at or above `since`.

        Known by INTERNALDATE (the instant the APPEND gave) and identity: Message-ID, Date, From
        and Subject as a re-rendering leaves them (shared.mailbox.identity). Never by bytes or
        RFC822.SIZE: Exchange rebuilds the MIME it serves and estimates sizes (imapsync's
        FAQ.Exchange.txt), so neither finds an earlier copy there. Two consumers appending into
        one folder at once, or messages sharing a Message-ID, are told apart by the rest of
        the identity and the INTERNALDATE. A folder that does not exist holds no copies.
        """
        internaldate = message.internaldate
        if internaldate.tzinfo is None:
            raise ValueError("find_copies needs a timezone-aware internaldate")
        with _failures_as_imap_failure(self._account, "find copies", folder):
            selected = self._examined_if_exists(folder)
            if selected is None:
                return []
            if since is not None and int(selected.get(b"UIDVALIDITY", -1)) == since.uidvalidity:
                # "n:*" always includes the highest UID, even one below n (RFC 3501 6.4.8).
                candidates = [uid for uid in self._client.search(["UID", f"{since.uid}:*"]) if uid >= since.uid]
            else:
                # Where the APPEND landed is not known: the days around its INTERNALDATE (servers
                # differ in the zone they take SEARCH dates in).
                day = internaldate.date()
                candidates = self._client.search(["SINCE", day - dt.timedelta(days=1), "BEFORE", day + dt.timedelta(days=2)])
            listed = _listed(self._client, candidates)
        return copies_in(listed, message)

    def identities_since(self, folder: str, day: dt.date) -> list[ListedMessage]:
        with _failures_as_imap_failure(self._account, "list messages", folder):
            # SEARCH and FETCH BODY.PEEK change nothing: the folder SELECTed to append to is
            # listed as it is, without a round trip to EXAMINE it.
            if self._selected != self._key(folder) and self._examined_if_exists(folder) is None:
                return []
            return _listed(self._client, self._client.search(["SINCE", day]))

    def _examined_if_exists(self, folder: str) -> dict | None:
        """EXAMINE `folder` (reads only); None when it does not exist."""
        self._selected = None
        try:
            return self._client.select_folder(folder, readonly=True)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error:
            if not self._folder_exists(folder):
                return None
            raise

    def _text(self, detail: str) -> str:
        return scrub(f"{self._account.label} at {self._account.endpoint}: {detail}")


# ---- helpers -----------------------------------------------------------------------------------
def _uid_fetch(client: IMAPClient, uids: Sequence[int], items: bytes) -> dict[int, dict[bytes, object]]:
    """By UID asked for, the items of the FETCH responses that carry it as their UID item
    (RFC 3501 6.4.8: every response to a UID command has one). A response without it, or
    with a UID not asked for, is someone else's: imapclient would key it by its sequence
    number and could take it, or merge it, for another's. The UIDs go as one set with runs
    written as ranges (imapclient's `fetch` lists each UID)."""
    asked = set(uids)
    status, data = client._imap.uid("FETCH", _uid_set(uids), items.decode("ascii"))
    if status != "OK":
        text = data[0].decode("utf-8", "replace") if data and isinstance(data[0], bytes) else str(data)
        raise imaplib.IMAP4.error(f"fetch failed: {text}")  # as imapclient says it
    found: dict[int, dict[bytes, object]] = {}
    # parse_fetch_response keys by sequence number: a message answered in two responses
    # (its flags apart) is merged under it, and both carry the UID.
    parsed = _parse_plain_fetch(data, client.normalise_times)
    if parsed is None:
        parsed = parse_fetch_response(data, client.normalise_times, uid_is_key=False)
    for response in parsed.values():
        uid = response.get(b"UID")
        if uid in asked:
            found.setdefault(uid, {}).update(response)
    return found


# One FETCH response as Dovecot, Gmail and Exchange write it for the items the copier asks for:
# simple items (UID, FLAGS of plain atoms, INTERNALDATE, RFC822.SIZE) around at most one literal,
# BODY[] or BODY[HEADER.FIELDS (...)]; imaplib hands it over as (head up to the literal's size,
# literal) and the rest of the line. Anything else goes to imapclient's parser.
_PLAIN_ITEM = rb'(?:UID \d+|RFC822\.SIZE \d+|FLAGS \([^()"{}\\\r\n]*(?:\\[^()"{}\\\r\n]*)*\)|INTERNALDATE "[^"\\\r\n]*")'
_PLAIN_HEAD = re.compile(
    rb"(\d+) \(((?:" + _PLAIN_ITEM + rb" )*)(BODY\[(?:|HEADER\.FIELDS \([A-Z0-9 -]*\))\]) \{\d+\}\Z", re.IGNORECASE
)
_PLAIN_TAIL = re.compile(rb"((?: " + _PLAIN_ITEM + rb")*)\)\Z", re.IGNORECASE)
_PLAIN_WHOLE = re.compile(rb"(\d+) \((" + _PLAIN_ITEM + rb"(?: " + _PLAIN_ITEM + rb")*)\)\Z", re.IGNORECASE)
_PLAIN_ITEMS = re.compile(rb'(UID|RFC822\.SIZE|FLAGS|INTERNALDATE) (\d+|\(([^)]*)\)|"([^"]*)")', re.IGNORECASE)


def _parse_plain_fetch(data: list, normalise_times: bool) -> dict[int, dict[bytes, object]] | None:
    """`data` (imaplib's FETCH answer) parsed as imapclient's parse_fetch_response would, when
    each response is of the plain shape above; else None. imapclient's lexer reads a character at
    a time, which took about as long as the rest of a copy (0.1 ms a message) on loopback."""
    parsed: dict[int, dict[bytes, object]] = {}
    index = 0
    while index < len(data):
        item = data[index]
        if isinstance(item, tuple):
            head, literal = item
            match = _PLAIN_HEAD.match(head) if isinstance(head, bytes) and isinstance(literal, bytes) else None
            tail = data[index + 1] if index + 1 < len(data) else None
            ending = _PLAIN_TAIL.match(tail) if match is not None and isinstance(tail, bytes) else None
            if ending is None:
                return None
            seq, items = int(match[1]), match[2] + b" " + ending[1]
            response: dict[bytes, object] | None = {match[3].upper(): literal}
            index += 2
        elif isinstance(item, bytes) and (whole := _PLAIN_WHOLE.match(item)) is not None:
            seq, items, response = int(whole[1]), whole[2], {}
            index += 1
        else:
            return None
        response = _plain_items(items, response, normalise_times)
        if response is None:
            return None
        parsed.setdefault(seq, {b"SEQ": seq}).update(response)
    return parsed


def _plain_items(items: bytes, response: dict[bytes, object], normalise_times: bool) -> dict[bytes, object] | None:
    for name, value, flags, date in _PLAIN_ITEMS.findall(items):
        name = name.upper()
        if name == b"FLAGS":
            response[name] = tuple(flags.split())
        elif name == b"INTERNALDATE":
            try:
                response[name] = parse_to_datetime(date, normalise=normalise_times)
            except ValueError:
                return None
        else:
            response[name] = int(value)
    return response


def _listed(client: IMAPClient, uids: Sequence[int]) -> list[ListedMessage]:
    """INTERNALDATE and identity headers of the UIDs of the selected folder that still exist."""
    listed = []
    for asked in _uid_chunks(uids):
        fetched = _uid_fetch(client, asked, b"(INTERNALDATE " + _IDENTITY_FIELDS + b")")
        for uid, data in fetched.items():
            internaldate = data.get(b"INTERNALDATE")
            if not isinstance(internaldate, dt.datetime):
                continue
            block = _header_fields(data) or b""
            listed.append(ListedMessage(uid, internaldate, Identity.of(block), Headline.of(block)))
    return sorted(listed, key=lambda message: message.uid)


@contextmanager
def _failures_as_imap_failure(account: ImapAccount, step: str, folder: str | None = None) -> Iterator[None]:
    try:
        yield
    except _IMAP_ERRORS as exc:
        raise _imap_failure(account, step, folder, exc) from None


def _imap_failure(account: ImapAccount, step: str, folder: str | None, cause: BaseException) -> ImapFailure:
    where = f" {folder!r}" if folder is not None else ""
    detail = str(cause).strip() or type(cause).__name__
    # Transient or throttled as the cause says: shared.mailbox.connections retries the former on a
    # new session and the queue waits out the latter.
    return classified_failure(
        scrub(f"{account.label} at {account.endpoint}: {step}{where} failed: {detail[:300]}"), step=step, cause=cause
    )


@dataclass(frozen=True)
class _NoAnswer:
    """An APPEND the session failed before answering: `sent` whether it went out."""

    cause: BaseException
    sent: bool


def _uid_runs(uids: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for uid in sorted(set(uids)):
        if runs and uid == runs[-1][-1] + 1:
            runs[-1].append(uid)
        else:
            runs.append([uid])
    return runs


def _run_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}:{run[-1]}"


def _uid_set(uids: Sequence[int]) -> str:
    """`uids` as an IMAP sequence set, runs written as ranges: "3:7,9,12:13"."""
    if not uids:
        raise ValueError("no UIDs")
    return ",".join(_run_text(run) for run in _uid_runs(uids))


def _uid_chunks(uids: Sequence[int], max_chars: int = SUMMARY_SET_CHARS) -> Iterator[list[int]]:
    """`uids` in order, in parts whose sets (see _uid_set) are at most `max_chars` long."""
    chunk: list[int] = []
    length = 0
    for run in _uid_runs(uids):
        text = len(_run_text(run)) + 1
        if chunk and length + text > max_chars:
            yield chunk
            chunk, length = [], 0
        chunk += run
        length += text
    if chunk:
        yield chunk


def _inbox_normalised(folder: str) -> str:
    """`folder` with a first level that is INBOX in any case spelt INBOX (RFC 3501 5.1: the
    name INBOX is case-insensitive on every server)."""
    first, separator, rest = folder.partition(FOLDER_SEPARATOR)
    return "INBOX" + separator + rest if first.upper() == "INBOX" else folder


def _describe_refusal(refused: BaseException) -> str:
    """The server's words in an imaplib or imapclient error ("create failed: <text>", b'...')."""
    text = str(refused).strip()
    if len(refused.args) == 1 and isinstance(refused.args[0], bytes):
        text = refused.args[0].decode("utf-8", "replace").strip()
    return re.sub(r"^[A-Za-z]+ failed: ", "", text)


def _header_fields(data: dict[bytes, object]) -> bytes | None:
    # The key echoes the request as the server wrote it back ("BODY[HEADER.FIELDS (MESSAGE-ID)]"
    # from Dovecot; other servers quote or case the field name differently).
    for key, value in data.items():
        if isinstance(key, bytes) and key.upper().startswith(_HEADER_FIELDS_KEY_PREFIX):
            return value if isinstance(value, bytes) else None
    return None


def _message_id(header_block: bytes | None) -> str | None:
    """The first Message-ID field's value, unfolded and stripped; None when absent or empty."""
    if not header_block:
        return None
    unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", header_block)
    for line in unfolded.splitlines():
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"message-id":
            # RFC 6532 allows UTF-8; "replace" keeps anything else printable and hashable.
            return value.strip().decode("utf-8", "replace") or None
    return None


def _flags_to_copy(flags: Sequence[str], facts: _FolderFacts) -> list[str]:
    copied = []
    for flag in flags:
        system_flag = _SYSTEM_FLAG_BY_LOWER.get(flag.lower())
        if system_flag is not None:
            copied.append(system_flag)
        elif not flag.startswith("\\") and _KEYWORD.fullmatch(flag):
            if facts.any_keyword or flag.lower() in facts.known_keywords:
                copied.append(flag)
    return list(dict.fromkeys(copied))


def _global_append_limit(capabilities: Sequence[bytes]) -> int | None:
    for capability in capabilities:
        name, equals, value = capability.partition(b"=")
        if name == b"APPENDLIMIT" and equals and value.isdigit():
            return int(value)
    return None


def _quoted_mailbox(folder: str) -> bytes:
    name = encode_mailbox_name(folder)  # modified UTF-7 (RFC 3501 5.1.3)
    return b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _refusal(context: str, status: str, text: bytes) -> AppendRejected:
    """A tagged NO or BAD as an AppendRejected: permanent only when retrying cannot help."""
    server_text = text.decode("utf-8", "replace").strip()
    message = f"{context} answered {status} {server_text}"
    code_match = _RESPONSE_CODE.match(server_text)
    code = code_match.group(1).upper() if code_match else None
    # Seconds to stay away: Outlook's suggested backoff, or a default for other throttles and
    # [OVERQUOTA]; the queue keeps the message invisible at least that long.
    wait = retry.throttle_wait(server_text)
    if code == "TOOBIG":
        return AppendRejected(message, permanent=True, reason=_TOO_LARGE)
    if "throttled" in server_text.lower():
        # Outlook's "Request is throttled. Suggested Backoff Time: N milliseconds", as NO or as
        # BAD (then "* BYE Connection closed. 14" and the close: see ImapDestination.closing).
        # Either is the tagged answer to this APPEND: nothing was stored.
        suggested = retry.suggested_backoff_ms(server_text)
        backoff = f" (suggested backoff {suggested} ms)" if suggested is not None else ""
        return AppendRejected(
            message, permanent=False, reason=f"throttled by the destination{backoff}", retry_after=wait
        )
    for pattern, meaning in _EXCHANGE_MESSAGE_REFUSALS:
        if pattern.match(server_text):
            return AppendRejected(
                message,
                permanent=False,
                reason=f"rejected by the destination: {server_text} ({meaning})",
                final_after=REFUSED_FINAL_AFTER,
            )
    if code not in retry.TRANSIENT_CODES:
        if _TOO_LARGE_TEXT.search(server_text):
            return AppendRejected(message, permanent=True, reason=_TOO_LARGE)
        if code == "LIMIT" or _LINE_TOO_LONG_TEXT.search(server_text):
            return AppendRejected(message, permanent=True, reason=f"rejected by the destination: {server_text}")
    # [UNAVAILABLE], [INUSE] and anything not recognised (such as [SERVERBUG]): worth another try later.
    return AppendRejected(
        message, permanent=False, reason=f"refused for now by the destination: {server_text}", retry_after=wait
    )


def _non_synchronising(capabilities: Sequence[bytes], size: int) -> bool:
    """Whether a literal of `size` bytes may be sent without waiting for "+" (RFC 7888)."""
    return b"LITERAL+" in capabilities or (b"LITERAL-" in capabilities and size <= LITERAL_MINUS_MAX)


def _run_pipelined(client: IMAPClient, commands: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, bytes] | _NoAnswer]:
    """Send every `<tag> <command> {n+}` with its literal, then read the tagged answers, matched
    to their commands by tag (RFC 3501 2.2.1: a client may send commands without waiting for
    the answers of earlier ones). When the session fails midway, the commands answered by then
    keep their answers; the rest have none, `sent` or not."""
    imap = client._imap
    tags: list[bytes] = []
    failure: BaseException | None = None
    try:
        for command, literal in commands:
            binary = b"\0" in literal
            tag = imap._new_tag()
            tags.append(tag)
            imap.send(b"%s %s %s{%d+}\r\n%s\r\n" % (tag, command, b"~" if binary else b"", len(literal), literal))
    except _IMAP_ERRORS as exc:
        failure = exc
    # Read the answers, also after a failed send: a server that ends the session after answering
    # an APPEND (Outlook.com when a token expires) makes the next send fail, and the answers
    # given before it are still to be read.
    try:
        for tag in tags:  # answered in any order; each read files its tagged answer
            while imap.tagged_commands.get(tag) is None:
                imap._get_response()
    except _IMAP_ERRORS as exc:
        failure = failure or exc
    replies: list[tuple[str, bytes] | _NoAnswer] = []
    for tag in tags:
        answered = imap.tagged_commands.pop(tag, None)
        if answered is None:
            assert failure is not None
            replies.append(_NoAnswer(failure, sent=True))
            continue
        status, (text,) = answered
        _forget_append_responses(imap, text)
        replies.append((status, text))
    if failure is not None:
        replies += [_NoAnswer(failure, sent=False)] * (len(commands) - len(tags))
    return replies


def _forget_append_responses(imap: imaplib.IMAP4, tagged_text: bytes) -> None:
    """imaplib files untagged data by name and only a SELECT clears it: drop what an APPEND
    brings (EXISTS and RECENT of a selected folder, the response code imaplib copies out of the
    tagged line) so that a long session does not pile it up."""
    response_code = _RESPONSE_CODE.match(tagged_text.decode("ascii", "replace"))
    for name in ("EXISTS", "RECENT", response_code.group(1).upper() if response_code else None):
        imap.untagged_responses.pop(name, None)


def _run_with_literal(client: IMAPClient, command: bytes, literal: bytes, *, binary: bool) -> tuple[str, bytes]:
    """Send `<tag> <command> {n}` and `literal` byte for byte; return the tagged (status, text).

    The literal is non-synchronising (`{n+}`) where the server allows it (LITERAL+, or LITERAL-
    for small ones), else synchronising: the server's "+" is awaited, and a tagged reply instead
    of it (e.g. NO [TOOBIG]) is returned without sending the literal. `binary` sends a literal8
    (`~{n}`, RFC 3516), the only kind that may carry NUL bytes.

    Built on imaplib's internals because neither imaplib nor imapclient sends a literal
    unchanged and reports a NO: `_new_tag` registers the tag, `send` writes raw bytes, and
    `_get_response` reads one response (returning None for a continuation request) and files
    the tagged one under `tagged_commands[tag]`.
    """
    capabilities = client.capabilities()  # cached; it cannot be asked in the middle of a command
    non_synchronising = _non_synchronising(capabilities, len(literal))
    imap = client._imap
    tag = imap._new_tag()
    announcement = b"%s{%d%s}" % (b"~" if binary else b"", len(literal), b"+" if non_synchronising else b"")
    if non_synchronising:
        imap.send(b"%s %s %s\r\n%s\r\n" % (tag, command, announcement, literal))
    else:
        imap.send(b"%s %s %s\r\n" % (tag, command, announcement))
        while imap._get_response() is not None:
            if imap.tagged_commands[tag] is not None:
                break  # refused before the literal was sent
        else:
            imap.send(literal + b"\r\n")
    while imap.tagged_commands[tag] is None:
        imap._get_response()
    status, (text,) = imap.tagged_commands.pop(tag)
    _forget_append_responses(imap, text)
    return status, text
