"""The SQLite file of a local process (STATE_DB): the state store's tables and the local queue's.

Both adapters (shared.state.sqlite, shared.queue.sqlite) open it through `prepare`, and say what
its failures mean with `explain`: one line naming the file and what to do.

"Was in use" is told by the file being there at all. A new file is made under another name with
its tables and only then linked into place, so a file at STATE_DB is never empty unless
something else emptied it (truncated by hand, a failed copy or restore, a sync tool). Such a
file has lost its watermarks and claims; made anew, it would copy every message of each
route's window again. So it is refused, never initialised. A file that is not there is made.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import uuid
from pathlib import Path


class Unusable(Exception):
    """The file cannot be used; the text is what to show (the file, what is wrong, what to do)."""


LOST = (
    "restore it from a backup; if it is truly lost, move it aside and run again: each route's window is "
    "then looked for in the destination before anything is copied (`reconcile` does it at once), so "
    "nothing is copied twice"
)

# What to do, by SQLite's primary result code; {path} is the file.
_WRITABLE = "make sure {path} and its directory exist and this user can read and write both, then run again"
_READ_ONLY_MOUNT = "the file system holding {path} is mounted read-only: remount it read-write, then run again"
_ADVICE = {
    sqlite3.SQLITE_FULL: "free space on the disk holding {path}, then run again",
    sqlite3.SQLITE_IOERR: "check the disk holding {path} (the system log says more), then run again",
    sqlite3.SQLITE_READONLY: _WRITABLE,
    sqlite3.SQLITE_PERM: _WRITABLE,
    sqlite3.SQLITE_CANTOPEN: _WRITABLE,
    # Past the busy timeout: another process (another run?) kept the file to itself that long.
    sqlite3.SQLITE_BUSY: "another process holds {path} (another run of this program?): let it finish, then run again",
    sqlite3.SQLITE_LOCKED: "another process holds {path} (another run of this program?): let it finish, then run again",
    sqlite3.SQLITE_NOTADB: "the file is damaged: " + LOST,
    sqlite3.SQLITE_CORRUPT: "the file is damaged: " + LOST,
}
_ADVICE_BY_ERRNO = {
    errno.ENOSPC: sqlite3.SQLITE_FULL,
    errno.EDQUOT: sqlite3.SQLITE_FULL,
    errno.EIO: sqlite3.SQLITE_IOERR,
    errno.EROFS: sqlite3.SQLITE_READONLY,
    errno.EACCES: sqlite3.SQLITE_READONLY,
    errno.EPERM: sqlite3.SQLITE_READONLY,
}
_CHECK = "check {path}, then run again"


def explain(path: Path, exc: BaseException) -> str:
    """`exc` (an sqlite3.Error or OSError met using `path`) as one line: what SQLite or the
    system said, then what to do."""
    if isinstance(exc, Unusable):
        return str(exc)
    if isinstance(exc, OSError):
        said = exc.strerror or str(exc)
        if exc.filename is not None and Path(exc.filename) != path:
            said = f"{exc.filename}: {said}"
        advice = _ADVICE.get(_ADVICE_BY_ERRNO.get(exc.errno), _CHECK)
    else:
        said = str(exc) or type(exc).__name__
        code = getattr(exc, "sqlite_errorcode", None)
        advice = _ADVICE.get(code & 0xFF if code is not None else None, _CHECK)
    # What SQLite cannot tell apart: a read-only mount from a file it may not write, and a full
    # disk met while sizing its shared-memory file (SQLITE_IOERR_SHMSIZE) from another I/O error.
    disk = _statvfs(path.parent)
    if advice is _WRITABLE and disk is not None and disk.f_flag & os.ST_RDONLY:
        advice = _READ_ONLY_MOUNT
    elif advice is _ADVICE[sqlite3.SQLITE_IOERR] and disk is not None and disk.f_bavail == 0:
        said, advice = f"{said} (the disk is full)", _ADVICE[sqlite3.SQLITE_FULL]
    return f"{said}: {advice.format(path=path)}"


def _statvfs(directory: Path) -> os.statvfs_result | None:
    try:
        return os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs on Windows
        return None


def prepare(path: Path, schema: str) -> None:
    """Make the file with the tables of `schema` (CREATE statements) if it is not there; refuse
    one that is empty. Raises Unusable. The parent directory must exist."""
    try:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            _create(path, schema)
            return
    except (OSError, sqlite3.Error) as exc:
        raise Unusable(explain(path, exc)) from exc
    if size == 0:
        raise Unusable(
            f"the file is empty (0 bytes), which this program never leaves behind, so what it recorded is lost: {LOST}"
        )


def _create(path: Path, schema: str) -> None:
    making = path.with_name(f".{path.name}.{uuid.uuid4().hex}.new")
    try:
        db = sqlite3.connect(making, isolation_level=None)
        try:
            db.executescript(f"BEGIN IMMEDIATE; {schema} COMMIT;")
        finally:
            db.close()
        try:
            os.link(making, path)
        except FileExistsError:
            pass  # another process made it meanwhile: that one is used
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # A file system without hard links (FAT): SQLite makes the file in place, as before.
    finally:
        making.unlink(missing_ok=True)
        Path(f"{making}-journal").unlink(missing_ok=True)
