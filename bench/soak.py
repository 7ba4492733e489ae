"""Soak: thousands of messages copied by `drain` under random faults, then completion and a count.

    .venv/bin/python bench/soak.py [--messages N] [--routes R] [--minutes M] [--seed S] [--front fronts|dovecot]

One run starts the test harness's servers (two Dovecots, behind the Gmail and Outlook.com fronts
or fault-injecting IMAP proxies, each behind a switch that can black-hole it), seeds messages over
several routes and keeps adding more, and runs `python -m shared.cli drain` again and again while
faults are injected at random (seeded) times: drains killed (SIGKILL, SIGTERM, SIGINT), frozen
past their lease while another drain runs, a second drain at once, Dovecot restarts, throttles and
other refusals, black holes. After each fault it measures the time until copying makes progress
again. At the end it drains until nothing is pending (redriving dead letters as a user would),
checks every route and prints lost, duplicated, dead-lettered (with and without cause) and the
recovery times. See bench/README.md. A script, not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from copy_speed import FLAG_SETS, with_message_id  # noqa: E402

from tests.harness.gmail_front import GmailFront  # noqa: E402
from tests.harness.imap_proxy import ImapProxy  # noqa: E402
from tests.harness.mail import DovecotServer, append, connect, corpus  # noqa: E402
from tests.harness.oauth import OAuthServer  # noqa: E402
from tests.harness.outlook_front import OutlookFront  # noqa: E402
from tests.harness.sync_env import OUTLOOK_MAX_LINE, _clean_environment  # noqa: E402
from tests.harness.tls import make_local_ca  # noqa: E402

IMAP_TIMEOUT = 3  # seconds: a black hole is noticed within three of these
LEASE_SECONDS = 20  # a frozen drain is held stopped past this
RECOVERY_TIMEOUT = 180.0  # seconds to wait for progress after a fault before calling it unrecovered
HANG_SECONDS = 120.0  # a drain that writes nothing this long (not stopped by us) counts as hung, and is killed
# README promises an exit within about 2 s of Ctrl-C or SIGTERM; on a loaded machine allow more.
INTERRUPT_EXIT_SECONDS = 15.0
SOAK_ID = re.compile(rb"<soak-[0-9a-z-]+@soak\.bench>")
GMAIL_UNAVAILABLE = "NO [UNAVAILABLE] Temporary System Error (Failure)"
OUTLOOK_UNAVAILABLE = "NO Server Unavailable. 15"
THROTTLED = "{form} Request is throttled. Suggested Backoff Time: {ms} milliseconds"
# What the product records for a 3-timeouts-in-a-row endpoint (shared.mailbox.session.EndpointDown):
# a 30-minute pause, which the soak skips (see Clock).
ENDPOINT_DOWN = "%not answering%"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- a switch before each endpoint: passes bytes, or black-holes them ---------------------------------


class Switch:
    """A TCP relay on 127.0.0.1 before an endpoint (it relays the TLS bytes, it does not end TLS),
    which can be turned into a black hole: while ``silent``, a new connection is accepted and held
    unanswered, and an open connection that carries a byte either way is frozen (nothing more
    passes). When the black hole ends, every held or frozen connection is closed (their clients
    have given up on them); connections that stayed idle throughout go on."""

    def __init__(self, target_port: int):
        self._target = ("127.0.0.1", target_port)
        self._lock = threading.Lock()
        self._silent = False
        self._held: list[socket.socket] = []
        self._frozen: list[tuple[socket.socket, socket.socket]] = []
        self._open: set[tuple[socket.socket, socket.socket]] = set()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="switch", daemon=True).start()

    @property
    def silent(self) -> bool:
        return self._silent

    def black_hole(self, on: bool) -> None:
        with self._lock:
            self._silent = on
            if on:
                return
            held, self._held = self._held, []
            frozen, self._frozen = self._frozen, []
        for sock in held:
            _close(sock)
        for pair in frozen:
            self._close_pair(pair)

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.black_hole(False)
        with self._lock:
            pairs = list(self._open)
        for pair in pairs:
            self._close_pair(pair)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._silent:
                    self._held.append(conn)
                    continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(conn)
                continue
            pair = (conn, upstream)
            with self._lock:
                self._open.add(pair)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(pair, a, b), name="switch-pump", daemon=True).start()

    def _pump(self, pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if self._silent:
                        self._frozen.append(pair)
                        return  # closed when the black hole ends
                dst.sendall(data)
        except OSError:
            pass
        self._close_pair(pair)

    def _close_pair(self, pair) -> None:
        with self._lock:
            self._open.discard(pair)
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


# -- the servers ----------------------------------------------------------------------------------------


@dataclass
class Side:
    """One mail server as the drains reach it: Dovecot, a front (or fault proxy) before it, a switch
    before that."""

    name: str  # "source" or "destination"
    dovecot: DovecotServer
    faults: GmailFront | OutlookFront | ImapProxy  # refuse(match, reply, times), refused_at
    switch: Switch


@dataclass
class Servers:
    mode: str
    source: Side
    dest: Side
    oauth: OAuthServer
    ca_bundle: str
    workdir: Path


def start_servers(stack: ExitStack, mode: str) -> Servers:
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
    ca = make_local_ca(workdir / "ca")
    oauth = OAuthServer(ca)
    stack.callback(oauth.close)
    sides = []
    for name, label, domain in (("source", "soak-src", "gmail.test"), ("destination", "soak-dst", "outlook.test")):
        server = DovecotServer(label, domain, ca, oauth.introspection_url)
        stack.callback(server.close)  # registered first: a half-started server is removed too
        server.start()
        if mode == "fronts":
            front = (GmailFront if name == "source" else OutlookFront)(server, ca.server_context)
        else:
            front = ImapProxy(server, ca.server_context)
        stack.callback(front.close)
        switch = Switch(front.port)
        stack.callback(switch.close)
        sides.append(Side(name, server, front, switch))
    return Servers(mode, sides[0], sides[1], oauth, ca.ca_bundle_path, workdir)


# -- the messages -------------------------------------------------------------------------------------


@dataclass
class Seeded:
    route: str
    uid: int  # in the source folder
    message_id: bytes
    sha256: str
    flags: frozenset[bytes]
    internaldate: datetime
    expected_skip: str | None  # why the destination is expected to refuse it, if it is


@dataclass
class Route:
    name: str
    gmail_user: str
    refresh_token: str
    folder: str  # in the destination


class Mail:
    """Makes and seeds the soak's messages: corpus messages cycled, each with its own Message-ID,
    flags and INTERNALDATE. Seeding goes straight to the source Dovecot (not through the front or
    the switch) and holds ``lock``, which a restart of the source Dovecot takes too: an APPEND is
    never cut by the soak's own fault, so the source never holds a message twice."""

    def __init__(self, servers: Servers, routes: list[Route], budget: int, rng: random.Random, mode: str):
        self.servers, self.routes, self.rng, self.mode = servers, routes, rng, mode
        self.sources = [m.bytes for m in corpus()]
        self.run_id = os.urandom(3).hex()
        self.lock = threading.Lock()
        self.seeded: list[Seeded] = []
        self.budget = budget
        self.now = datetime.now(timezone.utc).replace(microsecond=0)

    @property
    def left(self) -> int:
        return self.budget - len(self.seeded)

    def expected_copies(self) -> int:
        with self.lock:
            return sum(1 for s in self.seeded if s.expected_skip is None)

    def expected_skip(self, raw: bytes) -> str | None:
        """The Outlook.com front refuses a line over 9,900 characters (Command Error. 10) and, having
        no BINARY, a message with NUL bytes; plain Dovecot takes both."""
        if self.mode != "fronts":
            return None
        if any(len(line) > OUTLOOK_MAX_LINE for line in raw.split(b"\n")):
            return "line too long"
        if b"\0" in raw:
            return "NUL bytes"
        return None

    def seed(self, count: int, *, beyond_budget: bool = False) -> int:
        """Seed up to ``count`` more messages (within the budget, unless ``beyond_budget``: the
        probes that measure a recovery), spread over the routes at random."""
        count = count if beyond_budget else min(count, self.left)
        if count <= 0:
            return 0
        by_route: dict[int, int] = Counter(self.rng.randrange(len(self.routes)) for _ in range(count))
        with self.lock:
            for index, n in sorted(by_route.items()):
                route = self.routes[index]
                client = connect(self.servers.source.dovecot, route.gmail_user)
                try:
                    for _ in range(n):
                        number = len(self.seeded)
                        message_id = b"<soak-%s-%06d-%s@soak.bench>" % (route.name.encode(), number, self.run_id.encode())
                        raw = with_message_id(self.sources[number % len(self.sources)], message_id)
                        flags = tuple(self.rng.choice(FLAG_SETS))
                        when = self.now - timedelta(seconds=self.rng.randint(60, 3 * 86400 - 60))
                        uid = append(client, "INBOX", raw, flags, when)
                        self.seeded.append(
                            Seeded(
                                route.name, uid, message_id, hashlib.sha256(raw).hexdigest(), frozenset(flags), when,
                                self.expected_skip(raw),
                            )
                        )
                finally:
                    client.logout()
        return count


# -- watching the destination and the state file --------------------------------------------------------


class Watch:
    """A thread that counts the messages in the destination folders (on the Dovecot behind the
    front: STATUS MESSAGES) every few tenths of a second, and notes every dead letter seen in the
    local queue's table."""

    def __init__(self, servers: Servers, routes: list[Route], outlook_user: str, state_db: Path):
        self.servers, self.routes, self.outlook_user, self.state_db = servers, routes, outlook_user, state_db
        self.count = 0
        self.cond = threading.Condition()
        self.dead_seen: dict[tuple[str, int], str] = {}  # (route, uid) -> reason, as first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def wait_count_above(self, count: int, timeout: float) -> float | None:
        """Seconds until the destination holds more than ``count`` messages, or None after ``timeout``."""
        started = time.monotonic()
        with self.cond:
            ok = self.cond.wait_for(lambda: self.count > count, timeout=timeout)
        return time.monotonic() - started if ok else None

    def _run(self) -> None:
        client, last_dead = None, 0.0
        while not self._stop.is_set():
            try:
                if client is None:
                    client = connect(self.servers.dest.dovecot, self.outlook_user)
                total = 0
                for route in self.routes:
                    try:
                        total += client.folder_status(route.folder, [b"MESSAGES"])[b"MESSAGES"]
                    except Exception as exc:  # not made yet
                        if "NONEXISTENT" not in str(exc).upper() and "doesn't exist" not in str(exc):
                            raise
                with self.cond:
                    self.count = max(self.count, total)
                    self.cond.notify_all()
            except Exception:
                client = None  # the destination Dovecot restarting: connect again
            if time.monotonic() - last_dead > 1.0 and self.state_db.exists():
                last_dead = time.monotonic()
                self._note_dead_letters()
            self._stop.wait(0.25)
        if client is not None:
            try:
                client.logout()
            except Exception:
                pass

    def _note_dead_letters(self) -> None:
        try:
            for route, uid, reason in read_dead_letters(self.state_db):
                self.dead_seen.setdefault((route, uid), reason)
        except sqlite3.Error:
            pass


def read_dead_letters(state_db: Path) -> list[tuple[str, int, str]]:
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=30) as db:
        try:
            rows = db.execute("SELECT body, reason FROM queue_dead_letters").fetchall()
        except sqlite3.OperationalError:  # not made yet
            return []
    found = []
    for body, reason in rows:
        try:
            ref = json.loads(body)
            found.append((ref["route"], int(ref["uid"]), reason))
        except (ValueError, KeyError, TypeError):
            found.append(("?", -1, reason))
    return found


class Clock:
    """The soak's clock skip. An endpoint that timed out three times in a row pauses its mailbox for
    30 minutes by design (README: "Endpoints that accept a connection and never answer"), and the
    messages that met the pause are kept invisible in the local queue until it ends. The soak does
    not wait half an hour: once no black hole is on, it ends such a pause now and makes the queue's
    messages held for it (visible at the pause's end, give or take a few seconds) visible now, as
    if the half hour had passed. Nothing else in the state is touched. A message held for a pause
    already skipped (written by a drain that read the pause before the skip) is released too."""

    def __init__(self, state_db: Path):
        self.state_db = state_db
        self.skipped_until: list[float] = []  # the original ends of the pauses skipped
        self.released = 0  # queue messages made visible

    def skip(self) -> int:
        """Skip what there is to skip now; returns how many pauses it ended."""
        if not self.state_db.exists():
            return 0
        now = time.time()
        try:
            with sqlite3.connect(self.state_db, timeout=30) as db:
                pauses = db.execute(
                    "SELECT name, until FROM pauses WHERE until > ? AND reason LIKE ?", (now, ENDPOINT_DOWN)
                ).fetchall()
                for name, until in pauses:
                    db.execute("UPDATE pauses SET until = ? WHERE name = ? AND until = ?", (now, name, until))
                    self.skipped_until.append(until)
                for until in self.skipped_until:
                    self.released += db.execute(
                        "UPDATE queue_messages SET visible_at = ? WHERE visible_at BETWEEN ? AND ?",
                        (now, max(now, until - 10), until + 10),
                    ).rowcount
            return len(pauses)
        except sqlite3.OperationalError:  # the tables are not made yet
            return 0


# -- drains --------------------------------------------------------------------------------------------


@dataclass
class DrainRun:
    label: str
    proc: subprocess.Popen
    log_path: Path
    started: float
    ended: float | None = None
    code: int | None = None
    signalled: str | None = None  # what the soak sent it
    stopped_for: float = 0.0  # seconds it was SIGSTOPped


class Drains:
    """Runs `python -m shared.cli drain` subprocesses: the main loop (one after another while the
    soak runs) and the extra ones faults start. Every run's output is kept in its own log."""

    def __init__(self, env: dict[str, str], workdir: Path, code_dir: Path):
        self.env, self.workdir, self.code_dir = env, workdir, code_dir
        self.runs: list[DrainRun] = []
        self.main: DrainRun | None = None
        self.lock = threading.Lock()
        self._loop_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drains", daemon=True)
        self.hangs: list[DrainRun] = []

    def start(self, label: str, *args: str) -> DrainRun:
        number = len(self.runs) + 1
        log_path = self.workdir / "logs" / f"{number:04d}-{label}.log"
        log_path.parent.mkdir(exist_ok=True)
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", *(args or ("drain",))],
                env=self.env,
                cwd=self.workdir,  # no .env there
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the soak's own Ctrl-C is not theirs
            )
        run = DrainRun(label, proc, log_path, time.monotonic())
        with self.lock:
            self.runs.append(run)
        return run

    def wait(self, run: DrainRun, timeout: float = HANG_SECONDS, exit_within: float | None = None) -> int:
        """Wait for ``run`` to end. One that writes nothing (no progress line, no log line) for
        ``timeout`` seconds while not stopped by the soak is hung: noted, and killed. So is one
        still running ``exit_within`` seconds into the wait (sent SIGINT or SIGTERM)."""
        size, quiet_since, waited_from = -1, time.monotonic(), time.monotonic()
        while True:
            try:
                code = run.proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                now_size = run.log_path.stat().st_size
                if exit_within is not None and time.monotonic() - waited_from > exit_within:
                    log(f"HANG: {run.label} drain ({run.log_path.name}) still running {exit_within:.0f} s after"
                        f" {run.signalled}; killed")
                    self.hangs.append(run)
                    _signal(run, signal.SIGKILL)
                    exit_within = None
                elif now_size != size or run.signalled == "SIGSTOP" and run.stopped_for == 0:
                    size, quiet_since = now_size, time.monotonic()
                elif time.monotonic() - quiet_since > timeout:
                    log(f"HANG: {run.label} drain ({run.log_path.name}) wrote nothing for {timeout:.0f} s; killed")
                    self.hangs.append(run)
                    _signal(run, signal.SIGKILL)
        run.ended, run.code = time.monotonic(), code
        return code

    def start_loop(self) -> None:
        self._thread.start()

    def stop_loop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HANG_SECONDS + 30)

    def _loop(self) -> None:
        while True:
            with self._loop_lock:
                if self._stop.is_set():
                    return
                run = self.start("main")
            with self.lock:
                self.main = run
            code = self.wait(run)
            with self.lock:
                self.main = None
            # A run that found nothing to do is not followed at once: the soak shares the machine.
            copied = re.findall(r": (\d+) copied", run.log_path.read_text(errors="replace"))
            self._stop.wait(2.0 if code == 0 and not any(int(n) for n in copied) else 0.5)

    def current_main(self, timeout: float = 30) -> DrainRun | None:
        """The main loop's drain now running and at work (past its start-up: it has logged its
        first line), within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                run = self.main
            if run is not None and run.proc.poll() is None and run.log_path.stat().st_size > 0:
                return run
            time.sleep(0.05)
        return None

    def kill_all(self) -> None:
        with self._loop_lock:
            self._stop.set()  # the loop starts no drain after this
        for run in list(self.runs):
            if run.proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.killpg(run.proc.pid, sig)
                    except ProcessLookupError:
                        pass
                run.proc.wait(timeout=10)


def _signal(run: DrainRun, sig: signal.Signals) -> bool:
    try:
        os.kill(run.proc.pid, sig)
        return True
    except ProcessLookupError:
        return False


# -- faults ---------------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at: float  # time.monotonic() when injected
    ended: float | None = None
    recovery: float | None = None  # seconds from its end to the destination's next new message
    detail: str = ""


class Soak:
    def __init__(self, args, servers: Servers, routes: list[Route], mail: Mail, drains: Drains, watch: Watch, state_db: Path):
        self.args, self.servers, self.routes, self.mail = args, servers, routes, mail
        self.drains, self.watch, self.state_db = drains, watch, state_db
        self.rng = random.Random(args.seed + 1)
        self.faults: list[Fault] = []
        self.unconsumed: list[str] = []
        fronts = servers.mode == "fronts"
        self.kinds = {
            "drain kill -9": self.kill_drain,
            "drain SIGTERM": self.term_drain,
            "drain SIGINT": self.int_drain,
            "drain SIGSTOP past lease, 2nd drain runs": self.freeze_drain,
            "two drains at once": self.two_drains,
            "source Dovecot restart": lambda: self.restart(servers.source),
            "destination Dovecot restart": lambda: self.restart(servers.dest),
            "destination throttle (NO, backoff)": lambda: self.throttle("NO"),
            "destination Server Unavailable. 15": self.outlook_unavailable,
            "source [UNAVAILABLE] on FETCH": self.gmail_unavailable,
            "source black hole": lambda: self.black_hole(servers.source),
            "destination black hole": lambda: self.black_hole(servers.dest),
        }
        if fronts:
            self.kinds["destination throttle (BAD + BYE 14)"] = lambda: self.throttle("BAD")
            self.kinds["source session expired (BYE)"] = self.gmail_bye

    # -- the schedule ------------------------------------------------------------------------------
    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        kinds: list[str] = []
        mean_gap = max(2.0, seconds / max(1, self.expected_faults(seconds)) - 12)
        trickle = threading.Thread(target=self._trickle, args=(end,), name="arrivals", daemon=True)
        trickle.start()
        while time.monotonic() < end - 15:
            if not kinds:
                kinds = sorted(self.kinds)
                self.rng.shuffle(kinds)
            kind = kinds.pop()
            gap = self.rng.uniform(0.5, 1.5) * mean_gap
            time.sleep(min(gap, max(0.0, end - 15 - time.monotonic())))
            self.inject(kind)
        trickle.join()

    def expected_faults(self, seconds: float) -> int:
        return max(len(self.kinds), int(seconds / 25))

    def _trickle(self, end: float) -> None:
        """New mail arriving all along: a few messages every second or two, from the budget left
        beside what the faults' bursts will take."""
        while time.monotonic() < end - 20:
            keep = self.burst_size() * max(1, int((end - time.monotonic()) / 25))
            if self.mail.left > keep:
                self.mail.seed(self.rng.randint(1, 4))
            time.sleep(self.rng.uniform(0.5, 2.0))

    def burst_size(self) -> int:
        return max(10, self.args.messages // (3 * self.expected_faults(self.args.minutes * 60)))

    def inject(self, kind: str) -> None:
        # Work in hand: a burst of arrivals, and the drains copying it.
        before = self.watch.count
        self.mail.seed(self.burst_size())
        self.watch.wait_count_above(before, timeout=30)
        time.sleep(self.rng.uniform(0.0, 1.5))
        fault = Fault(kind, time.monotonic())
        log(f"fault {len(self.faults) + 1}: {kind}")
        try:
            fault.detail = self.kinds[kind]() or ""
        finally:
            fault.ended = time.monotonic()
            self.faults.append(fault)
        fault.recovery = self.recovery(fault)
        shown = "NOT RECOVERED" if fault.recovery is None else f"recovered in {fault.recovery:.1f} s"
        log(f"  {fault.detail}; {shown}")

    def recovery(self, fault: Fault) -> float | None:
        """Seconds from the fault's end until the destination holds a message more than it did then.
        If everything seeded was copied by then, a few new messages arrive first."""
        count = self.watch.count
        if count >= self.mail.expected_copies():
            self.mail.seed(5, beyond_budget=True)
        waited = self.watch.wait_count_above(count, RECOVERY_TIMEOUT)
        return None if waited is None else waited

    # -- the faults ------------------------------------------------------------------------------
    def _signal_main(self, sig: signal.Signals) -> str:
        run = self.drains.current_main()
        if run is None:
            return "no drain running"
        sent = time.monotonic()
        run.signalled = sig.name
        _signal(run, sig)
        code = self.drains.wait(run, timeout=60, exit_within=None if sig is signal.SIGKILL else INTERRUPT_EXIT_SECONDS)
        return f"{run.log_path.name} exited {code} {time.monotonic() - sent:.1f} s after {sig.name}"

    def kill_drain(self) -> str:
        return self._signal_main(signal.SIGKILL)

    def term_drain(self) -> str:
        return self._signal_main(signal.SIGTERM)

    def int_drain(self) -> str:
        return self._signal_main(signal.SIGINT)

    def freeze_drain(self) -> str:
        run = self.drains.current_main()
        if run is None:
            return "no drain running"
        seconds = LEASE_SECONDS + self.rng.uniform(3, 10)
        run.signalled = "SIGSTOP"
        _signal(run, signal.SIGSTOP)
        frozen_at = time.monotonic()
        others: list[DrainRun] = []
        # Drains run beside it while it is stopped; one still copying the backlog when the freeze
        # ends goes on beside the next faults (a freeze of one backlog's length held off every
        # other fault for minutes).
        while time.monotonic() - frozen_at < seconds:
            if not others or others[-1].proc.poll() is not None:
                others.append(self.drains.start("beside-frozen"))
            time.sleep(0.25)
        run.stopped_for += time.monotonic() - frozen_at
        _signal(run, signal.SIGCONT)
        for other in others:
            threading.Thread(target=self.drains.wait, args=(other,), name="beside-frozen", daemon=True).start()
        return f"{run.log_path.name} stopped {seconds:.0f} s (lease {LEASE_SECONDS} s); {len(others)} drains ran beside it"

    def two_drains(self) -> str:
        other = self.drains.start("second")
        # It shares the backlog with the main drain, which can take many minutes: waited for
        # beside the next faults (a hang is still noted), not before them.
        threading.Thread(target=self.drains.wait, args=(other,), name="second-drain", daemon=True).start()
        return f"second drain {other.log_path.name} started"

    def restart(self, side: Side) -> str:
        down = self.rng.uniform(0.5, 6.0)
        how = self.rng.choice(["kill", "stop"])
        with self.mail.lock:  # no seeding meanwhile
            getattr(side.dovecot, how)()
            time.sleep(down)
            side.dovecot.restart()
        return f"{side.name} Dovecot {'SIGKILL' if how == 'kill' else 'SIGTERM'}, down {down:.1f} s"

    def _refuse(self, side: Side, match: bytes, reply: str, times: int, then=None) -> str:
        before = len(side.faults.refused_at)
        if then is None:
            side.faults.refuse(match, reply, times)
        else:
            then()
        deadline = time.monotonic() + 60
        while len(side.faults.refused_at) < before + times and time.monotonic() < deadline:
            time.sleep(0.05)
        used = len(side.faults.refused_at) - before
        if used < times:
            self.unconsumed.append(f"{reply} x{times - used}")
        return f"{reply!r} x{used}"

    def throttle(self, form: str) -> str:
        ms, times = self.rng.randint(1000, 8000), self.rng.randint(1, 3)
        dest = self.servers.dest
        if isinstance(dest.faults, OutlookFront):
            return self._refuse(
                dest, b" APPEND ", THROTTLED.format(form=form, ms=ms), times,
                then=lambda: dest.faults.throttle(times, ms, form=form),
            )
        return self._refuse(dest, b" APPEND ", THROTTLED.format(form=form, ms=ms), times)

    def outlook_unavailable(self) -> str:
        return self._refuse(self.servers.dest, b" APPEND ", OUTLOOK_UNAVAILABLE, self.rng.randint(1, 4))

    def gmail_unavailable(self) -> str:
        return self._refuse(self.servers.source, b" FETCH ", GMAIL_UNAVAILABLE, self.rng.randint(1, 4))

    def gmail_bye(self) -> str:
        front = self.servers.source.faults
        before = front.sent(b" FETCH ")
        front.expire_session(b" FETCH ", nth=1)
        deadline = time.monotonic() + 60
        while front.sent(b" FETCH ") <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        return "* BYE Session expired at a FETCH"

    def black_hole(self, side: Side) -> str:
        seconds = self.rng.uniform(2.0, 20.0)
        side.switch.black_hole(True)
        time.sleep(seconds)
        side.switch.black_hole(False)
        return f"{side.name} silent {seconds:.1f} s"


# -- the end: completion, then the count ------------------------------------------------------------------


@dataclass
class Completion:
    rounds: int = 0
    redriven: int = 0
    seconds: float = 0.0
    pending: dict = field(default_factory=dict)
    dead_before_redrive: list[tuple[str, int, str]] = field(default_factory=list)
    dead_again: list[tuple[str, int, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def status_json(drains: Drains) -> dict:
    run = drains.start("status", "status", "--json")
    drains.wait(run, timeout=120)
    text = run.log_path.read_text(errors="replace")
    return json.loads(text[text.index("{"):])


def pending_of(status: dict) -> dict:
    queue = status["queue"]
    claims = Counter()
    for route in status["routes"]:
        claims.update(route["claims"])
    found = {
        "queued": queue.get("queued", 0),
        "in_flight": queue.get("in_flight", 0),
        "dead": queue.get("dead", 0),
        "claims in progress": claims.get("in_progress", 0) + claims.get("appending", 0),
        "claims to try again": claims.get("failed", 0),
        "pauses": len(status.get("pauses", [])),
    }
    return {k: v for k, v in found.items() if v}


def complete(drains: Drains, state_db: Path, clock: Clock, max_rounds: int = 8) -> Completion:
    """Drain until nothing is pending, as a user would finish by hand: end the skipped pauses (see
    Clock), run `drain`; dead letters are redriven once (every injected cause has passed by then),
    then drained again; a dead letter that comes back after that has a cause of its own."""
    done = Completion()
    started = time.monotonic()
    redriven = False
    for done.rounds in range(1, max_rounds + 1):
        clock.skip()
        run = drains.start("final")
        code = drains.wait(run)
        done.outputs.append(f"round {done.rounds}: {run.log_path.name} exited {code}: {last_line(run.log_path)}")
        dead = read_dead_letters(state_db)
        if dead and not redriven:
            done.dead_before_redrive = dead
            redrive = drains.start("redrive", "redrive")
            drains.wait(redrive, timeout=120)
            done.redriven, redriven = len(dead), True
            done.outputs.append(f"redrive of {len(dead)}: {last_line(redrive.log_path)}")
            continue
        done.dead_again = dead
        status = status_json(drains)
        done.pending = pending_of(status)
        if not done.pending or (redriven and set(done.pending) == {"dead"}):
            break
        time.sleep(2)  # e.g. a throttle's pause still running
    done.seconds = time.monotonic() - started
    return done


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class Verdict:
    seeded: int = 0
    copied: int = 0
    duplicated: int = 0  # extra copies
    lost: list[str] = field(default_factory=list)
    stranded: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # expected refusals, by reason
    skipped_unexpectedly: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # bytes, flags or date differ
    checked_bytes: int = 0
    strangers: int = 0  # messages in the destination that were never seeded


def claims_of(state_db: Path) -> dict[tuple[str, int], tuple[str, str | None]]:
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=30) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(claims)")]
        reason = "reason" if "reason" in columns else "NULL"
        rows = db.execute(f"SELECT route, uid, status, {reason} FROM claims").fetchall()
    return {(route, uid): (status, why) for route, uid, status, why in rows}


def verify(servers: Servers, routes: list[Route], outlook_user: str, mail: Mail, state_db: Path,
           sample: int, rng: random.Random) -> Verdict:
    verdict = Verdict(seeded=len(mail.seeded))
    claims = claims_of(state_db)
    dead = {(route, uid) for route, uid, _ in read_dead_letters(state_db)}
    queued = queued_refs(state_db)
    by_route: dict[str, list[Seeded]] = defaultdict(list)
    for s in mail.seeded:
        by_route[s.route].append(s)
    client = connect(servers.dest.dovecot, outlook_user)
    client.normalise_times = False
    sources = {}
    try:
        for route in routes:
            source = sources[route.name] = connect(servers.source.dovecot, route.gmail_user)
            source.normalise_times = False
            seeded = {s.message_id: s for s in by_route[route.name]}
            found: dict[bytes, list[int]] = defaultdict(list)
            if client.folder_exists(route.folder):
                client.select_folder(route.folder, readonly=True)
                uids = client.search("ALL")
                for start in range(0, len(uids), 500):
                    part = client.fetch(uids[start:start + 500], [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
                    for uid, item in part.items():
                        hit = SOAK_ID.search(item[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"])
                        if hit is None or hit.group(0) not in seeded:
                            verdict.strangers += 1
                        else:
                            found[hit.group(0)].append(uid)
            for message_id, s in seeded.items():
                copies = found.get(message_id, [])
                name = f"{route.name} UID {s.uid} {message_id.decode()}"
                status, why = claims.get((route.name, s.uid), (None, None))
                if len(copies) > 1:
                    verdict.duplicated += len(copies) - 1
                if copies:
                    verdict.copied += 1
                elif s.expected_skip and status == "skipped":
                    verdict.skipped[s.expected_skip] += 1
                elif status == "skipped":
                    verdict.skipped_unexpectedly.append(f"{name}: skipped: {why}")
                    verdict.lost.append(f"{name}: skipped without a reason it should have: {why}")
                elif (route.name, s.uid) in dead or (route.name, s.uid) in queued or status not in (None, "done"):
                    verdict.stranded.append(f"{name}: claim {status}, dead letter {(route.name, s.uid) in dead}, "
                                            f"queued {(route.name, s.uid) in queued}")
                else:
                    verdict.lost.append(f"{name}: not in the destination; claim {status}")
            copied = [(s, found[m][0]) for m, s in seeded.items() if found.get(m)]
            if sample:
                copied = rng.sample(copied, min(sample, len(copied)))
            source.select_folder("INBOX", readonly=True)
            items = [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"]
            for start in range(0, len(copied), 50):
                chunk = copied[start:start + 50]
                there = client.fetch([uid for _, uid in chunk], items)
                here = source.fetch([s.uid for s, _ in chunk], items)
                for s, uid in chunk:
                    a, b = here[s.uid], there[uid]
                    verdict.checked_bytes += 1
                    if a[b"BODY[]"] != b[b"BODY[]"]:
                        verdict.wrong.append(f"{route.name} UID {s.uid}: bytes differ")
                    if set(a[b"FLAGS"]) - {b"\\Recent"} != set(b[b"FLAGS"]) - {b"\\Recent"}:
                        verdict.wrong.append(f"{route.name} UID {s.uid}: flags {a[b'FLAGS']} became {b[b'FLAGS']}")
                    if a[b"INTERNALDATE"] != b[b"INTERNALDATE"]:
                        verdict.wrong.append(f"{route.name} UID {s.uid}: INTERNALDATE {a[b'INTERNALDATE']} became {b[b'INTERNALDATE']}")
    finally:
        for each in (client, *sources.values()):
            each.logout()
    return verdict


def queued_refs(state_db: Path) -> set[tuple[str, int]]:
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=30) as db:
        rows = db.execute("SELECT body FROM queue_messages").fetchall()
    found = set()
    for (body,) in rows:
        try:
            ref = json.loads(body)
            found.add((ref["route"], int(ref["uid"])))
        except (ValueError, KeyError, TypeError):
            pass
    return found


# -- the report ---------------------------------------------------------------------------------------


def drain_problems(drains: Drains) -> list[str]:
    """Drain runs that crashed (exit 70, a traceback) or ended in a way no fault explains."""
    problems = []
    for run in drains.runs:
        text = run.log_path.read_text(errors="replace") if run.log_path.exists() else ""
        if run.code == 70 or "Traceback" in text:
            problems.append(f"{run.log_path.name} exited {run.code} with an internal error:\n{text[-3000:]}")
        elif run.code == 4:
            problems.append(f"{run.log_path.name} exited 4 (state store):\n{text[-1500:]}")
        elif run.signalled in ("SIGTERM", "SIGINT") and run.code != 130:
            problems.append(f"{run.log_path.name} exited {run.code} after {run.signalled} (expected 130)")
    return problems


def report(args, mail: Mail, soak: Soak, drains: Drains, watch: Watch, clock: Clock, done: Completion, verdict: Verdict,
           wall: float, workdir: Path) -> int:
    print("\n==== soak report ====")
    print(f"seed {args.seed}, front {args.front}, {args.routes} routes, {args.minutes} minutes of faults, "
          f"IMAP_TIMEOUT {IMAP_TIMEOUT} s, LEASE_SECONDS {LEASE_SECONDS} s")
    exits = Counter(run.code for run in drains.runs if run.label in ("main", "second", "beside-frozen", "final"))
    print(f"drain runs: {sum(exits.values())}; exit codes: "
          + ", ".join(f"{code}: {n}" for code, n in sorted(exits.items(), key=lambda kv: str(kv[0]))))
    print(f"\nmessages seeded        {verdict.seeded}")
    print(f"copied (once or more)  {verdict.copied}")
    skipped = sum(verdict.skipped.values())
    print(f"skipped as expected    {skipped}" + (f" ({', '.join(f'{r}: {n}' for r, n in verdict.skipped.items())})" if skipped else ""))
    print(f"lost                   {len(verdict.lost)}")
    print(f"duplicated             {verdict.duplicated}")
    print(f"stranded               {len(verdict.stranded)}")
    print(f"wrong copies           {len(verdict.wrong)} (bytes, flags and INTERNALDATE checked on {verdict.checked_bytes})")
    if verdict.strangers:
        print(f"unknown messages in the destination: {verdict.strangers}")
    dead = {(r, u): why for r, u, why in done.dead_before_redrive}
    dead.update(watch.dead_seen)
    again = {(r, u) for r, u, _ in done.dead_again}
    with_cause = {k: v for k, v in dead.items() if k in again}
    without_cause = {k: v for k, v in dead.items() if k not in again}
    print(f"dead-lettered          {len(dead)}")
    print(f"  with cause           {len(with_cause)} (failed again when redriven with every fault gone)")
    print(f"  without cause        {len(without_cause)} (copied once redriven: only injected faults put them there)")
    for why, n in Counter(dead.values()).most_common(10):
        print(f"    {n} x {why[:300]}")
    print(f"30-minute pauses after a black hole skipped by the soak's clock: {len(clock.skipped_until)} "
          f"({clock.released} queue messages released with them)")
    if soak.unconsumed:
        print(f"refusals armed but never sent (no matching command came): {len(soak.unconsumed)}")

    print(f"\n{'fault':<44} {'count':>5} {'median s':>9} {'max s':>7} {'unrecovered':>12}")
    by_kind: dict[str, list[Fault]] = defaultdict(list)
    for fault in soak.faults:
        by_kind[fault.kind].append(fault)
    for kind in sorted(by_kind):
        times = [f.recovery for f in by_kind[kind] if f.recovery is not None]
        median = f"{statistics.median(times):.1f}" if times else "-"
        longest = f"{max(times):.1f}" if times else "-"
        print(f"{kind:<44} {len(by_kind[kind]):>5} {median:>9} {longest:>7} {len(by_kind[kind]) - len(times):>12}")
    every = [f.recovery for f in soak.faults if f.recovery is not None]
    if every:
        print(f"{'all':<44} {len(soak.faults):>5} {statistics.median(every):>9.1f} {max(every):>7.1f} "
              f"{len(soak.faults) - len(every):>12}")
    print(f"\ncompletion: {done.rounds} round(s), {done.seconds:.1f} s; redriven {done.redriven}; "
          f"pending at the end: {done.pending or 'nothing'}")
    for line in done.outputs:
        print(f"  {line}")
    problems = drain_problems(drains)
    hangs = [f"{run.log_path.name} hung and was killed" for run in drains.hangs]
    unrecovered = [f"{f.kind} at +{f.at - soak.started:.0f} s" for f in soak.faults if f.recovery is None]
    for title, items in (("LOST", verdict.lost), ("STRANDED", verdict.stranded), ("WRONG", verdict.wrong),
                         ("DRAIN PROBLEMS", problems), ("HANGS", hangs), ("UNRECOVERED FAULTS", unrecovered)):
        if items:
            print(f"\n{title} ({len(items)}):")
            for item in items[:20]:
                print(f"  {item}")
    print(f"\ntotal wall time {wall / 60:.1f} minutes; drain logs in {workdir / 'logs'}"
          + (" (kept)" if args.keep else " (removed)"))
    bad = verdict.lost or verdict.duplicated or verdict.stranded or verdict.wrong or problems or hangs or unrecovered
    return 1 if bad else 0


# -- main -------------------------------------------------------------------------------------------------


def drain_env(servers: Servers, routes: list[Route], outlook_user: str, ms_token: str, state_db: Path,
              code_dir: Path) -> dict[str, str]:
    env = _clean_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(code_dir), env.get("PYTHONPATH", "")])
    return env | {
        "HOME": str(state_db.parent),
        "SYNC_ROUTES_JSON": json.dumps([
            {"name": r.name, "gmail_user": r.gmail_user, "gmail_refresh_token": r.refresh_token,
             "gmail_folder": "INBOX", "outlook_folder": r.folder}
            for r in routes
        ]),
        "GMAIL_CLIENT_ID": servers.oauth.google_client_id,
        "GMAIL_CLIENT_SECRET": servers.oauth.google_client_secret,
        "OUTLOOK_USER": outlook_user,
        "MS_CLIENT_ID": servers.oauth.ms_client_id,
        "MS_REFRESH_TOKEN": ms_token,
        "GMAIL_IMAP_HOST": "127.0.0.1",
        "GMAIL_IMAP_PORT": str(servers.source.switch.port),
        "OUTLOOK_IMAP_HOST": "127.0.0.1",
        "OUTLOOK_IMAP_PORT": str(servers.dest.switch.port),
        "IMAP_CA_BUNDLE": servers.ca_bundle,
        "REQUESTS_CA_BUNDLE": servers.ca_bundle,
        "GOOGLE_TOKEN_URI": servers.oauth.google_token_uri,
        "MS_AUTHORITY": servers.oauth.ms_authority,
        "STATE_DB": str(state_db),
        "IMAP_TIMEOUT": str(IMAP_TIMEOUT),
        "LEASE_SECONDS": str(LEASE_SECONDS),
        "MAX_ENQUEUE_PER_RUN": "500",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, metavar="N", help="messages to seed in all (default 3000)")
    parser.add_argument("--routes", type=int, default=3, metavar="R", help="routes, each its own Gmail user (default 3)")
    parser.add_argument("--minutes", type=float, default=10, metavar="M",
                        help="minutes of faults, before completion and the check (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the faults, their times and the messages")
    parser.add_argument("--front", choices=("fronts", "dovecot"), default="fronts",
                        help="fronts: Gmail's and Outlook.com's dialects before Dovecot (default); "
                             "dovecot: plain Dovecot behind fault-injecting proxies")
    parser.add_argument("--sample", type=int, default=0, metavar="K",
                        help="check bytes, flags and date of K random copies per route (default 0: all)")
    parser.add_argument("--code", type=Path, default=REPO_ROOT, metavar="DIR",
                        help="the mail_syncer tree the drains run (default: this checkout; e.g. a `git archive` of a commit)")
    parser.add_argument("--keep", action="store_true", help="keep the drain logs and state file (the path is printed)")
    args = parser.parse_args(argv)
    if args.messages < 50 or args.routes < 1 or args.minutes <= 0:
        parser.error("--messages at least 50, --routes at least 1, --minutes above 0")
    return args


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so everything is cleaned up
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Started in the background by a shell (`nohup ... &`, cron), a process ignores SIGINT, and an
    # ignored signal is inherited through exec: the drains would shrug off the "drain SIGINT"
    # fault (seen: a soak waited on one for minutes). A handler is reset to default in a child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    rng = random.Random(args.seed)
    with ExitStack() as stack:
        servers = start_servers(stack, args.front)
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="soak-logs-"))

            def keep() -> None:
                shutil.copytree(servers.workdir / "logs", kept / "logs", dirs_exist_ok=True)
                shutil.copy2(servers.workdir / "state" / "state.db", kept)
                print(f"drain logs and state file kept in {kept}", file=sys.stderr)

            stack.callback(keep)
        oauth = servers.oauth
        routes = []
        for index in range(1, args.routes + 1):
            user = servers.source.dovecot.new_user(f"route{index}")
            routes.append(Route(f"r{index}", user, oauth.issue_refresh_token(user, "google"), f"Soak/R{index}"))
        outlook_user = servers.dest.dovecot.new_user("me")
        ms_token = oauth.issue_refresh_token(outlook_user, "microsoft")
        state_db = servers.workdir / "state" / "state.db"
        state_db.parent.mkdir()
        drains = Drains(drain_env(servers, routes, outlook_user, ms_token, state_db, args.code), servers.workdir, args.code)
        stack.callback(drains.kill_all)  # before the servers stop (the stack unwinds in reverse)
        mail = Mail(servers, routes, args.messages, rng, args.front)
        watch = Watch(servers, routes, outlook_user, state_db)
        stack.callback(watch.stop)
        first = args.messages // 2
        mail.seed(first)
        log(f"seeded {first} messages over {args.routes} routes; {args.front}; drains run {args.code}")
        watch.start()
        soak = Soak(args, servers, routes, mail, drains, watch, state_db)
        soak.started = time.monotonic()
        clock = Clock(state_db)
        threading.Thread(target=_skip_time, args=(servers, clock), name="clock", daemon=True).start()
        drains.start_loop()
        soak.run(args.minutes * 60)
        mail.seed(mail.left)  # the rest of the budget arrives at the end
        log(f"faults over; {len(mail.seeded)} seeded; stopping the drain loop")
        drains.stop_loop()
        for run in list(drains.runs):  # a second drain a fault started may still be at work
            if run.proc.poll() is None:
                drains.wait(run)
        log("completion: drain until nothing is pending")
        done = complete(drains, state_db, clock)
        watch.stop()
        log("checking every route")
        verdict = verify(servers, routes, outlook_user, mail, state_db, args.sample, rng)
        return report(args, mail, soak, drains, watch, clock, done, verdict, time.monotonic() - started, servers.workdir)


def _skip_time(servers: Servers, clock: Clock) -> None:
    while True:
        if not servers.source.switch.silent and not servers.dest.switch.silent:
            clock.skip()
        time.sleep(0.5)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; drains, servers and temp files cleaned up", file=sys.stderr)
        sys.exit(130)
