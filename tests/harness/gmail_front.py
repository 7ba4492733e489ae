"""A Gmail IMAP front in front of one of the harness's Dovecot servers (the "gmail" one).

The client sees Gmail's IMAP dialect; Dovecot behind stores the messages. Like ``outlook_front``
(whose wire syntax it shares through ``imap_wire``), the front takes IMAPS with the test
certificate (the code under test connects to it as to Dovecot, TLS verified), talks clear text
to Dovecot's plain port, reads each command whole (line and literals), then answers it itself or
forwards it (literals re-sent non-synchronising) and rewrites Dovecot's responses. One command at
a time per session; IDLE and AUTHENTICATE's challenges are relayed as they come. Logins (LOGIN,
AUTHENTICATE XOAUTH2 with or without SASL-IR) are Dovecot's.

``make(server, **switches)`` (the ``gmail_front`` fixture) gives a ``GmailFront`` with ``.host``,
``.port`` and ``.behaviours`` (a ``Behaviours``: each behaviour switchable on its own; the defaults
are a real, healthy Gmail account; tests may change them while the front runs). Sources are in
the comments of ``Behaviours`` and of the constants. In short:

1. CAPABILITY is Gmail's (before and after login; no LITERAL+, LITERAL- enforced), greeting and
   reply texts are Gmail's ("OK Success", "(Failure)");
2. X-GM-EXT-1: FETCH X-GM-MSGID / X-GM-THRID / X-GM-LABELS and SEARCH by them. X-GM-MSGID is one
   id per message, the same in every folder it is in: for messages stored with ``deliver`` the
   id ``deliver`` gave; for any other, derived from the user and the stored bytes;
3. labels are folders: ``deliver(user, message, labels=...)`` stores one message in INBOX (unless
   archived or sent), in each label's folder and in ``[Gmail]/All Mail`` (and ``[Gmail]/Sent
   Mail`` if sent); LIST carries SPECIAL-USE attributes, ``[Gmail]`` is ``\\Noselect``; XLIST;
   ``locale`` names the system folders as a German or Russian account does, same attributes;
4. a per-account download budget, counted on the literals of FETCH responses; past it every
   command answers ``NO [OVERQUOTA] ...`` until ``reset_quota()`` or ``quota_window`` passes;
5. at most ``max_connections`` logged-in sessions per account: the next login answers
   ``NO [ALERT] Too many simultaneous connections. (Failure)``;
6. ``* BYE Session expired, please login again.`` (scripted), ``OK Success [THROTTLED]``
   (``throttled``), and the "Folder size limits" setting (``folder_size_limit``): a folder shows
   only its newest N messages (EXISTS, sequence numbers, SEARCH, FETCH, STATUS MESSAGES);
7. an IDLE running past ``idle_timeout`` seconds ends with that BYE (off unless set).

Every system folder exists from an account's first login through the front (or ``deliver``).

One-shot faults (thread-safe, used up as they fire): ``refuse(match, reply, times)``,
``expire_session(match, nth)`` (the BYE at a command), ``expire_sessions(user)`` (the BYE now).
Quota: ``reset_quota(user)``, ``exceed_quota(user)``; ``clock`` may be replaced (time passing).

Recorded for tests: ``connections`` (accepted), ``logins`` (successful logins per user),
``sessions(user)`` (logged in now), ``peak_sessions`` (most at once, per user), ``served`` (bytes
of FETCH literals sent, per user, in the current quota window), ``served_total`` (per user, ever),
``commands`` (each command's first line, no literals), ``idles_ended`` (IDLEs ended by
``idle_timeout``), ``refused`` ((line, reply) the front gave itself), ``refused_at``, ``sent(match)``.

Not modelled: X-GM-RAW (Dovecot answers BAD), STORE of X-GM-LABELS, COMPRESS (advertised, as
Gmail does; Dovecot refuses it), APPENDLIMIT enforcement, ESEARCH results under a folder size limit,
Trash and Spam (``deliver`` refuses those labels).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import TYPE_CHECKING

import pytest
from imapclient import imap_utf7

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

# ---- what Gmail says ------------------------------------------------------------------------------
# imap.gmail.com's CAPABILITY before login and after it, from protocol logs of the real server:
# https://github.com/jstedfast/MailKit/issues/1396 (both lines, 2022), the same post-login line in
# https://github.com/home-assistant/core/issues/155699 and in public code that records the server's
# answer. Since about 2020 there is no LITERAL+ (Google's own page,
# https://developers.google.com/gmail/imap/imap-extensions, still shows an older line with it).
CAPABILITIES_BEFORE_LOGIN = (
    b"IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 XYZZY SASL-IR "
    b"AUTH=XOAUTH2 AUTH=PLAIN AUTH=PLAIN-CLIENTTOKEN AUTH=OAUTHBEARER AUTH=XOAUTH"
)
CAPABILITIES = (
    b"IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 UIDPLUS COMPRESS=DEFLATE "
    b"ENABLE MOVE CONDSTORE ESEARCH UTF8=ACCEPT LIST-EXTENDED LIST-STATUS LITERAL- SPECIAL-USE "
    b"APPENDLIMIT=35651584"
)
# The greeting and the texts of replies (Google's imap-extensions page above; MailKit #1396:
# "OK Thats all she wrote!" to CAPABILITY, "<user> authenticated (Success)" to a login, "OK
# Success" otherwise; Gmail transcripts in mscdex/node-imap's tests (test/test-connection-fetch-dup.js):
# "OK [READ-ONLY] INBOX selected. (Success)", "* BYE LOGOUT Requested", "OK 73 good day (Success)").
GREETING = b"* OK Gimap ready for requests from 127.0.0.1 m7mb61234567front"
# The ID answer shown on Google's imap-extensions page.
ID_ANSWER = (
    b'* ID ("name" "GImap" "vendor" "Google, Inc." "support-url" "https://support.google.com/mail" '
    b'"remote-host" "127.0.0.1")'
)
# Over the IMAP download limit: https://github.com/ljmerza/ha-email-sensor/issues/16 ("FETCH =>
# [OVERQUOTA] Account exceeded command or bandwidth limits."), the same in
# https://github.com/mailcow/mailcow-dockerized/issues/1554; the "(Failure)" every Gmail NO ends with
# as reported in issue 12.
OVERQUOTA = b"NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)"
# The login over the per-account connection limit: https://github.com/zone-eu/wildduck/issues/35
# ("a login ... a NO [ALERT] Too many simultaneous connections. (Failure)"),
# https://github.com/dinhvh/libetpan/pull/160 (Gmail's login response), https://github.com/mordak/runt/issues/1.
TOO_MANY_CONNECTIONS = b"NO [ALERT] Too many simultaneous connections. (Failure)"
# A refused login (LOGIN, or AUTHENTICATE after its error challenge):
# https://github.com/jstedfast/MailKit/issues/1276 (a log of imap.gmail.com),
# https://github.com/getmail6/getmail6/issues/236.
INVALID_CREDENTIALS = b"NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
# imapsync FAQ.d/FAQ.Gmail.txt ("How Gmail says limits are reached? This is either a
# disconnection with "BYE Session expired, please login again" ..."); issue 12.
SESSION_EXPIRED = b"* BYE Session expired, please login again."
# Tagged OKs of a throttled account: "A00000002 OK Success [THROTTLED]" in
# https://github.com/jstedfast/MailKit/issues/1396, https://github.com/mscdex/node-imap/issues/593.
THROTTLED = b" [THROTTLED]"
# Gmail's FLAGS, and PERMANENTFLAGS on SELECT (() on EXAMINE): transcripts of imap.gmail.com in
# public parser tests ("* FLAGS (\Answered \Flagged \Draft \Deleted \Seen $NotPhishing $Phishing)",
# "[PERMANENTFLAGS (... $Phishing \*)] Flags permitted.").
GMAIL_FLAGS = b"(\\Answered \\Flagged \\Draft \\Deleted \\Seen $NotPhishing $Phishing)"
GMAIL_PERMANENTFLAGS = b"(\\Answered \\Flagged \\Draft \\Deleted \\Seen $NotPhishing $Phishing \\*)"
# RFC 7888 section 4 (LITERAL-): a non-synchronising literal is at most 4096 octets; a larger one
# makes the command fail with BAD (the text is ours).
LITERAL_MINUS_MAX = 4096
LITERAL_TOO_BIG = b"BAD [TOOBIG] Non-synchronizing literal over 4096 bytes (Failure)"
# Gmail's bandwidth limit for IMAP downloads: 2,500 MB a day (https://support.google.com/a/answer/1071518,
# quoted in imapsync FAQ.d/FAQ.Gmail.txt: "Download with IMAP: 2500 MB per day";
# https://github.com/chatwoot/chatwoot/issues/6082: the account is blocked for a day).
GMAIL_DOWNLOAD_PER_DAY = 2_500_000_000
# 15 simultaneous IMAP connections per account: https://support.google.com/mail/answer/97150 as
# quoted by the imapsync maintainer in https://github.com/imapsync/imapsync/issues/61.
GMAIL_MAX_CONNECTIONS = 15
# "Folder size limits" (Settings > Forwarding and POP/IMAP): the values the Gmail API's
# ImapSettings.maxFolderSize allows (https://developers.google.com/gmail/api/reference/rest/v1/ImapSettings:
# "0, 1000, 2000, 5000 or 10000"); imapsync FAQ.d/FAQ.Gmail.txt "I can't sync more than 1000
# messages in each Gmail folder" (the default is "Do not limit").
FOLDER_SIZE_LIMITS = (1000, 2000, 5000, 10000)

# ---- folders -------------------------------------------------------------------------------------
# RFC 6154 attributes of Gmail's system folders and their names. English: Google's imap-extensions
# page (its LIST transcript: [Gmail], \All "[Gmail]/All Mail", \Drafts, \Important, \Sent "[Gmail]/Sent
# Mail", \Junk "[Gmail]/Spam", \Flagged "[Gmail]/Starred", \Trash "[Gmail]/Trash") and imapsync
# FAQ.d/FAQ.Gmail.txt ("Host1: special [Gmail]/All Mail = \All" ...). Localised names: imapsync
# FAQ.d/FAQ.Gmail.txt ("[Gmail]/Sent Mail" may be "Gesendet", "Enviado", ... "on both sides";
# "[Google Mail]" in Germany); Russian: the LIST output in https://github.com/ikvk/imap_tools/pull/43.
SPECIAL_USES = ("\\All", "\\Drafts", "\\Important", "\\Sent", "\\Junk", "\\Flagged", "\\Trash")
LOCALES: dict[str, tuple[str, dict[str, str]]] = {
    "en": (
        "[Gmail]",
        {"\\All": "All Mail", "\\Drafts": "Drafts", "\\Important": "Important", "\\Sent": "Sent Mail",
         "\\Junk": "Spam", "\\Flagged": "Starred", "\\Trash": "Trash"},
    ),
    "de": (
        "[Google Mail]",
        {"\\All": "Alle Nachrichten", "\\Drafts": "Entwürfe", "\\Important": "Wichtig", "\\Sent": "Gesendet",
         "\\Junk": "Spam", "\\Flagged": "Markiert", "\\Trash": "Papierkorb"},
    ),
    "ru": (
        "[Gmail]",
        {"\\All": "Вся почта", "\\Drafts": "Черновики", "\\Important": "Важное", "\\Sent": "Отправленные",
         "\\Junk": "Спам", "\\Flagged": "Помеченные", "\\Trash": "Корзина"},
    ),
}  # fmt: skip
# X-GM-LABELS names the system labels (Google's imap-extensions page: "\Inbox \Sent Important";
# \Important, \Starred, \Draft, \Sent, \Inbox); All Mail is no label.
_SYSTEM_LABEL = {"\\Drafts": "\\Draft", "\\Important": "\\Important", "\\Sent": "\\Sent",
                 "\\Flagged": "\\Starred", "\\Trash": "\\Trash", "\\Junk": "\\Spam"}  # fmt: skip
_LABEL_FOLDER = {label: use for use, label in _SYSTEM_LABEL.items()}
# XLIST (Gmail's older LIST, still in its CAPABILITY): \Inbox, \AllMail, \Spam, \Starred
# (https://developers.google.com/gmail/imap/imap-extensions, "XLIST is deprecated").
_XLIST_ATTRIBUTE = {"\\All": "\\AllMail", "\\Junk": "\\Spam", "\\Flagged": "\\Starred"}


@dataclass
class Behaviours:
    """Each of the front's behaviours. The defaults are a real Gmail account in good standing:
    Gmail's dialect on, its limits at their documented values, its account settings at their
    defaults (no folder size limit, not throttled). ``None`` turns a limit off."""

    # 1. Gmail's CAPABILITY before and after login (constants above); the post-login list comes
    #    as an untagged CAPABILITY before the login's OK, as imap.gmail.com sends it (MailKit #1396).
    capabilities: bool = True
    #    LITERAL-, not LITERAL+: a non-synchronising literal over 4096 bytes is refused (RFC 7888).
    literal_minus: bool = True
    #    Gmail's greeting, reply texts ("OK Success", "... (Failure)"), FLAGS, ID, LOGOUT (above).
    gmail_replies: bool = True
    # 2. X-GM-EXT-1 (https://developers.google.com/gmail/imap/imap-extensions): FETCH X-GM-MSGID (a
    #    64-bit id, the same for a message in every folder: "a unique message ID ... across
    #    multiple folders"), X-GM-THRID (the thread), X-GM-LABELS; SEARCH X-GM-MSGID, X-GM-THRID,
    #    X-GM-LABELS.
    x_gm_ext: bool = True
    #    X-GM-LABELS leaves out the label of the folder it is fetched from:
    #    https://github.com/dlech/gmailbuttons/issues/10 ("The response from the server for FETCH
    #    (X-GM-LABELS) does not include the selected folder").
    omit_selected_label: bool = True
    # 3. SPECIAL-USE attributes (RFC 6154) on every LIST, LSUB and XLIST answer ("All LIST responses
    #    contain these special-use attributes; this is not a new CAPABILITY and does not need to be
    #    ENABLEd", imap-extensions page); "[Gmail]" is \Noselect \HasChildren; LIST (SPECIAL-USE)
    #    lists only those.
    special_use: bool = True
    #    The names of the system folders: "en" ([Gmail]/All Mail ...), "de" ([Google Mail]/Alle
    #    Nachrichten ...), "ru" ([Gmail]/Вся почта ...). Only the names change, not the attributes.
    locale: str = "en"
    # 4. Bytes of FETCH literals per account and window; past it, OVERQUOTA to every command but
    #    LOGOUT and CAPABILITY, until the window (from its first counted byte) has passed.
    download_budget: int | None = GMAIL_DOWNLOAD_PER_DAY
    quota_window: float = 24 * 3600.0
    # 5. Logged-in sessions per account; the login past it gets TOO_MANY_CONNECTIONS.
    max_connections: int | None = GMAIL_MAX_CONNECTIONS
    # 6. " [THROTTLED]" after every tagged OK: an account Gmail is slowing down (off: a state, not
    #    a default).
    throttled: bool = False
    #    The account's "Folder size limits" setting: each folder shows only its newest N messages
    #    (off by default, as in Gmail: "Do not limit the number of messages in an IMAP folder
    #    (default)", imapsync FAQ.d/FAQ.Gmail.txt).
    folder_size_limit: int | None = None
    # 7. An IDLE left running this many seconds is ended by the server: SESSION_EXPIRED, then the
    #    close. RFC 2177 lets a server log off a client that idles past its inactivity timeout
    #    ("at least every 29 minutes" re-issue IDLE, section 3); Gmail's is reported at about 10
    #    to 29 minutes (issue 14; re-IDLE after 29 minutes "to prevent server from closing
    #    connection", https://github.com/tpitale/mail_room/pull/40). Google documents no value,
    #    so it is off by default; tests set a few seconds.
    idle_timeout: float | None = None


@dataclass
class GmMessage:
    """One Gmail message of one account: its ids and the folders (labels) it is in."""

    msgid: int
    thrid: int
    folders: set[str] = field(default_factory=set)


@dataclass
class _Refusal:
    match: bytes
    reply: bytes
    times: int


@dataclass
class _Expiry:
    match: bytes
    nth: int
    seen: int = 0


# ==== the front =====================================================================================
class GmailFront(Listening):
    _thread_name = "gmail-front-session"
    host = "127.0.0.1"

    def __init__(self, upstream: DovecotServer, server_context: ssl.SSLContext, **switches):
        self.server = upstream
        self._upstream = (upstream.host, upstream.plain_port)
        self._context = server_context
        self.behaviours = Behaviours(**switches)
        if self.behaviours.locale not in LOCALES:
            raise ValueError(f"locale: {self.behaviours.locale!r} (known: {', '.join(LOCALES)})")
        self.clock: Callable[[], float] = time.monotonic
        self._lock = threading.Lock()
        self._refusals: list[_Refusal] = []
        self._expiries: list[_Expiry] = []
        self._logged_in: dict[str, int] = {}
        self._provisioned: set[str] = set()
        self._window_start: dict[str, float] = {}
        # X-GM-EXT-1: (user, folder, uidvalidity, uid) -> msgid; (user, msgid) -> GmMessage.
        self._locations: dict[tuple[str, str, int, int], int] = {}
        self._messages: dict[tuple[str, int], GmMessage] = {}
        self._by_message_id: dict[tuple[str, str], int] = {}  # (user, Message-ID) -> thread id
        self._next_msgid = 0
        self.connections = 0
        self.logins: dict[str, int] = {}
        self.peak_sessions: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.served_total: dict[str, int] = {}
        self.commands: list[bytes] = []
        self.refused: list[tuple[bytes, bytes]] = []
        self.refused_at: list[float] = []
        self.idles_ended = 0  # IDLEs the front ended for running past idle_timeout
        self._sessions: list[_Session] = []
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="gmail-front", daemon=True)
        self._acceptor.start()

    # ---- folders ---------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        return LOCALES[self.behaviours.locale][0]

    def folder(self, special_use: str) -> str:
        """The name of the system folder with this RFC 6154 attribute (``"\\All"``, ``"\\Sent"``, ...)."""
        root, names = LOCALES[self.behaviours.locale]
        return f"{root}/{names[special_use]}"

    def special_use_of(self, folder: str) -> str | None:
        for use in SPECIAL_USES:
            if self.folder(use) == folder:
                return use
        return None

    # ---- what tests call -------------------------------------------------------------------------
    def deliver(
        self,
        user: str,
        message: bytes,
        labels: Iterable[str] = (),
        *,
        internaldate: datetime | None = None,
        flags: Iterable[str] = (),
        archived: bool = False,
        sent: bool = False,
    ) -> int:
        """Store ``message`` as Gmail keeps one message: in INBOX (unless ``archived`` or
        ``sent``), in each label's folder, in All Mail, and for ``sent`` in Sent Mail; all with
        the same X-GM-MSGID (returned), flags and INTERNALDATE. A label is a folder name (created
        if missing) or a system label: ``\\Important``, ``\\Starred``, ``\\Draft``, ``\\Sent``,
        ``\\Inbox``. The message's thread is that of the delivered message it replies to
        (In-Reply-To, References), else its own."""
        from tests.harness.mail import append, connect  # the mail plugin is loaded by now

        folders = [] if archived or sent else ["INBOX"]
        for label in labels:
            if label == "\\Inbox":
                folders.append("INBOX")
            elif label in ("\\Trash", "\\Spam"):
                raise ValueError(f"{label}: Trash and Spam are not modelled (not in All Mail)")
            elif label.startswith("\\"):
                if label not in _LABEL_FOLDER:
                    raise ValueError(f"unknown system label {label!r}")
                folders.append(self.folder(_LABEL_FOLDER[label]))
            else:
                folders.append(label)
        if sent:
            folders.append(self.folder("\\Sent"))
        folders.append(self.folder("\\All"))
        folders = list(dict.fromkeys(folders))
        key_user = user.lower()
        with self._lock:
            self._next_msgid += 1
            # Gmail's ids grow with time (milliseconds in the high bits, e.g. 1278455344230334865
            # on the imap-extensions page): later deliveries get larger ids.
            msgid = (int(time.time() * 1000) << 20) | (self._next_msgid & 0xFFFFF)
            thrid = msgid
            for parent in _referenced_ids(message):
                if (key_user, parent) in self._by_message_id:
                    thrid = self._by_message_id[(key_user, parent)]
                    break
            own = _message_id(message)
            if own is not None:
                self._by_message_id.setdefault((key_user, own), thrid)
            self._messages[(key_user, msgid)] = GmMessage(msgid, thrid, set(folders))
        client = connect(self.server, user)
        try:
            self._provision(client)
            for folder in folders:
                if not client.folder_exists(folder):
                    client.create_folder(folder)
                uid = append(client, folder, message, tuple(flags), internaldate)
                uidvalidity = int(client.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"])
                with self._lock:
                    self._locations[(key_user, folder, uidvalidity, uid)] = msgid
        finally:
            client.logout()
        with self._lock:
            self._provisioned.add(key_user)
        return msgid

    def message(self, user: str, msgid: int) -> GmMessage | None:
        with self._lock:
            return self._messages.get((user.lower(), msgid))

    def refuse(self, match: bytes, reply: str, times: int = 1) -> None:
        """The next ``times`` commands whose first line contains ``match`` (case-insensitive) are
        answered ``<tag> <reply>`` and never reach Dovecot."""
        with self._lock:
            self._refusals.append(_Refusal(match.upper(), reply.encode(), times))

    def expire_session(self, match: bytes = b"", nth: int = 1) -> None:
        """At the ``nth`` command (of any session) whose line contains ``match``: ``* BYE Session
        expired, please login again.`` instead of an answer, then the close."""
        with self._lock:
            self._expiries.append(_Expiry(match.upper(), nth))

    def expire_sessions(self, user: str | None = None) -> int:
        """The BYE now, to every logged-in session (of ``user``), then the close. Returns how many."""
        with self._lock:
            chosen = [s for s in self._sessions if s.user is not None and user in (None, s.user)]
        for session in chosen:
            session.expire()
        return len(chosen)

    def reset_quota(self, user: str | None = None) -> None:
        """The download window starts again (for ``user``, or every account)."""
        with self._lock:
            for name in [user.lower()] if user else list(self.served):
                self.served.pop(name, None)
                self._window_start.pop(name, None)

    def exceed_quota(self, user: str) -> None:
        """Mark ``user`` as past the download budget from now (without serving the bytes)."""
        budget = self.behaviours.download_budget
        if budget is None:
            raise ValueError("no download_budget set")
        with self._lock:
            self.served[user.lower()] = budget + 1
            self._window_start[user.lower()] = self.clock()

    def over_quota(self, user: str) -> bool:
        budget, name = self.behaviours.download_budget, user.lower()
        with self._lock:
            start = self._window_start.get(name)
            if start is not None and self.clock() - start >= self.behaviours.quota_window:
                self.served.pop(name, None)
                self._window_start.pop(name, None)
            return budget is not None and self.served.get(name, 0) > budget

    def sessions(self, user: str) -> int:
        """Sessions logged in as ``user`` now."""
        with self._lock:
            return self._logged_in.get(user.lower(), 0)

    def sent(self, match: bytes) -> int:
        """Commands seen so far whose first line contains ``match`` (case-insensitive)."""
        with self._lock:
            return sum(match.upper() in line.upper() for line in self.commands)

    def close(self) -> None:
        self._stop_listening(self._sessions)

    # ---- inside ----------------------------------------------------------------------------------
    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(30)
            client = self._context.wrap_socket(raw, server_side=True)
            client.settimeout(None)
            session = _Session(self, client)
        except (ssl.SSLError, OSError):
            raw.close()
            return
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

    def _provision(self, client) -> None:
        """Every system folder, as every Gmail account has them (an IMAPClient to Dovecot)."""
        for use in SPECIAL_USES:
            name = self.folder(use)
            if not client.folder_exists(name):
                client.create_folder(name)

    def _take_fault(self, line: bytes) -> tuple[str, object] | None:
        upper = line.upper()
        with self._lock:
            for expiry in self._expiries:
                if expiry.match in upper:
                    expiry.seen += 1
                    if expiry.seen == expiry.nth:
                        self._expiries.remove(expiry)
                        return "expire", expiry
            for refusal in self._refusals:
                if refusal.match in upper:
                    refusal.times -= 1
                    if refusal.times <= 0:
                        self._refusals.remove(refusal)
                    return "refuse", refusal.reply
        return None

    def _record_refusal(self, line: bytes, reply: bytes) -> None:
        with self._lock:
            self.refused.append((line.rstrip(b"\r\n"), reply))
            self.refused_at.append(time.time())

    def _login(self, user: str) -> bool:
        """Count a logged-in session of ``user``; False (not counted) when over the limit."""
        limit = self.behaviours.max_connections
        with self._lock:
            count = self._logged_in.get(user, 0) + 1
            if limit is not None and count > limit:
                return False
            self._logged_in[user] = count
            self.logins[user] = self.logins.get(user, 0) + 1
            self.peak_sessions[user] = max(self.peak_sessions.get(user, 0), count)
            return True

    def _logout(self, user: str) -> None:
        with self._lock:
            self._logged_in[user] = max(self._logged_in.get(user, 1) - 1, 0)

    def _count_served(self, user: str, size: int) -> None:
        with self._lock:
            self._window_start.setdefault(user, self.clock())
            self.served[user] = self.served.get(user, 0) + size
            self.served_total[user] = self.served_total.get(user, 0) + size

    def _known(self, user: str, folder: str, uidvalidity: int, uids: Iterable[int]) -> dict[int, GmMessage]:
        with self._lock:
            found = {}
            for uid in uids:
                msgid = self._locations.get((user, folder, uidvalidity, uid))
                if msgid is not None:
                    found[uid] = self._messages[(user, msgid)]
            return found

    def _found(
        self, user: str, folder: str, uidvalidity: int, uid: int, stored: bytes, internaldate: bytes
    ) -> GmMessage:
        """A message not stored by ``deliver``: its id from the account, its stored bytes and its
        INTERNALDATE, so the same message in several folders (Gmail's labels share one
        INTERNALDATE) is one message, while the same bytes delivered twice, at two times, are two
        messages, as Gmail gives each delivery its own id."""
        digest = hashlib.sha256(user.encode() + b"\0" + internaldate + b"\0" + stored).digest()
        msgid = (1 << 60) | (int.from_bytes(digest[:8], "big") & ((1 << 60) - 1))
        with self._lock:
            message = self._messages.setdefault((user, msgid), GmMessage(msgid, msgid))
            message.folders.add(folder)
            self._locations[(user, folder, uidvalidity, uid)] = msgid
            return message

    def _labels(self, message: GmMessage, selected: str | None) -> list[str]:
        labels = []
        for folder in sorted(message.folders):
            if self.behaviours.omit_selected_label and folder == selected:
                continue
            if folder == "INBOX":
                labels.append("\\Inbox")
                continue
            use = self.special_use_of(folder)
            if use == "\\All":
                continue
            labels.append(_SYSTEM_LABEL[use] if use else folder)
        return labels


# ==== one session ===================================================================================
class _Session(WireSession):
    def __init__(self, front: GmailFront, client: ssl.SSLSocket):
        self.front = front
        self.b = front.behaviours
        self._client = client
        self._from_client = client.makefile("rb")
        self._write_lock = threading.Lock()
        self._closed = threading.Event()
        self.user: str | None = None  # logged in and counted
        self._authenticated = False
        self._pending: list[Response] = []
        self._internal = 0
        self._sasl_user: str | None = None
        self._name = ""  # the command being answered
        self._folder: str | None = None  # selected, as Dovecot names it (decoded)
        self._uidvalidity = 0
        self._readonly = False
        self._hidden = 0  # the oldest messages the folder size limit hides
        self._floor = 0  # the UID of the oldest message it shows
        self._strip_uid = False
        self._connect_upstream()

    # ---- life ------------------------------------------------------------------------------------
    def _connect_upstream(self) -> None:
        self._upstream = socket.create_connection(self.front._upstream, timeout=30)
        self._upstream.settimeout(None)
        self._from_server = self._upstream.makefile("rb")

    def run(self) -> None:
        try:
            greeting = self._read_response()
            if self.b.gmail_replies:
                self._to_client(GREETING + CRLF)
            else:
                self._to_client(greeting.wire())
            while not self._closed.is_set():
                line = self._from_client.readline()
                if not line:
                    return
                self._command(line)
        except (OSError, SessionClosed, ValueError):
            pass

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self.user is not None:
            self.front._logout(self.user)
            self.user = None
        for sock in (self._client, self._upstream):
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    def expire(self) -> None:
        try:
            self._to_client(SESSION_EXPIRED + CRLF)
        except OSError:
            pass
        self.close()

    # ---- wire ------------------------------------------------------------------------------------
    def _read_rest(self, line: bytes, texts: list[bytes], literals: list[bytes]) -> bytes | None:
        """Read the literals of a command whose first line is ``line`` into texts/literals.
        Returns a refusal when a non-synchronising literal is over LITERAL-'s limit (the command
        is read whole all the same)."""
        refusal = None
        while literal := LITERAL_AT_END.search(line):
            texts.append(line[: literal.start()])
            size, plus = int(literal.group(2)), bool(literal.group(3))
            if not plus:
                self._to_client(b"+ go ahead" + CRLF)
            elif self.b.literal_minus and size > LITERAL_MINUS_MAX:
                refusal = LITERAL_TOO_BIG
            literals.append(self._read_exactly(size))
            line = self._from_client.readline()
            if not line:
                raise SessionClosed("the client closed the connection inside a command")
        texts.append(line.rstrip(b"\r\n"))
        return refusal

    def _skip_rest(self, line: bytes) -> None:
        """Read and drop the rest of a command refused at its first line: its non-synchronising
        literals (a synchronising one is never sent when no "+" asks for it)."""
        while (literal := LITERAL_AT_END.search(line)) and literal.group(3):
            self._read_exactly(int(literal.group(2)))
            line = self._from_client.readline()

    def _reply(self, tag: bytes, reply: bytes, line: bytes, *, refusal: bool = True) -> None:
        if refusal:
            self.front._record_refusal(line, reply)
        self._flush_pending()
        self._to_client(tag + b" " + reply + CRLF)

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for response in pending:
            self._send_untagged(response)

    # ---- dispatch --------------------------------------------------------------------------------
    def _command(self, line: bytes) -> None:
        stripped = line.rstrip(b"\r\n")
        head = stripped.split(b" ", 3)
        if len(head) < 2 or not head[0]:
            self._to_client(b"* BAD Could not parse command (Failure)" + CRLF)
            return
        tag = head[0]
        name = head[1].upper().decode("ascii", "replace")
        if name == "UID" and len(head) > 2:
            name = "UID " + head[2].upper().decode("ascii", "replace")
        self._name = name
        with self.front._lock:
            self.front.commands.append(LITERAL_AT_END.sub(b"", line).rstrip(b"\r\n") or stripped)

        fault = self.front._take_fault(line)
        if fault and fault[0] == "expire":
            self._to_client(SESSION_EXPIRED + CRLF)
            raise SessionClosed("session expired")
        if fault and fault[0] == "refuse":
            self._skip_rest(line)
            return self._reply(tag, fault[1], line)
        if self.user is not None and name not in ("LOGOUT", "CAPABILITY") and self.front.over_quota(self.user):
            self._skip_rest(line)
            return self._reply(tag, OVERQUOTA, line)

        texts, literals = [], []
        too_big = self._read_rest(line, texts, literals)
        if too_big is not None:
            return self._reply(tag, too_big, line)
        prefix = len(head[0]) + 1 + len(head[1]) + (len(head[2]) + 1 if name.startswith("UID ") else 0)
        texts[0] = texts[0][prefix:]
        try:
            args = parse_tokens(texts, literals)
            handler = getattr(self, "_cmd_" + name.replace(" ", "_").lower(), None)
            if handler is None:
                return self._forward(tag, name, args)
            return handler(tag, name, args, line)
        except ImapSyntaxError:
            return self._reply(tag, b"BAD Could not parse command (Failure)", line)

    # ---- upstream --------------------------------------------------------------------------------
    def _exchange(self, tag: bytes, wire: bytes, *, stream: bool) -> tuple[list[Response], bytes]:
        """Send ``<tag> <wire>`` to Dovecot; relay its "+" challenges (AUTHENTICATE) and the
        client's answers; untagged responses are sent on as they come (``stream``) or returned.
        Returns them and the tagged status text."""
        self._upstream.sendall(tag + b" " + wire + CRLF)
        collected: list[Response] = []
        while True:
            response = self._read_response()
            first = response.first
            if first.startswith(b"+"):
                self._flush_pending()
                self._to_client(response.wire())
                answer = self._from_client.readline()
                if not answer:
                    raise SessionClosed("the client left during a challenge")
                if self._name == "AUTHENTICATE" and self._sasl_user is None:
                    self._sasl_user = _sasl_user(self._mechanism, answer.strip())
                self._upstream.sendall(answer)
                continue
            if first.startswith(tag + b" "):
                return collected, first[len(tag) + 1 :]
            if stream:
                self._flush_pending()
                self._send_untagged(response)
            else:
                collected.append(response)

    def _internal_command(self, command: bytes, keep: Callable[[Response], bool]) -> list[Response]:
        """A command of the front's own to Dovecot: the untagged responses ``keep`` accepts are
        returned; the others wait for the client's next reply."""
        self._internal += 1
        tag = b"GF%d" % self._internal
        responses, _ = self._exchange(tag, command, stream=False)
        found = []
        for response in responses:
            (found if keep(response) else self._pending).append(response)
        return found

    def _forward(self, tag: bytes, name: str, args: list[Tok], *, wire: bytes | None = None) -> bytes:
        command = wire if wire is not None else name.encode() + (b" " + dump(args, plus=True) if args else b"")
        _, status_text = self._exchange(tag, command, stream=True)
        self._send_tagged(tag, status_text)
        return status_text

    def _send_tagged(self, tag: bytes, status_text: bytes) -> None:
        self._flush_pending()
        self._to_client(tag + b" " + self._tagged_text(status_text) + CRLF)

    def _tagged_text(self, status_text: bytes) -> bytes:
        """Dovecot's tagged reply in Gmail's words."""
        status, _, text = status_text.partition(b" ")
        status = status.upper()
        code = b""
        found = re.match(rb"(\[[^\]]*\])\s*", text)
        if found:
            code, text = found.group(1), text[found.end() :]
        if self.b.capabilities and code.upper().startswith(b"[CAPABILITY"):
            code = b""
        if not self.b.gmail_replies:
            out = status + b" " + (code + b" " if code else b"") + text
        elif status == b"NO" and self._name in ("LOGIN", "AUTHENTICATE") and self.user is None:
            out = INVALID_CREDENTIALS
        elif status == b"OK":
            name = self._name
            if name in ("LOGIN", "AUTHENTICATE"):
                out = b"OK " + (self.user or "").encode() + b" authenticated (Success)"
            elif name in ("SELECT", "EXAMINE") and self._folder is not None:
                mode = b"[READ-ONLY]" if self._readonly else b"[READ-WRITE]"
                out = b"OK " + mode + b" " + imap_utf7.encode(self._folder) + b" selected. (Success)"
            elif name == "LOGOUT":
                out = b"OK 73 good day (Success)"
            else:
                out = b"OK " + (code + b" " if code else b"") + b"Success"
        else:
            out = status + b" " + (code + b" " if code else b"") + text.rstrip() + b" (Failure)"
        if self.b.throttled and status == b"OK":
            out += THROTTLED
        return out

    def _send_untagged(self, response: Response) -> None:
        first = response.first
        upper = first.upper()
        if upper.startswith(b"* CAPABILITY"):
            if self.b.capabilities:
                return
        elif upper.startswith(b"* OK [CAPABILITY") and self.b.capabilities:
            response = Response([b"* OK" + first[first.find(b"]") + 1 :]] + response.texts[1:], response.literals)
        elif upper.startswith(b"* BYE") and self.b.gmail_replies and self._name == "LOGOUT":
            response = Response([b"* BYE LOGOUT Requested"], [])
        elif upper.startswith(b"* FLAGS ") and self.b.gmail_replies:
            response = Response([b"* FLAGS " + GMAIL_FLAGS], [])
        elif upper.startswith(b"* OK [PERMANENTFLAGS") and self.b.gmail_replies:
            flags = b"()" if self._readonly else GMAIL_PERMANENTFLAGS
            response = Response([b"* OK [PERMANENTFLAGS " + flags + b"] Flags permitted."], [])
        elif found := re.match(rb"\* (\d+) (EXISTS|EXPUNGE|FETCH)\b", upper):
            number, kind = int(found.group(1)), found.group(2)
            if kind == b"FETCH":
                return self._emit_fetch(response, None)
            if kind == b"EXPUNGE" and number <= self._hidden:
                self._hidden -= 1  # a hidden message went: the client never saw it
                return
            if self._hidden:
                response = Response(
                    [b"* %d %s" % (number - self._hidden, kind)] + response.texts[1:], response.literals
                )
        elif found := re.match(rb"\* OK \[UNSEEN (\d+)\](.*)", first, re.I):
            if self._hidden:
                number = int(found.group(1)) - self._hidden
                if number < 1:
                    return
                response = Response([b"* OK [UNSEEN %d]%s" % (number, found.group(2))], [])
        elif upper.startswith(b"* SEARCH") and self._hidden:
            response = self._capped_search(response)
        elif upper.startswith(b"* STATUS ") and self.b.folder_size_limit is not None:
            response = self._capped_status(response)
        elif re.match(rb"\* (LIST|LSUB) ", upper) and self.b.special_use:
            response = self._rewrite_list(response)
            if response is None:
                return
        self._to_client(response.wire())

    # ---- logins ----------------------------------------------------------------------------------
    _mechanism = b""

    def _cmd_login(self, tag, name, args, line):
        user = args[0].text.decode("utf-8", "replace") if args else None
        self._login(tag, name, dump(args, plus=True), user, line)

    def _cmd_authenticate(self, tag, name, args, line):
        self._mechanism = args[0].upper() if args else b""
        self._sasl_user = _sasl_user(self._mechanism, args[1].text) if len(args) > 1 else None
        self._login(tag, name, dump(args, plus=True), None, line)

    def _login(self, tag: bytes, name: str, wire_args: bytes, user: str | None, line: bytes) -> None:
        _, status_text = self._exchange(tag, name.encode() + b" " + wire_args, stream=True)
        user = user or self._sasl_user
        if not status_text.upper().startswith(b"OK"):
            return self._send_tagged(tag, status_text)
        account = (user or "").lower()
        if not self.front._login(account):
            # Over the limit: the client stays logged out (Dovecot's session is replaced).
            self._reset_upstream()
            return self._reply(tag, TOO_MANY_CONNECTIONS, line)
        self.user, self._authenticated = account, True
        self._provision()
        if self.b.capabilities:
            self._to_client(b"* CAPABILITY " + CAPABILITIES + CRLF)
        self._send_tagged(tag, status_text)

    def _reset_upstream(self) -> None:
        try:
            self._internal_command(b"LOGOUT", lambda response: True)
        except SessionClosed:
            pass
        self._pending.clear()
        self._upstream.close()
        self._connect_upstream()
        self._read_response()  # the new greeting

    def _provision(self) -> None:
        with self.front._lock:
            done = self.user in self.front._provisioned
            self.front._provisioned.add(self.user)
        if done:
            return
        for use in SPECIAL_USES:
            wire = dump([astring(imap_utf7.encode(self.front.folder(use)))], plus=True)
            self._internal_command(b"CREATE " + wire, lambda response: True)  # a NO if it exists

    def _cmd_capability(self, tag, name, args, line):
        if not self.b.capabilities:
            return self._forward(tag, name, args)
        words = CAPABILITIES if self._authenticated else CAPABILITIES_BEFORE_LOGIN
        done = b"OK Thats all she wrote!" if self.b.gmail_replies else b"OK Capability completed."
        self._flush_pending()
        self._to_client(b"* CAPABILITY " + words + CRLF + tag + b" " + done + CRLF)

    def _cmd_id(self, tag, name, args, line):
        if not self.b.gmail_replies:
            return self._forward(tag, name, args)
        self._to_client(ID_ANSWER + CRLF + tag + b" OK Success" + CRLF)

    def _cmd_starttls(self, tag, name, args, line):
        # Port 993 is TLS from the start; Gmail offers no STARTTLS there (CAPABILITY above).
        self._reply(tag, b"BAD Unknown command (Failure)", line)

    def _cmd_logout(self, tag, name, args, line):
        self._forward(tag, name, args)
        raise SessionClosed("logged out")

    # ---- folders ---------------------------------------------------------------------------------
    def _cmd_select(self, tag, name, args, line):
        if not args:
            return self._reply(tag, b"BAD Could not parse command (Failure)", line)
        folder = imap_utf7.decode(args[0].text)
        folder = "INBOX" if folder.upper() == "INBOX" else folder
        self._folder, self._hidden, self._readonly = None, 0, name == "EXAMINE"
        responses, status_text = self._exchange(tag, name.encode() + b" " + dump(args, plus=True), stream=False)
        if status_text.upper().startswith(b"OK"):
            self._folder = folder
            self._readonly = self._readonly or b"[READ-ONLY]" in status_text.upper()
            exists = 0
            for response in responses:
                if found := re.match(rb"\* (\d+) EXISTS", response.first, re.I):
                    exists = int(found.group(1))
                if found := re.match(rb"\* OK \[UIDVALIDITY (\d+)\]", response.first, re.I):
                    self._uidvalidity = int(found.group(1))
            limit = self.b.folder_size_limit
            if limit is not None and exists > limit:
                self._hidden = exists - limit
                found = self._internal_command(b"FETCH %d (UID)" % (self._hidden + 1), _is_fetch)
                self._floor = (_fetch_uid(found[0]) or 0) if found else 0
        self._pending.extend(responses)
        self._send_tagged(tag, status_text)

    _cmd_examine = _cmd_select

    def _cmd_close(self, tag, name, args, line):
        self._forward(tag, name, args)
        self._folder, self._hidden = None, 0

    _cmd_unselect = _cmd_close

    def _cmd_list(self, tag, name, args, line):
        if not self.b.special_use:
            return self._forward(tag, name, args)
        self._special_only = False
        if args and args[0].kind == "list":  # LIST-EXTENDED selection options
            options = [t for t in args[0].value if t.upper() != b"SPECIAL-USE"]
            self._special_only = len(options) != len(args[0].value)
            args = ([Tok("list", options)] if options else []) + args[1:]
        for index, tok in enumerate(args):
            if (
                tok.kind == "atom"
                and tok.upper() == b"RETURN"
                and index + 1 < len(args)
                and args[index + 1].kind == "list"
            ):
                options = [t for t in args[index + 1].value if t.upper() != b"SPECIAL-USE"]
                args = args[: index + 1] + [Tok("list", options)] + args[index + 2 :]
                break
        self._forward(tag, name, args)

    _cmd_lsub = _cmd_list
    _special_only = False

    def _cmd_xlist(self, tag, name, args, line):
        """XLIST is LIST with Gmail's older attributes (\\Inbox, \\AllMail, \\Spam, \\Starred)."""
        responses, status_text = self._exchange(tag, b"LIST " + dump(args, plus=True), stream=False)
        for response in responses:
            toks = _list_tokens(response)
            if toks is None:
                self._pending.append(response)
                continue
            folder = imap_utf7.decode(toks[2].text)
            attributes = self._attributes(folder, toks[0])
            if folder == "INBOX":
                attributes.append(Tok("atom", b"\\Inbox"))
            use = self.front.special_use_of(folder)
            if use in _XLIST_ATTRIBUTE:
                attributes = [t for t in attributes if t.text.decode() != use]
                attributes.append(Tok("atom", _XLIST_ATTRIBUTE[use].encode()))
            name = astring(toks[2].text)
            self._pending.append(
                Response([b"* XLIST " + dump([Tok("list", attributes), toks[1], name], plus=False)], [])
            )
        self._send_tagged(tag, status_text)

    def _attributes(self, folder: str, given: Tok) -> list[Tok]:
        attributes = [t for t in given.value if t.upper() not in (b"\\NOSELECT", b"\\NONEXISTENT")]
        use = self.front.special_use_of(folder)
        if folder == self.front.root:
            names = {t.upper() for t in attributes}
            attributes = [t for t in attributes if t.upper() != b"\\HASNOCHILDREN"]
            if b"\\HASCHILDREN" not in names:
                attributes.append(Tok("atom", b"\\HasChildren"))
            attributes.append(Tok("atom", b"\\Noselect"))
        elif use is not None:
            attributes.append(Tok("atom", use.encode()))
        elif any(t.upper() in (b"\\NOSELECT", b"\\NONEXISTENT") for t in given.value):
            attributes = list(given.value)
        return attributes

    def _rewrite_list(self, response: Response) -> Response | None:
        toks = _list_tokens(response)
        if toks is None:
            return response
        keyword = response.first.split(b" ", 2)[1]
        folder = imap_utf7.decode(toks[2].text)
        if self._special_only and self.front.special_use_of(folder) is None:
            return None
        attributes = self._attributes(folder, toks[0])
        name = astring(toks[2].text) if self.b.gmail_replies else toks[2]  # Gmail quotes every name
        return Response(
            [b"* " + keyword + b" " + dump([Tok("list", attributes), toks[1], name, *toks[3:]], plus=False)], []
        )

    def _capped_status(self, response: Response) -> Response:
        found = re.match(rb"(\* STATUS .*\()([^()]*)\)\s*$", response.wire().rstrip(b"\r\n"), re.S)
        if not found:
            return response
        limit = self.b.folder_size_limit
        items = found.group(2).split()
        for index in range(0, len(items) - 1, 2):
            if items[index].upper() == b"MESSAGES" and int(items[index + 1]) > limit:
                items[index + 1] = b"%d" % limit
        return Response([found.group(1) + b" ".join(items) + b")"], [])

    # ---- messages --------------------------------------------------------------------------------
    def _shift_set(self, tok: Tok) -> Tok:
        """A sequence set as Dovecot numbers it, when the folder size limit hides messages."""
        if not self._hidden or tok.kind != "atom":
            return tok

        def shift(number: bytes) -> bytes:
            return number if number == b"*" else b"%d" % (int(number) + self._hidden)

        ranges = []
        for part in tok.value.split(b","):
            ranges.append(b":".join(shift(n) for n in part.split(b":")))
        return Tok("atom", b",".join(ranges))

    def _cmd_store(self, tag, name, args, line):
        if args and not name.startswith("UID "):
            args = [self._shift_set(args[0]), *args[1:]]
        self._forward(tag, name, args)

    _cmd_copy = _cmd_move = _cmd_store

    def _cmd_fetch(self, tag, name, args, line):
        if len(args) < 2:
            return self._reply(tag, b"BAD Could not parse command (Failure)", line)
        uid_command = name.startswith("UID ")
        if not uid_command:
            args = [self._shift_set(args[0]), *args[1:]]
        items = args[1].value if args[1].kind == "list" else [args[1]]
        wanted = [t.upper() for t in items if t.kind == "atom" and t.upper().startswith(b"X-GM-")]
        if not self.b.x_gm_ext or not wanted:
            return self._forward(tag, name, args)
        kept = [t for t in items if not (t.kind == "atom" and t.upper().startswith(b"X-GM-"))]
        has_uid = any(t.kind == "atom" and t.upper() == b"UID" for t in kept)
        if not has_uid:
            kept.append(Tok("atom", b"UID"))
        args = [args[0], Tok("list", kept), *args[2:]]
        responses, status_text = self._exchange(tag, name.encode() + b" " + dump(args, plus=True), stream=False)
        fetched = [(r, _fetch_uid(r)) for r in responses]
        infos = self._infos([uid for _, uid in fetched if uid is not None])
        for response, uid in fetched:
            if uid is None or uid not in infos:
                self._pending.append(response)
                continue
            message = infos[uid]
            extra: list[Tok] = []
            for item in wanted:
                if item == b"X-GM-MSGID":
                    extra += [Tok("atom", b"X-GM-MSGID"), Tok("atom", b"%d" % message.msgid)]
                elif item == b"X-GM-THRID":
                    extra += [Tok("atom", b"X-GM-THRID"), Tok("atom", b"%d" % message.thrid)]
                elif item == b"X-GM-LABELS":
                    labels = self.front._labels(message, self._folder)
                    extra += [Tok("atom", b"X-GM-LABELS"), Tok("list", [_label_tok(label) for label in labels])]
            self._flush_pending()
            self._emit_fetch(response, extra, strip_uid=not has_uid and not uid_command)
        self._send_tagged(tag, status_text)

    _cmd_uid_fetch = _cmd_fetch

    def _emit_fetch(self, response: Response, extra: list[Tok] | None, strip_uid: bool = False) -> None:
        """One FETCH response to the client: dropped if the folder size limit hides its message,
        its literals counted against the download budget, X-GM items put first (as Gmail
        orders them), the sequence number as the client sees it."""
        head = re.match(rb"\* (\d+) FETCH ", response.texts[0], re.I)
        number = int(head.group(1))
        if number <= self._hidden:
            return
        if self.user is not None:
            self.front._count_served(self.user, sum(len(literal) for literal in response.literals))
        number -= self._hidden
        if not extra and not strip_uid:
            texts = [b"* %d FETCH " % number + response.texts[0][head.end() :], *response.texts[1:]]
            return self._to_client(Response(texts, response.literals).wire())
        toks = parse_tokens([response.texts[0][head.end() :], *response.texts[1:]], response.literals)
        items = toks[0].value if toks and toks[0].kind == "list" else []
        pairs = list(zip(items[::2], items[1::2]))
        if strip_uid:
            pairs = [(k, v) for k, v in pairs if not (k.kind == "atom" and k.upper() == b"UID")]
        out = list(extra or []) + [t for pair in pairs for t in pair]
        self._to_client(b"* %d FETCH " % number + dump([Tok("list", out)], plus=False) + CRLF)

    def _infos(self, uids: list[int]) -> dict[int, GmMessage]:
        """The Gmail message behind each UID of the selected folder (fetching the stored bytes of
        those the front has not seen yet; not counted as served)."""
        if self._folder is None or self.user is None:
            return {}
        known = self.front._known(self.user, self._folder, self._uidvalidity, uids)
        missing = sorted(set(uids) - set(known))
        for start in range(0, len(missing), 200):
            chunk = b",".join(b"%d" % uid for uid in missing[start : start + 200])
            for response in self._internal_command(b"UID FETCH " + chunk + b" (UID INTERNALDATE BODY.PEEK[])", _is_fetch):
                uid = _fetch_uid(response)
                toks = parse_tokens([response.texts[0].split(b" FETCH ", 1)[1], *response.texts[1:]], response.literals)
                items = toks[0].value if toks and toks[0].kind == "list" else []
                fields = {k.upper(): v for k, v in zip(items[::2], items[1::2]) if k.kind == "atom"}
                body, internaldate = fields.get(b"BODY[]"), fields.get(b"INTERNALDATE")
                if uid is not None and body is not None and body.kind != "atom" and internaldate is not None:
                    known[uid] = self.front._found(
                        self.user, self._folder, self._uidvalidity, uid, body.text, internaldate.text
                    )
        return known

    def _cmd_search(self, tag, name, args, line):
        if self.b.x_gm_ext and self._folder is not None and _has_gm_key(args):
            uids = []
            for response in self._internal_command(
                b"UID SEARCH ALL", lambda r: r.first.upper().startswith(b"* SEARCH")
            ):
                uids += [int(n) for n in response.first.split()[2:] if n.isdigit()]
            infos = self._infos(uids)
            args = self._gm_search(args, infos)
        self._forward(tag, name, args)

    _cmd_uid_search = _cmd_search

    def _gm_search(self, tokens: list[Tok], infos: dict[int, GmMessage]) -> list[Tok]:
        """X-GM-MSGID n, X-GM-THRID n and X-GM-LABELS label as the UIDs they stand for."""
        out, index = [], 0
        while index < len(tokens):
            tok = tokens[index]
            key = tok.upper() if tok.kind != "list" else b""
            if key in (b"X-GM-MSGID", b"X-GM-THRID", b"X-GM-LABELS") and index + 1 < len(tokens):
                value = tokens[index + 1].text
                if key == b"X-GM-LABELS":
                    label = imap_utf7.decode(value)
                    chosen = [u for u, m in infos.items() if label in self.front._labels(m, None)]
                else:
                    wanted = int(value)
                    chosen = [u for u, m in infos.items() if (m.msgid if key == b"X-GM-MSGID" else m.thrid) == wanted]
                if chosen:
                    out.append(
                        Tok("list", [Tok("atom", b"UID"), Tok("atom", b",".join(b"%d" % u for u in sorted(chosen)))])
                    )
                else:
                    out.append(Tok("list", [Tok("atom", b"NOT"), Tok("atom", b"ALL")]))
                index += 2
                continue
            out.append(Tok("list", self._gm_search(tok.value, infos)) if tok.kind == "list" else tok)
            index += 1
        return out

    def _capped_search(self, response: Response) -> Response:
        numbers = response.first.split()[2:]
        kept = []
        for number in numbers:
            if not number.isdigit():
                kept.append(number)
                continue
            if self._name.startswith("UID "):
                kept.append(number)  # filtered below by the hidden UIDs
            elif int(number) > self._hidden:
                kept.append(b"%d" % (int(number) - self._hidden))
        if self._name.startswith("UID "):
            kept = [n for n in kept if not n.isdigit() or int(n) >= self._floor]
        return Response([b" ".join([b"* SEARCH", *kept])], [])

    # ---- IDLE ------------------------------------------------------------------------------------
    def _cmd_idle(self, tag, name, args, line):
        self._upstream.sendall(tag + b" IDLE" + CRLF)
        done = threading.Event()

        def relay() -> None:
            try:
                while True:
                    response = self._read_response()
                    if response.first.startswith(tag + b" "):
                        self._send_tagged(tag, response.first[len(tag) + 1 :])
                        return
                    if response.first.startswith(b"+"):
                        self._to_client(b"+ idling" + CRLF)
                        continue
                    self._send_untagged(response)
            except (OSError, SessionClosed):
                self.close()
            finally:
                done.set()

        thread = threading.Thread(target=relay, name="gmail-front-idle", daemon=True)
        thread.start()
        timer = None
        if self.b.idle_timeout is not None:
            timer = threading.Timer(self.b.idle_timeout, self._end_idle)
            timer.daemon = True
            timer.start()
        try:
            answer = self._from_client.readline()
        finally:
            if timer is not None:
                timer.cancel()
        if not answer:
            raise SessionClosed("client left during IDLE")
        self._upstream.sendall(answer)
        done.wait(30)
        thread.join(timeout=1)

    def _end_idle(self) -> None:
        """The IDLE ran past Behaviours.idle_timeout: the session ends."""
        with self.front._lock:
            self.front.idles_ended += 1
        self.expire()


# ==== helpers ========================================================================================
def _is_fetch(response: Response) -> bool:
    return re.match(rb"\* \d+ FETCH ", response.first, re.I) is not None


def _fetch_uid(response: Response) -> int | None:
    found = re.search(rb"[( ]UID (\d+)", b" ".join(response.texts), re.I)
    return int(found.group(1)) if found else None


def _list_tokens(response: Response) -> list[Tok] | None:
    keyword = response.first.split(b" ", 2)
    if len(keyword) < 3:
        return None
    try:
        toks = parse_tokens([keyword[2], *response.texts[1:]], response.literals)
    except ImapSyntaxError:
        return None
    if len(toks) < 3 or toks[0].kind != "list":
        return None
    return toks


def _label_tok(label: str) -> Tok:
    wire = imap_utf7.encode(label)
    if label.startswith("\\") or re.fullmatch(rb"[^\x00-\x20\x7f(){%*\"\\\]]+", wire):
        return Tok("atom", wire)
    return astring(wire)


def _has_gm_key(tokens: list[Tok]) -> bool:
    for tok in tokens:
        if tok.kind == "list":
            if _has_gm_key(tok.value):
                return True
        elif tok.kind == "atom" and tok.upper() in (b"X-GM-MSGID", b"X-GM-THRID", b"X-GM-LABELS"):
            return True
    return False


def _sasl_user(mechanism: bytes, initial: bytes) -> str | None:
    try:
        decoded = base64.b64decode(initial, validate=True)
    except (binascii.Error, ValueError):
        return None
    if mechanism == b"XOAUTH2":
        found = re.match(rb"user=([^\x01]*)\x01", decoded)
        return found.group(1).decode("utf-8", "replace") if found else None
    if mechanism == b"PLAIN":
        parts = decoded.split(b"\0")
        return parts[1].decode("utf-8", "replace") if len(parts) == 3 else None
    return None


def _headers(message: bytes):
    return BytesHeaderParser(policy=compat32).parsebytes(message)


def _message_id(message: bytes) -> str | None:
    value = _headers(message).get("Message-ID")
    return str(value).strip() if value else None


def _referenced_ids(message: bytes) -> list[str]:
    headers = _headers(message)
    found = []
    for name in ("In-Reply-To", "References"):
        found += re.findall(r"<[^>]+>", str(headers.get(name) or ""))
    return found


@pytest.fixture
def gmail_front(test_ca):
    """``gmail_front(server, **switches) -> GmailFront`` in front of a DovecotServer; closed after
    the test. Connect to ``127.0.0.1:front.port`` with IMAPS and the test CA. Switches are
    ``Behaviours`` fields (e.g. ``download_budget=50_000``, ``locale="de"``, ``x_gm_ext=False``)."""
    fronts: list[GmailFront] = []

    def make(server: DovecotServer, **switches) -> GmailFront:
        front = GmailFront(server, test_ca.server_context, **switches)
        fronts.append(front)
        return front

    yield make
    for front in fronts:
        front.close()
