"""Two drains on one state file at once, as cron (or a timer) and a person at a terminal start
them: the second says which drain runs, leaves the work to it with exit 0, and every message is
copied once."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timezone

from infra.sample_mail import sample_mailbox
from tests.harness.mail import assert_copied_exactly, read_folder, seed, wait_for

# How long the destination holds back its answer to the first drain's first APPEND: the first
# drain is surely running (and holding the lock) until then, and the second, which opens no
# mailbox, is done long before. Not a sleep: nothing waits for it to pass.
FIRST_DRAIN_HELD_SECONDS = 15


def test_a_second_drain_while_one_runs_says_which_leaves_the_work_to_it_and_each_message_is_copied_once(
    sync_env, dovecot_pair, imap_proxy
):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    mail = [m for m in sample_mailbox(datetime.now(timezone.utc), user) if m.recent]
    seed(dovecot_pair.gmail, user, "INBOX", [(m.data, m.flags, m.internaldate) for m in mail])
    proxy = imap_proxy(dovecot_pair.outlook)
    setup.env |= {"OUTLOOK_IMAP_HOST": proxy.host, "OUTLOOK_IMAP_PORT": str(proxy.port)}
    proxy.stall(b"APPEND", FIRST_DRAIN_HELD_SECONDS)
    state_file = setup.env["STATE_DB"]

    first = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "drain"], env=setup.env, cwd=setup.workdir,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: proxy.sent(b"APPEND") or first.poll() is not None, timeout=60, what="the first drain's APPEND")
        assert first.poll() is None, first.communicate()
        second = setup.cli("drain")
        first_out, first_err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    assert second.returncode == 0, second.stdout + second.stderr
    said = re.escape(f"another drain (pid {first.pid}, started ") + r"\d\d:\d\d" + re.escape(
        f") is running on {state_file}; this one leaves the work to it and ends (exit 0): it copies what is queued,"
        " and the next run after it what arrives meanwhile"
    )
    assert re.fullmatch(said + "\n", second.stdout), second.stdout + second.stderr
    assert second.stderr == "", second.stderr  # it scanned nothing, copied nothing, logged nothing
    assert first.returncode == 0, first_out + first_err
    assert f"route work: {len(mail)} copied, 0 skipped, 0 failed" in first_out, first_out + first_err
    assert_copied_exactly(read_folder(dovecot_pair.gmail, user, "INBOX"), read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))

    # The lock went with the first drain: the next one runs, and finds nothing left to copy.
    third = setup.cli("drain")
    assert third.returncode == 0 and "another drain" not in third.stdout, third.stdout + third.stderr
    assert "route work: 0 copied, 0 skipped, 0 failed" in third.stdout, third.stdout + third.stderr
