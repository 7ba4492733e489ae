"""Ctrl-C and SIGTERM in the middle of a slow APPEND: the run ends within seconds, says so
without a traceback, and leaves nothing for the next run to wait out (its claim is let go, the
messages it had received are due again); the next run copies everything exactly once. After a
kill -9, which lets the run do nothing, the next run sees that its process is gone and takes
over its claims and the messages it had received at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.harness.mail import assert_copied_exactly, read_folder, seed, wait_for

# Long enough that a rerun waiting out the claim's lease or the queue's visibility timeout (both
# LEASE_SECONDS) would run past its own timeout below.
LEASE_SECONDS = "120"
RERUN_TIMEOUT = 60


def message(n: int, size: int = 0) -> bytes:
    head = f"From: a@example.org\r\nSubject: message {n}\r\nMessage-ID: <interrupt-{n}@example.org>\r\n\r\n"
    return head.encode() + b"x" * 76 + b"\r\n" + (b"y" * 998 + b"\r\n") * (size // 1000)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "kill-9"])
def test_an_interrupt_during_a_slow_append_ends_the_run_at_once_and_the_rerun_finishes(
    sync_env, dovecot_pair, imap_proxy, sent
):
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.outlook)
    setup.env |= {"OUTLOOK_IMAP_PORT": str(proxy.port), "LEASE_SECONDS": LEASE_SECONDS}
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", [message(1), message(2, size=3_000_000), message(3), message(4)])
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    # The others go at once; the APPEND of the 3 MB one (told by its literal's size) crawls:
    # about a minute at 50 KB/s.
    big = f"{{{len(source[1].body)}".encode()
    proxy.pace_upload(big, 50_000)
    running = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "drain"],
        env=setup.env,
        cwd=setup.workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: proxy.sent(big) == 1, timeout=60, what="the slow APPEND to start")
        interrupted_at = time.monotonic()
        os.kill(running.pid, sent)
        out, err = running.communicate(timeout=30)
        took = time.monotonic() - interrupted_at
    finally:
        running.kill()

    if sent is signal.SIGKILL:
        assert running.returncode == -signal.SIGKILL, out + err
    else:
        assert running.returncode == 130, out + err
        assert "interrupted: claims let go, messages in flight due again; run again to finish" in err
        assert "Traceback" not in out + err
        assert took < 5, f"took {took:.1f} s to end after the signal"

    started = time.monotonic()
    rerun = subprocess.run(
        [sys.executable, "-m", "shared.cli", "drain"],
        env=setup.env,
        cwd=setup.workdir,
        capture_output=True,
        text=True,
        timeout=RERUN_TIMEOUT,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert time.monotonic() - started < RERUN_TIMEOUT
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))
