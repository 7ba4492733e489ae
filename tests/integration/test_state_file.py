"""The SQLite state file (STATE_DB) and what each adapter of it says when it fails: the state store
and the local queue alike, on real faults (a full or read-only tmpfs, a lock held elsewhere, a
write past RLIMIT_FSIZE, an emptied or overwritten file). Each error is one line: the file, what
SQLite said, what to do."""

from __future__ import annotations

import itertools
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

import shared.queue.sqlite
import shared.state.sqlite
from shared.errors import QueueUnavailable, StateStoreUnavailable
from shared.message_ref import MessageRef
from shared.queue.sqlite import SqliteQueue
from shared.state.sqlite import SqliteStateStore
from tests.harness.small_disk import small_disk

REPO_ROOT = Path(__file__).resolve().parents[2]
LOST = (
    "restore it from a backup; if it is truly lost, move it aside and run again: each route's window is then"
    " looked for in the destination before anything is copied (`reconcile` does it at once), so nothing is"
    " copied twice"
)


@dataclass
class Adapter:
    """One adapter of the file: how to make it, one write that needs room of its own, what it raises."""

    name: str
    make: Callable[[Path], Any]
    error: type[Exception]
    prefix: str  # how its errors begin, before the path
    _uids = itertools.count(1)

    def write(self, adapter: Any) -> None:
        uid = next(self._uids)
        if self.name == "state":
            adapter.advance_watermark("work", 7, uid)
            adapter.record_scan("work", f"scan {uid}: " + "x" * 2000)
        else:
            adapter.send_refs([MessageRef("work", 7, uid * 100 + n, f"fp-{uid}-{n}", 1000) for n in range(20)])

    def raised(self, operation: Callable[[], object], path: Path) -> str:
        with pytest.raises(self.error) as failed:
            operation()
        if self.error is QueueUnavailable:
            assert failed.value.path == path  # the CLI tells the state file's failures by it
        return str(failed.value)


ADAPTERS = {
    "state": Adapter("state", SqliteStateStore, StateStoreUnavailable, "SQLite"),
    "queue": Adapter("queue", SqliteQueue, QueueUnavailable, "SQLite queue"),
}


@pytest.fixture(params=list(ADAPTERS))
def adapter(request) -> Adapter:
    return ADAPTERS[request.param]


def test_a_new_file_is_made_with_its_tables_and_nothing_is_left_beside_it(adapter, tmp_path):
    path = tmp_path / "state" / "state.db"
    opened = adapter.make(path)

    adapter.write(opened)
    opened.close()

    assert [p.name for p in path.parent.iterdir()] == ["state.db"]
    assert path.stat().st_size > 0


@pytest.mark.parametrize(
    ("content", "said"),
    [
        # This program never leaves an empty file (a new one is linked into place with its
        # tables): one that is empty had records and lost them. Made anew, the window's messages
        # would have to be looked for again, and whatever else it recorded would be lost.
        (b"", "the file is empty (0 bytes), which this program never leaves behind, so what it recorded is lost"),
        (b"this is not SQLite " * 100, "file is not a database: the file is damaged"),
    ],
    ids=["emptied", "overwritten"],
)
def test_an_emptied_or_overwritten_file_is_refused_and_left_as_it_is(adapter, tmp_path, content, said):
    path = tmp_path / "state.db"
    path.write_bytes(content)
    opened = adapter.make(path)

    message = adapter.raised(lambda: adapter.write(opened), path)

    assert message == f"{adapter.prefix} {path}: {said}: {LOST}"
    assert path.read_bytes() == content
    opened.close()


def test_a_full_disk_says_to_free_space_and_the_adapter_works_again_once_there_is(adapter, tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        path = disk.path / "state.db"
        opened = adapter.make(path)
        adapter.write(opened)
        disk.fill()

        message = adapter.raised(lambda: adapter.write(opened), path)

        # Both keep their connection (the queue one a thread), so both meet SQLITE_FULL.
        said = "database or disk is full"
        assert message == f"{adapter.prefix} {path}: {said}: free space on the disk holding {path}, then run again"
        disk.free()
        adapter.write(opened)  # the same adapter, no restart
        opened.close()


def test_a_read_only_file_system_says_so(adapter, tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        path = disk.path / "state.db"
        made = adapter.make(path)
        adapter.write(made)
        made.close()
        disk.make_read_only()

        message = adapter.raised(lambda: adapter.write(adapter.make(path)), path)

    assert message == (
        f"{adapter.prefix} {path}: unable to open database file: the file system holding {path} is mounted"
        " read-only: remount it read-write, then run again"
    )


def test_a_lock_held_past_the_busy_timeout_says_another_process_holds_the_file(adapter, tmp_path, monkeypatch):
    path = tmp_path / "state.db"
    made = adapter.make(path)
    adapter.write(made)
    made.close()
    module = shared.state.sqlite if adapter.name == "state" else shared.queue.sqlite
    monkeypatch.setattr(module, "BUSY_TIMEOUT_SECONDS", 0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction, never ending
    try:
        message = adapter.raised(lambda: adapter.write(adapter.make(path)), path)
    finally:
        holder.close()

    assert message == (
        f"{adapter.prefix} {path}: database is locked: another process holds {path} (another run of this"
        " program?): let it finish, then run again"
    )


# In a process of its own, whose writes stop at the file size the WAL has reached (RLIMIT_FSIZE):
# the kernel refuses the next one with EFBIG, which SQLite reports as an I/O error. Python ignores
# SIGXFSZ, so the write fails instead of killing the process. A connection of its own keeps the
# WAL (the queue's connections come and go).
WRITE_PAST_THE_LIMIT = """
import resource, sqlite3, sys
from pathlib import Path
from tests.integration.test_state_file import ADAPTERS
adapter, path = ADAPTERS[sys.argv[1]], Path(sys.argv[2])
opened = adapter.make(path)
adapter.write(opened)
keep = sqlite3.connect(path)
keep.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
limit = path.with_name(path.name + "-wal").stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    adapter.write(opened)
except adapter.error as exc:
    print(exc)
"""


def test_an_io_error_says_to_check_the_disk(adapter, tmp_path):
    path = tmp_path / "state.db"

    done = subprocess.run(
        [sys.executable, "-c", WRITE_PAST_THE_LIMIT, adapter.name, str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"{adapter.prefix} {path}: disk I/O error: check the disk holding {path} (the system log says more),"
        " then run again"
    )
