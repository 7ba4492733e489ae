"""Copy-speed benchmark: mail_syncer's `drain` against a plain imapclient loop and mbsync.

    .venv/bin/python bench/copy_speed.py [--messages N] [--repeat R]

One run starts two throwaway Dovecot servers (mail on /dev/shm), seeds N corpus-like
messages into a source user's INBOX, then times each copier into its own fresh destination
user and checks what arrived. See bench/README.md. This is a benchmark, not a test: it is
not collected by pytest and fails loudly rather than asserting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from imapclient.imapclient import datetime_to_INTERNALDATE, seq_to_parenstr  # noqa: E402

from tests.harness.mail import DovecotServer, append, connect, corpus  # noqa: E402
from tests.harness.oauth import OAuthServer  # noqa: E402
from tests.harness.tls import make_local_ca  # noqa: E402

MB = 1_000_000  # decimal megabytes in every figure
FOLDER = "INBOX"
FETCH_CHUNK = 100  # UIDs per FETCH in the baseline
SEED_WINDOW = 64  # APPENDs in flight while seeding
SPOT_CHECKS = 20
FLAG_SETS = [
    (),
    (b"\\Seen",),
    (b"\\Seen",),
    (b"\\Seen", b"\\Flagged"),
    (b"\\Seen", b"\\Answered"),
    (b"\\Flagged",),
    (b"\\Draft",),
    (b"\\Seen", b"\\Answered", b"\\Flagged"),
]
BENCH_ID = re.compile(rb"<bench-(\d+)-[0-9a-f]+@copy-speed\.bench>")


# -- the servers ---------------------------------------------------------------------------


@dataclass
class Servers:
    source: DovecotServer
    dest: DovecotServer
    ca_bundle: str
    workdir: Path  # a temp folder for drain's state, mbsync's config and logs


def start_servers(stack: ExitStack) -> Servers:
    """A CA, the OAuth stand-in (Dovecot's config needs its introspection URL) and two
    Dovecots; everything is registered on ``stack`` to be stopped and removed."""
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="copy-speed-")))
    ca = make_local_ca(workdir / "ca")
    oauth = OAuthServer(ca)
    stack.callback(oauth.close)
    pair = []
    for name, domain in (("bench-src", "gmail.test"), ("bench-dst", "outlook.test")):
        server = DovecotServer(name, domain, ca, oauth.introspection_url)
        stack.callback(server.close)  # registered first: a half-started server is removed too
        server.start()
        pair.append(server)
    return Servers(pair[0], pair[1], ca.ca_bundle_path, workdir)


# -- seeding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    user: str
    count: int
    total_bytes: int
    seconds: float
    message_ids: frozenset[bytes]


def with_message_id(raw: bytes, message_id: bytes) -> bytes:
    """``raw`` with every Message-ID header of its header block set to ``message_id``, or
    with one added (after an mbox ``From `` line if it starts with one)."""
    eol = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    split = min(ends) if ends else len(raw)
    head, body = raw[:split], raw[split:]
    header = rb"(?im)^Message-ID:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*"
    head, replaced = re.subn(header, b"Message-ID: " + message_id, head)
    if replaced:
        return head + body
    line = b"Message-ID: " + message_id + eol
    if raw.startswith(b"From "):
        first = raw.find(b"\n") + 1
        return raw[:first] + line + raw[first:]
    return line + raw


def bench_messages(n: int, run_id: str, rng: random.Random) -> Iterator[tuple[bytes, tuple[bytes, ...], datetime]]:
    """N messages cycling through the corpus (manifest order), each with its own
    Message-ID, a flag set and an INTERNALDATE within the last 3 days."""
    sources = [m.bytes for m in corpus()]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    for i in range(n):
        message_id = b"<bench-%06d-%s@copy-speed.bench>" % (i, run_id.encode())
        when = now - timedelta(seconds=rng.randint(60, 3 * 86400 - 60))
        yield with_message_id(sources[i % len(sources)], message_id), rng.choice(FLAG_SETS), when


def seed_source(server: DovecotServer, messages: Iterator[tuple[bytes, tuple[bytes, ...], datetime]]) -> Seeded:
    """APPEND every message to a fresh user's INBOX, pipelined: up to SEED_WINDOW LITERAL+
    APPENDs are on the wire before the oldest answer is read. Exact bytes."""
    user = server.new_user("source")
    client = connect(server, user)
    imap = client._imap  # imaplib underneath: its tags and tagged-response bookkeeping
    folder = client._normalise_folder(FOLDER)
    in_flight: deque[bytes] = deque()
    ids, total, started = set(), 0, time.perf_counter()

    def finish_oldest() -> None:
        tag = in_flight.popleft()
        typ, data = imap._command_complete("APPEND", tag)
        if typ != "OK":
            raise RuntimeError(f"seeding APPEND answered {typ} {data!r}")

    try:
        for raw, flags, when in messages:
            tag = imap._new_tag()
            imap.send(
                b'%s APPEND %s %s "%s" {%d+}\r\n%s\r\n'
                % (
                    tag,
                    folder,
                    seq_to_parenstr(list(flags)).encode(),
                    datetime_to_INTERNALDATE(when).encode(),
                    len(raw),
                    raw,
                )
            )
            in_flight.append(tag)
            ids.add(BENCH_ID.search(raw).group(0))
            total += len(raw)
            if len(in_flight) >= SEED_WINDOW:
                finish_oldest()
        while in_flight:
            finish_oldest()
        seconds = time.perf_counter() - started
    finally:
        client.logout()
    return Seeded(user, len(ids), total, seconds, frozenset(ids))


# -- the copiers ---------------------------------------------------------------------------
# Each takes (servers, seeded source, fresh destination user) and copies the source INBOX
# into the destination INBOX. It returns the source UIDs the copier itself said it skipped
# (only mbsync does), and raises CopyFailed when the copier reports failure.


class CopyFailed(Exception):
    pass


def copy_baseline(servers: Servers, seeded: Seeded, dest_user: str) -> set[int]:
    """One imapclient connection a side: FETCH BODY.PEEK[] FLAGS INTERNALDATE in chunks of
    100 UIDs, then one exact-bytes APPEND per message, waiting for each answer."""
    src = connect(servers.source, seeded.user)
    dst = connect(servers.dest, dest_user)
    src.normalise_times = False  # keep the zone the server answered with
    try:
        src.select_folder(FOLDER, readonly=True)
        uids = src.search("ALL")
        for start in range(0, len(uids), FETCH_CHUNK):
            chunk = uids[start : start + FETCH_CHUNK]
            fetched = src.fetch(chunk, [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"])
            for uid in chunk:
                item = fetched[uid]
                flags = [f for f in item[b"FLAGS"] if f != b"\\Recent"]
                append(dst, FOLDER, item[b"BODY[]"], flags, item[b"INTERNALDATE"])
    finally:
        src.logout()
        dst.logout()
    return set()


def drain_env(servers: Servers, seeded: Seeded, dest_user: str, run_dir: Path) -> dict[str, str]:
    """mail_syncer's settings for one password route, built from nothing (no inherited
    mail_syncer or AWS variables), with its SQLite state and queue in ``run_dir``."""
    route = {
        "name": "bench",
        "gmail_user": seeded.user,
        "gmail_password": servers.source.password,
        "gmail_folder": FOLDER,
        "outlook_folder": FOLDER,
        "since": (date.today() - timedelta(days=7)).isoformat(),
    }
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(run_dir),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO_ROOT),
        "SYNC_ROUTES_JSON": json.dumps([route]),
        "OUTLOOK_USER": dest_user,
        "OUTLOOK_PASSWORD": servers.dest.password,
        "GMAIL_IMAP_HOST": servers.source.host,
        "GMAIL_IMAP_PORT": str(servers.source.imaps_port),
        "OUTLOOK_IMAP_HOST": servers.dest.host,
        "OUTLOOK_IMAP_PORT": str(servers.dest.imaps_port),
        "IMAP_CA_BUNDLE": servers.ca_bundle,
        "STATE_DB": str(run_dir / "state.db"),
        "MAX_ENQUEUE_PER_RUN": str(seeded.count * 2 + 100),
    }


def drain_startup() -> float | None:
    """Seconds ``python -m shared.cli drain --help`` takes (interpreter and imports), or
    None when this checkout's CLI has no ``drain`` command (yet)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "drain", "--help"],
        cwd=REPO_ROOT,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        timeout=60,
    )
    return time.perf_counter() - started if done.returncode == 0 else None


def copy_drain(servers: Servers, seeded: Seeded, dest_user: str) -> set[int]:
    """``python -m shared.cli drain`` in a subprocess (interpreter start-up included)."""
    run_dir = Path(tempfile.mkdtemp(prefix="drain-", dir=servers.workdir))
    log = run_dir / "drain.log"
    with open(log, "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "shared.cli", "drain"],
            cwd=run_dir,  # no .env there
            env=drain_env(servers, seeded, dest_user, run_dir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
    if done.returncode != 0:
        raise CopyFailed(f"exit code {done.returncode}; last output:\n{tail(log)}")
    return set()


MBSYNCRC = """\
# isync 1.4.4 checks the server name against the certificate's DNS names and then its CN,
# never its IP addresses: the test certificate (SAN IP:127.0.0.1, DNS:localhost, no CN) is
# refused for "Host 127.0.0.1" ("cannot get certificate common name").
IMAPAccount source
Host localhost
Port {src.imaps_port}
User {src_user}
Pass "{src.password}"
AuthMechs LOGIN
SSLType IMAPS
CertificateFile {ca}
PipelineDepth 50

IMAPStore source
Account source

IMAPAccount dest
Host localhost
Port {dst.imaps_port}
User {dst_user}
Pass "{dst.password}"
AuthMechs LOGIN
SSLType IMAPS
CertificateFile {ca}
PipelineDepth 50

IMAPStore dest
Account dest

# isync 1.4 names the two ends Far and Near (1.3: Master and Slave); Pull = far -> near.
Channel bench
Far :source:{folder}
Near :dest:{folder}
# New messages only, far to near; they arrive with their flags. Without CopyArrivalDate
# the copies get the time of the copy as INTERNALDATE.
Sync Pull New
Create Near
Expunge None
Remove None
CopyArrivalDate yes
SyncState {state}/
"""


def copy_mbsync(servers: Servers, seeded: Seeded, dest_user: str) -> set[int]:
    """mbsync (isync) pulling the source INBOX into the destination INBOX.

    mbsync inserts an X-TUID header into every message it copies; a message without the
    blank line that ends a header it skips, with a warning and exit code 0: those source
    UIDs are returned."""
    run_dir = Path(tempfile.mkdtemp(prefix="mbsync-", dir=servers.workdir))
    (run_dir / "state").mkdir()
    rc = run_dir / "mbsyncrc"
    rc.write_text(
        MBSYNCRC.format(
            src=servers.source,
            dst=servers.dest,
            src_user=seeded.user,
            dst_user=dest_user,
            ca=servers.ca_bundle,
            folder=FOLDER,
            state=run_dir / "state",
        )
    )
    rc.chmod(0o600)
    log = run_dir / "mbsync.log"
    with open(log, "wb") as out:
        done = subprocess.run(
            ["mbsync", "-c", str(rc), "bench"],
            cwd=run_dir,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(run_dir)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
    if done.returncode != 0:
        raise CopyFailed(f"exit code {done.returncode}; last output:\n{tail(log)}")
    skipped = re.findall(
        r"message (\d+) from far side has incomplete header; skipping", log.read_text(errors="replace")
    )
    return {int(uid) for uid in skipped}


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- checking what arrived -----------------------------------------------------------------


X_TUID = re.compile(rb"(?im)^X-TUID: [^\r\n]*\r?\n")


@dataclass
class Checked:
    problems: list[str] = field(default_factory=list)  # the copy is wrong
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure


def check_destination(
    servers: Servers, seeded: Seeded, dest_user: str, skipped: set[int], rng: random.Random, strict_bytes: bool
) -> Checked:
    """Exactly the seeded messages arrived, once each (by Message-ID), but for the source
    UIDs the copier said it ``skipped``; then SPOT_CHECKS random ones compared with the
    source: BODY[] bytes (a problem when ``strict_bytes``, else a note, e.g. mbsync's X-TUID
    header), FLAGS and INTERNALDATE."""
    result = Checked()
    src, dst = connect(servers.source, seeded.user), connect(servers.dest, dest_user)
    try:
        src.normalise_times = dst.normalise_times = False
        src.select_folder(FOLDER, readonly=True)
        src_uid_by_id = message_ids(src, result)
        said_skipped = {m for m, uid in src_uid_by_id.items() if uid in skipped}
        expected = seeded.message_ids - said_skipped
        exists = dst.select_folder(FOLDER, readonly=True)[b"EXISTS"]
        if exists != len(expected):
            result.problems.append(f"{exists} messages in the destination, expected {len(expected)}")
        dst_uid_by_id = message_ids(dst, result) if exists else {}
        missing = expected - dst_uid_by_id.keys()
        if missing:
            result.problems.append(f"{len(missing)} seeded messages missing")
        if said_skipped:
            result.notes.append(
                f"skipped {len(said_skipped)} message(s) with no blank line after the header (exit code 0, "
                "a warning each); its msg/s still counts all N"
            )
        if not dst_uid_by_id:
            return result
        common = sorted(dst_uid_by_id.keys() & src_uid_by_id.keys())
        sample = rng.sample(common, min(SPOT_CHECKS, len(common)))
        compare(src, dst, [(src_uid_by_id[m], dst_uid_by_id[m]) for m in sample], strict_bytes, result)
    finally:
        src.logout()
        dst.logout()
    return result


def message_ids(client, result: Checked) -> dict[bytes, int]:
    """Message-ID -> UID for the selected folder; a repeated Message-ID is a problem."""
    by_id: dict[bytes, int] = {}
    fetched = client.fetch(client.search("ALL"), [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
    for uid, item in fetched.items():
        found = BENCH_ID.search(item[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"])
        if not found:
            result.problems.append(f"UID {uid} has no benchmark Message-ID")
        elif found.group(0) in by_id:
            result.problems.append(f"duplicate: {found.group(0).decode()}")
        else:
            by_id[found.group(0)] = uid
    return by_id


def compare(src, dst, pairs: list[tuple[int, int]], strict_bytes: bool, result: Checked) -> None:
    items = [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"]
    a, b = src.fetch([s for s, _ in pairs], items), dst.fetch([d for _, d in pairs], items)
    same_bytes = without_tuid = 0
    for s, d in pairs:
        x, y = a[s], b[d]
        if x[b"BODY[]"] == y[b"BODY[]"]:
            same_bytes += 1
        elif x[b"BODY[]"] == X_TUID.sub(b"", y[b"BODY[]"], count=1):
            without_tuid += 1
        flags_x, flags_y = (set(f[b"FLAGS"]) - {b"\\Recent"} for f in (x, y))
        if flags_x != flags_y:
            result.problems.append(f"source UID {s}: flags {sorted(flags_x)} became {sorted(flags_y)}")
        if x[b"INTERNALDATE"] != y[b"INTERNALDATE"]:
            result.problems.append(f"source UID {s}: INTERNALDATE {x[b'INTERNALDATE']} became {y[b'INTERNALDATE']}")
    differ = len(pairs) - same_bytes - without_tuid
    summary = f"{same_bytes}/{len(pairs)} spot-checked BODY[] identical"
    if without_tuid:
        summary += f", {without_tuid} identical once an added X-TUID header is removed"
    if differ:
        summary += f", {differ} otherwise different"
    if strict_bytes and same_bytes != len(pairs):
        result.problems.append(summary)
    else:
        result.notes.append(summary)


# -- running and reporting -----------------------------------------------------------------


@dataclass
class Copier:
    name: str
    copy: Callable[[Servers, Seeded, str], set[int]]
    strict_bytes: bool  # BODY[] must be byte-identical
    unavailable: str | None = None  # why it is skipped
    seconds: list[float] = field(default_factory=list)
    failure: str | None = None
    notes: list[str] = field(default_factory=list)


def run_copier(copier: Copier, servers: Servers, seeded: Seeded, rng: random.Random, round_no: int) -> None:
    dest_user = servers.dest.new_user(copier.name)
    print(f"  round {round_no}: {copier.name:<9} -> {dest_user} ...", end=" ", flush=True)
    started = time.perf_counter()
    try:
        skipped = copier.copy(servers, seeded, dest_user)
    except CopyFailed as exc:
        copier.failure = str(exc)
        print("FAILED")
        return
    seconds = time.perf_counter() - started
    checked = check_destination(servers, seeded, dest_user, skipped, rng, copier.strict_bytes)
    # Free the copy's memory on /dev/shm (the harness homes users at {root}/mail/USER).
    shutil.rmtree(servers.dest.root / "mail" / dest_user, ignore_errors=True)
    if checked.problems:
        copier.failure = "; ".join(checked.problems[:5]) + (" ..." if len(checked.problems) > 5 else "")
        print(f"{seconds:.2f} s, WRONG")
        return
    copier.seconds.append(seconds)
    copier.notes.extend(n for n in checked.notes if n not in copier.notes)
    print(f"{seconds:.2f} s, checked")


def machine_facts() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    dovecot = subprocess.run(
        [shutil.which("dovecot", path=os.environ.get("PATH", "") + ":/usr/sbin") or "dovecot", "--version"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    mbsync = shutil.which("mbsync")
    mbsync_version = (
        subprocess.run([mbsync, "--version"], capture_output=True, text=True).stdout.strip() if mbsync else "-"
    )
    return [
        f"cpus: {len(os.sched_getaffinity(0))} usable (nproc), model: {cpu}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"dovecot: {dovecot}; mbsync: {mbsync_version}",
        f"kernel: {platform.release()}",
    ]


def print_table(copiers: list[Copier], seeded: Seeded) -> None:
    baseline = next((c for c in copiers if c.name == "baseline" and c.seconds), None)
    base_s = statistics.median(baseline.seconds) if baseline else None
    mb = seeded.total_bytes / MB
    print(f"\n{'copier':<10} {'seconds':>9} {'msg/s':>9} {'MB/s':>8} {'vs baseline':>12}")
    for c in copiers:
        if c.unavailable:
            print(f"{c.name:<10} {c.unavailable}")
        elif c.failure:
            print(f"{c.name:<10} FAILED: {c.failure}")
        else:
            s = statistics.median(c.seconds)
            ratio = f"{base_s / s:.2f}x" if base_s else "-"
            print(f"{c.name:<10} {s:>9.2f} {seeded.count / s:>9.0f} {mb / s:>8.1f} {ratio:>12}")
    for c in copiers:
        if len(c.seconds) > 1:
            print(f"  {c.name} runs (s): {', '.join(f'{s:.2f}' for s in c.seconds)}")
        for note in c.notes:
            print(f"  {c.name}: {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--messages", type=int, default=2000, metavar="N", help="messages to seed and copy (default 2000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="R", help="rounds per copier; the median is shown (default 1)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed for flags, dates and spot checks (default 1)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.repeat < 1:
        parser.error("--messages and --repeat must be at least 1")
    return args


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so everything is cleaned up
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    rng = random.Random(args.seed)
    startup = drain_startup()
    drain = Copier("drain", copy_drain, strict_bytes=True, unavailable=None if startup else "drain: not available yet")
    if startup:
        drain.notes.append(f"its seconds include start-up: `shared.cli drain --help` takes {startup:.2f} s")
    copiers = [
        Copier("baseline", copy_baseline, strict_bytes=True),
        drain,
        Copier(
            "mbsync",
            copy_mbsync,
            strict_bytes=False,
            unavailable=None if shutil.which("mbsync") else "mbsync: not installed (apt-get install isync)",
        ),
    ]
    for line in machine_facts():
        print(line)
    with ExitStack() as stack:
        servers = start_servers(stack)
        run_id = os.urandom(4).hex()
        seeded = seed_source(servers.source, bench_messages(args.messages, run_id, rng))
        print(
            f"seeded {seeded.count} messages, {seeded.total_bytes / MB:.1f} MB "
            f"(mean {seeded.total_bytes / seeded.count / 1024:.1f} KiB) in {seeded.seconds:.2f} s, "
            f"into {seeded.user} on {servers.source.root}"
        )
        for round_no in range(1, args.repeat + 1):
            for copier in copiers:
                if not copier.unavailable and not copier.failure:
                    run_copier(copier, servers, seeded, rng, round_no)
        print(f"\nN = {seeded.count} messages, {seeded.total_bytes / MB:.1f} MB; median of {args.repeat} round(s)")
        print_table(copiers, seeded)
    return 1 if any(c.failure for c in copiers) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped and temp files removed", file=sys.stderr)
        sys.exit(130)
