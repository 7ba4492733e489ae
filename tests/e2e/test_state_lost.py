"""A state store that starts with no record of a route whose destination folder already holds
copies (the state file lost and moved aside; a move from the laptop to AWS; another copier
before): nothing is appended twice. The route's first scan marks what it found as possibly
copied already, and each of those is looked for in the destination (Message-ID, INTERNALDATE,
Date, From, Subject; never bytes or sizes) before it is appended."""

from __future__ import annotations

from pathlib import Path

from tests.harness.mail import assert_copied_exactly, read_folder, seed


def message(n: int) -> bytes:
    return f"From: a@example.org\r\nSubject: message {n}\r\nMessage-ID: <lost-{n}@example.org>\r\n\r\nBody {n}.\r\n".encode()


def test_a_lost_state_file_moved_aside_copies_nothing_twice(sync_env, dovecot_pair, servers):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", [message(n) for n in range(1, 6)])
    first = setup.cli("drain")
    assert first.returncode == 0, first.stdout + first.stderr

    state = Path(setup.env["STATE_DB"])
    state.rename(state.with_name("state.db.lost"))  # as the README says to do with a lost one
    seed(dovecot_pair.gmail, user, "INBOX", [message(n) for n in range(6, 8)])
    again = setup.cli("drain")

    assert again.returncode == 0, again.stdout + again.stderr
    assert "route work: 7 copied, 0 skipped, 0 failed (5 of them found in the destination already, not appended again)" in again.stdout
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"), kept=servers.kept)
