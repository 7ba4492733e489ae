"""The local state file (STATE_DB, which holds the local queue too) failing under a real `drain`:
its disk filling up mid-scan, a file emptied or damaged. Each stops the run with exit 4 and one
line naming the file and what to do, and costs no message (none lost, none copied twice)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.message_ref import MessageRef
from shared.pipeline.scan import CHUNK
from tests.harness.mail import assert_copied_exactly, connect, read_folder, seed, wait_for
from tests.harness.small_disk import small_disk


@pytest.fixture
def disk(tmp_path):
    """A real disk that fills up: a small tmpfs (tests/harness/small_disk.py says why)."""
    with small_disk(tmp_path / "disk") as mounted:
        yield mounted


def messages(count: int) -> list[tuple[bytes, tuple, datetime]]:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    tag = uuid.uuid4().hex
    return [
        (
            f"From: a@example.com\r\nTo: b@example.com\r\nSubject: message {n}\r\n"
            f"Message-ID: <{n}.{tag}@example.com>\r\n\r\nbody {n}\r\n".encode(),
            (),
            now - timedelta(minutes=n),
        )
        for n in range(count)
    ]


def assert_stopped_at_the_gate(done: subprocess.CompletedProcess, line: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 4, output
    assert line in done.stdout.splitlines(), output
    assert "stopped: no mailbox is opened while the state store fails" in done.stderr, output
    assert "Traceback" not in output and "OperationalError" not in output, output


def queued_uids(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        bodies = conn.execute("SELECT body FROM queue_messages ORDER BY seq").fetchall()
    return [MessageRef.from_body(body).uid for (body,) in bodies]


def watermark(db: Path) -> int | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT last_uid FROM watermarks").fetchone()
    return None if row is None else row[0]


def test_a_disk_full_mid_scan_stops_with_exit_4_and_leaves_the_watermark_behind_what_was_not_sent(
    sync_env, dovecot_pair, imap_proxy, disk
):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    db = disk.path / "state.db"
    proxy = imap_proxy(dovecot_pair.gmail)
    setup.env |= {"STATE_DB": str(db), "GMAIL_IMAP_HOST": proxy.host, "GMAIL_IMAP_PORT": str(proxy.port)}
    setup.env["MAX_ENQUEUE_PER_RUN"] = str(2 * CHUNK)  # one run scans both chunks
    uids = seed(dovecot_pair.gmail, user, "INBOX", messages(CHUNK + 50))
    # The scan sends its first chunk, then waits for the second one's summaries: the disk fills then.
    second_chunk = f"UID FETCH {uids[CHUNK]}:".encode()
    proxy.stall(second_chunk, 3)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(setup.cli, "drain")
        wait_for(lambda: proxy.sent(second_chunk), timeout=60, what="the scan's second chunk")
        disk.fill()
        done = running.result()

    assert_stopped_at_the_gate(
        done,
        f"FAIL  state store        SQLite queue {db}: database or disk is full: free space on the disk holding {db}, then run again",
    )
    assert appended_to(dovecot_pair.outlook, setup.outlook_user) == 0  # stopped in the scan
    disk.free()
    # The first chunk was queued and the watermark is at its end; the second was not, nor passed.
    assert queued_uids(db) == uids[:CHUNK]
    assert watermark(db) == uids[CHUNK - 1]

    again = setup.cli("drain")

    assert again.returncode == 0, again.stdout + again.stderr
    assert f"route work: {len(uids)} copied, 0 skipped, 0 failed" in again.stdout
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


@pytest.mark.parametrize("damage", ["emptied", "overwritten"])
def test_a_state_file_emptied_or_damaged_is_refused_and_nothing_is_copied_again(sync_env, dovecot_pair, damage):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    db = Path(setup.env["STATE_DB"])
    seed(dovecot_pair.gmail, user, "INBOX", messages(5))
    first = setup.cli("drain")  # no file yet: it is made, as on any first run
    assert first.returncode == 0, first.stdout + first.stderr
    assert "route work: 5 copied, 0 skipped, 0 failed" in first.stdout
    copied = read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    if damage == "emptied":
        os.truncate(db, 0)
        what = "the file is empty (0 bytes), which this program never leaves behind, so what it recorded is lost"
    else:
        with open(db, "r+b") as f:
            f.write(b"not SQLite " * 10)  # over its header
        what = "file is not a database: the file is damaged"
    left = db.read_bytes()
    logins = dovecot_pair.gmail.logins(user), dovecot_pair.outlook.logins(setup.outlook_user)

    done = setup.cli("drain")

    assert_stopped_at_the_gate(
        done,
        f"FAIL  state store        SQLite {db}: {what}: restore it from a backup; if it is truly lost, move it "
        "aside and run again: each route's window is then looked for in the destination before anything is "
        "copied (`reconcile` does it at once), so nothing is copied twice",
    )
    # No mailbox was opened (the gate held), and nothing was copied again.
    assert (dovecot_pair.gmail.logins(user), dovecot_pair.outlook.logins(setup.outlook_user)) == logins
    assert read_folder(dovecot_pair.outlook, setup.outlook_user, "Work") == copied
    assert db.read_bytes() == left  # left as it was found, not made anew


def appended_to(server, user) -> int:
    """Messages in every folder of `user` (a folder a run made ready may be there, empty)."""
    client = connect(server, user)
    try:
        return sum(client.folder_status(name, [b"MESSAGES"])[b"MESSAGES"] for _, _, name in client.list_folders())
    finally:
        client.logout()
