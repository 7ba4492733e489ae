"""One source message the server cannot read (its file unreadable to Dovecot, which then ends
the session: "BYE FETCH failed: Internal error occurred"): it alone goes to the dead letters,
with the reason; the messages of its route behind it are copied; the scan survives it; and no
later drain exits 0 while it waits there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.mail import DovecotServer, assert_copied_exactly, read_folder, seed


def message(n: int) -> bytes:
    return f"From: a@example.org\r\nSubject: message {n}\r\nMessage-ID: <unreadable-{n}@example.org>\r\n\r\nBody {n}.\r\n".encode()


def message_file(server: DovecotServer, user: str, uid: int) -> Path:
    """The maildir file of INBOX's `uid`, by Dovecot's dovecot-uidlist ("UID [fields] :name")."""
    maildir = server.root / "mail" / user / "Maildir"
    for line in (maildir / "dovecot-uidlist").read_text().splitlines()[1:]:
        number, _, name = line.partition(" ")
        if int(number) == uid:
            base = name.rsplit(":", 1)[-1]
            (path,) = [p for p in maildir.glob(f"*/{base}*") if p.parent.name in ("cur", "new")]
            return path
    raise LookupError(f"UID {uid} not in {maildir}")


@pytest.mark.parametrize("when", ["before the scan", "after the scan"])
def test_one_unreadable_message_alone_is_dead_lettered_and_drain_says_so_until_redriven(
    sync_env, dovecot_pair, when
):
    setup = sync_env()
    setup.env["MAX_ATTEMPTS"] = "2"
    user = setup.routes[0].gmail_user
    bodies = [message(n) for n in range(1, 6)]
    seed(dovecot_pair.gmail, user, "INBOX", bodies)
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    source_order = {m.body: index for index, m in enumerate(source)}
    if when == "after the scan":
        scanned = setup.cli("scan")
        assert scanned.returncode == 0, scanned.stdout + scanned.stderr
    bad = message_file(dovecot_pair.gmail, user, source[2].uid)
    bad.chmod(0)  # Dovecot's imap processes run as nobody: it can no longer read this one

    done = setup.cli("drain", timeout=300)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "route work: 4 copied, 0 skipped, 0 failed, 1 dead-lettered" in done.stdout, done.stdout
    assert "1 message(s) in the dead letters: `status` says why; once the cause is fixed, `redrive` puts them back" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    good = [m for m in source if m.uid != source[2].uid]
    assert_copied_exactly(good, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))
    status = json.loads(setup.cli("status", "--json").stdout)
    (route,) = status["routes"]
    assert route["dead_letters"]["count"] == 1
    assert any("Internal error" in reason for reason in route["dead_letters"]["reasons"]), route

    again = setup.cli("drain")  # nothing new: it still says what waits, and does not exit 0
    assert again.returncode == 1, again.stdout + again.stderr
    assert "1 message(s) in the dead letters" in again.stdout

    bad.chmod(0o600)  # the cause fixed
    assert setup.cli("redrive").returncode == 0
    last = setup.cli("drain")
    assert last.returncode == 0, last.stdout + last.stderr
    # All five, each once: the one redriven came last.
    landed = read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    assert_copied_exactly(source, sorted(landed, key=lambda m: source_order[m.body]))

