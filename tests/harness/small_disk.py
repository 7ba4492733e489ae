"""A small tmpfs mounted for one test: a real disk that fills up (ENOSPC) or turns read-only.

Mounting needs root, which `make test` and CI have (CI runs `sudo bash .ci/run`). Without it a
test that needs one is skipped rather than faked: RLIMIT_FSIZE, the other way to make writes
fail, fails them with EFBIG, which SQLite reports as an I/O error (SQLITE_IOERR_WRITE), not as
the full disk (SQLITE_FULL) these tests are about. (The I/O error has a test of its own that uses
exactly that.)
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DISK_BYTES = 16 * 1024 * 1024


class SmallDisk:
    def __init__(self, path: Path):
        self.path = path

    def fill(self) -> None:
        """Write a file until the file system says it is full (ENOSPC), to its last block."""
        with open(self.path / "filler", "wb", buffering=0) as filler:
            for block in (b"\0" * (1 << 20), b"\0" * 512):
                try:
                    while True:
                        filler.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        (self.path / "filler").unlink()

    def make_read_only(self) -> None:
        _mount("-o", "remount,ro", str(self.path))


@contextmanager
def small_disk(path: Path, size: int = DISK_BYTES) -> Iterator[SmallDisk]:
    """A tmpfs of `size` bytes mounted at `path` (made if missing) for the `with` block."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path), check=False)
    if mounted.returncode != 0:
        # Not a skip: CI runs as root, and a run that cannot mount must say so, not pass quietly.
        pytest.fail(f"cannot mount a tmpfs (make test needs root for the full-disk tests): {mounted.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def _mount(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=check)
