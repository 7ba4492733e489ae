"""One drain at a time on a state file (shared.cli.run_lock): a holder in a process of its own,
as a second drain meets it."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from shared.cli import run_lock
from tests.harness.mail import wait_for

# A drain holding the lock until its stdin closes: prints "first" (or "second") once it knows.
HOLDER = """
import sys
from pathlib import Path
from types import SimpleNamespace
from shared.cli import run_lock
settings = SimpleNamespace(state_table=None, state_db_path=Path(sys.argv[1]))
routes = sys.argv[2].split(",") if len(sys.argv) > 2 else None
with run_lock.first_drain(settings, "drain --watch", routes) as first:
    print("first" if first else "second", flush=True)
    sys.stdin.read()
"""


def local_state(path: Path) -> SimpleNamespace:
    return SimpleNamespace(state_table=None, state_db_path=path)


@pytest.fixture
def holder(tmp_path):
    state_file = tmp_path / "state" / "state.db"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "first\n"  # it holds the lock from here on
    yield SimpleNamespace(process=process, state_file=state_file)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)
        process.stdin.close()
        process.wait(timeout=30)


def test_a_second_drain_is_told_which_drain_holds_the_state_file_and_leaves_it_the_work(holder, capsys):
    with run_lock.first_drain(local_state(holder.state_file), "drain") as first:
        assert first is False
    out = capsys.readouterr().out
    assert re.fullmatch(
        re.escape(f"another drain --watch (pid {holder.process.pid}, started ") + r"\d\d:\d\d"
        + re.escape(f") is running on {holder.state_file}; this one leaves the work to it and ends (exit 0)") + ".*\n",
        out,
    ), out


def test_once_the_holder_ends_the_next_drain_takes_the_lock_and_names_itself(holder, capsys):
    holder.process.stdin.close()
    assert holder.process.wait(timeout=30) == 0
    with run_lock.first_drain(local_state(holder.state_file), "drain") as first:
        assert first is True
        named = json.loads(run_lock.lock_path(holder.state_file).read_text())
        assert named["command"] == "drain" and f":{os.getpid()}:" in named["owner"]
    assert capsys.readouterr().out == ""


def test_a_killed_holder_leaves_no_lock_behind(holder, capsys):
    holder.process.kill()  # kill -9: no cleanup ran in it
    holder.process.wait(timeout=30)
    with run_lock.first_drain(local_state(holder.state_file), "drain") as first:
        assert first is True
    assert capsys.readouterr().out == ""


def test_beside_a_stopped_holder_a_drain_goes_on_and_says_so(holder, capsys):
    os.kill(holder.process.pid, signal.SIGSTOP)  # Ctrl-Z
    stopped = lambda: psutil.Process(holder.process.pid).status() == psutil.STATUS_STOPPED  # noqa: E731
    wait_for(stopped, timeout=10, what="the holder to stop")  # a signal arrives a moment after kill()
    try:
        with run_lock.first_drain(local_state(holder.state_file), "drain") as first:
            assert first is True
    finally:
        os.kill(holder.process.pid, signal.SIGCONT)
    out = capsys.readouterr().out
    assert f"another drain --watch (pid {holder.process.pid}, started " in out, out
    assert f"holds {holder.state_file} but is stopped (Ctrl-Z or SIGSTOP); this one goes on beside it" in out, out


def test_a_lock_held_but_not_yet_named_is_said_as_such(tmp_path, monkeypatch, capsys):
    """The holder writes its name just after taking the lock: a drain that comes in between
    waits for it a moment, then says what it knows."""
    monkeypatch.setattr(run_lock, "HOLDER_NAME_WAIT_SECONDS", 0.05)
    state_file = tmp_path / "state.db"
    fd = os.open(run_lock.lock_path(state_file), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: conflicts with ours
        with run_lock.first_drain(local_state(state_file), "drain") as first:
            assert first is False
    finally:
        os.close(fd)
    assert capsys.readouterr().out.startswith(
        f"another drain (not named: its lock file holds no name yet) is running on {state_file};"
    )


def test_no_lock_where_the_state_folder_cannot_be_made_the_state_stores_gate_says_why(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    with run_lock.first_drain(local_state(tmp_path / "a-file" / "state.db"), "drain") as first:
        assert first is True
    assert capsys.readouterr().out == ""


def test_no_lock_with_dynamodb_state_drains_on_several_machines_share_through_the_claims(tmp_path):
    settings = SimpleNamespace(state_table="mail-syncer-state", state_db_path=tmp_path / "state.db")
    with run_lock.first_drain(settings, "drain") as first:
        assert first is True
    assert list(tmp_path.iterdir()) == []


def test_a_drain_of_other_routes_goes_on_beside_the_holder_and_one_of_its_routes_leaves_it_the_work(tmp_path, capsys):
    """`drain --route b` beside `drain --route a`: nobody else would copy b's mail."""
    state_file = tmp_path / "state.db"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state_file), "a,c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "first\n"
        with run_lock.first_drain(local_state(state_file), "drain", ["b"]) as first:
            assert first is True
        assert "for route(s) a, c; this one goes on beside it for its own" in capsys.readouterr().out
        with run_lock.first_drain(local_state(state_file), "drain", ["c"]) as first:
            assert first is False
        with run_lock.first_drain(local_state(state_file), "drain") as first:
            assert first is True  # every route: more than the holder drains
    finally:
        process.stdin.close()
        process.wait(timeout=30)
