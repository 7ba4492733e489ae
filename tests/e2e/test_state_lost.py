"""A state store that starts with no record of a route whose destination folder already holds
copies (the state file lost and moved aside; a move from the laptop to AWS; another copier
before): nothing is appended twice. The route's first scan marks what it found as possibly
copied already, and each of those is looked for in the destination (Message-ID, INTERNALDATE,
Date, From, Subject; never bytes or sizes) before it is appended."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from shared.settings import Settings
from tests.harness.mail import assert_copied_exactly, read_folder, seed


def message(n: int) -> bytes:
    return f"From: a@example.org\r\nSubject: message {n}\r\nMessage-ID: <lost-{n}@example.org>\r\n\r\nBody {n}.\r\n".encode()


def copied_then_state_lost(setup, dovecot_pair) -> str:
    """Messages 1 to 5 copied by a drain; the state file then lost and moved aside, as the README
    says to do; messages 6 and 7 arrive after. The route's Gmail user."""
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", [message(n) for n in range(1, 6)])
    first = setup.cli("drain")
    assert first.returncode == 0, first.stdout + first.stderr
    state = Path(setup.env["STATE_DB"])
    state.rename(state.with_name("state.db.lost"))
    seed(dovecot_pair.gmail, user, "INBOX", [message(n) for n in range(6, 8)])
    return user


def test_a_lost_state_file_moved_aside_copies_nothing_twice(sync_env, dovecot_pair, servers):
    setup = sync_env()
    user = copied_then_state_lost(setup, dovecot_pair)

    again = setup.cli("drain")

    assert again.returncode == 0, again.stdout + again.stderr
    assert "route work: 7 copied, 0 skipped, 0 failed (5 of them found in the destination already, not appended again)" in again.stdout
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"), kept=servers.kept)


def test_reconcile_records_what_a_lost_state_file_knew_and_drain_copies_only_the_rest(sync_env, dovecot_pair, servers):
    setup = sync_env()
    user = copied_then_state_lost(setup, dovecot_pair)

    dry = setup.cli("reconcile", "--dry-run")
    done = setup.cli("reconcile")
    again = setup.cli("drain")

    since = (dt.date.today() - dt.timedelta(days=Settings.model_fields["fallback_since_days"].default)).isoformat()
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"route work: 7 message(s) in the source since {since}; 5 found in 'Work', would be recorded as copied; 2 not found" in dry.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"route work: 7 message(s) in the source since {since}; 5 found in 'Work', recorded as copied; 2 not found: the next drain copies them" in done.stdout
    assert again.returncode == 0, again.stdout + again.stderr
    assert "route work: 2 copied, 0 skipped, 0 failed, 5 already done" in again.stdout
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"), kept=servers.kept)


def test_reconcile_recognises_copies_another_copier_made_without_their_internaldate(sync_env, dovecot_pair, servers):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    received = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(days=2)
    dated = [message(n).replace(b"\r\n\r\n", b"\r\nDate: Mon, 1 Jun 2026 10:00:00 +0000\r\n\r\n", 1) for n in range(1, 6)]
    seed(dovecot_pair.gmail, user, "INBOX", [(body, (), received) for body in dated])
    # imapsync without --syncinternaldates, say: the copies are dated when they were made.
    seed(dovecot_pair.outlook, setup.outlook_user, "Work", dated[:3])

    done = setup.cli("reconcile")
    drained = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 found in 'Work', recorded as copied (3 by headers alone: their INTERNALDATE differs); 2 not found" in done.stdout
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "route work: 2 copied, 0 skipped, 0 failed, 3 already done" in drained.stdout
    copies = read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    ids = sorted(line for copy in copies for line in copy.body.split(b"\r\n") if line.startswith(b"Message-ID:"))
    assert ids == sorted(f"Message-ID: <lost-{n}@example.org>".encode() for n in range(1, 6))
