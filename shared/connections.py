"""IMAP sessions kept open for reuse: one per route's source, one to the destination.

A warm Lambda container or a long `drain` reuses them across messages and invocations. A
session idle for a while is checked with NOOP before use and reopened when the server closed
it; a session that failed mid-operation is dropped, and the next use opens a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import imapclient

from shared.imap import ImapAccount, open_session
from shared.imap_mailbox import ImapDestination, ImapSource
from shared.mailbox import FolderState
from shared.settings import Route

log = logging.getLogger("mail_syncer.connections")

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source_account = source_account
        self._destination_account = destination_account
        self._clock = clock
        self._sources: dict[str, _Session] = {}
        self._destination: _Session | None = None

    def source(self, route: Route) -> tuple[ImapSource, FolderState]:
        """The route's source with its folder EXAMINEd, and the folder's state then."""
        session = self._sources.get(route.name)
        if session is not None and not self._alive(session):
            self.drop_source(route)
            session = None
        if session is None:
            account = self._source_account(route)
            client = open_session(account)
            session = self._sources[route.name] = _Session(client, ImapSource(client, account), self._clock())
        source = session.mailbox
        assert isinstance(source, ImapSource)
        if session.folder is None:
            session.folder = source.examine(route.gmail_folder)
        session.last_used = self._clock()
        return source, session.folder

    def destination(self) -> ImapDestination:
        session = self._destination
        if session is not None and not self._alive(session):
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
        """For the producer: the source session, dropped if anything goes wrong with it."""
        source, _ = self.source(route)
        try:
            yield source
        except BaseException:
            self.drop_source(route)
            raise
        finally:
            # The producer EXAMINEs afresh each run (UIDNEXT and UIDVALIDITY may have changed).
            session = self._sources.get(route.name)
            if session is not None:
                session.folder = None

    def drop_source(self, route: Route) -> None:
        session = self._sources.pop(route.name, None)
        if session is not None:
            _close_quietly(session.client)

    def drop_destination(self) -> None:
        if self._destination is not None:
            _close_quietly(self._destination.client)
            self._destination = None

    def close(self) -> None:
        for session in self._sources.values():
            _logout_quietly(session.client)
        self._sources.clear()
        if self._destination is not None:
            _logout_quietly(self._destination.client)
            self._destination = None

    def _alive(self, session: _Session) -> bool:
        if self._clock() - session.last_used < IDLE_CHECK_SECONDS:
            return True
        try:
            session.client.noop()
            return True
        except Exception:  # noqa: BLE001 - any failure means: open a new session
            log.info("an idle IMAP session was closed by the server; reopening")
            return False


def _close_quietly(client: imapclient.IMAPClient) -> None:
    try:
        client.shutdown()
    except Exception:  # noqa: BLE001 - abandoning it anyway
        pass


def _logout_quietly(client: imapclient.IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # noqa: BLE001
        _close_quietly(client)
