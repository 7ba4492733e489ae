"""One drain at a time on a state file: what a second one started meanwhile does, and says.

A drain takes an advisory lock (`fcntl.flock`) on a file beside the SQLite state file,
`STATE_DB` + `.run-lock`, and writes into it who holds it: the process (host, pid and start time,
as claims name it) and its command line. The kernel lets it go when the process ends however it
ends (`kill -9` too), so a lock is never left behind.

A second drain (cron every 5 minutes while a long first one runs, `make drain` in a terminal
beside a timer's) finds it held, says which drain holds it, and ends with exit 0: that drain
copies what is queued, and the next run after it what arrived meanwhile. Two drains would be safe
(the claims give each message to one process), but each opens its own IMAP sessions, and drains
that pile up would go past Gmail's connection limit and into Outlook's throttling.

A drain of some routes only (`--route`) leaves the work to a holder that drains them all (or
them among others); beside a holder of other routes it goes on, and says so: their messages are
apart, and nobody else would copy this one's.

One exception: a holder that is stopped (Ctrl-Z, SIGSTOP) may stay so for days, and the drains
after it must not end doing nothing all that while. Beside a stopped holder a drain goes on; the
claims keep the stopped one's messages its own (see `shared.claim_owners`).

The lock is for SQLite state, on one machine; with DynamoDB state (STATE_TABLE) drains on
several machines share the work through the claims alone, and none is taken here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from shared import claim_owners
from shared.settings import Settings
from shared.state import HolderState

LOCK_SUFFIX = ".run-lock"
# The holder writes its name just after it takes the lock: how long a second drain waits for it.
HOLDER_NAME_WAIT_SECONDS = 2.0


@dataclass(frozen=True)
class Holder:
    """The drain that holds the lock, as read from the lock file."""

    owner: str  # claim_owners.this_process() of the holder: local:<host>:<pid>:<start>:<random>
    command: str  # e.g. "drain" or "drain --watch"
    state_file: Path
    routes: tuple[str, ...] | None = None  # the routes it drains (`--route`); None: every route

    def covers(self, routes: Sequence[str] | None) -> bool:
        """Whether it drains every one of `routes` (None: every route) too."""
        if self.routes is None:
            return True
        return routes is not None and set(routes) <= set(self.routes)

    @property
    def pid(self) -> int | None:
        parts = self.owner.split(":")
        return int(parts[2]) if len(parts) == 5 and parts[2].isdigit() else None

    @property
    def started(self) -> float | None:
        try:
            return float(self.owner.split(":")[3])
        except (IndexError, ValueError):
            return None

    def stopped(self) -> bool:
        """Whether the holder is a process of this host that is stopped (Ctrl-Z, SIGSTOP)."""
        if claim_owners.holder_state(self.owner) is not HolderState.ALIVE:
            return False
        try:
            return psutil.Process(self.pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        except psutil.Error:
            return False

    def describe(self) -> str:
        """`drain (pid 1234, started 14:05)`; the date too when it started on another day."""
        if self.pid is None:
            return f"{self.command} (not named: its lock file holds no name yet)"
        started = self.started
        when = ""
        if started is not None:
            same_day = time.strftime("%Y-%m-%d", time.localtime(started)) == time.strftime("%Y-%m-%d")
            when = ", started " + time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", time.localtime(started))
        return f"{self.command} (pid {self.pid}{when})"


@contextlib.contextmanager
def first_drain(settings: Settings, command: str, routes: Sequence[str] | None = None) -> Iterator[bool]:
    """Enter as the one drain on the state file: True (the lock is held until the block ends),
    or False after saying which drain runs already and that this one leaves the work to it.
    True beside a stopped holder, or one that drains other routes than `routes` (None: every
    route), each said too; and when there is no file to lock: DynamoDB state, or a state folder
    that cannot be written (the state store's gate says so, with exit 4)."""
    state_file = None if settings.state_table else settings.state_db_path
    if state_file is None:
        yield True
        return
    try:
        fd = _open(lock_path(state_file))
    except OSError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd, state_file)
            if not holder.covers(routes):
                print(
                    f"another {holder.describe()} is running on {state_file} for route(s) {', '.join(holder.routes or ())};"
                    " this one goes on beside it for its own (the claims give each message to one process)",
                    flush=True,
                )
                yield True
                return
            if not holder.stopped():
                print(
                    f"another {holder.describe()} is running on {state_file}; this one leaves the work to it and "
                    "ends (exit 0): it copies what is queued, and the next run after it what arrives meanwhile",
                    flush=True,
                )
                yield False
                return
            print(
                f"another {holder.describe()} holds {state_file} but is stopped (Ctrl-Z or SIGSTOP); this one goes "
                "on beside it: what the stopped one holds stays its own (`status` shows its claims)",
                flush=True,
            )
            yield True
            return
        _write_name(fd, command, routes)
        yield True
    finally:
        os.close(fd)  # lets the lock go, if this process held it


def lock_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + LOCK_SUFFIX)


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _write_name(fd: int, command: str, routes: Sequence[str] | None) -> None:
    named = {"owner": claim_owners.this_process(), "command": command, "routes": None if routes is None else list(routes)}
    name = json.dumps(named).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, name, 0)
    except OSError:
        pass  # a full disk: the lock holds all the same; a second drain finds it unnamed


def _holder(fd: int, state_file: Path) -> Holder:
    """The holder named in the lock file. Right after it took the lock the file may still be
    empty or name the holder before it: read again, for a moment, until it names a live one."""
    deadline = time.monotonic() + HOLDER_NAME_WAIT_SECONDS
    while True:
        try:
            named = json.loads(os.pread(fd, 4096, 0) or b"null")
            routes = named.get("routes")
            holder = Holder(
                str(named["owner"]), str(named["command"]), state_file,
                None if routes is None else tuple(str(route) for route in routes),
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError):  # empty, or half written
            holder = Holder("", "drain", state_file)
        alive = claim_owners.holder_state(holder.owner) is not HolderState.GONE and holder.pid
        if alive or time.monotonic() > deadline:
            return holder
        time.sleep(0.01)
