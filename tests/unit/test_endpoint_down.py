"""An endpoint that stops answering: its timeouts are counted in a row, the third makes it down,
an answer starts the count over; a down endpoint pauses its mailbox without charging the message
an attempt, long enough that `drain` ends instead of waiting it out.
(Against real black holes: tests/integration/test_unanswering_endpoints.py.)"""

from __future__ import annotations

import imaplib

import google.auth.exceptions
import imapclient.exceptions
import pytest
import requests
import urllib3.exceptions

from shared.cli.commands import DRAIN_MAX_PAUSE_WAIT_SECONDS
from shared.mailbox import retry
from shared.mailbox.port import EndpointDown
from shared.mailbox.session import EndpointWatch, ImapEndpointDown, ImapTimedOut, classified_failure
from shared.pipeline.copier import Outcome
from shared.tokens.sources import timed_out
from tests.fakes import FakeWorld


@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path)
    yield world
    world.close()


def timeout(step: str = "connect") -> ImapTimedOut:
    return ImapTimedOut(f"destination at mail.test:993: {step} failed: timed out", step=step)


def test_the_third_timeout_in_a_row_makes_the_endpoint_down_and_names_it():
    watch = EndpointWatch()
    first, second = timeout(), timeout()

    assert watch.timed_out("destination me", first, endpoint="mail.test:993", timeout=60) is first
    assert watch.timed_out("destination me", second, endpoint="mail.test:993", timeout=60) is second
    down = watch.timed_out("destination me", timeout("greeting"), endpoint="mail.test:993", timeout=60)

    assert isinstance(down, ImapEndpointDown) and isinstance(down, EndpointDown)
    assert str(down) == "destination me: IMAP server mail.test:993 not answering: 3 tries in a row got no answer within 60 s"
    assert (down.endpoint, down.step, down.retry_after) == ("mail.test:993", "greeting", retry.ENDPOINT_DOWN_PAUSE_SECONDS)
    # While no answer comes, each further timeout is down at once: one wait, not three.
    assert isinstance(watch.timed_out("destination me", timeout(), endpoint="mail.test:993", timeout=60), ImapEndpointDown)


def test_an_answer_starts_the_count_over_and_endpoints_are_counted_apart():
    watch = EndpointWatch()
    for _ in range(2):
        watch.timed_out("a", timeout(), endpoint="one:993", timeout=5)
    watch.answered("one:993")
    watch.timed_out("a", timeout(), endpoint="two:993", timeout=5)
    watch.timed_out("a", timeout(), endpoint="two:993", timeout=5)

    assert not isinstance(watch.timed_out("a", timeout(), endpoint="one:993", timeout=5), ImapEndpointDown)
    assert isinstance(watch.timed_out("a", timeout(), endpoint="two:993", timeout=5), ImapEndpointDown)


def test_a_token_endpoints_timeout_is_counted_against_it_not_the_imap_server():
    watch = EndpointWatch()
    url = "https://login.microsoftonline.com/consumers"
    for _ in range(retry.ENDPOINT_DOWN_AFTER - 1):
        failure = ImapTimedOut("token refresh failed", step="token", endpoint=url, timeout=30)
        watch.timed_out("destination me", failure, endpoint="outlook.office365.com:993", timeout=60)
    failure = ImapTimedOut("token refresh failed", step="token", endpoint=url, timeout=30)

    down = watch.timed_out("destination me", failure, endpoint="outlook.office365.com:993", timeout=60)

    assert str(down) == f"destination me: token endpoint {url} not answering: 3 tries in a row got no answer within 30 s"


def test_a_down_endpoints_pause_outlasts_what_drain_waits_out():
    # Shorter, drain would wait the pause out and hang on the endpoint again, over and over.
    assert retry.ENDPOINT_DOWN_PAUSE_SECONDS > DRAIN_MAX_PAUSE_WAIT_SECONDS


@pytest.mark.parametrize(
    "cause, is_timeout",
    [
        (TimeoutError("timed out"), True),
        (TimeoutError("_ssl.c:989: The handshake operation timed out"), True),
        (imaplib.IMAP4.abort("command: UID => timed out"), True),
        (imapclient.exceptions.LoginError("socket error: timed out"), True),
        (ConnectionRefusedError(111, "Connection refused"), False),
        (imaplib.IMAP4.abort("socket error: EOF"), False),
    ],
)
def test_a_timeout_is_told_apart_from_other_transient_failures(cause, is_timeout):
    failure = classified_failure("fetch failed", step="fetch", cause=cause)
    assert isinstance(failure, ImapTimedOut) is is_timeout
    assert retry.is_transient(cause)  # either way tried again on a new session


def _pool_error(reason: Exception) -> requests.ConnectionError:
    return requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "https://idp.test/token", reason=reason))


def _google_wrapped(error: Exception) -> google.auth.exceptions.TransportError:
    try:
        raise google.auth.exceptions.TransportError(error) from error
    except google.auth.exceptions.TransportError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    "error, is_timeout",
    [
        (requests.ReadTimeout("Read timed out. (read timeout=2)"), True),
        (requests.ConnectTimeout("Connection to idp.test timed out"), True),
        (_pool_error(urllib3.exceptions.ConnectTimeoutError(None, "timed out")), True),
        (_google_wrapped(requests.ReadTimeout("Read timed out.")), True),
        (_pool_error(urllib3.exceptions.NewConnectionError(None, "Connection refused")), False),
        (_google_wrapped(requests.ConnectionError("Connection refused")), False),
        (ValueError("not JSON"), False),
    ],
)
def test_an_http_timeout_is_found_however_the_library_wraps_it(error, is_timeout):
    assert timed_out(error) is is_timeout


def test_retry_call_goes_past_the_policy_for_errors_bounded_elsewhere():
    class Bounded(Exception):
        pass

    class Other(Exception):
        pass

    errors = [Bounded(), Bounded(), Bounded(), Bounded(), Other()]
    calls = []

    def operation():
        calls.append(1)
        raise errors[len(calls) - 1]

    policy = retry.RetryPolicy(attempts=2, first_wait=0.01, max_wait=0.01, deadline=0.0)
    with pytest.raises(Other):
        retry.call(
            policy, operation, retry_on=lambda e: True, what="test", sleep=lambda s: None,
            bounded_elsewhere=lambda e: isinstance(e, Bounded),
        )
    assert len(calls) == 5  # the policy alone would have stopped after the first


def test_a_destination_found_down_at_append_pauses_it_and_the_message_is_looked_for_first(world):
    ref = world.arrive("work")
    down = EndpointDown("destination: IMAP server mail.test:993 not answering", endpoint="mail.test:993", retry_after=1800)
    world.destination.fail_next("append", down)

    result = world.copier().copy_message(ref)

    assert (result.outcome, result.retry_after) == (Outcome.PAUSED, 1800)
    assert "mail.test:993 not answering" in result.detail
    assert world.failure(ref) is None  # no attempt charged
    assert world.state.inner.read_pause("destination").until == world.clock() + 1800
    # The APPEND may have landed before the server went silent: the next try looks first.
    world.clock.advance(1801)
    assert world.copier().copy_message(ref).outcome is Outcome.COPIED
    assert len(world.destination.calls_to("find_copies")) == 1
    assert len(world.destination.bodies("Work")) == 1
