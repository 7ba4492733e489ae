"""The delaying proxy (tests/harness/latency.py) that bench/copy_speed.py puts between the copiers
and both servers: the round trip a client measures through it is the one asked for, bytes pass
unchanged both ways, and the delay is per chunk, not a wait per chunk in turn."""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time

import pytest

from tests.harness.latency import DelayProxy, DelayProxyProcess, median_noop, noop_round_trips

# The bench refuses a proxy more than 3 ms plus the loopback time off; a test shares two CPUs
# with a full suite, so it allows more. A proxy that did not delay, delayed twice, or waited a
# whole RTT per chunk is still far outside.
SLACK = 0.010


@pytest.mark.parametrize("proxy_class", [DelayProxy, DelayProxyProcess])
@pytest.mark.parametrize("rtt", [0.02, 0.06])
def test_imap_noops_through_the_proxy_take_the_asked_round_trip(dovecot_pair, proxy_class, rtt):
    server = dovecot_pair.gmail
    user = server.new_user("latency")
    loopback = median_noop(server.host, server.imaps_port, server.ssl_context(), user, server.password)
    with proxy_class(server.host, server.imaps_port, rtt) as proxy:
        # IMAPS through the proxy: the TLS handshake is Dovecot's, verified against the test CA.
        trips = noop_round_trips(proxy.host, proxy.port, server.ssl_context(), user, server.password, 20)
    # The fastest trip: a busy CPU (make test's other xdist workers) only ever adds to a trip, and
    # one that did not delay, delayed twice or per chunk has no trip within the bound.
    fastest = min(trips)
    assert rtt <= fastest <= rtt + loopback + SLACK, f"asked {rtt * 1000:.1f} ms, fastest {fastest * 1000:.2f} ms"


class _Exchange:
    """A TCP server for one connection: it records every byte it receives until the client's
    half-close, while it sends its own payload, then closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.received = payload, bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        sender = threading.Thread(target=conn.sendall, args=(self.payload,), daemon=True)
        sender.start()
        while data := conn.recv(1 << 20):
            self.received.extend(data)
        sender.join()
        conn.close()
        self.listener.close()


def test_bytes_pass_unchanged_both_ways_at_the_same_time():
    up, down = os.urandom(12_000_000 + 17), os.urandom(9_000_000 + 5)
    server = _Exchange(down)
    with DelayProxy("127.0.0.1", server.port, 0.03) as proxy:
        client = socket.create_connection((proxy.host, proxy.port))
        got = bytearray()

        def read() -> None:
            while data := client.recv(1 << 20):
                got.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        started = time.monotonic()
        client.sendall(up)
        client.shutdown(socket.SHUT_WR)  # the half-close reaches the server after the bytes
        reader.join(30)
        took = time.monotonic() - started
        server.thread.join(30)
        client.close()
    assert bytes(server.received) == up
    assert bytes(got) == down
    # 21 MB in a few round trips, not one round trip per 256 KiB chunk (80 chunks: 2.4 s).
    assert took < 1.5, f"{took:.2f} s"


def test_the_delay_is_per_chunk_not_one_after_another():
    """100 lines sent 2 ms apart come back each one RTT after it was sent: waiting RTT/2 per
    chunk in turn would take 100 x 50 ms."""
    rtt, lines = 0.05, 100
    listener = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = listener.accept()
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.close()

    threading.Thread(target=echo, daemon=True).start()
    sent_at, back_at = [], []
    with DelayProxy("127.0.0.1", listener.getsockname()[1], rtt) as proxy:
        client = socket.create_connection((proxy.host, proxy.port))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(b"hello\n")  # the connection's first bytes also wait its handshake RTT
        assert client.recv(6) == b"hello\n"

        def read() -> None:
            buffered = b""
            while len(back_at) < lines:
                buffered += client.recv(65536)
                while b"\n" in buffered:
                    _, buffered = buffered.split(b"\n", 1)
                    back_at.append(time.monotonic())

        reader = threading.Thread(target=read)
        reader.start()
        for i in range(lines):
            sent_at.append(time.monotonic())
            client.sendall(b"%04d\n" % i)
            time.sleep(0.002)
        reader.join(10)
        client.close()
    listener.close()
    assert len(back_at) == lines
    trips = [b - s for s, b in zip(sent_at, back_at)]
    assert min(trips) >= rtt
    assert statistics.median(trips) <= rtt + SLACK, f"median {statistics.median(trips) * 1000:.1f} ms"
    assert back_at[-1] - sent_at[0] < lines * 0.002 + rtt + 0.5


def test_a_client_that_leaves_nagle_on_waits_one_round_trip_per_exchange():
    """imaplib leaves Nagle on: the last TLS record of an APPEND waits for the ACK of the one
    before. Had the proxy's socket delayed its ACKs (40 ms on Linux), each exchange would take
    RTT + 40 ms, a cost a direct loopback connection does not have."""
    rtt, size = 0.01, 22_000
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_each_message() -> None:
        conn, _ = listener.accept()
        buffered = b""
        while True:
            while len(buffered) < size:
                data = conn.recv(65536)
                if not data:
                    conn.close()
                    return
                buffered += data
            buffered = buffered[size:]
            conn.sendall(b"OK\n")

    threading.Thread(target=answer_each_message, daemon=True).start()
    times = []
    with DelayProxy("127.0.0.1", listener.getsockname()[1], rtt) as proxy:
        client = socket.create_connection((proxy.host, proxy.port))  # TCP_NODELAY not set
        for _ in range(40):
            started = time.monotonic()
            client.sendall(b"a" * 16384)  # two writes, like a message in two TLS records
            client.sendall(b"b" * (size - 16384))
            assert client.recv(3) == b"OK\n"
            times.append(time.monotonic() - started)
        client.close()
    listener.close()
    assert statistics.median(times[1:]) <= rtt + SLACK, f"median {statistics.median(times[1:]) * 1000:.1f} ms"
