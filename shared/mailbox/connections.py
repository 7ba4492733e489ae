"""IMAP sessions kept open for reuse: one per route's source, one to the destination (and one
more to the destination per lane: `drain` copies the routes of several accounts at once).

A warm Lambda container or a long `drain` reuses them across messages and invocations. A
session idle for a while, or with unread input (a server says BYE before it closes one), is
checked with NOOP before use and reopened when the server closed it; a session that failed
mid-operation is dropped, and the next use opens a new one.

The consumer's FETCH and APPEND (and the folder steps before an APPEND) go through
`ReopeningSource` and `ReopeningDestination`: a transient failure (connection lost, timed out,
BYE, [UNAVAILABLE]) is tried again on a new session under `retry.COMMAND`. An APPEND is tried
again only when it certainly did not land: refused with a tagged NO, or failed before it was
sent. A throttle is not tried again here; the queue waits it out (`retry_after`).

A timed-out command counts against its server (`shared.mailbox.session.ENDPOINTS`). When its
retries end on a timeout (or, an APPEND, it is not repeated), a new session is opened before the
failure is given up: if the server does not answer that either, it is down, and the caller gets
`ImapEndpointDown` (a pause of the mailbox) instead of a failure charged to the message.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import select
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import imapclient

from shared.errors import ImapFailure
from shared.mailbox import retry
from shared.mailbox.imap import ImapDestination, ImapSource
from shared.mailbox.port import (
    AppendAnswer,
    AppendRejected,
    EndpointDown,
    FolderState,
    ListedMessage,
    SourceMessage,
    UidFloor,
)
from shared.mailbox.session import (
    ImapAccount,
    ImapTimedOut,
    TransientImapFailure,
    close_quietly,
    open_session,
    timeout_counted,
)
from shared.redaction import scrub
from shared.settings import Route

log = logging.getLogger("mail_syncer.connections")

T = TypeVar("T")

# Servers drop idle sessions (Gmail after ~10 minutes of silence, some far sooner).
IDLE_CHECK_SECONDS = 60.0


@dataclass
class _Session:
    client: imapclient.IMAPClient
    # One adapter per session, so what it caches (folders seen, their flags) lasts as long.
    mailbox: ImapSource | ImapDestination
    last_used: float
    folder: FolderState | None = None


class MailboxConnections:
    def __init__(
        self,
        source_account: Callable[[Route], ImapAccount],
        destination_account: Callable[[], ImapAccount],
        *,
        sessions_per_source_account: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source_account = source_account
        self._destination_account = destination_account
        # Gmail refuses a login past 15 sessions of one account ("Too many simultaneous
        # connections"): the routes of one account share this many, least recently used first out.
        self._per_account = sessions_per_source_account
        self._clock = clock
        self._sources: dict[str, _Session] = {}  # by route
        self._source_users: dict[str, str] = {}  # route -> the account its session is logged in as
        # The source sessions are shared with the lanes (see lanes): each route's is used by one
        # thread at a time, and this guards the dicts (and the start of prepare_destination).
        self._lock = threading.RLock()
        self._lanes: list[MailboxConnections] = []
        self._set_aside: dict[str, int] = {}  # account -> its sessions kept for other uses (IDLE)
        self._destination: _Session | None = None
        self._preparing: threading.Thread | None = None  # see prepare_destination
        self._prepare_failure: Exception | None = None

    def source(self, route: Route) -> tuple[ReopeningSource, FolderState]:
        """For the consumer: the route's source with its folder EXAMINEd, and the folder's state
        then; its FETCH reopens the session on a transient failure."""
        _, folder = self._examined_source(route)
        return ReopeningSource(self, route, folder), folder

    def destination(self) -> ReopeningDestination:
        """For the consumer: the destination, logged in; a transient failure reopens the session."""
        self._destination_adapter()
        return ReopeningDestination(self)

    def prepare_destination(self, folder: str) -> None:
        """Log in to the destination and make `folder` ready to append to (made if missing,
        SELECTed), in a thread of its own, while the caller goes on with a source: at 100 ms
        that is half a second off a run. The next use of the destination waits for it, and
        meets what failed here (retried as ever, see ReopeningDestination) as its own failure,
        so that a destination that does not answer costs no more tries than before."""
        with self._lock:  # scans of several accounts may ask at once
            if self._destination is not None or self._preparing is not None:
                return
            self._prepare_failure = None
            self._preparing = threading.Thread(target=self._prepare, args=(folder,), name="destination-login", daemon=True)
            self._preparing.start()

    def _prepare(self, folder: str) -> None:
        try:
            destination = self.destination()
            destination.ensure_folder(folder)
            destination.uid_floor(folder)
        except Exception as exc:  # noqa: BLE001 - see prepare_destination
            self._prepare_failure = exc

    def _prepared(self, *, raise_failure: bool = False) -> None:
        """Wait for prepare_destination's thread (unless this is it): one session, one user."""
        preparing = self._preparing
        if preparing is None or preparing is threading.current_thread():
            return
        preparing.join()
        self._preparing = None
        failure, self._prepare_failure = self._prepare_failure, None
        if failure is not None and raise_failure:
            raise failure

    def lanes(self, count: int) -> list[MailboxConnections]:
        """Connections for `count` more threads copying at the same time as this one's, the
        same ones each time asked (their sessions are kept): the same source sessions (a
        route's is used by one thread at a time: the routes of one account go through one
        thread, see copy_batch), a destination session each of their own."""
        while len(self._lanes) < count:
            lane = copy.copy(self)
            lane._destination, lane._preparing, lane._prepare_failure = None, None, None
            self._lanes.append(lane)
        return self._lanes[:count]

    def _source_session(self, route: Route) -> _Session:
        with self._lock:
            session = self._sources.get(route.name)
        if session is not None and not self._alive(session):
            self.drop_source(route)
            session = None
        if session is None:
            account = self._source_account(route)
            with self._lock:
                self._make_room_for(account.user)
            client = open_session(account)
            with self._lock:
                session = self._sources[route.name] = _Session(client, ImapSource(client, account), self._clock())
                self._source_users[route.name] = account.user
        return session

    def _examined_source(self, route: Route) -> tuple[ImapSource, FolderState]:
        session = self._source_session(route)
        source = session.mailbox
        assert isinstance(source, ImapSource)
        if session.folder is None:
            try:
                session.folder = source.examine(route.gmail_folder)
            except ImapFailure as exc:
                self.drop_source(route)  # the session may be broken; the next use opens a new one
                if isinstance(exc, ImapTimedOut):
                    raise timeout_counted(self._source_account(route), exc) from None
                raise
        session.last_used = self._clock()
        return source, session.folder

    def _destination_adapter(self) -> ImapDestination:
        self._prepared(raise_failure=True)
        session = self._destination
        closing = session is not None and isinstance(session.mailbox, ImapDestination) and session.mailbox.closing
        if session is not None and (closing or not self._alive(session)):
            self.drop_destination()
            session = None
        if session is None:
            account = self._destination_account()
            client = open_session(account)
            session = self._destination = _Session(client, ImapDestination(client, account), self._clock())
        session.last_used = self._clock()
        assert isinstance(session.mailbox, ImapDestination)
        return session.mailbox

    @contextmanager
    def borrowed_source(self, route: Route) -> Iterator[ImapSource]:
        """For the producer: the source session, dropped if anything goes wrong with it. The
        borrower EXAMINEs the folder itself, afresh each run (UIDNEXT and UIDVALIDITY may have
        changed); the consumer then goes on in the folder so EXAMINEd, without another."""
        session = self._source_session(route)
        source = session.mailbox
        assert isinstance(source, ImapSource)
        session.folder = None
        try:
            yield source
        except BaseException:
            self.drop_source(route)
            raise
        session.folder = source.examined(route.gmail_folder)
        session.last_used = self._clock()

    def set_aside(self, user: str, sessions: int) -> int:
        """Keep up to `sessions` of the account's budget out of this pool, for sessions opened
        elsewhere that count against the same limit (`drain --watch`'s IDLE sessions). The pool
        keeps at least one; returns how many were set aside."""
        granted = sessions if self._per_account is None else max(0, min(sessions, self._per_account - 1))
        self._set_aside[user] = granted
        return granted

    def _make_room_for(self, user: str) -> None:
        """Log out the account's least recently used session while it has its budget's worth."""
        if self._per_account is None:
            return
        budget = self._per_account - self._set_aside.get(user, 0)
        while True:
            open_ = [name for name, owner in self._source_users.items() if owner == user and name in self._sources]
            if len(open_) < budget:
                return
            oldest = min(open_, key=lambda name: self._sources[name].last_used)
            _logout_quietly(self._sources.pop(oldest).client)
            del self._source_users[oldest]

    def drop_source(self, route: Route) -> None:
        with self._lock:
            self._source_users.pop(route.name, None)
            session = self._sources.pop(route.name, None)
        if session is not None:
            close_quietly(session.client)

    def drop_destination(self) -> None:
        self._prepared()
        if self._destination is not None:
            close_quietly(self._destination.client)
            self._destination = None

    def close(self, *, abruptly: bool = False) -> None:
        """LOGOUT of every session; `abruptly`: the sockets only closed (an interrupted run: a
        LOGOUT could land in an APPEND's unfinished literal and wait out the timeout)."""
        sessions = []
        for connections in (self, *self._lanes):
            if not abruptly:
                connections._prepared()
            if connections._destination is not None:
                sessions.append(connections._destination.client)
                connections._destination = None
        with self._lock:
            sessions += [session.client for session in self._sources.values()]
            self._sources.clear()
            self._source_users.clear()
        for client in sessions:
            (close_quietly if abruptly else _logout_quietly)(client)

    def _unless_down(self, timed_out: ImapTimedOut, reopen: Callable[[], object]) -> ImapFailure:
        """After a command timed out for good: `timed_out`, or the ImapEndpointDown a new session
        (`reopen`) meets when the server does not answer that either. Whether the command itself
        had an effect (an APPEND) stays unknown either way."""
        try:
            reopen()
        except EndpointDown as down:
            assert isinstance(down, ImapFailure)
            return down
        except ImapFailure:
            pass  # it answered, if only to refuse: the command's own failure stands
        return timed_out

    def _alive(self, session: _Session) -> bool:
        if self._clock() - session.last_used < IDLE_CHECK_SECONDS and not _has_unread_input(session.client):
            return True
        try:
            session.client.noop()
            return True
        except Exception:  # noqa: BLE001 - any failure means: open a new session
            log.info("an idle IMAP session was closed by the server; reopening")
            return False


class ReopeningSource:
    """The route's source for the consumer: `fetch` and `has_uid` on the current session, and on
    a new one (same folder, same UIDVALIDITY) after a transient failure."""

    def __init__(self, connections: MailboxConnections, route: Route, folder: FolderState) -> None:
        self._connections = connections
        self._route = route
        self._uidvalidity = folder.uidvalidity

    def fetch(self, uid: int) -> SourceMessage | None:
        return self._call(lambda source: source.fetch(uid), f"fetch UID {uid}")

    def has_uid(self, uid: int) -> bool:
        return self._call(lambda source: source.has_uid(uid), f"search UID {uid}")

    def fetch_many(self, uids: Sequence[int]) -> dict[int, SourceMessage]:
        return self._call(lambda source: source.fetch_many(uids), f"fetch {len(uids)} UIDs")

    def _call(self, operation: Callable[[ImapSource], T], what: str) -> T:
        """`operation` (read-only, so safe to repeat) on the session, and on a new one after a
        transient failure: only while the folder keeps the UIDVALIDITY the reference was made
        under, else the UID may name another message now (the copy fails and its retry sees why)."""

        def attempt() -> T:
            source, folder = self._connections._examined_source(self._route)
            if folder.uidvalidity != self._uidvalidity:
                raise ImapFailure(
                    scrub(
                        f"route {self._route.name} source: UIDVALIDITY changed from {self._uidvalidity} "
                        f"to {folder.uidvalidity} while reconnecting to {what}"
                    ),
                    step="examine",
                )
            try:
                return operation(source)
            except ImapFailure as exc:
                self._connections.drop_source(self._route)  # it may be in the middle of a reply
                if isinstance(exc, ImapTimedOut):
                    raise timeout_counted(self._connections._source_account(self._route), exc) from None
                raise

        try:
            return retry.call(retry.COMMAND, attempt, retry_on=_transient, what=f"route {self._route.name} source: {what}")
        except ImapTimedOut as timed_out:
            raise self._connections._unless_down(
                timed_out, lambda: self._connections._examined_source(self._route)
            ) from None


class ReopeningDestination:
    """The destination for the consumer, its steps tried again on a new session after a
    transient failure; APPEND only when it certainly did not land."""

    def __init__(self, connections: MailboxConnections) -> None:
        self._connections = connections

    def ensure_folder(self, folder: str) -> None:
        self._call(lambda destination: destination.ensure_folder(folder), _transient, f"create folder {folder!r}")

    def uid_floor(self, folder: str) -> UidFloor | None:
        return self._call(lambda destination: destination.uid_floor(folder), _transient, f"select {folder!r}")

    def find_copies(self, folder: str, message: SourceMessage, since: UidFloor | None) -> list[int]:
        # Read-only, so safe to repeat.
        return self._call(
            lambda destination: destination.find_copies(folder, message, since),
            _transient,
            f"find copies of source UID {message.uid} in {folder!r}",
        )

    def identities_since(self, folder: str, day: dt.date) -> list[ListedMessage]:
        return self._call(
            lambda destination: destination.identities_since(folder, day), _transient, f"list messages of {folder!r}"
        )

    def append(self, folder: str, message: SourceMessage) -> int | None:
        (answer,) = self.append_many(folder, [message])  # one path for one message and many
        return answer.uid_or_raise()

    def append_many(self, folder: str, messages: Sequence[SourceMessage]) -> list[AppendAnswer]:
        """Each message's answer. Those that certainly did not land (a transient refusal such as
        [UNAVAILABLE], or not sent before the session was lost) are sent again on a new session
        under retry.COMMAND; one sent without an answer is not: it may have landed. A timeout
        counts against the server, which may be found down (the answer's failure says so)."""
        answers: dict[int, AppendAnswer] = {}
        pending = list(range(len(messages)))

        def attempt() -> None:
            nonlocal pending
            batch = [messages[index] for index in pending]
            try:
                got = self._call(lambda destination: destination.append_many(folder, batch), _transient, "APPEND")
            except Exception as exc:  # noqa: BLE001 - before anything was sent (session, SELECT)
                answers.update((index, AppendAnswer(failed=exc, sent=False)) for index in pending)
                raise
            if any(answer.failed is not None for answer in got):
                self._connections.drop_destination()  # lost midway: it may be in the middle of a reply
            answers.update(zip(pending, got))
            pending = [index for index, answer in zip(pending, got) if _append_worth_resending(answer)]
            if pending:
                answer = answers[pending[0]]
                raise answer.refused or answer.failed  # type: ignore[misc]

        what = f"APPEND of {len(messages)} messages to {folder!r}"
        try:
            retry.call(retry.COMMAND, attempt, retry_on=_append_certainly_not_landed, what=f"destination: {what}")
        except Exception:  # noqa: BLE001 - the answers say what became of each
            pass
        # Timeouts of the APPENDs themselves (those before them were counted by _call).
        timed_out = [
            index
            for index, answer in answers.items()
            if isinstance(answer.failed, ImapTimedOut) and answer.failed.step == "append"
        ]
        if timed_out:
            account = self._connections._destination_account()
            counted = timeout_counted(account, answers[timed_out[0]].failed)  # type: ignore[arg-type]
            if isinstance(counted, ImapTimedOut):
                counted = self._connections._unless_down(counted, self._connections._destination_adapter)
            for index in timed_out:
                answers[index] = replace(answers[index], failed=counted)
        return [answers[index] for index in range(len(messages))]

    def _call(self, operation: Callable[[ImapDestination], T], retry_on: Callable[[BaseException], bool], what: str) -> T:
        def attempt() -> T:
            destination = self._connections._destination_adapter()
            try:
                return operation(destination)
            except ImapFailure as exc:
                self._connections.drop_destination()  # it may be in the middle of a reply
                if isinstance(exc, ImapTimedOut):
                    raise timeout_counted(self._connections._destination_account(), exc) from None
                raise

        try:
            return retry.call(retry.COMMAND, attempt, retry_on=retry_on, what=f"destination: {what}")
        except ImapTimedOut as timed_out:
            raise self._connections._unless_down(timed_out, self._connections._destination_adapter) from None


def _transient(error: BaseException) -> bool:
    return isinstance(error, TransientImapFailure)


def _append_certainly_not_landed(error: BaseException) -> bool:
    if isinstance(error, AppendRejected):
        # A tagged NO: nothing was stored. [UNAVAILABLE], [INUSE] and Exchange's "Server
        # Unavailable. 15" pass in a moment; a throttle (retry_after) is waited out by the
        # queue, not here.
        return not error.permanent and error.retry_after is None and retry.says_transient(error.reason)
    # Lost before the APPEND went out (capability, select). Once it was sent, whether it landed is
    # unknown: the copy fails and the next try looks in the destination first.
    return isinstance(error, TransientImapFailure) and error.step != "append"


def _append_worth_resending(answer: AppendAnswer) -> bool:
    if answer.refused is not None:
        return _append_certainly_not_landed(answer.refused)
    return answer.failed is not None and not answer.sent and isinstance(answer.failed, TransientImapFailure)


def _has_unread_input(client: imapclient.IMAPClient) -> bool:
    """Between commands a server only speaks to say something unasked, like BYE before it
    closes the session; a closed connection reads as input too."""
    try:
        sock = client.socket()
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):  # already closed
        return True


def _logout_quietly(client: imapclient.IMAPClient) -> None:
    """LOGOUT sent and the socket closed, its answer not waited for: nothing is left to learn
    from the session, and the wait was a round trip at the end of every run."""
    try:
        imap = client._imap
        imap.send(imap._new_tag() + b" LOGOUT\r\n")
    except Exception:  # noqa: BLE001 - the session ends either way
        pass
    close_quietly(client)
