"""An IMAP proxy in front of one of the harness's Dovecot servers, for injecting faults:
throttle and other refusals, dropped connections, cut responses, slow replies.

The code under test connects to the proxy with IMAPS and the test certificate, exactly as it
connects to Dovecot (TLS verified). The proxy talks to Dovecot's plain port in clear text
(Dovecot counts a loopback connection as secure and accepts the login without STARTTLS), so
it reads every command and response. It knows just enough IMAP for that: lines, and literals
(``{n}``, ``{n+}``, ``~{n}``) whose bytes it passes on or, for a command it answers itself,
reads and drops (sending the ``+`` a synchronising literal waits for).

Faults are armed by the test and used up as they fire; all of them are thread-safe:

- ``refuse(match, reply, times)``: the next ``times`` commands whose line contains ``match``
  are answered ``<tag> <reply>`` by the proxy and never reach Dovecot;
- ``throttle_appends(times, backoff_ms)``: Outlook's throttle reply to APPEND;
- ``drop_connection(match, nth, when, bye, before)``: at the ``nth`` matching command, close the
  connection: ``when="unsent"``, the command never reaches Dovecot; ``"reply_lost"``, Dovecot
  runs it and its tagged reply is lost; ``"after_reply"``, the reply is passed on, then the
  line ``bye`` if given (``* BYE ...``), then the close, as a server ending a session between
  commands. ``before()`` runs first (e.g. expire the access tokens);
- ``cut_response(match)``: the next response line containing ``match`` with a literal is passed
  on with only half of its literal, then the connection is closed (mid-FETCH);
- ``stall(match, seconds)``: the tagged reply to the next matching command is held back;
- ``delay``: seconds by which every tagged reply is held back (a slow server);
- ``rewrite_command(match, rewrite, times)``: the next ``times`` matching command lines (without a
  literal) reach Dovecot as ``rewrite(line)``: e.g. ``UID FETCH`` of another UID, or as ``FETCH``;
- ``rewrite_fetch(match, rewrite, times)``: each untagged FETCH response to the next ``times``
  matching commands reaches the client as ``rewrite(response)`` (the whole response, literals
  included; ``b""`` drops it): e.g. ``without_body`` answers OK without the message;
- ``go_silent(match, nth)``: at the ``nth`` matching command the server stops answering: that
  command and every later one are swallowed (never reach Dovecot, never answered), and each new
  connection is accepted and held without a TLS handshake (counted in ``unanswered``).

What happened is recorded: ``connections`` accepted, ``commands`` (each command line seen,
without literals), ``refused_at`` (``time.time()`` when each refusal was sent).
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.harness.imap_wire import Listening

if TYPE_CHECKING:  # not imported at run time: the mail plugin module must be loaded by pytest first
    from tests.harness.mail import DovecotServer

CRLF = b"\r\n"
_LITERAL_AT_END = re.compile(rb"~?\{(\d+)(\+?)\}\r\n$")
_UNTAGGED_FETCH = re.compile(rb"\* \d+ FETCH ", re.IGNORECASE)
_BODY_ITEM = re.compile(rb" ?BODY\[\] (?:\{(\d+)\}\r\n|NIL)", re.IGNORECASE)

Rewrite = Callable[[bytes], bytes]


def without_body(response: bytes) -> bytes:
    """An untagged FETCH response without its BODY[] item (and literal): answered, but not with
    the message."""
    item = _BODY_ITEM.search(response)
    if item is None:
        return response
    end = item.end() + (int(item.group(1)) if item.group(1) else 0)
    return response[: item.start()] + response[end:]


@dataclass
class _Refusal:
    match: bytes
    reply: bytes
    times: int


@dataclass
class _Rewrite:
    match: bytes
    rewrite: Rewrite
    times: int


@dataclass
class _Drop:
    match: bytes
    nth: int
    when: str  # "unsent", "reply_lost", "after_reply"
    bye: bytes | None
    before: Callable[[], None] | None
    seen: int = 0


class ImapProxy(Listening):
    _thread_name = "imap-proxy-link"
    host = "127.0.0.1"

    def __init__(self, upstream: DovecotServer, server_context: ssl.SSLContext):
        self._upstream = (upstream.host, upstream.plain_port)
        self._context = server_context
        self._lock = threading.Lock()
        self._refusals: list[_Refusal] = []
        self._drops: list[_Drop] = []
        self._cuts: list[bytes] = []
        self._stalls: list[tuple[bytes, float]] = []
        self._slow_uploads: list[tuple[bytes, float]] = []
        self._paced_uploads: list[tuple[bytes, float]] = []
        self._command_rewrites: list[_Rewrite] = []
        self._fetch_rewrites: list[_Rewrite] = []
        self._silent_at: tuple[bytes, int] | None = None  # go_silent's match and nth
        self._silent_seen = 0
        self._silent = False
        self.unanswered = 0  # connections accepted once silent
        self.delay = 0.0
        self.connections = 0
        self.commands: list[bytes] = []
        self.refused_at: list[float] = []
        self._links: list[_Link] = []
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="imap-proxy", daemon=True)
        self._acceptor.start()

    # ---- what tests call -----------------------------------------------------------------
    def refuse(self, match: bytes, reply: str, times: int = 1) -> None:
        with self._lock:
            self._refusals.append(_Refusal(match.upper(), reply.encode(), times))

    def throttle_appends(self, times: int = 1, backoff_ms: int = 1500) -> None:
        self.refuse(b" APPEND ", f"NO Request is throttled. Suggested Backoff Time: {backoff_ms} milliseconds", times)

    def drop_connection(
        self,
        match: bytes,
        nth: int = 1,
        *,
        when: str = "unsent",
        bye: str | None = None,
        before: Callable[[], None] | None = None,
    ) -> None:
        if when not in ("unsent", "reply_lost", "after_reply"):
            raise ValueError(f"when: {when!r}")
        with self._lock:
            self._drops.append(_Drop(match.upper(), nth, when, bye.encode() + CRLF if bye else None, before))

    def cut_response(self, match: bytes) -> None:
        with self._lock:
            self._cuts.append(match.upper())

    def stall(self, match: bytes, seconds: float) -> None:
        with self._lock:
            self._stalls.append((match.upper(), seconds))

    def slow_upload(self, match: bytes, seconds: float) -> None:
        """The next matching command's literal (an APPEND's message) reaches the server only
        after `seconds`: a large message on a slow uplink, not yet stored meanwhile."""
        with self._lock:
            self._slow_uploads.append((match.upper(), seconds))

    def pace_upload(self, match: bytes, bytes_per_second: float) -> None:
        """The next matching command's literal is read from the client and passed on at this
        rate: a slow uplink, where the client is still sending; one that goes away midway
        leaves the server a cut literal (so nothing stored)."""
        with self._lock:
            self._paced_uploads.append((match.upper(), bytes_per_second))

    def rewrite_command(self, match: bytes, rewrite: Rewrite, times: int = 1) -> None:
        with self._lock:
            self._command_rewrites.append(_Rewrite(match.upper(), rewrite, times))

    def rewrite_fetch(self, match: bytes, rewrite: Rewrite, times: int = 1) -> None:
        with self._lock:
            self._fetch_rewrites.append(_Rewrite(match.upper(), rewrite, times))

    def go_silent(self, match: bytes, nth: int = 1) -> None:
        with self._lock:
            self._silent_at, self._silent_seen = (match.upper(), nth), 0

    def sent(self, match: bytes) -> int:
        """Commands seen so far whose line contains ``match`` (forwarded or answered here)."""
        with self._lock:
            return sum(match.upper() in line.upper() for line in self.commands)

    def close(self) -> None:
        self._stop_listening(self._links)

    # ---- the proxy -----------------------------------------------------------------------
    def _serve(self, raw: socket.socket) -> None:
        with self._lock:
            if self._silent:
                self.unanswered += 1
                self._links.append(raw)  # held open, never answered; closed with the proxy
                return
        try:
            client = self._context.wrap_socket(raw, server_side=True)
            upstream = socket.create_connection(self._upstream, timeout=30)
            upstream.settimeout(None)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        link = _Link(self, client, upstream)
        with self._lock:
            self.connections += 1
            self._links.append(link)
        replies = threading.Thread(target=link.server_to_client, name="imap-proxy-replies", daemon=True)
        replies.start()
        link.client_to_server()
        replies.join(timeout=30)

    def _decide(self, line: bytes) -> tuple[str, object | None]:
        """What to do with a command line: ("forward", None), ("refuse", reply), ("drop", _Drop) or
        ("silent", None)."""
        upper = line.upper()
        with self._lock:
            self.commands.append(line.rstrip(b"\r\n"))
            if self._silent_at is not None and self._silent_at[0] in upper:
                self._silent_seen += 1
                self._silent = self._silent or self._silent_seen == self._silent_at[1]
            if self._silent:
                return "silent", None
            for drop in self._drops:
                if drop.match in upper:
                    drop.seen += 1
                    if drop.seen == drop.nth:
                        self._drops.remove(drop)
                        return "drop", drop
            for refusal in self._refusals:
                if refusal.match in upper:
                    refusal.times -= 1
                    if refusal.times == 0:
                        self._refusals.remove(refusal)
                    return "refuse", refusal.reply
        return "forward", None

    def _take_stall(self, line: bytes, stalls: list[tuple[bytes, float]] | None = None) -> float:
        stalls = self._stalls if stalls is None else stalls
        upper = line.upper()
        with self._lock:
            for stall in stalls:
                if stall[0] in upper:
                    stalls.remove(stall)
                    return stall[1]
        return 0.0

    def _take_rewrite(self, line: bytes, rewrites: list[_Rewrite]) -> Rewrite | None:
        upper = line.upper()
        with self._lock:
            for rewrite in rewrites:
                if rewrite.match in upper:
                    rewrite.times -= 1
                    if rewrite.times == 0:
                        rewrites.remove(rewrite)
                    return rewrite.rewrite
        return None

    def _take_cut(self, line: bytes) -> bool:
        upper = line.upper()
        with self._lock:
            for match in self._cuts:
                if match in upper:
                    self._cuts.remove(match)
                    return True
        return False


class _Link:
    """One client connection and its Dovecot connection: commands one way, replies the other."""

    def __init__(self, proxy: ImapProxy, client: ssl.SSLSocket, upstream: socket.socket):
        self._proxy = proxy
        self._client = client
        self._upstream = upstream
        self._from_client = client.makefile("rb")
        self._from_server = upstream.makefile("rb")
        self._write_lock = threading.Lock()
        self._closing_at: tuple[bytes, _Drop] | None = None  # (tag, drop): close at its reply
        self._stalled: dict[bytes, float] = {}  # tag -> seconds its tagged reply is held back
        self._rewriting: dict[bytes, Rewrite] = {}  # tag -> what its untagged FETCH responses become
        self._closed = threading.Event()

    def client_to_server(self) -> None:
        try:
            while not self._closed.is_set():
                line = self._from_client.readline()
                if not line:
                    break
                # A command is "<tag> <name> ..."; a line without a space answers a challenge
                # (AUTHENTICATE), and is passed on as it is.
                if b" " not in line.strip():
                    self._upstream.sendall(line)
                    continue
                tag = line.split(b" ", 1)[0]
                action, detail = self._proxy._decide(line)
                if action == "refuse":
                    self._read_literals(line)
                    self._proxy.refused_at.append(time.time())
                    self._to_client(tag + b" " + detail + CRLF)
                elif action == "silent":
                    self._closed.wait()  # nothing more is read or answered on this connection
                    break
                elif action == "drop":
                    if detail.before is not None:
                        detail.before()
                    if detail.when == "unsent":
                        break
                    self._closing_at = (tag, detail)
                    self._forward_command(line)
                else:
                    stall = self._proxy._take_stall(line)
                    if stall:
                        self._stalled[tag] = stall
                    rewrite = self._proxy._take_rewrite(line, self._proxy._fetch_rewrites)
                    if rewrite is not None:
                        self._rewriting[tag] = rewrite
                    command_rewrite = self._proxy._take_rewrite(line, self._proxy._command_rewrites)
                    if command_rewrite is not None:
                        line = command_rewrite(line)
                    self._forward_command(
                        line,
                        upload_delay=self._proxy._take_stall(line, self._proxy._slow_uploads),
                        upload_rate=self._proxy._take_stall(line, self._proxy._paced_uploads),
                    )
        except OSError:
            pass
        finally:
            self.close()

    def server_to_client(self) -> None:
        continuing = False  # the last line ended in a literal: this one goes on the same response
        try:
            while not self._closed.is_set():
                line = self._from_server.readline()
                if not line:
                    break
                if not continuing and self._rewriting and _UNTAGGED_FETCH.match(line):
                    # One command at a time: the FETCH responses are the rewritten command's.
                    rewrite = next(iter(self._rewriting.values()))
                    self._to_client(rewrite(self._whole_response(line)))
                    continue
                literal = _LITERAL_AT_END.search(line)
                tagged = not continuing and not line.startswith((b"* ", b"+"))
                if tagged:
                    self._rewriting.pop(line.split(b" ", 1)[0], None)
                if tagged and self._closing_at is not None and line.startswith(self._closing_at[0] + b" "):
                    drop = self._closing_at[1]
                    if drop.when == "after_reply":
                        self._to_client(line + (drop.bye or b""))
                    break  # with "reply_lost", Dovecot did it and the client never hears so
                if tagged:
                    held = self._proxy.delay + self._stalled.pop(line.split(b" ", 1)[0], 0.0)
                    if held:
                        time.sleep(held)  # the fault itself: a server this slow to answer
                if literal and self._proxy._take_cut(line):
                    size = int(literal.group(1))
                    self._to_client(line + self._from_server.read(size // 2))
                    break
                self._to_client(line)
                if literal:
                    self._to_client(self._from_server.read(int(literal.group(1))))
                continuing = bool(literal)
        except OSError:
            pass
        finally:
            self.close()

    def _whole_response(self, line: bytes) -> bytes:
        """`line` and the rest of its response from Dovecot: each literal and the line after it."""
        response = line
        while literal := _LITERAL_AT_END.search(line):
            response += self._from_server.read(int(literal.group(1)))
            line = self._from_server.readline()
            response += line
        return response

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in (self._client, self._upstream):
            try:
                # The plain socket's shutdown: it wakes the other thread's read without touching
                # the TLS object that thread may be using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        for sock in (self._client, self._upstream):
            try:
                sock.close()
            except OSError:
                pass

    def _forward_command(self, line: bytes, upload_delay: float = 0.0, upload_rate: float = 0.0) -> None:
        """The line and, literal by literal, the rest of the command. A synchronising literal's
        ``+`` comes from Dovecot through server_to_client."""
        self._upstream.sendall(line)
        while literal := _LITERAL_AT_END.search(line):
            if upload_rate:
                self._pass_on_paced(int(literal.group(1)), upload_rate)
                line = self._from_client.readline()
                self._upstream.sendall(line)
                continue
            data = self._read_exactly(int(literal.group(1)))
            if upload_delay:
                time.sleep(upload_delay)  # the fault itself: the bytes are still on their way
            self._upstream.sendall(data)
            line = self._from_client.readline()
            self._upstream.sendall(line)

    def _pass_on_paced(self, size: int, rate: float) -> None:
        step = 0.05
        chunk = max(1, int(rate * step))
        while size:
            part = self._from_client.read(min(chunk, size))
            if not part:
                raise ConnectionError("the client closed the connection inside a literal")
            self._upstream.sendall(part)
            size -= len(part)
            time.sleep(step)

    def _read_literals(self, line: bytes) -> None:
        """Read and drop the literals of a command the proxy answers itself."""
        while literal := _LITERAL_AT_END.search(line):
            if not literal.group(2):
                self._to_client(b"+ Ready for literal data" + CRLF)
            self._read_exactly(int(literal.group(1)))
            line = self._from_client.readline()

    def _read_exactly(self, size: int) -> bytes:
        data = self._from_client.read(size)
        if len(data) != size:
            raise ConnectionError("the client closed the connection inside a literal")
        return data

    def _to_client(self, data: bytes) -> None:
        with self._write_lock:
            self._client.sendall(data)


@pytest.fixture
def imap_proxy(test_ca):
    """``imap_proxy(server) -> ImapProxy`` in front of a DovecotServer; closed after the test.
    Point the code under test at ``127.0.0.1:proxy.port`` with IMAPS and the test CA."""
    proxies: list[ImapProxy] = []

    def make(server: DovecotServer) -> ImapProxy:
        proxy = ImapProxy(server, test_ca.server_context)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
