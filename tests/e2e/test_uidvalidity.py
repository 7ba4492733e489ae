"""A UIDVALIDITY change of the source folder (DESIGN.md guarantee 7): what was copied is not
copied again, with or without a Message-ID; what is new is copied once, including a new message
whose INTERNALDATE is older than the route's window; what was before the start point stays out."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.harness.mail import read_folder, seed

UTC = dt.timezone.utc


def mail(subject: str, message_id: str | None, text: str) -> bytes:
    header = f"Message-ID: {message_id}\r\n" if message_id else ""
    return f"{header}From: a@example.org\r\nSubject: {subject}\r\n\r\n{text}\r\n".encode()


def seconds_ago_today() -> dt.datetime:
    """A time 6 s ago on the UTC day the drains below run in. Never a future INTERNALDATE: the
    servers store "now" for one (this test failed at 00:13 UTC with dates at noon). Near midnight
    it waits for the new day, so the start point ("today") cannot move under the test."""
    now = dt.datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if now - midnight < dt.timedelta(seconds=10):
        time.sleep((midnight + dt.timedelta(seconds=10) - now).total_seconds())
    elif midnight + dt.timedelta(days=1) - now < dt.timedelta(minutes=2):
        time.sleep((midnight + dt.timedelta(days=1, seconds=10) - now).total_seconds())
    return dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(seconds=6)


def test_after_a_uidvalidity_change_copied_messages_are_skipped_and_new_ones_copied(sync_env, dovecot_pair):
    setup = sync_env()
    # The start point is today (a fallback window of 0 days), so "yesterday" is outside the window.
    setup.env |= {"FALLBACK_SINCE_DAYS": "0", "TZ": "UTC"}
    user = setup.routes[0].gmail_user
    today = seconds_ago_today()
    before_start = (mail("before the start point", "<old@example.org>", "never copied"), (), today - dt.timedelta(days=3))
    first = [
        (mail("one", "<one@example.org>", "hello"), ("\\Seen",), today),
        (mail("no id", None, "without a Message-ID"), ("\\Flagged",), today + dt.timedelta(seconds=1)),
        (mail("twin", "<twin@example.org>", "version one"), (), today + dt.timedelta(seconds=2)),
        (mail("twin", "<twin@example.org>", "version two"), (), today + dt.timedelta(seconds=3)),
    ]
    seed(dovecot_pair.gmail, user, "INBOX", [before_start, *first])
    assert setup.cli("drain").returncode == 0
    old_uidvalidity = json.loads(setup.cli("status", "--json").stdout)["routes"][0]["watermark"]["uidvalidity"]

    new_uidvalidity = old_uidvalidity + 1000
    dovecot_pair.gmail.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(new_uidvalidity), "INBOX")
    new = [
        (mail("two", "<two@example.org>", "new"), (), today + dt.timedelta(seconds=4)),
        (mail("no id either", None, "new without a Message-ID"), ("\\Seen",), today + dt.timedelta(seconds=5)),
        # Arrived now with an older date (moved in from another folder): older than the window.
        (mail("late", "<late@example.org>", "dated yesterday"), (), today - dt.timedelta(days=1)),
    ]
    seed(dovecot_pair.gmail, user, "INBOX", new)
    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 4 skipped" in done.stdout, done.stdout
    assert f"UIDVALIDITY changed from {old_uidvalidity} to {new_uidvalidity}" in done.stderr
    copied = read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    want = Counter((body, when) for body, _, when in [*first, *new])
    # Each message once, with its date; the one from before the start point never.
    assert Counter((m.body, m.internaldate) for m in copied) == want

    status = json.loads(setup.cli("status", "--json").stdout)["routes"][0]
    assert status["watermark"]["uidvalidity"] == new_uidvalidity
    assert status["claims"] == {"done": 7, "skipped": 4}
    assert sum(status["skipped_reasons"].values()) == 4
    assert all(reason.startswith("duplicate of route work UID ") for reason in status["skipped_reasons"])


@pytest.mark.parametrize("gmail_side", ["Message-ID", "no Message-ID"])
def test_a_drain_killed_after_an_append_then_the_source_renumbered_copies_each_message_once(
    sync_env, dovecot_pair, gmail_side
):
    """The killed run's reference names a UID the renumbering gave to another message: it is
    skipped, and the APPEND it left behind is looked for when the message is queued again under
    its new UID, instead of being appended a second time."""
    setup = sync_env()
    setup.env |= {"LEASE_SECONDS": "2"}
    user = setup.routes[0].gmail_user
    now = dt.datetime.now(UTC).replace(microsecond=0)
    def message_id(n: int) -> str | None:
        return None if gmail_side == "no Message-ID" and n == 2 else f"<m{n}@example.org>"

    messages = [(mail(f"message {n}", message_id(n), f"text {n}"), (), now - dt.timedelta(minutes=10 - n)) for n in range(1, 6)]
    seed(dovecot_pair.gmail, user, "INBOX", messages)
    crash = [sys.executable, "-m", "tests.e2e.crash_driver", "drain", "--kill-at", "after-append", "--uid", "2"]
    killed = subprocess.run(crash, env=setup.env, cwd=setup.workdir, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # UID 1, and UID 2 unrecorded; the batch's later APPENDs were sent with them, unanswered
    # when it was killed, and may have landed too.
    assert len(read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")) >= 2

    status = dovecot_pair.gmail.doveadm("mailbox", "status", "-u", user, "uidvalidity", "INBOX").stdout
    renumbered = int(status.strip().split("=")[1]) + 1000
    dovecot_pair.gmail.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(renumbered), "INBOX")
    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    copied = read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    assert Counter(m.body for m in copied) == Counter(body for body, _, _ in messages)  # each once
    reasons = json.loads(setup.cli("status", "--json").stdout)["routes"][0]["skipped_reasons"]
    assert any("its interrupted APPEND is looked for" in reason for reason in reasons), reasons
