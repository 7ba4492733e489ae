"""Telling a copy in the destination from its source message when the destination re-renders it.

Outlook.com (Exchange Online) stores no MIME: a FETCH returns MIME rebuilt from its own store,
and RFC822.SIZE is an estimate (imapsync's FAQ.Exchange.txt: use --skipsize with Exchange). So
bytes and sizes cannot find an earlier copy after a crash. What Exchange keeps are properties:
the Message-ID (InternetMessageId), the Date instant (sent time), the sender's address and the
subject text; INTERNALDATE (received time) is the one the APPEND gave. An `Identity` holds those
as a re-rendering leaves them: Date as an instant, addresses without display names, the subject
decoded from RFC 2047 with white space folded.

`Identity.of(header_block)` reads them from a header block; `source.same_as(candidate)` says
whether a destination message is how a server may render a copy of the source. Only what the
source has is compared: a server may add a Message-ID the source lacked, and a Date or From
the source had in a form nobody can parse is left out rather than guessed at.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from dataclasses import dataclass
from email.header import decode_header, make_header

# The fields an identity is read from: what a FETCH of the destination asks for.
FIELDS = ("MESSAGE-ID", "DATE", "FROM", "SUBJECT")

_FOLDED_LINE = re.compile(rb"\r?\n(?=[ \t])")
_WHITE_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Identity:
    message_id: str | None  # stripped, as written; None when absent
    date: dt.datetime | None  # the Date header's instant (UTC); None when absent or unreadable
    senders: frozenset[str]  # From's addr-specs, lower case; empty when absent or unreadable
    subject: str | None  # decoded, white space folded, case folded; None when absent
    # The subject had raw 8-bit bytes with no declared charset: a server may guess another
    # charset, so only its ASCII letters and digits are compared.
    subject_undeclared_8bit: bool = False

    @classmethod
    def of(cls, header_block: bytes) -> Identity:
        fields = _fields(header_block)
        subject = fields.get("subject")
        return cls(
            message_id=_message_id(fields.get("message-id")),
            date=_instant(fields.get("date")),
            senders=_addresses(fields.get("from")),
            subject=None if subject is None else _text(subject),
            subject_undeclared_8bit=subject is not None and any(byte > 0x7F for byte in subject),
        )

    @property
    def described(self) -> bool:
        """Whether it has a Date, a sender or a subject (a Message-ID alone may be the server's)."""
        return self.date is not None or bool(self.senders) or bool(self.subject)

    def same_as(self, candidate: Identity) -> bool:
        """Whether `candidate` (a destination message's headers) may be a rendering of this one."""
        if self.described and not candidate.described:
            # The server could not read this header block (a malformed line ends it for some
            # parsers) and served one without Date, From and Subject, and its own Message-ID:
            # nothing here can tell; the INTERNALDATE and the UID floor have to.
            return True
        if self.message_id is not None and candidate.message_id != self.message_id:
            return False
        if self.date is not None and candidate.date != self.date:
            return False
        if self.senders and candidate.senders != self.senders:
            return False
        if self.subject is not None and self.subject:
            if self.subject_undeclared_8bit or candidate.subject_undeclared_8bit:
                return _ascii_words(self.subject) == _ascii_words(candidate.subject or "")
            return candidate.subject == self.subject
        return True


def header_block(message: bytes) -> bytes:
    """The header block of a whole message: up to the first empty line (CRLF or bare LF)."""
    message = message.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark some writers put first
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = message.find(separator)
        if end != -1:
            return message[: end + len(separator)]
    return message


def _fields(block: bytes) -> dict[str, bytes]:
    """The first occurrence of each field, unfolded (a later duplicate is a server's addition)."""
    fields: dict[str, bytes] = {}
    for line in _FOLDED_LINE.sub(b"", block).splitlines():
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.rstrip() or b" " in name:
            continue
        fields.setdefault(name.decode("ascii", "replace").lower(), value.strip())
    return fields


def _message_id(value: bytes | None) -> str | None:
    if not value:
        return None
    return value.decode("utf-8", "replace").strip() or None


def _instant(value: bytes | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value.decode("ascii", "replace"))
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None  # "-0000" or no zone: the instant is unknown, so it is not compared
    return parsed.astimezone(dt.timezone.utc)


@dataclass(frozen=True)
class Headline:
    """A message as a person reads it in a list: From and Subject decoded, as written (a dry
    run's listing), never compared."""

    sender: str  # "" when absent
    subject: str  # "" when absent

    @classmethod
    def of(cls, header_block: bytes) -> Headline:
        fields = _fields(header_block)
        sender, subject = fields.get("from"), fields.get("subject")
        return cls(
            sender=_WHITE_SPACE.sub(" ", _decoded(sender)).strip() if sender else "",
            subject=_WHITE_SPACE.sub(" ", _decoded(subject)).strip() if subject else "",
        )


def _addresses(value: bytes | None) -> frozenset[str]:
    if not value:
        return frozenset()
    text = _decoded(value)
    found = {address.strip().lower() for _, address in email.utils.getaddresses([text]) if "@" in address}
    return frozenset(found)


def _text(value: bytes) -> str:
    return _WHITE_SPACE.sub(" ", _decoded(value)).strip().casefold()


def _decoded(value: bytes) -> str:
    """RFC 2047 words decoded; raw 8-bit bytes read as UTF-8 (RFC 6532), else kept replaced."""
    text = value.decode("utf-8", "replace")
    try:
        return str(make_header(decode_header(text)))
    except (LookupError, ValueError, UnicodeError):
        return text  # an unknown charset or a broken encoded word: compared as written


def _ascii_words(text: str) -> str:
    return "".join(character for character in text if character.isascii() and character.isalnum())
