"""`make demo` as a newcomer runs it on a fresh clone: infra/demo.py end to end, with no settings
and no .env, and what it leaves behind (nothing)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import psutil

from infra.sample_mail import sample_mailbox
from tests.harness.sync_env import REPO_ROOT, _clean_environment

DEMO = REPO_ROOT / "infra" / "demo.py"
# "within a minute or two", on a loaded machine; it takes about 5 s on an idle one.
DEMO_SECONDS = 120
ROUTES = {"inbox": "INBOX", "receipts": "Receipts"}
SERVER = re.compile(r"Dovecot pid (\d+), 127\.0\.0\.1:(\d+)\)")


def start_demo(workdir: Path) -> subprocess.Popen:
    # No mail_syncer setting in its environment, and run from a folder without .env.
    return subprocess.Popen(
        [sys.executable, str(DEMO)],
        cwd=workdir,
        env=_clean_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the test plays the terminal's Ctrl-C
    )


def left_behind(output: str) -> list[str]:
    """What the demo left of what its last lines say it stopped and removed: processes of its
    servers' process groups (Dovecot's master, and its imap, auth and login processes), their
    listening ports, and the folders (the demo's state, certificates, the servers' mail)."""
    stopped, removed = output.splitlines()[-2:]
    servers = [(int(pid), int(port)) for pid, port in SERVER.findall(stopped)]
    folders = removed.removeprefix("demo: removed ").rsplit(" (", 1)[0].split(", ")
    assert len(servers) == 2 and len(folders) == 3, output
    groups, ports = {pid for pid, _ in servers}, {port for _, port in servers}
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getpgid(process.pid) in groups:
                found.append(f"process {process.pid} {process.info['cmdline']}")
        except ProcessLookupError:
            pass
    found += [
        f"port {c.laddr.port} listening (pid {c.pid})"
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
    ]
    found += [f"folder {folder}" for folder in folders if Path(folder).exists()]
    return found


def test_the_demo_copies_the_sample_mail_of_the_start_window_shows_status_and_leaves_nothing(tmp_path):
    started = time.monotonic()
    demo = start_demo(tmp_path)
    output, _ = demo.communicate(timeout=DEMO_SECONDS)
    took = time.monotonic() - started

    assert demo.returncode == 0, output
    assert took < DEMO_SECONDS, output
    seeded = sample_mailbox(datetime.now(timezone.utc), "alice@gmail.test")
    in_window = Counter(message.folder for message in seeded if message.recent)
    older = Counter(message.folder for message in seeded if not message.recent)
    assert sum(in_window.values()) >= 24 and sum(older.values()) >= 1  # a few dozen, some outside
    for route, folder in ROUTES.items():
        # drain's own lines: the start window, then the summary.
        assert f"{older[folder]} older message(s) in {folder} are not copied" in output, output
        assert f"route {route}: {in_window[folder]} copied, 0 skipped, 0 failed" in output, output
        # status, after it.
        status = output.split("$ python -m shared.cli status", 1)[1]
        assert re.search(rf"route {route}: \S+ {folder} -> Gmail/\w+; watermark UIDVALIDITY \d+, UID {older[folder] + in_window[folder]}", status), output
        assert f"done {in_window[folder]}, skipped 0, to try again 0, in progress 0" in status, output
    assert "0 queued, 0 in flight, 0 dead" in output, output
    # Its own check, byte for byte, passed.
    assert f"holds {sum(in_window.values())} messages, each the exact bytes, flags and date" in output, output
    assert not left_behind(output), left_behind(output)


def test_ctrl_c_while_the_servers_run_stops_them_and_removes_every_file(tmp_path):
    demo = start_demo(tmp_path)
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if line.startswith("demo: Gmail stand-in:"):  # both servers are up and seeded
            os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's process group
            break
    rest, _ = demo.communicate(timeout=60)
    output = "".join(lines) + rest

    assert demo.returncode == 130, output
    assert "demo: interrupted" in output, output
    assert not left_behind(output), left_behind(output)
