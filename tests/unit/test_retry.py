"""What counts as transient, what a throttle asks for, how far a retry policy goes, and the
visibility a throttled message gets."""

from __future__ import annotations

import imaplib
import socket
import ssl

import imapclient.exceptions
import pytest

from shared.mailbox import retry
from shared.mailbox.port import DownloadQuotaSpent, MailboxThrottled
from shared.mailbox.session import classified_failure
from shared.pipeline.copier import CopyResult, Outcome, throttled_visibility
from shared.queue.port import MAX_VISIBILITY_SECONDS


@pytest.mark.parametrize(
    "server_text, wait",
    [
        ("Request is throttled. Suggested Backoff Time: 1500 milliseconds", 1.5),
        ("[LIMIT] Request is throttled. Suggested Backoff Time: 120 milliseconds", 0.12),
        ("Request is throttled.", retry.DEFAULT_THROTTLE_WAIT_SECONDS),
        ("[OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)", retry.DEFAULT_THROTTLE_WAIT_SECONDS),
        ("[ALERT] Too many simultaneous connections. (Failure)", retry.DEFAULT_THROTTLE_WAIT_SECONDS),
        ("[UNAVAILABLE] Temporary authentication failure.", None),
        ("[TOOBIG] Message too big", None),
    ],
)
def test_throttle_wait(server_text, wait):
    assert retry.throttle_wait(server_text) == wait


@pytest.mark.parametrize(
    "error, transient",
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (TimeoutError("timed out"), True),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), True),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), False),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), False),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
        (imaplib.IMAP4.abort("socket error: EOF"), True),
        (imaplib.IMAP4.abort("Disconnected for inactivity."), True),
        (imaplib.IMAP4.error("[UNAVAILABLE] Temporary authentication failure."), True),
        (imaplib.IMAP4.error("[INUSE] Mailbox is locked"), True),
        (imaplib.IMAP4.error("[AUTHENTICATIONFAILED] Authentication failed."), False),
        (imaplib.IMAP4.error("Request is throttled. Suggested Backoff Time: 10 milliseconds"), False),
        (imapclient.exceptions.LoginError("socket error: EOF"), True),
        (imapclient.exceptions.LoginError("[AUTHENTICATIONFAILED] Authentication failed."), False),
        (ValueError("a bug"), False),
    ],
)
def test_is_transient(error, transient):
    assert retry.is_transient(error) is transient


class Flaky(Exception):
    pass


def test_a_policy_gives_up_after_its_attempts_and_raises_the_last_error():
    calls, sleeps = [], []
    policy = retry.RetryPolicy(attempts=3, first_wait=0.5, max_wait=2.0, deadline=60)

    def operation():
        calls.append(len(calls))
        raise Flaky(f"attempt {len(calls)}")

    with pytest.raises(Flaky, match="attempt 3"):
        retry.call(policy, operation, retry_on=lambda e: isinstance(e, Flaky), what="test", sleep=sleeps.append)
    assert len(calls) == 3
    # Doubling from 0.5 s, each with up to 0.5 s of jitter on top.
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 1.5


def test_only_what_retry_on_accepts_is_tried_again():
    calls = []

    def operation():
        calls.append(1)
        raise ValueError("not transient")

    with pytest.raises(ValueError):
        retry.call(retry.COMMAND, operation, retry_on=lambda e: isinstance(e, Flaky), what="test", sleep=lambda s: None)
    assert len(calls) == 1


def test_success_after_a_transient_failure_returns_the_result():
    outcomes = iter([Flaky("once"), "done"])

    def operation():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert retry.call(retry.SESSION, operation, retry_on=lambda e: isinstance(e, Flaky), what="t", sleep=lambda s: None) == "done"


def test_the_named_policies_stay_short():
    # A consumer Lambda must not spend minutes retrying: whatever the attempts, the waits are few
    # seconds in all.
    for policy in (retry.SESSION, retry.COMMAND):
        assert policy.attempts <= 3
        assert (policy.attempts - 1) * (policy.max_wait + policy.first_wait) <= 5


@pytest.mark.parametrize(
    "retry_after, seconds",
    [(None, None), (1.5, 3), (0.12, 2), (2.0, 3), (60.0, 61), (10**6, MAX_VISIBILITY_SECONDS)],
)
def test_throttled_visibility_is_the_wait_rounded_up_plus_a_second(retry_after, seconds):
    assert throttled_visibility(CopyResult(Outcome.FAILED, retry_after=retry_after)) == seconds


@pytest.mark.parametrize(
    "text, transient",
    [
        ("NO [UNAVAILABLE] Try again later", True),
        ("append failed: [INUSE] Mailbox is locked", True),
        ("NO [unavailable] lower case", True),
        # RFC 5530: the server broke its own invariants; nothing says a retry in a moment passes.
        ("NO [SERVERBUG] Internal error", False),
        ("NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)", False),
        ("NO UNAVAILABLE without brackets is only a word", False),
    ],
)
def test_names_transient_code(text, transient):
    assert retry.names_transient_code(text) is transient


@pytest.mark.parametrize(
    ("reply", "quota_spent"),
    [
        ("[OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)", True),
        ("[ALERT] Too many simultaneous connections. (Failure)", False),
        ("Request is throttled. Suggested Backoff Time: 299609 milliseconds", False),
    ],
)
def test_only_gmails_overquota_is_a_spent_daily_allowance(reply, quota_spent):
    failure = classified_failure("fetch failed", step="fetch", cause=imaplib.IMAP4.error(reply))
    assert isinstance(failure, MailboxThrottled)
    assert isinstance(failure, DownloadQuotaSpent) is quota_spent
