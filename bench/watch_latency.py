#!/usr/bin/env python3
"""How soon after its arrival is a message in the destination, with `drain --watch` running?

Starts the Dovecot pair as bench/copy_speed.py does (its set-up code, imported), puts the
round-trip delay proxy before both servers (`--rtt-ms`, default 40; 0: none), starts
`python -m shared.cli drain --watch` (periodic rescan off: what is measured is IDLE), and APPENDs
`--messages` messages (default 100, copy_speed's generated mix) straight to the source at random
times (exponential gaps, mean `--mean-gap` s, seeded). For each: from its APPEND answered at the
source to its Message-ID visible in the destination, polled every POLL_SECONDS on a session of
its own (straight to Dovecot: NOOP, then UID SEARCH of the new UIDs and their Message-IDs).
Prints p50, p95 and max, and whether every message was copied exactly once (exit 1 if not).
A script, not a test; see bench/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.copy_speed import (  # noqa: E402
    FOLDER,
    Seeded,
    _terminate,
    bench_messages,
    delayed_link,
    drain_env,
    loopback_noops,
    machine_facts,
    start_servers,
    verify_delay,
)
from tests.harness.mail import append, connect  # noqa: E402

POLL_SECONDS = 0.02
COPY_TIMEOUT_SECONDS = 120  # after the last APPEND, for the last copies
DUPLICATE_WATCH_SECONDS = 3  # after the last copy: a second copy of anything would show by then
MESSAGE_ID = re.compile(rb"<bench-\d+-[0-9a-f]+@copy-speed\.bench>")


class DestinationWatcher:
    """A session of its own on the destination INBOX: when each Message-ID was first seen, and
    how many times it is there."""

    def __init__(self, server, user: str) -> None:
        self.seen_at: dict[bytes, float] = {}
        self.copies: dict[bytes, int] = {}
        self._client = connect(server, user)
        self._client.select_folder(FOLDER, readonly=True)
        self._last_uid = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._client.noop()
            uids = [uid for uid in self._client.search(["UID", f"{self._last_uid + 1}:*"]) if uid > self._last_uid]
            if not uids:
                continue
            now = time.monotonic()
            for data in self._client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).values():
                found = next((MESSAGE_ID.search(v) for v in data.values() if isinstance(v, bytes) and MESSAGE_ID.search(v)), None)
                if found:
                    message_id = found.group(0)
                    self.seen_at.setdefault(message_id, now)
                    self.copies[message_id] = self.copies.get(message_id, 0) + 1
            self._last_uid = max(uids)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.logout()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.01)


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value at least `share` of them are at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100, help="messages to append (default 100)")
    parser.add_argument("--rtt-ms", type=float, default=40, help="round trip to both servers, ms (default 40; 0: no proxy)")
    parser.add_argument("--mean-gap", type=float, default=1.5, help="mean seconds between arrivals (default 1.5)")
    parser.add_argument("--seed", type=int, default=14, help="random seed: gaps and messages (default 14)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    rng = random.Random(args.seed)
    for line in machine_facts():
        print(line)
    with ExitStack() as stack:
        servers = start_servers(stack)
        source_user, dest_user = servers.source.new_user("source"), servers.dest.new_user("dest")
        connect(servers.dest, dest_user).logout()  # the destination INBOX exists before the watch
        link = delayed_link(stack, servers, args.rtt_ms)
        if not verify_delay(servers, link, source_user, loopback_noops(servers, source_user)):
            print(f"refusing to measure at RTT {args.rtt_ms:g} ms: the measured round trip is not the asked one")
            return 2
        run_dir = Path(tempfile.mkdtemp(prefix="watch-", dir=servers.workdir))
        seeded = Seeded((source_user,), args.messages, 0, 0.0, frozenset())  # drain_env's route and limits
        env = drain_env(servers, link, seeded, dest_user, run_dir) | {"WATCH_RESCAN_SECONDS": "3600"}
        out = (run_dir / "watch.log").open("w")
        stack.callback(out.close)
        watch = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "drain", "--watch"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        stack.callback(lambda: watch.poll() is None and (watch.kill(), watch.wait()))
        log = run_dir / "watch.log"
        wait_for(lambda: "route bench: 0 copied" in log.read_text() or watch.poll() is not None, 60, "drain --watch to start")
        if watch.poll() is not None:
            print(f"drain --watch ended at start (exit {watch.returncode}):\n{log.read_text()}")
            return 1
        destination = DestinationWatcher(servers.dest, dest_user)
        stack.callback(destination.close)
        source = connect(servers.source, source_user)
        stack.callback(source.logout)
        arrived: dict[bytes, float] = {}
        print(f"appending {args.messages} messages, mean gap {args.mean_gap:g} s (seed {args.seed}), RTT {args.rtt_ms:g} ms")
        for raw, flags, when in bench_messages(args.messages, os.urandom(4).hex(), rng, "generated"):
            time.sleep(rng.expovariate(1 / args.mean_gap))
            append(source, FOLDER, raw, flags, when)
            arrived[MESSAGE_ID.search(raw).group(0)] = time.monotonic()
        try:
            wait_for(lambda: len(destination.seen_at) >= len(arrived), COPY_TIMEOUT_SECONDS, "the last copies")
        except TimeoutError as exc:
            print(f"{exc}: {len(destination.seen_at)} of {len(arrived)} copied")
        time.sleep(DUPLICATE_WATCH_SECONDS)
        watch.send_signal(signal.SIGTERM)
        code = watch.wait(30)
        latencies = [destination.seen_at[m] - arrived[m] for m in arrived if m in destination.seen_at]
        twice = sorted(m for m, n in destination.copies.items() if n > 1)
        missing = sorted(set(arrived) - set(destination.seen_at))
        strangers = sorted(set(destination.copies) - set(arrived))
    if latencies:
        print(
            f"arrival to copy, N = {len(latencies)}, RTT {args.rtt_ms:g} ms: p50 {percentile(latencies, 0.50):.2f} s, "
            f"p95 {percentile(latencies, 0.95):.2f} s, max {max(latencies):.2f} s, mean {statistics.mean(latencies):.2f} s "
            f"(polled every {POLL_SECONDS * 1000:g} ms)"
        )
    once = not (twice or missing or strangers)
    print(
        f"exactly once: {'yes' if once else 'NO'} ({len(arrived) - len(missing)} of {len(arrived)} copied, "
        f"{len(twice)} more than once, {len(strangers)} not appended by this run); drain --watch exit {code} after SIGTERM"
    )
    return 0 if once and code == 130 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; servers and proxies stopped, temp files removed", file=sys.stderr)
        sys.exit(130)
