"""The destination folder deleted or renamed by its owner in the middle of a drain: the next
APPEND is refused with `NO [TRYCREATE]`; the folder is made again and the APPEND sent again at
once. Every message ends up in the destination exactly once (in the renamed folder, for those
copied before the rename), none in the dead letters."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.harness.mail import read_folder, seed

MESSAGES = 20
GONE_AT_APPEND = 8  # the folder goes just before this APPEND reaches the server


def message(n: int) -> bytes:
    return f"From: a@example.org\r\nSubject: message {n}\r\nMessage-ID: <gone-{n}@example.org>\r\n\r\nBody {n}.\r\n".encode()


@pytest.mark.parametrize("change", ["deleted", "renamed"])
def test_the_destination_folder_gone_mid_run_is_made_again_and_nothing_is_lost_or_doubled(
    sync_env, dovecot_pair, imap_proxy, change
):
    setup = sync_env()
    outlook = dovecot_pair.outlook
    proxy = imap_proxy(outlook)
    setup.env["OUTLOOK_IMAP_PORT"] = str(proxy.port)
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", [message(n) for n in range(1, MESSAGES + 1)])
    seen = Counter()

    def take_the_folder_away(line: bytes) -> bytes:
        seen["append"] += 1
        if seen["append"] == GONE_AT_APPEND:
            if change == "deleted":
                outlook.doveadm("mailbox", "delete", "-u", setup.outlook_user, "Work")
            else:
                outlook.doveadm("mailbox", "rename", "-u", setup.outlook_user, "Work", "Work (old)")
        return line

    proxy.rewrite_command(b" APPEND ", take_the_folder_away, times=GONE_AT_APPEND)

    done = setup.cli("drain", timeout=300)

    assert seen["append"] == GONE_AT_APPEND
    assert done.returncode == 0, done.stdout + done.stderr
    landed = [m.body for m in read_folder(outlook, setup.outlook_user, "Work")]
    if change == "renamed":
        landed += [m.body for m in read_folder(outlook, setup.outlook_user, "Work (old)")]
        assert len(landed) - len(read_folder(outlook, setup.outlook_user, "Work")) == GONE_AT_APPEND - 1
    # The deleted folder took the copies made before with it: those are the owner's doing. The
    # rest, each once.
    expected = [message(n) for n in range(GONE_AT_APPEND if change == "deleted" else 1, MESSAGES + 1)]
    assert sorted(landed) == sorted(expected)
    assert f"route work: {MESSAGES} copied, 0 skipped, 0 failed" in done.stdout


def test_an_append_refused_with_trycreate_makes_the_folder_and_is_sent_again_at_once(sync_env, dovecot_pair, imap_proxy):
    """RFC 3501 6.3.11: "NO [TRYCREATE]" when the folder is missing (Dovecot says so when it was
    deleted while another folder was selected)."""
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.outlook)
    setup.env["OUTLOOK_IMAP_PORT"] = str(proxy.port)
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", [message(n) for n in range(1, 4)])
    proxy.refuse(b" APPEND ", "NO [TRYCREATE] Mailbox doesn't exist: Work")

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    assert "failed (attempt" not in done.stderr  # sent again at once, not failed and retried later
    assert proxy.sent(b" APPEND ") == 4
    assert sorted(m.body for m in read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")) == sorted(
        message(n) for n in range(1, 4)
    )
