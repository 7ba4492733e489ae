"""A delaying TCP proxy: network round-trip time between a client and a server on loopback.

Real Gmail and Outlook.com are 20-150 ms away; the harness's servers are on 127.0.0.1, and
this kernel has no netem (``tc qdisc ... delay``), so the delay is made in user space. A
``DelayProxy`` listens on 127.0.0.1 and forwards each connection to its target; every chunk
read from one side is written to the other side RTT/2 after it was read, in order, in both
directions. Delivery is scheduled per chunk (its arrival time + RTT/2), never by waiting RTT/2
per chunk one after another, so the delay does not limit throughput: a client that pipelines
gains as it would over a real long path. It forwards bytes and never looks at them, so TLS
passes through untouched (the client verifies the server's certificate as before).

What it models and what it does not:

- the first bytes of a connection reach the server one RTT after the connect, plus RTT/2, as
  if the TCP handshake (SYN, SYN-ACK) had taken its round trip; the kernel accepts at once;
- TCP itself runs on loopback at both ends: ACKs come from the proxy at once (it asks for
  quick ACKs), so Nagle's algorithm, slow start and the congestion window cost nothing. Over a
  real path they cost round trips too, most of all to a client that leaves Nagle on;
- no bandwidth limit, no loss: a long, fat, clean pipe. At most
  ``max_in_flight`` bytes (64 MiB) wait per direction before the proxy stops reading, far more
  than bandwidth x delay here;
- the delay is exact to a fraction of a millisecond (threads and ``time.sleep``, which sleeps
  with clock_nanosleep; an asyncio loop's epoll timeout is rounded up to whole milliseconds).

``DelayProxy`` runs its threads in the calling process; ``DelayProxyProcess`` runs one in a
child process (``python -m tests.harness.latency HOST PORT RTT_SECONDS``), for a caller whose own
Python work (a copier in the same interpreter) would otherwise hold the GIL while a delayed
chunk is due. ``noop_round_trips`` measures the delay as a client sees it: IMAP NOOPs timed.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

CHUNK = 256 * 1024
MAX_IN_FLIGHT = 64 * 1024 * 1024


class _Link:
    """One proxied connection: two sockets, closed once both directions have ended."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.sockets = (client, server)
        self._lock = threading.Lock()
        self._ended = 0
        self.aborted = False
        self.closed = False

    def direction_ended(self) -> None:
        with self._lock:
            self._ended += 1
            last = self._ended == 2
        if last:
            self._close()

    def abort(self) -> None:
        """A side failed (reset, or the proxy closes): both sides see the connection end now."""
        self.aborted = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _close(self) -> None:
        self.closed = True
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass


class _Direction:
    """Bytes from ``src`` to ``dst``, each chunk written ``delay`` seconds after it was read
    (but not before ``not_before``): a reader thread stamps and queues, a writer thread sleeps
    until the oldest chunk is due and writes every chunk due by then."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, delay: float, link: _Link, not_before: float, max_in_flight: int
    ) -> None:
        self.src, self.dst, self.delay, self.link = src, dst, delay, link
        self.not_before, self.max_in_flight = not_before, max_in_flight
        self._queue: deque[tuple[float, bytes]] = deque()  # (due, data); b"" is the end of the stream
        self._queued = 0
        self._cond = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._read, name="delay-read", daemon=True).start()
        threading.Thread(target=self._write, name="delay-write", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK)
                # ACK at once, as the kernel does for a peer reading straight from Dovecot: with
                # the delayed ACK (40 ms on Linux) a client that leaves Nagle on (imaplib) waits
                # for the ACK of its first TLS record before the last one goes out. Linux clears
                # the flag by itself, hence after every read.
                self.src.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                self._put(data)
                if not data:
                    return
        except OSError:
            self.link.abort()
            self._put(b"")

    def _put(self, data: bytes) -> None:
        due = max(time.monotonic(), self.not_before) + self.delay
        with self._cond:
            self._queue.append((due, data))
            self._queued += len(data)
            self._cond.notify_all()
            # Like a receive window: past this the sender waits (it never does in the bench).
            while self._queued > self.max_in_flight and not self.link.aborted:
                self._cond.wait(1.0)

    def _write(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                    due = self._queue[0][0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                chunks, end = [], False
                with self._cond:
                    now = time.monotonic()
                    while self._queue and self._queue[0][0] <= now:
                        data = self._queue.popleft()[1]
                        if not data:
                            end = True
                            break
                        chunks.append(data)
                sent = b"".join(chunks)
                if sent:
                    self.dst.sendall(sent)
                    with self._cond:
                        self._queued -= len(sent)
                        self._cond.notify_all()
                if end:
                    if not self.link.aborted:
                        self.dst.shutdown(socket.SHUT_WR)  # the half-close, delayed like the bytes
                    return
        except OSError:
            self.link.abort()
        finally:
            with self._cond:  # a reader waiting for room must not wait on a dead writer
                self._queue.clear()
                self._queued = 0
                self._cond.notify_all()
            self.link.direction_ended()


class DelayProxy:
    """Listens on 127.0.0.1 (``port``) and forwards to ``(target_host, target_port)`` with a
    round-trip time of ``rtt`` seconds (RTT/2 each way). ``connections`` counts accepted ones."""

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int, rtt: float, *, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        if rtt < 0:
            raise ValueError("rtt must be >= 0")
        self.target = (target_host, target_port)
        self.rtt = rtt
        self.max_in_flight = max_in_flight
        self.connections = 0
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.create_server((self.host, 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.abort()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            accepted = time.monotonic()
            threading.Thread(target=self._open, args=(client, accepted), name="delay-open", daemon=True).start()

    def _open(self, client: socket.socket, accepted: float) -> None:
        try:
            server = socket.create_connection(self.target, timeout=10)
            server.settimeout(None)
        except OSError:
            client.close()  # the client sees the refusal as a closed connection
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, server)
        with self._lock:
            if self._closed:
                link.abort()
                link._close()
                return
            self.connections += 1
            self._links = [k for k in self._links if not k.closed] + [link]
        half = self.rtt / 2
        # The client's first bytes wait one RTT after the accept: its SYN/SYN-ACK round trip.
        _Direction(client, server, half, link, accepted + self.rtt, self.max_in_flight).start()
        _Direction(server, client, half, link, 0.0, self.max_in_flight).start()


class DelayProxyProcess:
    """A ``DelayProxy`` in a child process (same ``host``, ``port``, ``rtt``, ``close``). The
    child ends when its stdin closes, so it does not outlive this process even on SIGKILL."""

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int, rtt: float) -> None:
        self.target, self.rtt = (target_host, target_port), rtt
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.latency", target_host, str(target_port), repr(rtt)],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        line = self._proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the delay proxy did not start (it said {line!r})")
        self.port = int(line)

    def __enter__(self) -> DelayProxyProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()


def noop_round_trips(host: str, port: int, ssl_context, user: str, password: str, count: int = 20) -> list[float]:
    """Seconds each of ``count`` NOOPs took, in one IMAPS session to ``host:port`` logged in
    as ``user``: what a client waits per command (round trip plus server time)."""
    from imapclient import IMAPClient  # here: the child process of DelayProxyProcess does not need it

    client = IMAPClient(host, port=port, ssl=True, ssl_context=ssl_context, timeout=30)
    try:
        client.login(user, password)
        client.noop()  # the first can carry a server's queued untagged data
        times = []
        for _ in range(count):
            started = time.perf_counter()
            client.noop()
            times.append(time.perf_counter() - started)
    finally:
        client.logout()
    return times


def median_noop(host: str, port: int, ssl_context, user: str, password: str, count: int = 20) -> float:
    return statistics.median(noop_round_trips(host, port, ssl_context, user, password, count))


def _main(argv: list[str]) -> None:
    host, port, rtt = argv[0], int(argv[1]), float(argv[2])
    proxy = DelayProxy(host, port, rtt)
    print(proxy.port, flush=True)
    sys.stdin.buffer.read()  # until the parent closes our stdin, or dies
    proxy.close()


if __name__ == "__main__":
    _main(sys.argv[1:])
