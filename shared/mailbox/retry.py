"""Trying again after an IMAP failure that passes: the named retry policies, what counts as
transient, and how long a throttling server asked us to wait.

Every policy is bounded (a few attempts, seconds in all): a consumer Lambda must not spend its
minutes sleeping, and a failure that outlasts a policy is handed to the queue, whose retries
(growing delays, then the dead letters) take over. A throttle is never waited out here: the
server's wait travels with the failure as `retry_after`, and the queue keeps the message
invisible at least that long (see `shared.pipeline.copier.throttled_visibility`).
"""

from __future__ import annotations

import imaplib
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

log = logging.getLogger("mail_syncer.retry")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int  # in all, the first one included
    first_wait: float  # seconds before the second attempt; doubled for each later one
    max_wait: float  # the doubling stops here (the jitter, up to first_wait, comes on top)
    deadline: float  # seconds: no attempt is started that would begin later than this after the first


# Connecting and logging in (shared.mailbox.session.open_session).
SESSION = RetryPolicy(attempts=3, first_wait=0.5, max_wait=2.0, deadline=10.0)
# One FETCH or APPEND (or a folder step before it) on a reopened session (shared.mailbox.connections).
# Each attempt may open a session under SESSION; a session that cannot be opened is not retried
# again here, so the two policies do not multiply.
COMMAND = RetryPolicy(attempts=3, first_wait=0.5, max_wait=2.0, deadline=15.0)

# RFC 5530 response codes that say the same command may work in a moment: UNAVAILABLE (a
# subsystem is down for now) and INUSE (another session holds what the command needs). Not
# SERVERBUG: it says the server broke its own invariants, not that a retry soon will pass; such a
# refusal is left to the queue's slower retries, like any refusal not known to be permanent.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "INUSE"})
# Exchange Online says the same without a code: "NO Server Unavailable. 15" (the server is
# busy, or the mailbox is over its quota: imapsync FAQ.d/FAQ.Exchange.txt). Either may pass; one
# that lasts goes the way of any failure (the queue's growing delays, then the dead letters).
_TRANSIENT_TEXT = re.compile(r"\bServer Unavailable\. *15\b", re.IGNORECASE)
# Outlook.com: "Request is throttled. Suggested Backoff Time: 1500 milliseconds".
_SUGGESTED_BACKOFF = re.compile(r"throttled.*?Suggested Backoff Time: *(\d+) *milliseconds", re.IGNORECASE | re.DOTALL)
# Gmail: "[OVERQUOTA] Account exceeded command or bandwidth limits", "[THROTTLED]", "Too many
# simultaneous connections"; Outlook.com without a number.
_THROTTLED = re.compile(
    r"throttled|\[OVERQUOTA\]|bandwidth limit|too many simultaneous connections", re.IGNORECASE
)
# An endpoint (an IMAP server, a token endpoint) that let this many tries in a row time out, with
# no answer between them, is taken to be down: its mailbox is paused (port.EndpointDown), not
# charged an attempt per message. Each further timeout is at once another EndpointDown.
ENDPOINT_DOWN_AFTER = 3
# How long a mailbox whose endpoint is down is left alone. Longer than `drain` waits out a pause
# (15 minutes: shared.cli.commands.DRAIN_MAX_PAUSE_WAIT_SECONDS), so a run facing a dead endpoint
# ends at once with exit 6 instead of waiting and hanging on it again, over and over; short enough
# that mail flows again within half an hour of the endpoint's return. Each later probe costs at
# most ENDPOINT_DOWN_AFTER timeouts, and only one while the streak lasts.
ENDPOINT_DOWN_PAUSE_SECONDS = 30 * 60
# The wait after a throttle that names no time. Gmail's bandwidth limits last minutes or more:
# trying sooner only spends a receive of the message's budget.
DEFAULT_THROTTLE_WAIT_SECONDS = 60.0


def says_quota_spent(server_text: str) -> bool:
    """Whether a throttle is Gmail's daily allowance spent ("[OVERQUOTA] Account exceeded
    command or bandwidth limits"), not a wait of minutes."""
    return "[OVERQUOTA]" in server_text.upper()


def names_transient_code(text: str) -> bool:
    """Whether a server's reply (or an error text quoting it) carries a TRANSIENT_CODES code."""
    upper = text.upper()
    return any(f"[{code}]" in upper for code in TRANSIENT_CODES)


def says_transient(text: str) -> bool:
    """Whether a server's reply (or an error text quoting it) says the command may pass in a
    moment: a TRANSIENT_CODES code, or Exchange's "Server Unavailable. 15"."""
    return names_transient_code(text) or bool(_TRANSIENT_TEXT.search(text))


def suggested_backoff_ms(server_text: str) -> int | None:
    """Outlook.com's "Suggested Backoff Time" in a throttled reply, when it names one."""
    suggested = _SUGGESTED_BACKOFF.search(server_text)
    return int(suggested.group(1)) if suggested else None


def throttle_wait(server_text: str) -> float | None:
    """Seconds a server's reply asks us to stay away, or None when it is not a throttle."""
    suggested = suggested_backoff_ms(server_text)
    if suggested is not None:
        return suggested / 1000
    if _THROTTLED.search(server_text):
        return DEFAULT_THROTTLE_WAIT_SECONDS
    return None


def is_transient(error: BaseException) -> bool:
    """Whether the operation that raised `error` (a socket, TLS or imaplib error) may succeed
    when tried again on a new connection a moment later. Throttles are not: see throttle_wait."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return False
    if isinstance(error, socket.gaierror):
        return error.errno == socket.EAI_AGAIN  # a name that does not exist stays so
    if isinstance(error, ssl.SSLError):
        # The peer went away mid-handshake or mid-record; other TLS errors are configuration.
        return isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError))
    if isinstance(error, OSError):
        return True  # refused, reset, broken pipe, timed out, unreachable
    if isinstance(error, imaplib.IMAP4.abort):
        return True  # EOF, BYE, a garbled reply: the connection is gone
    if isinstance(error, imaplib.IMAP4.error):
        text = str(error)
        if throttle_wait(text) is not None:
            return False
        # imapclient turns an abort during login into a LoginError with imaplib's text.
        return says_transient(text) or text.startswith("socket error")
    return False


def is_timeout(error: BaseException) -> bool:
    """Whether `error` (a socket, TLS or imaplib error) says the server did not answer in time.
    imaplib and imapclient wrap a socket timeout into their own errors, keeping its text."""
    if isinstance(error, TimeoutError):  # socket.timeout; a TLS handshake that timed out too
        return True
    return isinstance(error, imaplib.IMAP4.error) and "timed out" in str(error).lower()


def call(
    policy: RetryPolicy,
    operation: Callable[[], T],
    *,
    retry_on: Callable[[BaseException], bool],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    bounded_elsewhere: Callable[[BaseException], bool] = lambda error: False,
) -> T:
    """`operation()`, tried again under `policy` while it raises an error `retry_on` accepts;
    the last error is raised as it was. Waits grow exponentially with random jitter, so many
    consumers that failed together do not come back together. An error `bounded_elsewhere`
    accepts is tried again past the policy's attempts and deadline: the operation itself ends
    those (a timeout: the endpoint's ENDPOINT_DOWN_AFTER-th in a row raises EndpointDown)."""
    policy_stop = tenacity.stop_after_attempt(policy.attempts) | tenacity.stop_before_delay(policy.deadline)

    def stop(state: tenacity.RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome is not None else None
        return not (error is not None and bounded_elsewhere(error)) and policy_stop(state)

    retrying = tenacity.Retrying(
        stop=stop,
        wait=tenacity.wait_exponential(multiplier=policy.first_wait, max=policy.max_wait)
        + tenacity.wait_random(0, policy.first_wait),
        retry=tenacity.retry_if_exception(retry_on),
        reraise=True,
        before_sleep=lambda state: _log_retry(what, state),
        sleep=sleep,
    )
    return retrying(operation)


def _log_retry(what: str, state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    # Error texts are built scrubbed (ImapFailure); the log filter scrubs again.
    log.info("%s: attempt %d failed (%s); trying again in %.1f s", what, state.attempt_number, error, wait)
