"""The fault matrix (DESIGN.md guarantee 2): a run killed with SIGKILL at each step of the path,
then run again, loses nothing, doubles nothing and changes no byte.

Each point runs `tests/e2e/crash_driver.py` in a subprocess: the real `drain`, or the real Lambda
handlers on moto's server, killed by itself at the point (returncode -9), then a plain run to
completion. Every scenario has its own mailboxes, state and queue, so the points of one path run
side by side: most of a scenario is waiting for a lease and a visibility timeout to run out.
The messages include one without a Message-ID and two sharing one (same size, one minute apart);
the message points fire at the second of those (UID 4), and once at the one without (UID 2).
Two points run in chunks of 5, so that the batch's next chunk is fetched from a thread while
this chunk's APPENDs go out: killed after that FETCH (UID 7), and after the chunk's last answer.
"During the producer's send" is, for SQS, after the first of its two SendMessageBatch calls; for
the local queue, inside its one send transaction with a row written and not committed.

Also: the destination Dovecot killed and restarted under a running `drain`, and moto's server
stopped under one (a clear error and exit code; nothing lost once it is back). The matrix is
printed at the end of the session (tests/harness/fault_matrix.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from shared.queue.sqs import create_fifo_queue_pair
from shared.state.dynamodb import create_state_table
from tests.harness.aws import REGION, unique_name
from tests.harness.fault_matrix import MATRIX, Row
from tests.harness.mail import DovecotServer, read_folder, seed, wait_for

UTC = dt.timezone.utc
FOLDER = "Crash/Test"
NO_MESSAGE_ID_UID = 2
SHARED_ID_SECOND_UID = 4
# A claim left by a killed run expires after this; the local queue's visibility timeout is the same.
LEASE_SECONDS = "2"
PARALLEL_SCENARIOS = 4

MESSAGE_POINTS = [
    ("after claim", "after-claim", SHARED_ID_SECOND_UID),
    ("after fetch", "after-fetch", SHARED_ID_SECOND_UID),
    ("during APPEND (half the literal sent)", "during-append", SHARED_ID_SECOND_UID),
    ("after APPEND, before finalize (k of B answered)", "after-append", SHARED_ID_SECOND_UID),
    ("after APPEND, before finalize (no Message-ID)", "after-append", NO_MESSAGE_ID_UID),
    ("a batch's APPENDs all sent, none answered", "appends-sent", SHARED_ID_SECOND_UID),
    ("after finalize, before the queue delete", "after-finalize", SHARED_ID_SECOND_UID),
]
# In chunks of 5 (crash_driver --chunk), so that a batch of 10 or 12 has two or three, and the
# next chunk's FETCH goes on from a thread while this chunk's APPENDs go out.
CHUNK = 5
CHUNK_POINTS = [
    ("next chunk fetched ahead, APPENDs going", "after-fetch", CHUNK + 2),
    ("a chunk's APPENDs answered, next FETCH going", "after-append", CHUNK),
]
PRODUCER_POINTS = [
    ("during the producer's send", "during-send", 0),
    ("after the send, before the watermark moves", "after-send", 0),
]
POINTS = [(point, hook, uid, None) for point, hook, uid in MESSAGE_POINTS]
POINTS += [(f"{point} (chunks of {CHUNK})", hook, uid, CHUNK) for point, hook, uid in CHUNK_POINTS]
POINTS += [(point, hook, uid, None) for point, hook, uid in PRODUCER_POINTS]


def messages() -> list[tuple[bytes, tuple[str, ...], dt.datetime]]:
    """Twelve small messages (two SQS batches), INTERNALDATEs in the last hour."""
    now = dt.datetime.now(UTC).replace(microsecond=0)

    def mail(subject: str, message_id: str | None, text: str) -> bytes:
        header = f"Message-ID: {message_id}\r\n" if message_id else ""
        return f"{header}From: a@example.org\r\nSubject: {subject}\r\n\r\n{text}\r\n".encode()

    shared_id = "<shared@example.org>"
    found = [
        (mail("first", "<first@example.org>", "hello"), ("\\Seen",)),
        (mail("no id", None, "a message without a Message-ID"), ("\\Flagged",)),
        (mail("twin", shared_id, "version one"), ()),
        (mail("twin", shared_id, "version two"), ("\\Seen", "\\Answered")),
    ]
    found += [(mail(f"filler {n}", f"<filler-{n}@example.org>", f"text {n}"), ()) for n in range(5, 13)]
    return [(body, flags, now - dt.timedelta(minutes=60 - n)) for n, (body, flags) in enumerate(found)]


def faults(source, destination) -> tuple[int, int, int]:
    """(lost, duplicated, foreign), comparing bytes, flags and INTERNALDATE."""
    want = Counter((m.body, m.flags, m.internaldate) for m in source)
    got = Counter((m.body, m.flags, m.internaldate) for m in destination)
    lost = sum((want - got).values())
    duplicated = sum(got[k] - want[k] for k in want if got[k] > want[k])
    foreign = sum(n for k, n in got.items() if k not in want)
    return lost, duplicated, foreign


def driver(env: dict, workdir: Path, path: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.e2e.crash_driver", path, *args],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Scenario:
    path: str
    server: str
    point: str
    hook: str
    uid: int
    env: dict
    gmail_user: str
    outlook_user: str
    workdir: Path
    chunk: int | None = None  # crash_driver --chunk, for the killed run and the rerun
    killed: subprocess.CompletedProcess | None = None
    rerun: subprocess.CompletedProcess | None = None
    row: Row | None = None

    def run(self, dovecot_pair) -> Scenario:
        chunked = ["--chunk", str(self.chunk)] if self.chunk else []
        args = ["--kill-at", self.hook, "--uid", str(self.uid), *chunked]
        self.killed = driver(self.env, self.workdir, self.path, *args)
        if self.killed.returncode == -signal.SIGKILL:
            self.rerun = driver(self.env, self.workdir, self.path, *chunked)
        source = read_folder(dovecot_pair.gmail, self.gmail_user, "INBOX")
        destination = read_folder(dovecot_pair.outlook, self.outlook_user, FOLDER)
        self.row = Row(self.path, self.point, self.server, *faults(source, destination))
        return self

    def problem(self) -> str | None:
        if self.killed.returncode != -signal.SIGKILL:
            return f"{self.point}: not killed at the point (exit {self.killed.returncode})\n{_output(self.killed)}"
        if self.rerun.returncode != 0:
            return f"{self.point}: the rerun exited {self.rerun.returncode}\n{_output(self.rerun)}"
        if not self.row.clean:
            return f"{self.point}: {self.row}\n{_output(self.rerun)}"
        return None


def _output(done: subprocess.CompletedProcess) -> str:
    return f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"


def _matrix_text(rows: list[Row]) -> str:
    return "\n".join(
        f"{r.path:<7} {r.server:<7} {r.point:<52} lost {r.lost}  duplicated {r.duplicated}  foreign {r.foreign}"
        for r in rows
    )


def run_matrix(scenarios: list[Scenario], dovecot_pair) -> None:
    for scenario in scenarios:
        seed(dovecot_pair.gmail, scenario.gmail_user, "INBOX", messages())
    with ThreadPoolExecutor(PARALLEL_SCENARIOS) as pool:
        done = list(pool.map(lambda scenario: scenario.run(dovecot_pair), scenarios))
    rows = [scenario.row for scenario in done]
    MATRIX.extend(rows)
    problems = [p for p in (scenario.problem() for scenario in done) if p]
    assert not problems, _matrix_text(rows) + "\n\n" + "\n\n".join(problems)


def route_env(sync_env, name: str) -> tuple[dict, str, str, Path]:
    setup = sync_env(routes=((name, "INBOX", FOLDER),))
    env = setup.env | {"LEASE_SECONDS": LEASE_SECONDS}
    env["STATE_DB"] = str(setup.workdir / "state" / f"{name}.db")
    return env, setup.routes[0].gmail_user, setup.outlook_user, setup.workdir


def test_drain_killed_at_each_point_then_rerun(sync_env, dovecot_pair, servers):
    scenarios = []
    for index, (point, hook, uid, chunk) in enumerate(POINTS):
        env, gmail_user, outlook_user, workdir = route_env(sync_env, f"drain{index}")
        scenarios.append(Scenario("drain", servers.name, point, hook, uid, env, gmail_user, outlook_user, workdir, chunk))
    run_matrix(scenarios, dovecot_pair)


def test_lambda_handlers_killed_at_each_point_then_rerun(sync_env, dovecot_pair, aws_env, aws_client, servers):
    scenarios = []
    for index, (point, hook, uid, chunk) in enumerate(POINTS):
        env, gmail_user, outlook_user, workdir = route_env(sync_env, f"lambda{index}")
        table = unique_name("crash")
        create_state_table(aws_client("dynamodb"), table)
        # Above the deliveries a killed run and a still-held claim can cost (each is one receive).
        queue_url, dlq_url = create_fifo_queue_pair(aws_client("sqs"), unique_name("crash"), max_receive_count=5)
        env |= aws_env | {"STATE_TABLE": table, "QUEUE_URL": queue_url, "DLQ_URL": dlq_url}
        scenarios.append(Scenario("lambda", servers.name, point, hook, uid, env, gmail_user, outlook_user, workdir, chunk))
    run_matrix(scenarios, dovecot_pair)


# ---- servers failing under a running drain ---------------------------------------------------
def process_state(pid: int) -> str:
    """R, S, T (stopped), Z ...: the field after the command name in /proc/PID/stat."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


class StoppingDriver:
    """The driver in the background, stopping itself (SIGSTOP) at a point until `resume()`."""

    def __init__(self, env: dict, workdir: Path, *args: str) -> None:
        self.out, self.err = workdir / "driver.out", workdir / "driver.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.e2e.crash_driver", *args], env=env, cwd=workdir, stdout=out, stderr=err
            )

    def wait_stopped(self) -> None:
        stopped = lambda: process_state(self.proc.pid) == "T" or self.proc.poll() is not None  # noqa: E731
        wait_for(stopped, timeout=60, what="the driver to stop at its point")
        assert self.proc.poll() is None, f"exited {self.proc.returncode} before its point\n{self.output()}"

    def resume_and_wait(self) -> int:
        os.kill(self.proc.pid, signal.SIGCONT)
        return self.proc.wait(timeout=120)

    def output(self) -> str:
        return f"stdout:\n{self.out.read_text()[-3000:]}\nstderr:\n{self.err.read_text()[-3000:]}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def own_outlook(test_ca, oauth_server):
    """A destination Dovecot of this test's own, so killing it cannot disturb other tests."""
    server = DovecotServer("outlook-crash", "outlook.test", test_ca, oauth_server.introspection_url)
    server.start()
    yield server
    server.close()


def test_destination_dovecot_killed_and_restarted_during_append(sync_env, dovecot_pair, own_outlook):
    env, gmail_user, outlook_user, workdir = route_env(sync_env, "restart")
    env["OUTLOOK_IMAP_PORT"] = str(own_outlook.imaps_port)
    seed(dovecot_pair.gmail, gmail_user, "INBOX", messages())
    running = StoppingDriver(env, workdir, "drain", "--stop-at", "during-append", "--uid", str(SHARED_ID_SECOND_UID))
    try:
        running.wait_stopped()  # half of UID 4's literal is on its way
        own_outlook.kill()
        own_outlook.restart()
        returncode = running.resume_and_wait()
    finally:
        running.kill()

    source = read_folder(dovecot_pair.gmail, gmail_user, "INBOX")
    destination = read_folder(own_outlook, outlook_user, FOLDER)
    row = Row("drain", "destination Dovecot killed and restarted during APPEND", "dovecot", *faults(source, destination))
    MATRIX.append(row)
    assert returncode == 0, running.output()
    # The outage was met at UID 4's APPEND, half sent before the kill: a failure of its own, or,
    # when the answers to the APPENDs sent before it were read (they are, from the socket's
    # buffer), one of the session that ended; and then got over.
    err = running.err.read_text()
    met = (f"UID {SHARED_ID_SECOND_UID} failed (attempt 1)", f"UID {SHARED_ID_SECOND_UID}: its APPEND was left unanswered")
    assert any(line in err for line in met), running.output()
    assert "route restart: 12 copied, 0 skipped, 0 failed" in running.out.read_text(), running.output()
    assert row.clean, row


@pytest.fixture
def own_moto(aws_env):
    """A moto server of this test's own on a fixed port, which the test can stop and start again.
    moto keeps its state in this process, so a server started again serves the same table and
    queues, as AWS would after an outage."""
    servers = []

    def start(port: int = 0) -> str:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        servers.append(server)
        host, bound = server.get_host_and_port()
        return f"http://{host}:{bound}"

    def stop() -> None:
        server = servers[-1]
        server.stop()
        server._server.server_close()  # stop() leaves the socket listening: connections would hang

    yield start, stop
    if servers and servers[-1]._server_ready_event.is_set():
        stop()


def test_moto_stopped_during_a_drain_fails_safe_and_loses_nothing(sync_env, dovecot_pair, aws_env, own_moto):
    start_moto, stop_moto = own_moto
    endpoint = start_moto()
    env, gmail_user, outlook_user, workdir = route_env(sync_env, "outage")
    table, queue_name = unique_name("outage"), unique_name("outage")
    client = lambda service: boto3.client(service, endpoint_url=endpoint, region_name=REGION)  # noqa: E731
    create_state_table(client("dynamodb"), table)
    queue_url, dlq_url = create_fifo_queue_pair(client("sqs"), queue_name, max_receive_count=5)
    env |= aws_env | {"AWS_ENDPOINT_URL": endpoint, "STATE_TABLE": table, "QUEUE_URL": queue_url, "DLQ_URL": dlq_url}
    seed(dovecot_pair.gmail, gmail_user, "INBOX", messages())

    running = StoppingDriver(env, workdir, "drain", "--stop-at", "after-append", "--uid", str(SHARED_ID_SECOND_UID))
    try:
        running.wait_stopped()  # UID 4 is in the destination; its claim is not finalized
        stop_moto()
        returncode = running.resume_and_wait()
    finally:
        running.kill()
    # The state store is gone mid-run: a clear error naming it, the gate's exit code, no traceback.
    assert returncode == 4, running.output()
    assert f"FAIL  state store        DynamoDB table {table}" in running.out.read_text(), running.output()
    assert "Traceback" not in running.err.read_text()

    start_moto(int(endpoint.rsplit(":", 1)[1]))
    rerun = driver(env, workdir, "drain")

    source = read_folder(dovecot_pair.gmail, gmail_user, "INBOX")
    destination = read_folder(dovecot_pair.outlook, outlook_user, FOLDER)
    row = Row("drain", "moto (DynamoDB + SQS) stopped after an APPEND, then back", "dovecot", *faults(source, destination))
    MATRIX.append(row)
    assert rerun.returncode == 0, _output(rerun)
    assert row.clean, row


def claim_lease(state_db: str, uid: int) -> float | None:
    with contextlib.closing(sqlite3.connect(state_db)) as db:
        row = db.execute("SELECT lease_until FROM claims WHERE uid = ?", (uid,)).fetchone()
    return None if row is None else row[0]


def test_a_drain_stopped_mid_append_past_its_lease_is_not_overtaken(sync_env, dovecot_pair, servers):
    """A drain frozen (SIGSTOP: a laptop lid, a paused VM) after sending half an APPEND, for
    longer than its lease. A second drain must not append the message too: the first is alive
    and its APPEND lands when it goes on, and then it copies what waited behind it."""
    env, gmail_user, outlook_user, workdir = route_env(sync_env, "stopped")
    seed(dovecot_pair.gmail, gmail_user, "INBOX", messages())
    first = StoppingDriver(env, workdir, "drain", "--stop-at", "during-append", "--uid", str(SHARED_ID_SECOND_UID))
    try:
        first.wait_stopped()
        lease = claim_lease(env["STATE_DB"], SHARED_ID_SECOND_UID)
        wait_for(lambda: time.time() > lease + 1, timeout=30, what="the stopped drain's lease to run out")

        second = driver(env, workdir, "drain")

        # It leaves the message to its holder, and the route's later messages behind it.
        assert second.returncode == 6, _output(second)
        assert "message(s) wait in the queue for a later run:" in second.stdout, _output(second)
        # The stopped drain holds its whole batch (UIDs 1 to 10): the first of them is named.
        held = "route stopped UID 1: held by pid "
        assert held in second.stdout and "alive past its lease (stopped?)" in second.stdout, _output(second)
        copied_before = len(read_folder(dovecot_pair.outlook, outlook_user, FOLDER))
        # The APPENDs sent whole ahead of the half-sent one, landed and unanswered.
        assert copied_before == SHARED_ID_SECOND_UID - 1

        resumed = first.resume_and_wait()
    finally:
        first.kill()
    # It goes on, and its APPEND lands; its claim was never taken. The message the second drain
    # put off for 20 minutes is deleted with it, so the route's later messages do not wait
    # behind it: the resumed drain copies them, and a later run finds nothing left.
    assert resumed == 0, first.output()
    assert "is not held by" not in first.err.read_text(), first.output()
    later = driver(env, workdir, "drain")
    assert "0 copied" in later.stdout and "wait in the queue" not in later.stdout, _output(later)

    source = read_folder(dovecot_pair.gmail, gmail_user, "INBOX")
    destination = read_folder(dovecot_pair.outlook, outlook_user, FOLDER)
    row = Row("drain", "stopped mid-APPEND past its lease; another drain ran", servers.name, *faults(source, destination))
    MATRIX.append(row)
    assert later.returncode == 0, _output(later)
    assert row.clean, row
