"""The mailbox ports: what the pipeline reads from a source folder and writes to the destination.

`SourceMailbox` and `DestinationMailbox` are one folder's reads and the destination's writes;
`Mailboxes` is the consumer's way to them: sessions opened on first use, kept, and dropped after a
failure. The errors a use case acts on are here too: `AppendRejected` (a refusal, permanent or
not) and `MailboxThrottled` (stay away `retry_after` seconds); the adapters' errors subclass them.

Adapters over IMAP are in `shared.mailbox.imap` and `shared.mailbox.connections`; use cases
import this module only. The source is only ever read: EXAMINE and BODY.PEEK[] (DESIGN.md
guarantee 3).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared.errors import MailSyncerError
from shared.mailbox.identity import Headline, Identity, header_block
from shared.settings import Route

# The flags copied to the destination. \Recent belongs to a session and \Deleted would hide the
# copy; keywords (no backslash) are copied too where the destination accepts them.
SYSTEM_FLAGS_COPIED = ("\\Seen", "\\Flagged", "\\Answered", "\\Draft")


@dataclass(frozen=True)
class FolderState:
    uidvalidity: int
    uidnext: int | None
    exists: int


@dataclass(frozen=True)
class MessageSummary:
    """Light metadata for a fingerprint, fetched by the producer without the body."""

    uid: int
    size: int
    internaldate: dt.datetime
    message_id: str | None  # the Message-ID header's value, stripped; None when absent
    gmail_msgid: int | None = None  # X-GM-MSGID where the server has X-GM-EXT-1
    # sha256 (hex) of BODY[HEADER]: fetched only for a message with neither of the two above.
    header_sha256: str | None = None


@dataclass(frozen=True)
class SourceMessage:
    uid: int
    body: bytes  # BODY[] exactly as the source served it
    flags: tuple[str, ...]
    internaldate: dt.datetime  # timezone-aware


@dataclass(frozen=True)
class ListedMessage:
    """A message as a copy is told from its source without bytes or sizes (which a destination
    may re-render): its INTERNALDATE and identity headers (shared.mailbox.identity)."""

    uid: int
    internaldate: dt.datetime  # timezone-aware
    identity: Identity
    # From and Subject as written, for a person (a dry run lists them); not compared.
    headline: Headline | None = field(default=None, compare=False)


def copies_in(listed: Iterable[ListedMessage], message: SourceMessage) -> list[int]:
    """UIDs of the `listed` messages that are copies of `message`: the same INTERNALDATE (the
    instant its APPEND gave) and the same identity headers."""
    same_instant = [copy for copy in listed if copy.internaldate == message.internaldate]
    if not same_instant:
        return []
    wanted = Identity.of(header_block(message.body))
    return [copy.uid for copy in same_instant if wanted.same_as(copy.identity)]


@dataclass(frozen=True)
class UidFloor:
    """Where the next APPEND into a folder lands at the earliest: every message appended from
    now on gets a UID at or above `uid`, for as long as the folder keeps `uidvalidity`. Recorded
    before an APPEND, it bounds the search for that APPEND's copy after a crash."""

    uidvalidity: int
    uid: int


class AppendRejected(MailSyncerError):
    """The destination refused an APPEND, so it certainly did not land. `permanent`: it can
    never succeed (too large, NUL bytes without BINARY, lines too long), so the message is
    skipped with `reason`, not retried. `final_after`: a refusal that is most likely about the
    message but might be a glitch once (Outlook's "Command Argument Error. 11"): it is retried,
    and once the message has failed this many times (its failure record's attempts, this one
    included), skipped with `reason`. `retry_after`: seconds the destination asked us to stay
    away (a throttle), if it did."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        reason: str,
        retry_after: float | None = None,
        final_after: int | None = None,
    ):
        if final_after is not None and final_after < 1:
            raise ValueError("final_after: at least 1 attempt")
        self.permanent = permanent
        self.reason = reason
        self.retry_after = retry_after
        self.final_after = final_after
        super().__init__(message)


@dataclass(frozen=True)
class AppendAnswer:
    """What became of one APPEND of a batch (DestinationMailbox.append_many): it landed (at
    `uid`, where the server says), or was `refused` (certainly not stored), or got no answer:
    `failed` is why, and `sent` whether it went out (then it may have landed)."""

    landed: bool = False
    uid: int | None = None
    refused: AppendRejected | None = None
    failed: Exception | None = None
    sent: bool = True

    def uid_or_raise(self) -> int | None:
        """As `DestinationMailbox.append` answers: the UID, or the failure or refusal raised."""
        if self.failed is not None:
            raise self.failed
        if self.refused is not None:
            raise self.refused
        return self.uid


class MailboxThrottled(MailSyncerError):
    """The server asked to be left alone (Outlook's "Request is throttled", Gmail's bandwidth
    limits): not retried at once; the queue keeps the message away at least `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float, **kwargs) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)  # cooperative: an adapter's error may add its own fields


class DownloadQuotaSpent(MailboxThrottled):
    """The source account's download allowance for the day is used up (Gmail's "[OVERQUOTA]
    Account exceeded command or bandwidth limits"): it waits until its daily window has room
    again (shared.pipeline.budget), not just `retry_after`."""


class EndpointDown(MailboxThrottled):
    """A server the mailbox needs (its IMAP server, its token endpoint: `endpoint`) accepted
    connections and stopped answering, several tries in a row: the mailbox is paused like a
    throttle, for every route, and no message is charged an attempt for it."""

    def __init__(self, message: str, *, endpoint: str, retry_after: float, **kwargs) -> None:
        self.endpoint = endpoint
        super().__init__(message, retry_after=retry_after, **kwargs)


class SourceReader(Protocol):
    """A source folder as the consumer reads it: one message at a time."""

    def fetch(self, uid: int) -> SourceMessage | None:
        """`UID FETCH uid (BODY.PEEK[] FLAGS INTERNALDATE)`: the message, or None when the answer
        held none for `uid`. None is no proof that it is gone (servers slip): `has_uid` in a new
        session is."""

    def has_uid(self, uid: int) -> bool:
        """`UID SEARCH UID uid`: whether the folder holds the message, as this session sees it."""

    def fetch_many(self, uids: Sequence[int]) -> dict[int, SourceMessage]:
        """One `UID FETCH` of all `uids` (BODY.PEEK[] FLAGS INTERNALDATE): the messages served in
        full, by UID. A UID left out proves nothing, as with `fetch`."""


class SourceMailbox(SourceReader, Protocol):
    def examine(self, folder: str) -> FolderState:
        """EXAMINE (read-only SELECT) `folder`; later calls read from it."""

    def uids_above(self, last_uid: int) -> list[int]:
        """UIDs greater than `last_uid`, ascending (`UID SEARCH last_uid+1:*` always answers
        the highest UID, even when it is not above `last_uid`: it is filtered out)."""

    def uids_since(self, day: dt.date) -> list[int]:
        """UIDs of messages whose INTERNALDATE is on or after `day`, ascending."""

    def summaries(self, uids: Sequence[int]) -> list[MessageSummary]:
        """Summaries of the UIDs that still exist, in UID order."""

    def identities(self, uids: Sequence[int]) -> list[ListedMessage]:
        """INTERNALDATE and identity headers of the UIDs that still exist, in UID order."""


class DestinationMailbox(Protocol):
    def ensure_folder(self, folder: str) -> None:
        """Create `folder` (and its parents) if missing."""

    def append(self, folder: str, message: SourceMessage) -> int | None:
        """APPEND the exact bytes with the copied flags and INTERNALDATE; the new UID from
        APPENDUID, or None when the server has no UIDPLUS. Raises AppendRejected."""

    def append_many(self, folder: str, messages: Sequence[SourceMessage]) -> list[AppendAnswer]:
        """APPEND each message as `append` does, in order, without waiting for one answer before
        sending the next where the server allows it (LITERAL+): one answer per message, in the
        order given. Never raises for one message's fate: a refusal or a session lost midway is
        in its answer, and messages not sent after a loss are answered `sent=False`."""

    def uid_floor(self, folder: str) -> UidFloor | None:
        """Where an APPEND into `folder` made now lands at the earliest; None when the server does
        not say (no UIDNEXT). Asked before the APPEND and recorded with the claim."""

    def find_copies(self, folder: str, message: SourceMessage, since: UidFloor | None) -> list[int]:
        """UIDs in `folder` that hold a copy of `message` appended at or above `since` (the crash
        window: did an interrupted APPEND land?). A copy is known by its INTERNALDATE and its
        identity (`shared.mailbox.identity`), never by bytes or size: a server may re-render both.
        Without `since`, or when the folder's UIDVALIDITY is no longer `since`'s, the messages
        of the days around its INTERNALDATE are looked at instead."""

    def identities_since(self, folder: str, day: dt.date) -> list[ListedMessage]:
        """INTERNALDATE and identity headers of every message in `folder` whose INTERNALDATE
        is on or after `day`, in UID order; [] when the folder does not exist (reconcile)."""


class FolderWatch(Protocol):
    """A source folder watched on a session of its own (IMAP IDLE), for `drain --watch`."""

    def wait_for_change(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the server to report a change in the folder (a new
        message, an expunge, a flag); True if it did. Raises when the session is lost."""

    def close(self) -> None:
        """End the session; callable from another thread, to wake a `wait_for_change`."""


class Mailboxes(Protocol):
    """The consumer's sessions: one per route's source, one to the destination, opened on first
    use and kept across messages (and warm Lambda invocations)."""

    def source(self, route: Route) -> tuple[SourceReader, FolderState]:
        """The route's source folder, EXAMINEd, and its state when it was."""

    def destination(self) -> DestinationMailbox:
        """The destination, logged in."""

    def prepare_destination(self, folder: str) -> None:
        """Start logging in to the destination and readying `folder` while the caller goes on;
        `destination()` waits for it. Failures are left for `destination()`'s user to meet."""

    def drop_source(self, route: Route) -> None:
        """Forget the route's source session (it failed mid-command); the next use opens a new one."""

    def drop_destination(self) -> None:
        """Forget the destination session likewise."""


def fingerprint(summary: MessageSummary) -> str | None:
    """The `FP#` key of a message: Gmail's X-GM-MSGID where there is one, else a hash of
    Message-ID, INTERNALDATE and size; without a Message-ID, a hash of the whole header block,
    INTERNALDATE and size (INTERNALDATE and size alone could match two different messages, and
    a false match would drop one as a duplicate; a header block carries Received, Date and
    the like). None when the header block was not fetched."""
    if summary.gmail_msgid is not None:
        return f"gm:{summary.gmail_msgid}"
    instant = summary.internaldate.astimezone(dt.timezone.utc).isoformat()
    if summary.message_id:
        digest = hashlib.sha256(f"{summary.message_id}\n{instant}\n{summary.size}".encode()).hexdigest()
        return f"h:{digest[:40]}"
    if summary.header_sha256:
        digest = hashlib.sha256(f"header {summary.header_sha256}\n{instant}\n{summary.size}".encode()).hexdigest()
        return f"hh:{digest[:40]}"
    return None
