"""In-memory mailboxes behind the mailbox port (`shared.mailbox.port`), scriptable for faults.

- `FakeSource`: one Gmail account (its folders, with UIDVALIDITY, UIDNEXT and messages by UID)
  seen through one session; it implements `SourceMailbox`. `session()` opens another session on
  the same account: sessions share the folders, the faults and the call log, and each has its
  own EXAMINEd folder, as IMAP sessions do.
- `FakeDestination`: the Outlook mailbox; it implements `DestinationMailbox`.
- `FakeMailboxes`: the consumer's `Mailboxes` over them, counting opens and drops, and
  `open_source` for the producer's scan (`Callable[[Route], ContextManager[SourceMailbox]]`).

What they do as the IMAP adapters do: only the source's EXAMINEd folder is read and nothing in
the source ever changes; a `FolderState` is taken once per session (a consumer sees a
renumbering only after its session is dropped); APPEND stores the exact bytes, the INTERNALDATE
and the copied flags (system flags of SYSTEM_FLAGS_COPIED and keywords; \\Recent and \\Deleted
are not stored), returns a new UID (None without UIDPLUS), and refuses a folder that does not
exist; `find_copies` matches bytes and INTERNALDATE instant. What they do not: SEARCH SINCE
compares the INTERNALDATE's own calendar date (a server takes its own zone).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from shared.errors import MailSyncerError
from shared.mailbox.identity import Headline, Identity, header_block
from shared.mailbox.port import (
    SYSTEM_FLAGS_COPIED,
    AppendAnswer,
    AppendRejected,
    DownloadQuotaSpent,
    EndpointDown,
    FolderState,
    ListedMessage,
    MailboxThrottled,
    MessageSummary,
    SourceMessage,
    UidFloor,
    copies_in,
)
from shared.settings import Route
from tests.fakes.faults import Answer, FaultScript

# INTERNALDATE of a message added without one.
DEFAULT_INTERNALDATE = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
# How long a blocked APPEND waits for `release` before it fails (a test that forgot to release
# fails instead of hanging).
BLOCK_LIMIT_SECONDS = 10.0

SOURCE_OPERATIONS = frozenset({"examine", "uids_above", "uids_since", "summaries", "identities", "fetch", "fetch_many", "has_uid"})
DESTINATION_OPERATIONS = frozenset({"ensure_folder", "uid_floor", "append", "find_copies", "identities_since"})

_SYSTEM_FLAG_BY_LOWER = {flag.lower(): flag for flag in SYSTEM_FLAGS_COPIED}


class FakeMailboxError(MailSyncerError):
    """A failure of a fake mailbox (a missing folder, a blocked APPEND never released)."""


class ConnectionLost(FakeMailboxError):
    """The session broke mid-command: whether the command took effect is unknown."""


class FakeThrottled(MailboxThrottled):
    """The server asked to be left alone for `retry_after` seconds (as ImapThrottled does)."""


class FakeQuotaSpent(DownloadQuotaSpent):
    """The account's daily download allowance is spent (as Gmail's [OVERQUOTA], ImapQuotaSpent)."""


def email(
    subject: str = "Hello",
    *,
    message_id: str | None = "auto",
    body: str = "Hi there.",
    extra_headers: Sequence[str] = (),
) -> bytes:
    """A small RFC 5322 message with CRLF line ends. `message_id=None`: no Message-ID header."""
    if message_id == "auto":
        message_id = f"<{hashlib.sha256(subject.encode()).hexdigest()[:16]}@mail.test>"
    headers = ["From: Alice <alice@mail.test>", "To: Bob <bob@mail.test>", f"Subject: {subject}"]
    if message_id is not None:
        headers.append(f"Message-ID: {message_id}")
    headers.extend(extra_headers)
    return ("\r\n".join(headers) + "\r\n\r\n" + body + "\r\n").encode()


@dataclass(frozen=True)
class StoredMessage:
    uid: int
    body: bytes
    flags: tuple[str, ...]
    internaldate: dt.datetime
    gmail_msgid: int | None = None

    def as_source_message(self) -> SourceMessage:
        return SourceMessage(uid=self.uid, body=self.body, flags=self.flags, internaldate=self.internaldate)

    def listed(self, served: bytes | None = None) -> ListedMessage:
        """Its INTERNALDATE and the identity of the bytes a FETCH serves (`served`, else its own)."""
        block = header_block(served if served is not None else self.body)
        return ListedMessage(self.uid, self.internaldate, Identity.of(block), Headline.of(block))

    def summary(self) -> MessageSummary:
        """As the IMAP source makes it: the header block's hash only when there is no other identity."""
        message_id = _message_id(self.body)
        anonymous = message_id is None and self.gmail_msgid is None
        return MessageSummary(
            uid=self.uid,
            size=len(self.body),
            internaldate=self.internaldate,
            message_id=message_id,
            gmail_msgid=self.gmail_msgid,
            header_sha256=hashlib.sha256(_header_block(self.body)).hexdigest() if anonymous else None,
        )


@dataclass
class FakeFolder:
    uidvalidity: int
    uidnext: int = 1
    messages: dict[int, StoredMessage] = field(default_factory=dict)

    def state(self) -> FolderState:
        return FolderState(uidvalidity=self.uidvalidity, uidnext=self.uidnext, exists=len(self.messages))

    def store(self, body: bytes, flags: Sequence[str], internaldate: dt.datetime, gmail_msgid: int | None) -> int:
        if internaldate.tzinfo is None:
            raise ValueError("an INTERNALDATE has a zone: pass an aware datetime")
        uid = self.uidnext
        self.messages[uid] = StoredMessage(uid, bytes(body), tuple(flags), internaldate, gmail_msgid)
        self.uidnext += 1
        return uid

    def in_order(self) -> list[StoredMessage]:
        return [self.messages[uid] for uid in sorted(self.messages)]


# -- the source ---------------------------------------------------------------------------------


class _Account:
    """What the sessions of one source account share: the server's side."""

    def __init__(self, user: str, gmail_ids: bool) -> None:
        self.user = user
        self.gmail_ids = gmail_ids
        self.folders: dict[str, FakeFolder] = {}
        self.script = FaultScript(SOURCE_OPERATIONS)
        self.calls: list[tuple] = []
        self.sessions = 0
        self.unreadable: set[int] = set()  # UIDs whose FETCH fails (make_unreadable)
        self.lock = threading.RLock()
        self._uidvalidities = itertools.count(1001)
        self._gmail_msgids = itertools.count(1_700_000_000_000_000_001)

    def new_uidvalidity(self) -> int:
        return next(self._uidvalidities)

    def new_gmail_msgid(self) -> int:
        return next(self._gmail_msgids)


class FakeSource:
    """A session on a source account (implements SourceMailbox). Set the account up with
    `folder`/`add`/`expunge`/`renumber`; script faults with `fail_next`, `throttle_next`,
    `answer_next`, `fetch_answers_without_body`, `fetch_answers_with` and `before_next`; read
    `calls` to see what the code asked for."""

    def __init__(self, user: str = "alice@gmail.test", *, gmail_ids: bool = False, _account: _Account | None = None):
        # gmail_ids: the server has X-GM-EXT-1, so every message has an X-GM-MSGID.
        self._account = _account or _Account(user, gmail_ids)
        self._account.sessions += 1
        self._examined: str | None = None

    # -- the account, for the test ------------------------------------------------------------
    @property
    def user(self) -> str:
        return self._account.user

    @property
    def calls(self) -> list[tuple]:
        """Every port call of every session, in order: ("examine", folder), ("fetch", uid), ..."""
        return self._account.calls

    @property
    def sessions(self) -> int:
        """Sessions opened on the account (this one included)."""
        return self._account.sessions

    def calls_to(self, operation: str) -> list[tuple]:
        return [call for call in self._account.calls if call[0] == operation]

    def session(self) -> FakeSource:
        """Another session on the same account, with no folder EXAMINEd yet."""
        return FakeSource(_account=self._account)

    def folder(self, name: str = "INBOX", *, uidvalidity: int | None = None) -> FakeFolder:
        """The folder `name`, created (empty) if missing."""
        with self._account.lock:
            if name not in self._account.folders:
                self._account.folders[name] = FakeFolder(uidvalidity or self._account.new_uidvalidity())
            return self._account.folders[name]

    def add(
        self,
        folder: str = "INBOX",
        body: bytes | None = None,
        *,
        flags: Sequence[str] = (),
        internaldate: dt.datetime = DEFAULT_INTERNALDATE,
        gmail_msgid: int | None = None,
    ) -> int:
        """A message arrives in `folder`: its new UID."""
        with self._account.lock:
            target = self.folder(folder)
            if body is None:
                # Unique per account, folder and UID: distinct messages have distinct fingerprints.
                body = email(f"Message {target.uidnext} in {folder} of {self.user}")
            if gmail_msgid is None and self._account.gmail_ids:
                gmail_msgid = self._account.new_gmail_msgid()
            return target.store(body, flags, internaldate, gmail_msgid)

    def message(self, folder: str, uid: int) -> StoredMessage:
        return self._account.folders[folder].messages[uid]

    def expunge(self, folder: str, uid: int) -> None:
        """The user deletes a message (the syncer never does)."""
        with self._account.lock:
            del self._account.folders[folder].messages[uid]

    def renumber(self, folder: str = "INBOX", *, uidvalidity: int | None = None) -> dict[int, int]:
        """A new UIDVALIDITY: the messages are numbered again from 1, in order. Old UID -> new."""
        with self._account.lock:
            old = self._account.folders[folder]
            new = FakeFolder(uidvalidity or self._account.new_uidvalidity())
            mapping = {}
            for message in old.in_order():
                mapping[message.uid] = new.store(message.body, message.flags, message.internaldate, message.gmail_msgid)
            self._account.folders[folder] = new
            return mapping

    # -- faults -------------------------------------------------------------------------------
    def fail_next(self, operation: str, error: BaseException, times: int = 1, *, after: int = 0) -> None:
        """After `after` calls that work, `times` calls to `operation` raise `error`."""
        self._account.script.raise_(operation, error, times, after=after)

    def throttle_next(self, operation: str, retry_after: float, times: int = 1) -> None:
        """As Gmail's "[OVERQUOTA] bandwidth limits": MailboxThrottled with `retry_after`."""
        self.fail_next(operation, FakeThrottled(f"{self.user}: {operation} throttled", retry_after=retry_after), times)

    def quota_spent_next(self, operation: str, times: int = 1) -> None:
        """As Gmail's "NO [OVERQUOTA] Account exceeded command or bandwidth limits"."""
        error = FakeQuotaSpent(f"{self.user}: {operation}: [OVERQUOTA] Account exceeded command or bandwidth limits", retry_after=60)
        self.fail_next(operation, error, times)

    def answer_next(self, operation: str, value: object, times: int = 1) -> None:
        """E.g. `answer_next("has_uid", True)`: the operation returns `value` instead."""
        self._account.script.answer(operation, value, times)

    def make_unreadable(self, uid: int) -> None:
        """Every FETCH of `uid` fails, as for a message file the server cannot read; a FETCH of
        several that includes it fails as a whole."""
        self._account.unreadable.add(uid)

    def make_readable(self, uid: int) -> None:
        self._account.unreadable.discard(uid)

    def fetch_answers_without_body(self, times: int = 1) -> None:
        """The next FETCHes are answered OK without the body (no data, or "BODY[] NIL"), whether
        or not the message is still there."""
        self.answer_next("fetch", None, times)

    def fetch_answers_with(self, folder: str, uid: int, times: int = 1) -> None:
        """The next FETCHes are answered with the message at `uid` of `folder` (another UID's
        data), whatever UID was asked for."""
        self._account.script.queue("fetch", lambda: Answer(self.message(folder, uid).as_source_message()), times)

    def before_next(self, operation: str, action: Callable[[], None], times: int = 1) -> None:
        """Run `action` (a change of the world, another process's step) just before the operation."""

        def step() -> None:
            action()

        self._account.script.queue(operation, step, times)

    # -- SourceMailbox --------------------------------------------------------------------------
    def examine(self, folder: str) -> FolderState:
        answer = self._begin("examine", folder)
        if answer is not None:
            return answer.value
        with self._account.lock:
            found = self._account.folders.get(folder)
            if found is None:
                raise FakeMailboxError(f"{self.user}: EXAMINE {folder!r}: NO [NONEXISTENT] Mailbox doesn't exist")
            self._examined = folder
            return found.state()

    def uids_above(self, last_uid: int) -> list[int]:
        answer = self._begin("uids_above", last_uid)
        if answer is not None:
            return answer.value
        with self._account.lock:
            return sorted(uid for uid in self._selected().messages if uid > last_uid)

    def uids_since(self, day: dt.date) -> list[int]:
        answer = self._begin("uids_since", day)
        if answer is not None:
            return answer.value
        with self._account.lock:
            return sorted(uid for uid, message in self._selected().messages.items() if message.internaldate.date() >= day)

    def summaries(self, uids: Sequence[int]) -> list[MessageSummary]:
        answer = self._begin("summaries", tuple(uids))
        if answer is not None:
            return answer.value
        with self._account.lock:
            messages = self._selected().messages
            return [messages[uid].summary() for uid in sorted(set(uids)) if uid in messages]

    def identities(self, uids: Sequence[int]) -> list[ListedMessage]:
        answer = self._begin("identities", tuple(uids))
        if answer is not None:
            return answer.value
        with self._account.lock:
            messages = self._selected().messages
            return [messages[uid].listed() for uid in sorted(set(uids)) if uid in messages]

    def fetch(self, uid: int) -> SourceMessage | None:
        answer = self._begin("fetch", uid)
        if answer is not None:
            return answer.value
        if uid in self._account.unreadable:
            raise FakeMailboxError(f"{self.user}: UID FETCH {uid} answered NO [SERVERBUG] Internal error")
        with self._account.lock:
            message = self._selected().messages.get(uid)
            return message.as_source_message() if message is not None else None

    def fetch_many(self, uids: Sequence[int]) -> dict[int, SourceMessage]:
        """As one FETCH of them all: a fault scripted for "fetch" of any one fails the lot."""
        answer = self._begin("fetch_many", tuple(uids))
        if answer is not None:
            return answer.value
        fetched = {uid: self.fetch(uid) for uid in uids}
        return {uid: message for uid, message in fetched.items() if message is not None}

    def has_uid(self, uid: int) -> bool:
        answer = self._begin("has_uid", uid)
        if answer is not None:
            return answer.value
        with self._account.lock:
            return uid in self._selected().messages

    def _begin(self, operation: str, argument: object) -> Answer | None:
        self._account.calls.append((operation, argument))
        return self._account.script.before(operation)

    def _selected(self) -> FakeFolder:
        if self._examined is None:
            raise FakeMailboxError(f"{self.user}: no folder EXAMINEd in this session")
        found = self._account.folders.get(self._examined)
        if found is None:
            raise FakeMailboxError(f"{self.user}: folder {self._examined!r} was deleted")
        return found


# -- the destination ------------------------------------------------------------------------------


class AppendGate:
    """Holds one APPEND until `release()`: the test sees it start, acts meanwhile, lets it go."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self._released = threading.Event()

    def wait_until_started(self, timeout: float = 5.0) -> None:
        if not self.started.wait(timeout):
            raise AssertionError(f"the APPEND did not start within {timeout} s")

    def release(self) -> None:
        self._released.set()

    def _hold(self) -> None:
        self.started.set()
        if not self._released.wait(BLOCK_LIMIT_SECONDS):
            raise FakeMailboxError(f"APPEND blocked for {BLOCK_LIMIT_SECONDS} s and never released")


class FakeDestination:
    """The destination mailbox (implements DestinationMailbox). `uidplus=False`: APPEND returns
    no UID, as on a server without UIDPLUS. Script faults with `refuse_next_append`,
    `throttle_next`, `lose_connection_in_next_append`, `block_next_append`, `fail_next`,
    `before_next`; read `calls`, `appends` and `messages(folder)`."""

    def __init__(
        self,
        *,
        uidplus: bool = True,
        folders: Sequence[str] = (),
        served: Callable[[bytes], bytes] = lambda stored: stored,
    ) -> None:
        self.uidplus = uidplus
        # What a FETCH serves of the stored bytes: unchanged, or rebuilt as Exchange does.
        self.served = served
        self.folders: dict[str, FakeFolder] = {}
        self.calls: list[tuple] = []
        self._script = FaultScript(DESTINATION_OPERATIONS)
        self._after_store: list[Callable[[], None]] = []  # steps of the next APPENDs, after storing
        self._lock = threading.RLock()
        self._uidvalidities = itertools.count(5001)
        for name in folders:
            self.create_folder(name)

    # -- for the test -------------------------------------------------------------------------
    def create_folder(self, name: str) -> FakeFolder:
        with self._lock:
            if name not in self.folders:
                self.folders[name] = FakeFolder(next(self._uidvalidities))
            return self.folders[name]

    def messages(self, folder: str) -> list[StoredMessage]:
        """What the folder holds, in UID order ([] when it does not exist)."""
        with self._lock:
            found = self.folders.get(folder)
            return found.in_order() if found else []

    def bodies(self, folder: str) -> list[bytes]:
        return [message.body for message in self.messages(folder)]

    @property
    def appends(self) -> int:
        """APPEND commands sent, whatever became of them."""
        return sum(1 for call in self.calls if call[0] == "append")

    def calls_to(self, operation: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == operation]

    # -- faults -------------------------------------------------------------------------------
    def refuse_next_append(
        self,
        reason: str,
        *,
        permanent: bool,
        retry_after: float | None = None,
        final_after: int | None = None,
        times: int = 1,
    ) -> None:
        """A tagged NO: nothing stored. As the IMAP adapter reports it (AppendRejected;
        `final_after` as for Outlook's Command Error 10 and Argument Error 11)."""
        error = AppendRejected(
            f"APPEND answered NO ({reason})",
            permanent=permanent,
            reason=reason,
            retry_after=retry_after,
            final_after=final_after,
        )
        self._script.raise_("append", error, times)

    def throttle_next(self, operation: str, retry_after: float, times: int = 1) -> None:
        """MailboxThrottled (not a refusal), as ImapThrottled from a throttled session."""
        self._script.raise_(operation, FakeThrottled(f"destination: {operation} throttled", retry_after=retry_after), times)

    def lose_connection_in_next_append(self, *, landed: bool) -> None:
        """The connection breaks during the APPEND: after the message was stored (`landed`) or
        before the server got it. Either way the client sees only ConnectionLost."""
        error = ConnectionLost("destination: connection lost during APPEND")
        if landed:
            with self._lock:
                self._after_store.append(lambda: _raise(error))
        else:
            self._script.raise_("append", error)

    def block_next_append(self) -> AppendGate:
        gate = AppendGate()
        self._script.queue("append", lambda: gate._hold())
        return gate

    def fail_next(self, operation: str, error: BaseException, times: int = 1, *, after: int = 0) -> None:
        """After `after` calls that work, `times` calls to `operation` raise `error`."""
        self._script.raise_(operation, error, times, after=after)

    def before_next(self, operation: str, action: Callable[[], None], times: int = 1) -> None:
        def step() -> None:
            action()

        self._script.queue(operation, step, times)

    # -- DestinationMailbox ---------------------------------------------------------------------
    def ensure_folder(self, folder: str) -> None:
        answer = self._begin("ensure_folder", folder)
        if answer is None:
            self.create_folder(folder)

    def append(self, folder: str, message: SourceMessage) -> int | None:
        answer = self._begin("append", (folder, message.uid))
        if answer is not None:
            return answer.value
        with self._lock:
            target = self.folders.get(folder)
            if target is None:
                reason = "refused for now by the destination: [TRYCREATE] Mailbox doesn't exist"
                raise AppendRejected(f"APPEND to {folder!r} answered NO {reason}", permanent=False, reason=reason)
            uid = target.store(message.body, _copied_flags(message.flags), message.internaldate, None)
            after = self._after_store.pop(0) if self._after_store else None
        if after is not None:
            after()
        return uid if self.uidplus else None

    def append_many(self, folder: str, messages: Sequence[SourceMessage]) -> list[AppendAnswer]:
        """As pipelined APPENDs: each answered by its own fate; after a lost connection the rest
        were sent (pipelined) and have no answer."""
        answers: list[AppendAnswer] = []
        for message in messages:
            if answers and answers[-1].failed is not None and not isinstance(answers[-1].failed, MailboxThrottled):
                answers.append(AppendAnswer(failed=answers[-1].failed, sent=True))
                continue
            try:
                answers.append(AppendAnswer(landed=True, uid=self.append(folder, message)))
            except AppendRejected as refused:
                answers.append(AppendAnswer(refused=refused))
            except EndpointDown as down:  # timed out: it may have landed
                answers.append(AppendAnswer(failed=down, sent=True))
            except MailboxThrottled as throttled:
                answers.append(AppendAnswer(failed=throttled, sent=False))
            except Exception as lost:  # noqa: BLE001 - the session's end, as the port reports it
                answers.append(AppendAnswer(failed=lost, sent=True))
        return answers

    def uid_floor(self, folder: str) -> UidFloor | None:
        answer = self._begin("uid_floor", folder)
        if answer is not None:
            return answer.value
        with self._lock:
            found = self.folders.get(folder)
            return UidFloor(found.uidvalidity, found.uidnext) if found else None

    def find_copies(self, folder: str, message: SourceMessage, since: UidFloor | None) -> list[int]:
        """As the port says: INTERNALDATE and identity of what the server serves, at or above
        `since` while the folder keeps its UIDVALIDITY (else every message: the fake has no
        date window to narrow by)."""
        answer = self._begin("find_copies", (folder, message.uid, since))
        if answer is not None:
            return answer.value
        if message.internaldate.tzinfo is None:
            raise ValueError("find_copies needs a timezone-aware internaldate")
        with self._lock:
            found = self.folders.get(folder)
            lowest = since.uid if since is not None and found is not None and found.uidvalidity == since.uidvalidity else 1
        listed = [stored.listed(self.served(stored.body)) for stored in self.messages(folder) if stored.uid >= lowest]
        return copies_in(listed, message)

    def identities_since(self, folder: str, day: dt.date) -> list[ListedMessage]:
        answer = self._begin("identities_since", (folder, day))
        if answer is not None:
            return answer.value
        return [stored.listed(self.served(stored.body)) for stored in self.messages(folder) if stored.internaldate.date() >= day]

    def _begin(self, operation: str, argument: object) -> Answer | None:
        with self._lock:
            self.calls.append((operation, argument))
        return self._script.before(operation)


# -- the consumer's sessions, and the producer's ------------------------------------------------


class FakeMailboxes:
    """`Mailboxes` over fake accounts: a source session per route (EXAMINEd once, kept until
    dropped, as the IMAP connections keep theirs) and one destination session.

    `sources`: one FakeSource serving every route, or FakeSources by Gmail user."""

    def __init__(self, sources: FakeSource | Mapping[str, FakeSource], destination: FakeDestination | None = None):
        self._sources = sources
        self.destination_mailbox = destination or FakeDestination()
        self._sessions: dict[str, tuple[FakeSource, FolderState]] = {}
        self._destination_open = False
        self.sources_opened: list[str] = []  # route names, each time a source session was opened
        self.source_drops: Counter[str] = Counter()  # by route name
        self.destinations_opened = 0
        self.destinations_prepared: list[str] = []
        self.destination_drops = 0

    def account(self, route: Route) -> FakeSource:
        if isinstance(self._sources, FakeSource):
            return self._sources
        return self._sources[route.gmail_user]

    # -- Mailboxes ------------------------------------------------------------------------------
    def source(self, route: Route) -> tuple[FakeSource, FolderState]:
        if route.name not in self._sessions:
            session = self._open_source(route)
            try:
                folder = session.examine(route.gmail_folder)
            except Exception:
                self.drop_source(route)
                raise
            self._sessions[route.name] = (session, folder)
        return self._sessions[route.name]

    def destination(self) -> FakeDestination:
        if not self._destination_open:
            self._destination_open = True
            self.destinations_opened += 1
        return self.destination_mailbox

    def prepare_destination(self, folder: str) -> None:
        self.destinations_prepared.append(folder)  # the real one logs in early; here, nothing to wait for

    def drop_source(self, route: Route) -> None:
        self._sessions.pop(route.name, None)
        self.source_drops[route.name] += 1

    def drop_destination(self) -> None:
        self._destination_open = False
        self.destination_drops += 1

    # -- the producer's way in (scan's `open_source`) --------------------------------------------
    @contextmanager
    def open_source(self, route: Route) -> Iterator[FakeSource]:
        """A source session for one scan of `route`, dropped if the scan fails with it."""
        session = self._open_source(route)
        try:
            yield session
        except BaseException:
            self.source_drops[route.name] += 1
            raise

    def _open_source(self, route: Route) -> FakeSource:
        self.sources_opened.append(route.name)
        return self.account(route).session()


# -- helpers --------------------------------------------------------------------------------------


def _raise(error: BaseException) -> None:
    raise error


def _copied_flags(flags: Sequence[str]) -> tuple[str, ...]:
    copied = []
    for flag in flags:
        system_flag = _SYSTEM_FLAG_BY_LOWER.get(flag.lower())
        if system_flag is not None:
            copied.append(system_flag)
        elif not flag.startswith("\\"):
            copied.append(flag)  # a keyword
    return tuple(dict.fromkeys(copied))


def _header_block(body: bytes) -> bytes:
    """BODY[HEADER]: the header lines and the blank line after them."""
    for end in (b"\r\n\r\n", b"\n\n"):
        at = body.find(end)
        if at >= 0:
            return body[: at + len(end)]
    return body


def _message_id(body: bytes) -> str | None:
    unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", _header_block(body))
    for line in unfolded.splitlines():
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"message-id":
            return value.strip().decode("utf-8", "replace") or None
    return None
