"""An Outlook.com (Exchange Online) IMAP front in front of one of the harness's Dovecot servers.

The client sees Outlook.com's IMAP dialect; Dovecot behind stores exactly the bytes the client
APPENDed, so a test reads them straight from Dovecot (``read_folder(dovecot_pair.outlook, ...)``)
and proves byte-exactness there, while through the front it only ever sees re-rendered MIME and
estimated sizes, as on the real server.

Like ``imap_proxy``, the front takes IMAPS with the test certificate (the code under test connects
to it as to Dovecot, TLS verified) and talks clear text to Dovecot's plain port. Unlike it, the
front reads each command whole (line and literals), decides, and answers itself or forwards it
(literals re-sent non-synchronising, ``{n+}``), then reads Dovecot's responses up to the tagged
one and rewrites them. One command at a time per session; IDLE and AUTHENTICATE's challenges are
relayed as they come.

``make(server, **switches)`` (the ``outlook_front`` fixture) gives an ``OutlookFront`` with
``.host``, ``.port`` and ``.behaviours`` (a ``Behaviours``: every behaviour switchable on its own,
all on by default; tests may change them while the front runs). Sources for each behaviour are in
the comments of ``Behaviours`` and of the code that does it. In short:

1. rebuilt MIME: FETCH of any body section answers from ``render_exchange_mime(stored)``
   (ENVELOPE and BODYSTRUCTURE still come from Dovecot, i.e. from the stored bytes);
2. RFC822.SIZE is ``estimated_size(stored size)``; SEARCH LARGER/SMALLER answer by it;
3. CAPABILITY is Outlook's; what Outlook lacks gets ``BAD Command Error. 12``;
4. APPEND and SELECT pass through (APPENDUID, UIDNEXT, UIDVALIDITY), PERMANENTFLAGS are Outlook's
   and other keywords are dropped;
5. refusals by their real texts: size limit, long lines, scripted Argument Error 11 / Server
   Unavailable 15, reserved folder names;
6. throttling (scripted), NO form and BAD + ``* BYE Connection closed. 14`` form;
7. case-insensitive folder names, ``INBOX`` listed as ``Inbox``;
8. idle sessions dropped, concurrent sessions per mailbox limited.

One-shot faults (thread-safe, used up as they fire): ``throttle``, ``unavailable``,
``cannot_parse``, ``refuse`` (any text), ``drop_connection``; and ``refuse_messages(predicate,
reply)`` for every APPEND whose message matches until ``clear_message_refusals()``.

Recorded for tests: ``connections``, ``commands`` (each command's first line, no literals),
``appends`` (APPENDs Dovecot stored), ``appended`` (their message bytes), ``append_attempts``
(every APPEND received, refused or not: the message it carried, None if the client sent none),
``refused`` ((command line, reply) the front answered itself with a refusal), ``refused_at``,
``idle_drops``, ``sent(match)``.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import io
import quopri
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timezone
from email.generator import BytesGenerator
from email.header import decode_header, make_header
from email.utils import format_datetime, getaddresses, parsedate_to_datetime
from functools import lru_cache
from typing import TYPE_CHECKING

import pytest

from tests.harness.imap_wire import (
    CRLF,
    LITERAL_AT_END,
    ImapSyntaxError,
    Listening,
    Response,
    SessionClosed,
    Tok,
    WireSession,
    astring,
    dump,
    parse_tokens,
)

if TYPE_CHECKING:  # not imported at run time: the mail plugin module must be loaded by pytest first
    from tests.harness.mail import DovecotServer


# ---- what Outlook.com says ----------------------------------------------------------------------
# The CAPABILITY line of outlook.office365.com, as issue 12 gives it; protocol logs of the real
# server show the same list (pre-login without MOVE; post-login with MOVE and three private
# ones): https://github.com/jstedfast/MailKit/issues/849,
# https://github.com/jstedfast/MailKit/issues/1282, https://github.com/mscdex/node-imap/issues/689
CAPABILITIES = (
    b"IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+"
)
# The greeting, with its base64 server tag (MailKit #849, #1282); no CAPABILITY response code.
GREETING = b"* OK The Microsoft Exchange IMAP4 service is ready. [T1VUTE9PSy1GUk9OVC5URVNU]"
# "BAD Command Error. 12" for a command or extension Exchange does not implement:
# https://github.com/domainaware/parsedmarc/issues/9 (MOVE on Exchange 2010, citing Microsoft KB
# 3064393 "BAD command 12 error occurs and IMAP capability commands are not offered").
UNSUPPORTED = b"BAD Command Error. 12"
# Syntax it cannot take: imapsync FAQ.d/FAQ.Exchange.txt ("BAD Command Argument Error 11"),
# https://github.com/imapsync/imapsync/issues/285, https://github.com/awangga/outlook/issues/42
ARGUMENT_ERROR = b"BAD Command Argument Error. 11"
# Over-long lines: https://blog.freron.com/2017/slow-descent-into-madness-exchange-imap/ quoted in
# https://github.com/nextcloud/mail/issues/6038; https://github.com/thunderbird/thunderbird-android/issues/1809
LINE_TOO_LONG = b"BAD Command Error. 10"
# imapsync FAQ.d/FAQ.Exchange.txt and FAQ.Office365.txt: "NO Maximum size of appendable message
# has been exceeded".
TOO_LARGE = b"NO Maximum size of appendable message has been exceeded"
# imapsync FAQ.d/FAQ.Exchange.txt: "NO Server Unavailable. 15" (busy, or the mailbox over quota).
SERVER_UNAVAILABLE = b"NO Server Unavailable. 15"
# imapsync FAQ.d/FAQ.Office365.txt: CREATE "Files" answers "NO Folder name is reserved".
RESERVED = b"NO Folder name is reserved"
# imapsync FAQ.d/FAQ.Exchange.txt ("Couldn't create folder [trash] "Mailbox already exists"":
# Exchange ignores case); issue 12: no response code.
ALREADY_EXISTS = b"NO Mailbox already exists"
# imapsync FAQ.d/FAQ.Office365.txt and https://github.com/imapsync/imapsync/issues/198 (NO form,
# "Suggested Backoff Time: 299609 milliseconds"); https://github.com/simonrob/email-oauth2-proxy/issues/191
# (BAD form followed by "* BYE Connection closed. 14", then the close).
THROTTLED = "Request is throttled. Suggested Backoff Time: {ms} milliseconds"
CLOSED_14 = b"* BYE Connection closed. 14"
# Over the per-mailbox connection limit the login is accepted and every later command answers
# this: https://github.com/mscdex/node-imap/issues/523 (Office365's limit of 20 concurrent IMAP
# connections), https://github.com/atc0005/check-mail/issues/183,
# https://github.com/Webklex/php-imap/issues/464. No documented refusal text was found.
NOT_CONNECTED = b"BAD User is authenticated but not connected."
# imapsync FAQ.d/FAQ.Exchange.txt: "BAD Command received in Invalid state".
INVALID_STATE = b"BAD Command received in Invalid state."
# Outlook's flags: SELECT on Exchange answers FLAGS and PERMANENTFLAGS with the system flags and
# $MDNSent only: https://github.com/MailCore/mailcore2/issues/780,
# https://github.com/jstedfast/MailKit/issues/1449; imapsync FAQ.d/FAQ.Office365.txt ($MDNSent).
OUTLOOK_FLAGS = (b"\\Seen", b"\\Answered", b"\\Flagged", b"\\Deleted", b"\\Draft", b"$MDNSent")
_SYSTEM_FLAGS = {f.upper() for f in OUTLOOK_FLAGS} | {b"\\RECENT"}

# The commands Exchange Online's IMAP4 service implements (RFC 3501 and the capabilities above).
_SUPPORTED = {
    "CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "AUTHENTICATE", "LOGIN", "SELECT", "EXAMINE", "CREATE",
    "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "CHECK", "CLOSE",
    "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "ID", "UNSELECT", "IDLE", "NAMESPACE",
    "UID FETCH", "UID SEARCH", "UID STORE", "UID COPY", "UID MOVE", "UID EXPUNGE",
}  # fmt: skip
_PRE_AUTH = {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "AUTHENTICATE", "LOGIN", "ID"}
_STATUS_ITEMS = {b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN"}
# Outlook.com's limit on a message: about 25 MB (LOCAL-SERVERS.md; issue 12). Microsoft 365 is
# ~45 MB by default (imapsync FAQ.d/FAQ.Office365.txt: "--maxsize 45000000"), up to 150 MB.
OUTLOOK_COM_MAX_MESSAGE = 25 * 1024 * 1024


@dataclass
class Behaviours:
    """Each of the front's behaviours, on by default (a faithful Outlook.com). ``None`` turns a
    limit off."""

    # 1. Exchange stores no MIME: a message is converted into its store and rendered again for
    #    IMAP (Set-ImapSettings -MessageRetrievalMimeFormat, https://learn.microsoft.com/en-us/powershell/module/exchange/set-imapsettings;
    #    the MAPI<->MIME conversion, https://learn.microsoft.com/en-us/office/client-developer/outlook/mapi/about-the-mapi-mime-conversion-api).
    #    What the re-rendering changes is as observed and reported in issue 12.
    rebuilt_mime: bool = True
    # 2. RFC822.SIZE is an estimate (Exchange's EnableExactRFC822Size is $false by default:
    #    set-imapsettings above; [MS-STANOIMAP] 2.2.25, https://msdn.microsoft.com/en-us/library/ee624465(v=exchg.80).aspx:
    #    "otherwise, Microsoft Exchange returns the stored-message size"; KB Q191504 "IMAP4 FETCH
    #    Command Returns Wrong Size"). imapsync skips size comparison by default for this
    #    (imapsync --skipsize, "On by default").
    estimated_size: bool = True
    # 3. Outlook's CAPABILITY, and BAD Command Error. 12 for what it lacks (constants above).
    capabilities: bool = True
    # 4. FLAGS/PERMANENTFLAGS are Outlook's; keywords other than $MDNSent are dropped silently.
    outlook_flags: bool = True
    # 5. Refusals. APPEND larger than this: TOO_LARGE (imapsync FAQ.Exchange/FAQ.Office365).
    max_message_size: int | None = OUTLOOK_COM_MAX_MESSAGE
    #    A line of the message longer than this: LINE_TOO_LONG. imapsync FAQ.d/FAQ.Exchange.txt:
    #    "Exchange supports 9900 characters line length" (FAQ.Office365.txt says 10500).
    max_line_length: int | None = 9900
    #    A command line longer than this: LINE_TOO_LONG. Set-ImapSettings -MaxCommandSize,
    #    default 10,240 bytes (https://technet.microsoft.com/en-us/library/bb123712(v=exchg.150)).
    max_command_length: int | None = 10240
    #    CREATE of these names (any case): RESERVED (imapsync FAQ.d/FAQ.Office365.txt, "Files").
    reserved_names: frozenset[str] = frozenset({"Files"})
    # 7. Folder names case-insensitive; INBOX listed as "Inbox" (MailKit #1282's log:
    #    'LIST "" "INBOX"' answers '* LIST (\Marked \HasNoChildren) "/" Inbox'); CREATE of a name
    #    existing in another case: ALREADY_EXISTS.
    case_insensitive_folders: bool = True
    # 8. An idle session is closed after this many seconds, with no BYE: Set-ImapSettings
    #    -AuthenticatedConnectionTimeout, default 00:30:00 (set-imapsettings above); Exchange
    #    Online sends no BYE (https://github.com/eclipse-ee4j/angus-mail/issues/176).
    idle_timeout: float | None = 30 * 60
    #    Logged-in sessions per mailbox; the one over it gets NOT_CONNECTED to every command.
    #    Office365: 20 (node-imap #523); Exchange's MaxConnectionsPerUser default is 16
    #    (bb123712 above).
    max_sessions: int | None = 20
    # Exchange's texts for completions, logins and LOGOUT ("LOGIN completed.", "AUTHENTICATE
    # failed.", "* BYE Microsoft Exchange Server IMAP4 server signing off.": MailKit #849, #1449;
    # https://github.com/imapsync/imapsync/issues/239).
    exchange_replies: bool = True


# ==== 1. Rebuilt MIME ==============================================================================
_EOL = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_ADDRESS_HEADERS = {b"from", b"sender", b"to", b"cc", b"bcc", b"reply-to", b"resent-from", b"resent-to", b"resent-cc"}
_TEXT_HEADERS = {b"subject", b"thread-topic", b"comments", b"keywords"}
_TRACE_HEADERS = {
    b"return-path", b"received", b"delivered-to", b"x-received", b"arc-seal", b"arc-message-signature",
    b"arc-authentication-results", b"dkim-signature", b"authentication-results", b"received-spf", b"x-original-to",
}  # fmt: skip
_FIRST_HEADERS = [b"from", b"sender", b"to", b"cc", b"bcc", b"reply-to", b"subject", b"thread-topic", b"date",
                  b"message-id", b"references", b"in-reply-to"]  # fmt: skip
_CANONICAL = {
    b"message-id": b"Message-ID", b"mime-version": b"MIME-Version", b"content-type": b"Content-Type",
    b"content-transfer-encoding": b"Content-Transfer-Encoding", b"content-disposition": b"Content-Disposition",
    b"content-id": b"Content-ID", b"from": b"From", b"to": b"To", b"cc": b"Cc", b"bcc": b"Bcc", b"subject": b"Subject",
    b"date": b"Date", b"reply-to": b"Reply-To", b"sender": b"Sender", b"in-reply-to": b"In-Reply-To",
    b"references": b"References",
}  # fmt: skip
_FOLD_AT = 76


def header_fields(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(fields, body) of a message as the front sees it: each field (name, unfolded value with
    its leading blanks), in order; the body after the blank line. Line ends may be CRLF, LF or
    CR. An mbox "From " first line is skipped, a continuation line before any field is ignored,
    and a line that is neither a field nor a continuation starts the body (as Python's email
    parser does)."""
    fields: list[tuple[bytes, list[bytes]]] = []
    pos = 0
    if message.startswith(b"From "):
        eol = _EOL.search(message)
        pos = eol.end() if eol else len(message)
    body = b""
    while pos < len(message):
        eol = _EOL.search(message, pos)
        line, end = (message[pos : eol.start()], eol.end()) if eol else (message[pos:], len(message))
        if line == b"":
            body = message[end:]
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
        elif found := _FIELD_NAME.match(line):
            fields.append((found.group(1), [line[found.end() :]]))
        else:
            body = message[pos:]
            break
        pos = end
    return [(name, b"".join(lines)) for name, lines in fields], body


def header_value(message: bytes, name: str) -> bytes | None:
    """The first field ``name``'s unfolded value, stripped (None if the message has none)."""
    wanted = name.lower().encode()
    for found, value in header_fields(message)[0]:
        if found.lower() == wanted:
            return value.strip()
    return None


def header_text(value: bytes) -> str:
    """A header value as text: UTF-8 (else Latin-1) with RFC 2047 words decoded, blanks collapsed."""
    return " ".join(_decode_words(_as_text(value)).split())


def _as_text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _decode_words(text: str) -> str:
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except Exception:  # an unknown charset, a broken word: Exchange keeps the text as it came
        return text


def _encode_words(text: str) -> bytes:
    """RFC 2047 B-words in UTF-8, each at most 45 bytes of text, separated by spaces."""
    words, chunk = [], ""
    for char in text:
        if len((chunk + char).encode("utf-8")) > 45:
            words.append(chunk)
            chunk = ""
        chunk += char
    words.append(chunk)
    return b" ".join(b"=?utf-8?B?" + base64.b64encode(w.encode("utf-8")) + b"?=" for w in words if w)


def _render_address_list(value: bytes) -> bytes | None:
    """Every address as Exchange writes it: display names quoted (RFC 2047 when not ASCII),
    addresses in angle brackets. None when the list does not parse cleanly."""
    text = _as_text(value)
    pairs = getaddresses([text])
    if not pairs or any(not addr or "@" not in addr or not addr.isascii() or " " in addr for _, addr in pairs):
        return None
    out = []
    for name, addr in pairs:
        name = " ".join(_decode_words(name).split())
        if not name:
            out.append(b"<%s>" % addr.encode())
        elif name.isascii():
            quoted = name.replace("\\", "\\\\").replace('"', '\\"')
            out.append(b'"%s" <%s>' % (quoted.encode(), addr.encode()))
        else:
            out.append(b"%s <%s>" % (_encode_words(name), addr.encode()))
    return b", ".join(out)


def _render_field(name: bytes, value: bytes) -> bytes:
    """One field's new value (unfolded). Semantics kept: the same Message-ID, Date instant,
    addresses and decoded text."""
    lower = name.lower()
    value = value.strip()
    if lower == b"message-id":
        return value
    if lower == b"date":
        try:
            when = parsedate_to_datetime(_as_text(value))
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None and when.tzinfo is not None:
            # The same instant in UTC, "+0000", day zero-padded.
            return format_datetime(when.astimezone(timezone.utc)).encode()
        return value if value.isascii() else _encode_words(_as_text(value))
    if lower in _ADDRESS_HEADERS:
        rendered = _render_address_list(value)
        # Addresses that do not parse, or are not ASCII (RFC 6532), are kept as they came.
        return rendered if rendered is not None else value
    if lower in _TEXT_HEADERS or not value.isascii():
        if lower.startswith(b"content-"):
            return value  # a structured MIME field: re-encoding its words would break it
        text = " ".join(_decode_words(_as_text(value)).split())
        return text.encode() if text.isascii() and b"=?" not in value else _encode_words(text)
    return value


def _render_field_safely(name: bytes, value: bytes) -> bytes:
    try:
        return _render_field(name, value)
    except (RecursionError, ValueError, TypeError, IndexError, LookupError):  # the email package's parsers
        return value.strip()


def _fold(name: bytes, value: bytes) -> bytes:
    """``Name: value`` folded before blanks into lines of at most 76 characters where it can be;
    unfolding gives ``Name: value`` back exactly."""
    name = _CANONICAL.get(name.lower(), name)
    tokens = re.findall(rb"[ \t]*[^ \t]+", value)
    if not tokens:
        return name + b":" + CRLF
    lines, line = [], name + b": " + tokens[0].lstrip(b" \t")
    for token in tokens[1:]:  # each starts with its blanks
        if len(line) + len(token) > _FOLD_AT:
            lines.append(line)
            line = token
        else:
            line += token
    lines.append(line)
    return CRLF.join(lines) + CRLF


def _boundary(digest: str, index: int) -> str:
    return f"_{index:03d}_{digest[:32]}_"


def _render_body(content_fields: list[tuple[bytes, bytes]], body: bytes, digest: str):
    """Re-render the MIME tree: new boundaries, 8bit/binary leaves as quoted-printable (text)
    or base64, a charset on text parts without one, CRLF line ends. Returns (top-level content
    fields, body bytes, has attachments)."""
    mini = b"".join(_fold(n, v.strip()) for n, v in content_fields) + CRLF + body
    msg = email.message_from_bytes(mini, policy=email.policy.compat32)
    attachments = False
    for index, part in enumerate(msg.walk()):
        if part.is_multipart():
            if part.get_content_maintype() == "multipart" and part.get_boundary() is not None:
                part.set_boundary(_boundary(digest, index))
            continue
        maintype = part.get_content_maintype()
        if maintype in ("multipart", "message"):
            continue
        if str(part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            attachments = True
        payload = part.get_payload()
        if not isinstance(payload, str):
            continue
        cte = str(part.get("Content-Transfer-Encoding") or "").strip().lower()
        eight_bit = not payload.isascii()
        if cte in ("8bit", "binary") or (cte in ("", "7bit") and eight_bit):
            data = part.get_payload(decode=True) or b""
            if maintype == "text":
                encoded, cte = quopri.encodestring(_EOL.sub(b"\n", data)).decode("ascii"), "quoted-printable"
            else:
                encoded, cte = base64.encodebytes(data).decode("ascii"), "base64"
            del part["Content-Transfer-Encoding"]
            part["Content-Transfer-Encoding"] = cte
            part.set_payload(encoded)
        if maintype == "text" and part.get_param("charset") is None:
            try:
                part.set_param("charset", "utf-8" if eight_bit else "us-ascii")
            except TypeError:  # an 8-bit Content-Type (a Header object in compat32): kept
                pass
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=email.policy.compat32.clone(linesep="\r\n")).flatten(msg)
    generated = out.getvalue()
    if generated.startswith(CRLF):
        rendered_body = generated[2:]
    else:
        rendered_body = generated.split(CRLF + CRLF, 1)[1] if CRLF + CRLF in generated else b""
    new_fields = [
        (k.encode("ascii", "surrogateescape"), re.sub(r"\r?\n(?=[ \t])", "", str(v)).encode("ascii", "surrogateescape"))
        for k, v in msg.raw_items()
        if k.lower().startswith("content-")
    ]
    return new_fields, rendered_body, attachments


@lru_cache(maxsize=512)
def render_exchange_mime(stored: bytes) -> bytes:
    """The message as Exchange gives it back over IMAP: the same Message-ID (one added when
    there is none), Date instant, addresses and decoded Subject; everything else may move.

    Deterministic: the same stored bytes always render the same. Headers are unfolded and
    folded again at 76, non-ASCII or 8-bit text re-encoded as RFC 2047 UTF-8 words, Date
    rewritten in UTC ("+0000"), address lists re-rendered (names quoted), names canonicalised
    (Message-ID, MIME-Version), headers reordered (trace first, then From/To/Cc/Subject/Date/
    Message-ID..., the rest, two X-MS- headers, the Content- headers, MIME-Version last).
    The MIME tree is re-rendered by ``email`` (new boundaries, 8bit parts re-encoded, charsets
    added, CRLF); where that fails (deep nesting, broken MIME) the body only has its line ends
    made CRLF."""
    digest = hashlib.sha256(stored).hexdigest()
    fields, body = header_fields(stored)
    content = [(n, v) for n, v in fields if n.lower().startswith(b"content-")]
    attachments = False
    try:
        content, body, attachments = _render_body(content, body, digest)
    except Exception:  # RecursionError, parser or generator failures: the lighter change
        body = _EOL.sub(CRLF, body)
    if not any(n.lower() == b"content-type" for n, _ in content):
        content.insert(0, (b"Content-Type", b'text/plain; charset="us-ascii"'))
    others = [(n, _render_field_safely(n, v)) for n, v in fields if not n.lower().startswith(b"content-")]
    if not any(n.lower() == b"message-id" for n, _ in others):
        others.append((b"Message-ID", b"<%s@front.outlook.test>" % digest[:32].encode()))
    trace = [f for f in others if f[0].lower() in _TRACE_HEADERS]
    first = [f for name in _FIRST_HEADERS for f in others if f[0].lower() == name]
    rest = [f for f in others if f[0].lower() not in _TRACE_HEADERS and f[0].lower() not in _FIRST_HEADERS]
    rest = [f for f in rest if f[0].lower() not in (b"mime-version", b"x-ms-has-attach", b"x-ms-tnef-correlator")]
    added = [(b"X-MS-Has-Attach", b"yes" if attachments else b""), (b"X-MS-TNEF-Correlator", b"")]
    ordered = trace + first + rest + added + [(n, v.strip()) for n, v in content] + [(b"MIME-Version", b"1.0")]
    return b"".join(_fold(n, v) for n, v in ordered) + CRLF + body


# ---- sections of a rendered message (FETCH BODY[...]) --------------------------------------------
def _split_entity(entity: bytes) -> tuple[bytes, bytes]:
    """(header with its blank line, body) of a CRLF entity."""
    at = entity.find(CRLF + CRLF)
    if entity.startswith(CRLF):
        return CRLF, entity[2:]
    if at < 0:
        return entity + (b"" if entity.endswith(CRLF) else CRLF) + CRLF, b""
    return entity[: at + 4], entity[at + 4 :]


def _header_subset(header: bytes, names: list[bytes], keep: bool) -> bytes:
    wanted = {n.lower() for n in names}
    out = []
    for raw in re.findall(rb"[^\r\n][^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", header):
        found = _FIELD_NAME.match(raw)
        if found and (found.group(1).lower() in wanted) == keep:
            out.append(raw)
    return b"".join(out) + CRLF


def _content_type(header: bytes):
    return email.message_from_bytes(header, policy=email.policy.compat32)


def _children(entity: bytes) -> list[bytes]:
    """The numbered parts of an entity (RFC 3501 6.4.5), each with its own header (an empty one
    for the body of a non-multipart entity): the parts of a multipart; for message/rfc822, the
    parts of the embedded message; else the body alone as part 1."""
    header, body = _split_entity(entity)
    parsed = _content_type(header)
    if parsed.get_content_type() == "message/rfc822":
        inner_header, inner_body = _split_entity(body)
        if _content_type(inner_header).get_content_maintype() == "multipart":
            return _children(body)
        return [CRLF + inner_body]
    boundary = parsed.get_boundary() if parsed.get_content_maintype() == "multipart" else None
    if boundary is None:
        return [CRLF + body]
    delimiter = re.compile(
        rb"(?:^|\r\n)--" + re.escape(boundary.encode("ascii", "surrogateescape")) + rb"(--)?[ \t]*(?:\r\n|$)"
    )
    parts, start = [], None
    for found in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : found.start()])
        if found.group(1):
            start = None
            break
        start = found.end()
    if start is not None:
        parts.append(body[start:])
    return parts


def section_of(rendered: bytes, section: bytes) -> bytes:
    """BODY[section] of a rendered message: "", HEADER, TEXT, HEADER.FIELDS (..),
    HEADER.FIELDS.NOT (..), and part numbers ("1.2", "2.MIME", "3.HEADER") (RFC 3501 6.4.5)."""
    spec = section.strip()
    entity = rendered
    numbered = re.match(rb"((?:\d+\.)*\d+)(?:\.(.*))?$", spec, re.S)
    if numbered:
        part = rendered
        for number in (int(n) for n in numbered.group(1).split(b".")):
            parts = _children(part)
            if not 1 <= number <= len(parts):
                return b""
            part = parts[number - 1]
        header, body = _split_entity(part)
        spec = numbered.group(2) or b""
        if not spec:
            return body
        if spec.upper() == b"MIME":
            return header
        if _content_type(header).get_content_type() != "message/rfc822":
            return b""
        entity = body
    header, text = _split_entity(entity)
    upper = spec.upper()
    if upper == b"":
        return entity
    if upper == b"HEADER":
        return header
    if upper == b"TEXT":
        return text
    fields = re.match(rb"HEADER\.FIELDS(\.NOT)?\s*\((.*)\)\s*$", spec, re.I | re.S)
    if fields:
        names = [n.strip(b'"') for n in fields.group(2).split()]
        return _header_subset(header, names, keep=not fields.group(1))
    return b""


# ==== 2. Estimated sizes ===========================================================================
def estimated_size(stored_size: int) -> int:
    """What the front answers for RFC822.SIZE: 2.5% and 97 bytes more than Dovecot stores, like
    Exchange's size of the stored item (never the appended or the rendered size, except by
    chance for the latter). Strictly increasing, so SEARCH LARGER/SMALLER can be mapped back."""
    return stored_size + stored_size // 40 + 97


def _first_stored_size_reaching(estimate: int) -> int:
    """The smallest stored size whose estimate is >= ``estimate``."""
    low, high = 0, max(estimate, 0) + 1
    while low < high:
        middle = (low + high) // 2
        if estimated_size(middle) >= estimate:
            high = middle
        else:
            low = middle + 1
    return low


# ==== IMAP syntax: just enough (tests/harness/imap_wire.py) ==========================================
_LITERAL_AT_END = LITERAL_AT_END
_Response = Response


# ==== faults ========================================================================================
@dataclass
class _Refusal:
    match: bytes
    reply: bytes
    times: int
    then_close: bytes | None = None  # an untagged line sent after the reply, then the close


@dataclass
class _Drop:
    match: bytes
    nth: int
    when: str
    bye: bytes | None
    seen: int = 0


# ==== the front ====================================================================================
class OutlookFront(Listening):
    _thread_name = "outlook-front-session"
    host = "127.0.0.1"

    def __init__(self, upstream: DovecotServer, server_context: ssl.SSLContext, **switches):
        self._upstream = (upstream.host, upstream.plain_port)
        self._context = server_context
        self.behaviours = Behaviours(**switches)
        self._lock = threading.Lock()
        self._refusals: list[_Refusal] = []
        self._message_refusals: list[tuple[Callable[[bytes], bool], bytes]] = []
        self._drops: list[_Drop] = []
        self._logged_in: dict[str, int] = {}
        self.connections = 0
        self.commands: list[bytes] = []
        self.appends = 0
        self.appended: list[bytes] = []
        self.append_attempts: list[bytes | None] = []
        self.refused: list[tuple[bytes, bytes]] = []
        self.refused_at: list[float] = []
        self.idle_drops = 0
        self._sessions: list[_Session] = []
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="outlook-front", daemon=True)
        self._acceptor.start()

    # ---- what tests call ----------------------------------------------------------------------
    def refuse(self, match: bytes, reply: str, times: int = 1) -> None:
        """The next ``times`` commands whose first line contains ``match`` (case-insensitive) are
        answered ``<tag> <reply>`` and never reach Dovecot."""
        with self._lock:
            self._refusals.append(_Refusal(match.upper(), reply.encode(), times))

    def throttle(
        self, times: int = 1, backoff_ms: int = 299609, *, match: bytes = b" APPEND ", form: str = "NO"
    ) -> None:
        """Outlook's throttle: ``NO Request is throttled. Suggested Backoff Time: N milliseconds``,
        or with ``form="BAD"`` that as BAD, then ``* BYE Connection closed. 14`` and the close."""
        if form not in ("NO", "BAD"):
            raise ValueError(f"form: {form!r}")
        reply = f"{form} {THROTTLED.format(ms=backoff_ms)}".encode()
        with self._lock:
            self._refusals.append(_Refusal(match.upper(), reply, times, CLOSED_14 if form == "BAD" else None))

    def unavailable(self, times: int = 1, *, match: bytes = b" APPEND ") -> None:
        """``NO Server Unavailable. 15`` (busy, or the mailbox over quota)."""
        self.refuse(match, SERVER_UNAVAILABLE.decode(), times)

    def cannot_parse(self, times: int = 1, *, match: bytes = b" APPEND ") -> None:
        """``BAD Command Argument Error. 11``, as for a message Exchange cannot parse."""
        self.refuse(match, ARGUMENT_ERROR.decode(), times)

    def refuse_messages(self, predicate: Callable[[bytes], bool], reply: str = ARGUMENT_ERROR.decode()) -> None:
        """Every APPEND whose message satisfies ``predicate`` is answered ``reply`` (default the
        Argument Error 11 of a message Exchange cannot parse), until clear_message_refusals()."""
        with self._lock:
            self._message_refusals.append((predicate, reply.encode()))

    def clear_message_refusals(self) -> None:
        with self._lock:
            self._message_refusals.clear()

    def drop_connection(self, match: bytes, nth: int = 1, *, when: str = "unsent", bye: str | None = None) -> None:
        """At the ``nth`` command whose line contains ``match``, close the connection: "unsent"
        (never reaches Dovecot), "reply_lost" (Dovecot runs it, its reply is lost) or
        "after_reply" (the reply, then ``bye`` if given, then the close)."""
        if when not in ("unsent", "reply_lost", "after_reply"):
            raise ValueError(f"when: {when!r}")
        with self._lock:
            self._drops.append(_Drop(match.upper(), nth, when, bye.encode() + CRLF if bye else None))

    def sent(self, match: bytes) -> int:
        """Commands seen so far whose first line contains ``match`` (case-insensitive)."""
        with self._lock:
            return sum(match.upper() in line.upper() for line in self.commands)

    def sessions(self, user: str) -> int:
        """Sessions logged in as ``user`` now."""
        with self._lock:
            return self._logged_in.get(user.lower(), 0)

    def close(self) -> None:
        self._stop_listening(self._sessions)

    # ---- inside ------------------------------------------------------------------------------
    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(30)
            client = self._context.wrap_socket(raw, server_side=True)
            upstream = socket.create_connection(self._upstream, timeout=30)
            upstream.settimeout(None)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        session = _Session(self, client, upstream)
        with self._lock:
            self.connections += 1
            self._sessions.append(session)
        try:
            session.run()
        finally:
            session.close()
            with self._lock:
                if session in self._sessions:
                    self._sessions.remove(session)

    def _take_fault(self, line: bytes) -> tuple[str, object] | None:
        upper = line.upper()
        with self._lock:
            for drop in self._drops:
                if drop.match in upper:
                    drop.seen += 1
                    if drop.seen == drop.nth:
                        self._drops.remove(drop)
                        return "drop", drop
            for refusal in self._refusals:
                if refusal.match in upper:
                    refusal.times -= 1
                    if refusal.times <= 0:
                        self._refusals.remove(refusal)
                    return "refuse", refusal
        return None

    def _message_refusal(self, message: bytes) -> bytes | None:
        with self._lock:
            rules = list(self._message_refusals)
        for predicate, reply in rules:
            if predicate(message):
                return reply
        return None

    def _record_refusal(self, line: bytes, reply: bytes) -> None:
        with self._lock:
            self.refused.append((line.rstrip(b"\r\n"), reply))
            self.refused_at.append(time.time())

    def _login(self, user: str) -> bool:
        """Count a logged-in session of ``user``; False when it is over the limit."""
        limit = self.behaviours.max_sessions
        with self._lock:
            count = self._logged_in.get(user, 0) + 1
            self._logged_in[user] = count
            return limit is None or count <= limit

    def _logout(self, user: str) -> None:
        with self._lock:
            self._logged_in[user] = max(self._logged_in.get(user, 1) - 1, 0)


@dataclass
class _FetchPlan:
    """What the client asked for in a FETCH whose body sections the front computes."""

    wanted: list[tuple[bytes, bytes, tuple[int, int] | None]] = field(
        default_factory=list
    )  # (reply name, section, partial)


class _Session(WireSession):
    def __init__(self, front: OutlookFront, client: ssl.SSLSocket, upstream: socket.socket):
        self.front = front
        self.b = front.behaviours
        self._client = client
        self._upstream = upstream
        self._from_client = client.makefile("rb")
        self._from_server = upstream.makefile("rb")
        self._write_lock = threading.Lock()
        self._closed = threading.Event()
        self._user: str | None = None
        self._over_limit = False
        self._authenticated = False
        self._pending: list[_Response] = []
        self._internal = 0
        self._append_at: int | None = None  # the APPEND being read: its index in front.append_attempts

    # ---- life ---------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._read_response()  # Dovecot's greeting, replaced by Exchange's
            self._to_client(GREETING + CRLF if self.b.exchange_replies else b"* OK IMAP4rev1 front ready." + CRLF)
            while not self._closed.is_set():
                self._client.settimeout(self.b.idle_timeout)
                try:
                    line = self._from_client.readline()
                except (TimeoutError, socket.timeout):
                    with self.front._lock:
                        self.front.idle_drops += 1
                    return  # the idle session is closed, no BYE
                self._client.settimeout(None)
                if not line:
                    return
                self._command(line)
        except (OSError, SessionClosed, ValueError):
            pass

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._user is not None:
            self.front._logout(self._user)
            self._user = None
        for sock in (self._client, self._upstream):
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    # ---- wire ---------------------------------------------------------------------------------
    def _read_rest(
        self, line: bytes, texts: list[bytes], literals: list[bytes], *, refuse: bytes | None = None
    ) -> bool:
        """Read the literals of a command whose first line is ``line`` into texts/literals.
        A synchronising literal gets Exchange's "+" unless ``refuse`` is given: then nothing
        more is read for it (the client sends no literal a server did not ask for) and False
        is returned. Non-synchronising literals are always read."""
        while literal := _LITERAL_AT_END.search(line):
            texts.append(line[: literal.start()])
            if not literal.group(3):
                if refuse is not None:
                    return False
                self._to_client(b"+ Ready for additional command text." + CRLF)
            literals.append(self._read_exactly(int(literal.group(2))))
            line = self._from_client.readline()
            if not line:
                raise SessionClosed("the client closed the connection inside a command")
        texts.append(line.rstrip(b"\r\n"))
        return True

    def _reply(self, tag: bytes, reply: bytes, line: bytes, *, refusal: bool = True) -> None:
        if refusal:
            self.front._record_refusal(line, reply)
        self._flush_pending()
        self._to_client(tag + b" " + reply + CRLF)

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for response in pending:
            self._send_untagged(response, None)

    def _read_exactly(self, size: int) -> bytes:
        data = super()._read_exactly(size)
        if self._append_at is not None:  # an APPEND's last literal is its message
            with self.front._lock:
                self.front.append_attempts[self._append_at] = data
        return data

    # ---- dispatch -----------------------------------------------------------------------------
    def _command(self, line: bytes) -> None:
        stripped = line.rstrip(b"\r\n")
        head = stripped.split(b" ", 3)
        if len(head) < 2 or not head[0]:
            self._to_client(b"* " + ARGUMENT_ERROR + CRLF)
            return
        tag = head[0]
        name = head[1].upper().decode("ascii", "replace")
        if name == "UID" and len(head) > 2:
            name = "UID " + head[2].upper().decode("ascii", "replace")
        with self.front._lock:
            self.front.commands.append(_LITERAL_AT_END.sub(b"", line).rstrip(b"\r\n") or stripped)
            self._append_at = len(self.front.append_attempts) if name == "APPEND" else None
            if self._append_at is not None:
                self.front.append_attempts.append(None)

        if self.b.max_command_length is not None and len(stripped) > self.b.max_command_length:
            texts, literals = [], []
            self._read_rest(line, texts, literals, refuse=LINE_TOO_LONG)
            return self._reply(tag, LINE_TOO_LONG, line)
        if self._over_limit and name != "LOGOUT":
            self._read_rest(line, [], [], refuse=NOT_CONNECTED)
            return self._reply(tag, NOT_CONNECTED, line)
        literal = _LITERAL_AT_END.search(line)
        if self.b.capabilities and (name not in _SUPPORTED or (literal and literal.group(1) and name != "APPEND")):
            self._read_rest(line, [], [], refuse=UNSUPPORTED)
            return self._reply(tag, UNSUPPORTED, line)
        if not self._authenticated and name not in _PRE_AUTH:
            self._read_rest(line, [], [], refuse=INVALID_STATE)
            return self._reply(tag, INVALID_STATE, line)

        fault = self.front._take_fault(line)
        if fault and fault[0] == "refuse":
            refusal: _Refusal = fault[1]
            self._read_rest(line, [], [], refuse=refusal.reply)
            self._reply(tag, refusal.reply, line)
            if refusal.then_close:
                self._to_client(refusal.then_close + CRLF)
                raise SessionClosed("closed after the throttle")
            return
        drop: _Drop | None = fault[1] if fault else None
        if drop is not None and drop.when == "unsent":
            raise SessionClosed("dropped before the command reached Dovecot")

        if name == "APPEND":
            return self._append(tag, line, drop)
        texts, literals = [], []
        self._read_rest(line, texts, literals)
        prefix = len(head[0]) + 1 + len(head[1]) + (len(head[2]) + 1 if name.startswith("UID ") else 0)
        texts[0] = texts[0][prefix:]
        try:
            args = parse_tokens(texts, literals)
            handler = getattr(self, "_cmd_" + name.replace(" ", "_").lower(), None)
            if handler is None:
                return self._forward(tag, name, args, drop=drop)
            return handler(tag, name, args, line, drop)
        except ImapSyntaxError:
            return self._reply(tag, ARGUMENT_ERROR, line)

    # ---- upstream -----------------------------------------------------------------------------
    def _internal_command(self, command: bytes) -> list[_Response]:
        """A command of the front's own to Dovecot (e.g. LIST to match folder names); its
        untagged responses are returned, unrelated ones kept for the client's next reply."""
        self._internal += 1
        tag = b"OF%d" % self._internal
        self._upstream.sendall(tag + b" " + command + CRLF)
        found = []
        while True:
            response = self._read_response()
            if response.first.startswith(tag + b" "):
                return found
            if re.match(rb"\* (LIST|LSUB|STATUS) ", response.first):
                found.append(response)
            else:
                self._pending.append(response)

    def _forward(self, tag, name, args, *, drop=None, wire: bytes | None = None, plan=None, on_tagged=None) -> bytes:
        """Send the command to Dovecot; pass its responses on (rewritten) until the tagged one,
        which is returned (its status and text) after it is sent."""
        command = name.encode() + (b" " + dump(args, plus=True) if args else b"") if wire is None else wire
        self._upstream.sendall(tag + b" " + command + CRLF)
        while True:
            response = self._read_response()
            first = response.first
            if first.startswith(b"+"):
                self._to_client(response.wire())
                answer = self._from_client.readline()
                if not answer:
                    raise SessionClosed("the client left during a challenge")
                self._note_sasl(name, answer)
                self._upstream.sendall(answer)
                continue
            if first.startswith(tag + b" "):
                status_text = first[len(tag) + 1 :]
                if drop is not None and drop.when == "reply_lost":
                    raise SessionClosed("the tagged reply is lost")
                if on_tagged is not None:
                    on_tagged(status_text)
                self._flush_pending()
                self._to_client(tag + b" " + self._tagged_text(name, status_text) + CRLF)
                if drop is not None and drop.when == "after_reply":
                    if drop.bye:
                        self._to_client(drop.bye)
                    raise SessionClosed("closed after the reply")
                return status_text
            self._flush_pending()
            self._send_untagged(response, plan)

    def _tagged_text(self, name: str, status_text: bytes) -> bytes:
        """Dovecot's tagged reply in Exchange's words: "OK [code] FETCH completed.", "NO LOGIN
        failed.", BAD as Argument Error 11; no CAPABILITY response code."""
        status, _, text = status_text.partition(b" ")
        code = b""
        found = re.match(rb"(\[[^\]]*\])\s*", text)
        if found:
            code, text = found.group(1), text[found.end() :]
        if self.b.capabilities and code.upper().startswith(b"[CAPABILITY"):
            code = b""
        with_code = (code + b" ") if code else b""
        if not self.b.exchange_replies:
            return status + b" " + with_code + text
        verb = name.split()[-1].encode()
        if status.upper() == b"OK":
            return b"OK " + with_code + verb + b" completed."
        if status.upper() == b"NO" and name in ("LOGIN", "AUTHENTICATE"):
            return b"NO " + verb + b" failed."
        if status.upper() == b"BAD":
            return ARGUMENT_ERROR
        return status + b" " + with_code + text

    def _send_untagged(self, response: _Response, plan: _FetchPlan | None) -> None:
        first = response.first
        upper = first.upper()
        if self.b.capabilities:
            if upper.startswith(b"* CAPABILITY"):
                return
            if upper.startswith(b"* OK [CAPABILITY"):
                response = _Response([b"* OK" + first[first.find(b"]") + 1 :]] + response.texts[1:], response.literals)
        if upper.startswith(b"* BYE") and self.b.exchange_replies:
            response = _Response([b"* BYE Microsoft Exchange Server IMAP4 server signing off."], [])
        elif self.b.outlook_flags and upper.startswith(b"* FLAGS "):
            response = _Response([b"* FLAGS (" + b" ".join(OUTLOOK_FLAGS) + b")"], [])
        elif self.b.outlook_flags and upper.startswith(b"* OK [PERMANENTFLAGS"):
            response = _Response([b"* OK [PERMANENTFLAGS (" + b" ".join(OUTLOOK_FLAGS) + b")] Permanent flags"], [])
        elif upper.startswith(b"* OK [HIGHESTMODSEQ") or upper.startswith(b"* OK [NOMODSEQ"):
            return  # no CONDSTORE on Outlook
        elif re.match(rb"\* \d+ FETCH ", upper):
            response = self._rewrite_fetch(response, plan)
        elif self.b.case_insensitive_folders and re.match(rb"\* (LIST|LSUB) ", upper):
            response = self._rewrite_list(response)
        self._to_client(response.wire())

    # ---- logins -------------------------------------------------------------------------------
    def _note_sasl(self, name: str, answer: bytes) -> None:
        if name == "AUTHENTICATE" and self._pending_mechanism is not None and self._sasl_user is None:
            self._sasl_user = _sasl_user(self._pending_mechanism, answer.strip())

    _pending_mechanism: bytes | None = None
    _sasl_user: str | None = None

    def _logged_in(self, user: str | None):
        def on_tagged(status_text: bytes) -> None:
            if status_text.upper().startswith(b"OK"):
                self._authenticated = True
                if user is not None:
                    self._user = user.lower()
                    self._over_limit = not self.front._login(self._user)

        return on_tagged

    def _cmd_login(self, tag, name, args, line, drop):
        user = args[0].text.decode("utf-8", "replace") if args else None
        self._forward(tag, name, args, drop=drop, on_tagged=self._logged_in(user))

    def _cmd_authenticate(self, tag, name, args, line, drop):
        mechanism = args[0].upper() if args else b""
        if self.b.capabilities and mechanism not in (b"PLAIN", b"XOAUTH2"):
            return self._reply(tag, b"NO AUTHENTICATE failed.", line)
        self._pending_mechanism, self._sasl_user = mechanism, None
        if len(args) > 1:
            self._sasl_user = _sasl_user(mechanism, args[1].text)

        def on_tagged(status_text: bytes) -> None:
            self._logged_in(self._sasl_user)(status_text)

        self._forward(tag, name, args, drop=drop, on_tagged=on_tagged)

    def _cmd_capability(self, tag, name, args, line, drop):
        if not self.b.capabilities:
            return self._forward(tag, name, args, drop=drop)
        self._flush_pending()
        self._to_client(b"* CAPABILITY " + CAPABILITIES + CRLF + tag + b" OK CAPABILITY completed." + CRLF)

    def _cmd_starttls(self, tag, name, args, line, drop):
        self._reply(tag, INVALID_STATE, line)  # already TLS (imapsync FAQ.Exchange: "Invalid state")

    def _cmd_id(self, tag, name, args, line, drop):
        if not self.b.exchange_replies:
            return self._forward(tag, name, args, drop=drop)
        self._to_client(b"* ID NIL" + CRLF + tag + b" OK ID completed." + CRLF)

    def _cmd_logout(self, tag, name, args, line, drop):
        self._forward(tag, name, args, drop=drop)
        raise SessionClosed("logged out")

    # ---- folders ------------------------------------------------------------------------------
    def _folders(self) -> list[tuple[Tok, bytes, bytes]]:
        """(attributes, delimiter token raw, name) of every folder in Dovecot."""
        found = []
        for response in self._internal_command(b'LIST "" "*"'):
            toks = parse_tokens([response.texts[0][len(b"* LIST ") :], *response.texts[1:]], response.literals)
            if len(toks) >= 3:
                found.append((toks[0], dump([toks[1]], plus=False), toks[2].text))
        return found

    def _resolve(self, name: bytes) -> bytes:
        """The existing folder a name means on Outlook (case-insensitive; INBOX = Inbox)."""
        if not self.b.case_insensitive_folders:
            return name
        if name.upper() == b"INBOX":
            return b"INBOX"
        if name.upper().startswith(b"INBOX/"):
            name = b"INBOX" + name[5:]
        names = [n for _, _, n in self._folders()]
        if name in names:
            return name
        for existing in names:
            if existing.lower() == name.lower():
                return existing
        return name

    def _shown(self, name: bytes) -> bytes:
        if self.b.case_insensitive_folders and (name == b"INBOX" or name.startswith(b"INBOX/")):
            return b"Inbox" + name[5:]
        return name

    def _rewrite_list(self, response: _Response) -> _Response:
        keyword = response.first.split(b" ", 2)[1]
        toks = parse_tokens([response.texts[0][len(b"* LIST ") :], *response.texts[1:]], response.literals)
        if len(toks) < 3:
            return response
        toks[2] = astring(self._shown(toks[2].text))
        return _Response([b"* " + keyword + b" " + dump(toks, plus=False)], [])

    def _mailbox_arg(self, args: list[Tok], index: int) -> None:
        if len(args) > index:
            args[index] = astring(self._resolve(args[index].text))

    def _cmd_select(self, tag, name, args, line, drop):
        if self.b.capabilities and len(args) > 1:  # (CONDSTORE), (QRESYNC ...)
            return self._reply(tag, UNSUPPORTED, line)
        self._mailbox_arg(args, 0)
        self._forward(tag, name, args, drop=drop)

    _cmd_examine = _cmd_select

    def _cmd_create(self, tag, name, args, line, drop):
        if not args:
            return self._reply(tag, ARGUMENT_ERROR, line)
        wanted = args[0].text.rstrip(b"/")
        if any(wanted.lower() == r.lower().encode() for r in self.b.reserved_names):
            return self._reply(tag, RESERVED, line)
        if self.b.case_insensitive_folders:
            existing = [n.lower() for _, _, n in self._folders()] + [b"inbox"]
            if wanted.lower() in existing:
                return self._reply(tag, ALREADY_EXISTS, line)
            if wanted.upper().startswith(b"INBOX/"):
                args[0] = astring(b"INBOX" + wanted[5:])
        self._forward(tag, name, args, drop=drop)

    def _cmd_delete(self, tag, name, args, line, drop):
        self._mailbox_arg(args, 0)
        self._forward(tag, name, args, drop=drop)

    _cmd_subscribe = _cmd_unsubscribe = _cmd_delete

    def _cmd_rename(self, tag, name, args, line, drop):
        self._mailbox_arg(args, 0)
        self._forward(tag, name, args, drop=drop)

    def _cmd_status(self, tag, name, args, line, drop):
        if len(args) != 2 or args[1].kind != "list":
            return self._reply(tag, ARGUMENT_ERROR, line)
        if self.b.capabilities and any(t.upper() not in _STATUS_ITEMS for t in args[1].value):
            return self._reply(tag, UNSUPPORTED, line)  # STATUS (APPENDLIMIT), (HIGHESTMODSEQ), (SIZE)
        self._mailbox_arg(args, 0)
        self._forward(tag, name, args, drop=drop)

    def _cmd_list(self, tag, name, args, line, drop):
        if self.b.capabilities and (len(args) != 2 or any(t.kind == "list" for t in args)):
            return self._reply(tag, UNSUPPORTED, line)  # LIST-EXTENDED selection/return options
        if not self.b.case_insensitive_folders:
            return self._forward(tag, name, args, drop=drop)
        reference, pattern = args[0].text, args[1].text
        if pattern == b"":
            return self._forward(tag, name, args, drop=drop)
        regex = re.compile(
            b"".join(
                b".*" if c == b"*" else b"[^/]*" if c == b"%" else re.escape(c) for c in _chars(reference + pattern)
            )
            + b"$",
            re.IGNORECASE | re.DOTALL,
        )
        keyword = name.encode()
        folders = self._folders() if keyword == b"LIST" else self._lsub()
        for attributes, delimiter, folder in folders:
            shown = self._shown(folder)
            if regex.match(shown) or regex.match(folder):
                self._to_client(
                    b"* "
                    + keyword
                    + b" "
                    + dump([attributes], plus=False)
                    + b" "
                    + delimiter
                    + b" "
                    + dump([astring(shown)], plus=False)
                    + CRLF
                )
        self._reply(tag, b"OK " + keyword + b" completed.", line, refusal=False)

    def _lsub(self):
        found = []
        for response in self._internal_command(b'LSUB "" "*"'):
            toks = parse_tokens([response.texts[0][len(b"* LSUB ") :], *response.texts[1:]], response.literals)
            if len(toks) >= 3:
                found.append((toks[0], dump([toks[1]], plus=False), toks[2].text))
        return found

    _cmd_lsub = _cmd_list

    def _cmd_copy(self, tag, name, args, line, drop):
        self._mailbox_arg(args, 1)
        self._forward(tag, name, args, drop=drop)

    _cmd_move = _cmd_uid_copy = _cmd_uid_move = _cmd_copy

    # ---- messages -----------------------------------------------------------------------------
    def _cmd_store(self, tag, name, args, line, drop):
        if self.b.capabilities and len(args) > 3:  # (UNCHANGEDSINCE n)
            return self._reply(tag, UNSUPPORTED, line)
        if self.b.outlook_flags and len(args) == 3:
            flags = args[2].value if args[2].kind == "list" else [args[2]]
            args[2] = Tok("list", [t for t in flags if t.upper() in _SYSTEM_FLAGS])
        self._forward(tag, name, args, drop=drop)

    _cmd_uid_store = _cmd_store

    def _cmd_search(self, tag, name, args, line, drop):
        if self.b.capabilities and args and args[0].upper() == b"RETURN":
            return self._reply(tag, UNSUPPORTED, line)  # ESEARCH
        if self.b.estimated_size:
            _rewrite_sizes(args)
        self._forward(tag, name, args, drop=drop)

    _cmd_uid_search = _cmd_search

    def _cmd_fetch(self, tag, name, args, line, drop):
        if len(args) < 2:
            return self._reply(tag, ARGUMENT_ERROR, line)
        if self.b.capabilities and len(args) > 2:  # (CHANGEDSINCE n)
            return self._reply(tag, UNSUPPORTED, line)
        items = args[1].value if args[1].kind == "list" else [args[1]]
        names = [t.upper() for t in items]
        if self.b.capabilities and any(
            n.startswith((b"BINARY", b"MODSEQ", b"X-GM-", b"EMAILID", b"THREADID")) for n in names
        ):
            return self._reply(tag, UNSUPPORTED, line)
        plan = None
        if self.b.rebuilt_mime:
            plan, kept, seen = _FetchPlan(), [], False
            for tok, upper in zip(items, names):
                body = _body_item(tok.value if tok.kind == "atom" else b"")
                if body is None:
                    kept.append(tok)
                    continue
                reply_name, section, partial, peek = body
                plan.wanted.append((reply_name, section, partial))
                seen = seen or not peek
            if plan.wanted:
                kept.append(Tok("atom", b"BODY[]" if seen else b"BODY.PEEK[]"))
                args[1] = Tok("list", kept)
            else:
                plan = None
        self._forward(tag, name, args, drop=drop, plan=plan)

    _cmd_uid_fetch = _cmd_fetch

    def _rewrite_fetch(self, response: _Response, plan: _FetchPlan | None) -> _Response:
        head = re.match(rb"\* (\d+) FETCH ", response.texts[0])
        texts = [response.texts[0][head.end() :], *response.texts[1:]]
        try:
            toks = parse_tokens(texts, response.literals)
        except ImapSyntaxError:
            return response
        if len(toks) != 1 or toks[0].kind != "list":
            return response
        items, out = toks[0].value, []
        for key, value in zip(items[::2], items[1::2]):
            upper = key.upper() if key.kind == "atom" else b""
            if upper == b"RFC822.SIZE" and self.b.estimated_size:
                value = Tok("atom", b"%d" % estimated_size(int(value.text)))
            elif upper == b"FLAGS" and self.b.outlook_flags and value.kind == "list":
                value = Tok("list", [t for t in value.value if t.upper() in _SYSTEM_FLAGS])
            elif upper == b"BODY[]" and plan is not None:
                stored = value.text if value.kind != "atom" else b""
                rendered = render_exchange_mime(stored)
                for reply_name, section, partial in plan.wanted:
                    data = section_of(rendered, section)
                    if partial is not None:
                        data = data[partial[0] : partial[0] + partial[1]]
                    out += [Tok("atom", reply_name), Tok("literal", data)]
                continue
            out += [key, value]
        return _Response([b"* " + head.group(1) + b" FETCH " + dump([Tok("list", out)], plus=False)], [])

    def _append(self, tag: bytes, line: bytes, drop: _Drop | None) -> None:
        """APPEND mailbox [flags] [date] message: the checks Outlook makes, then to Dovecot."""
        start = len(tag) + len(b" APPEND")
        texts: list[bytes] = []
        literals: list[bytes] = []
        literal = _LITERAL_AT_END.search(line)
        if literal and not line[start : literal.start()].strip():  # the mailbox name is a literal
            texts.append(line[start : literal.start()])
            if not literal.group(3):
                self._to_client(b"+ Ready for additional command text." + CRLF)
            literals.append(self._read_exactly(int(literal.group(2))))
            line, start = self._from_client.readline(), 0
            literal = _LITERAL_AT_END.search(line)
        if not literal:
            return self._reply(tag, ARGUMENT_ERROR, line)
        binary, size, sync = bool(literal.group(1)), int(literal.group(2)), not literal.group(3)
        texts.append(line[start : literal.start()])
        refusal = None
        if binary and self.b.capabilities:
            refusal = UNSUPPORTED  # a literal8 (RFC 3516 BINARY): Outlook has no BINARY
        elif self.b.max_message_size is not None and size > self.b.max_message_size:
            refusal = TOO_LARGE  # said before the "+": the client need not send the message
        if refusal is not None:
            if not sync:
                self._read_exactly(size)
                self._read_rest(self._from_client.readline(), [], [], refuse=refusal)
            return self._reply(tag, refusal, line)
        if sync:
            self._to_client(b"+ Ready for additional command text." + CRLF)
        message = self._read_exactly(size)
        rest = self._from_client.readline()
        if rest.strip():  # MULTIAPPEND (RFC 3502): another message follows
            self._read_rest(rest, [], [], refuse=UNSUPPORTED)
            return self._reply(tag, UNSUPPORTED if self.b.capabilities else ARGUMENT_ERROR, line)
        if self.b.max_line_length is not None and any(
            len(x) > self.b.max_line_length for x in re.split(rb"\r\n|\n", message)
        ):
            return self._reply(tag, LINE_TOO_LONG, line)
        scripted = self.front._message_refusal(message)
        if scripted is not None:
            return self._reply(tag, scripted, line)
        try:
            args = parse_tokens(texts, literals)
            if not args:
                raise ImapSyntaxError("no mailbox")
            args[0] = astring(self._resolve(args[0].text))
        except ImapSyntaxError:
            return self._reply(tag, ARGUMENT_ERROR, line)
        if self.b.outlook_flags:
            for index, tok in enumerate(args):
                if tok.kind == "list":  # keywords Outlook does not keep are dropped, silently
                    args[index] = Tok("list", [t for t in tok.value if t.upper() in _SYSTEM_FLAGS])
        wire = b"APPEND " + dump(args, plus=True) + b" {%d+}\r\n" % size + message

        def on_tagged(status_text: bytes) -> None:
            if status_text.upper().startswith(b"OK"):
                with self.front._lock:
                    self.front.appends += 1
                    self.front.appended.append(message)

        self._forward(tag, "APPEND", [], drop=drop, wire=wire, on_tagged=on_tagged)

    # ---- IDLE ---------------------------------------------------------------------------------
    def _cmd_idle(self, tag, name, args, line, drop):
        self._upstream.sendall(tag + b" IDLE" + CRLF)
        done = threading.Event()

        def relay() -> None:
            try:
                while True:
                    response = self._read_response()
                    if response.first.startswith(tag + b" "):
                        self._to_client(tag + b" " + self._tagged_text("IDLE", response.first[len(tag) + 1 :]) + CRLF)
                        return
                    if response.first.startswith(b"+"):
                        self._to_client(b"+ IDLE accepted, awaiting DONE command." + CRLF)
                        continue
                    self._send_untagged(response, None)
            except (OSError, SessionClosed):
                self.close()
            finally:
                done.set()

        thread = threading.Thread(target=relay, name="outlook-front-idle", daemon=True)
        thread.start()
        self._client.settimeout(self.b.idle_timeout)
        try:
            answer = self._from_client.readline()
        except (TimeoutError, socket.timeout):
            with self.front._lock:
                self.front.idle_drops += 1
            raise SessionClosed("idle too long")
        finally:
            self._client.settimeout(None)
        if not answer:
            raise SessionClosed("client left during IDLE")
        self._upstream.sendall(answer)
        done.wait(30)
        thread.join(timeout=1)


def _chars(data: bytes):
    return [data[i : i + 1] for i in range(len(data))]


def _sasl_user(mechanism: bytes, initial: bytes) -> str | None:
    try:
        decoded = base64.b64decode(initial, validate=True)
    except (binascii.Error, ValueError):
        return None
    if mechanism == b"XOAUTH2":
        found = re.match(rb"user=([^\x01]*)\x01", decoded)
        return found.group(1).decode("utf-8", "replace").lower() if found else None
    if mechanism == b"PLAIN":
        parts = decoded.split(b"\0")
        return parts[1].decode("utf-8", "replace").lower() if len(parts) == 3 else None
    return None


def _body_item(item: bytes) -> tuple[bytes, bytes, tuple[int, int] | None, bool] | None:
    """(reply name, section, partial, peek) of a FETCH item that returns message text, else None."""
    upper = item.upper()
    simple = {b"RFC822": (b"RFC822", b"", False), b"RFC822.HEADER": (b"RFC822.HEADER", b"HEADER", True),
              b"RFC822.TEXT": (b"RFC822.TEXT", b"TEXT", False)}  # fmt: skip
    if upper in simple:
        reply, section, peek = simple[upper]
        return reply, section, None, peek
    found = re.fullmatch(rb"BODY(\.PEEK)?\[(.*)\](?:<(\d+)\.(\d+)>)?", item, re.I | re.S)
    if not found:
        return None
    section = found.group(2)
    partial = (int(found.group(3)), int(found.group(4))) if found.group(3) else None
    reply = b"BODY[" + section.upper() + b"]" + (b"<%d>" % partial[0] if partial else b"")
    return reply, section, partial, bool(found.group(1))


def _rewrite_sizes(tokens: list[Tok]) -> None:
    """SEARCH LARGER n / SMALLER n by the estimate: Dovecot is asked for the stored sizes whose
    estimate is > n / < n (the estimate is strictly increasing)."""
    for index, tok in enumerate(tokens):
        if tok.kind == "list":
            _rewrite_sizes(tok.value)
            continue
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if tok.kind != "atom" or following is None or following.kind != "atom" or not following.value.isdigit():
            continue
        number = int(following.value)
        if tok.upper() == b"LARGER":  # estimate > n  <=>  stored >= s, s the first reaching n+1
            tokens[index + 1] = Tok("atom", b"%d" % max(_first_stored_size_reaching(number + 1) - 1, 0))
        elif tok.upper() == b"SMALLER":  # estimate < n  <=>  stored < s, s the first reaching n
            tokens[index + 1] = Tok("atom", b"%d" % _first_stored_size_reaching(number))


@pytest.fixture
def outlook_front(test_ca):
    """``outlook_front(server, **switches) -> OutlookFront`` in front of a DovecotServer; closed
    after the test. Connect to ``127.0.0.1:front.port`` with IMAPS and the test CA. Switches are
    ``Behaviours`` fields (e.g. ``max_message_size=10_000``, ``rebuilt_mime=False``)."""
    fronts: list[OutlookFront] = []

    def make(server: DovecotServer, **switches) -> OutlookFront:
        front = OutlookFront(server, test_ca.server_context, **switches)
        fronts.append(front)
        return front

    yield make
    for front in fronts:
        front.close()
