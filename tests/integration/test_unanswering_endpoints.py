"""Endpoints that accept a connection and never answer (issue 13, item 6), met by `drain` in a
subprocess: the destination's IMAP server, Microsoft's authority, Google's token endpoint.

Each is a real black hole (tests/harness/black_hole.py): a listening socket that accepts and
then says nothing. What a user must see: the run ends within a few timeouts of that endpoint
(not minutes per message), exit 6 with one line naming the endpoint and until when its mailbox
is left alone, and no message dead-lettered or charged with a failure: the messages wait in the
queue for the first run after the pause.
"""

from __future__ import annotations

import json
import time

import pytest
from pydantic import SecretStr

from shared.mailbox import retry
from shared.mailbox.port import EndpointDown
from shared.mailbox.session import ImapAccount, ImapEndpoint, ImapEndpointDown, open_session
from shared.tokens.sources import GoogleTokenSource, MicrosoftTokenSource, TokenEndpointTimedOut
from tests.harness.black_hole import BlackHole
from tests.harness.mail import corpus_seed, seed

IMAP_TIMEOUT = 2
# Three timeouts end it (shared/mailbox/retry.py ENDPOINT_DOWN_AFTER); one more, and the run's own
# start, scan and summary, as margin. A bound on hanging, not a benchmark: the connections each
# test counts tell a run that paused from one that tried per message. The margin is wide because
# the CLI's start is CPU work shared with make test's other xdist workers: 10 s was once 0.6 s short.
BOUND_SECONDS = 4 * IMAP_TIMEOUT + 25
# The subprocess is stopped well after the bound, so a hang fails the test instead of stalling it.
CLI_TIMEOUT = 90


@pytest.fixture
def black_hole(test_ca):
    holes: list[BlackHole] = []

    def make(*, tls: bool = False) -> BlackHole:
        hole = BlackHole(test_ca.server_context if tls else None)
        holes.append(hole)
        return hole

    yield make
    for hole in holes:
        hole.close()


def timed_drain(setup):
    started = time.monotonic()
    done = setup.cli("drain", timeout=CLI_TIMEOUT)
    return done, time.monotonic() - started


def the_line_naming(endpoint: str, stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if endpoint in line]
    assert len(lines) == 1, stdout
    return lines[0]


def assert_nothing_charged(setup, *, waiting: int, paused: str) -> None:
    """No failure recorded, nothing dead-lettered: the messages wait in the queue for the pause."""
    status = json.loads(setup.cli("status", "--json").stdout)
    (route,) = status["routes"]
    assert route["failures"] == {}, route
    assert route["dead_letters"]["count"] == 0
    assert status["queue"]["dead"] == 0
    assert status["queue"]["queued"] + status["queue"]["in_flight"] == waiting
    assert [pause["mailbox"] for pause in status["pauses"]] == [paused]


def assert_paused_by(setup, done, took: float, *, endpoint: str, paused: str, waiting: int = 3) -> None:
    """The run ended within the bound, exit 6, with one line naming `endpoint` as not answering
    and the mailbox `paused`; no message was charged an attempt for it."""
    assert done.returncode == 6, done.stdout + done.stderr
    assert took < BOUND_SECONDS, (took, done.stdout, done.stderr)
    line = the_line_naming(endpoint, done.stdout)
    assert line.strip().startswith(f"{paused} paused until") and "not answering" in line, line
    assert f"{waiting} message(s) wait in the queue" in done.stdout
    assert "failed (attempt" not in done.stderr
    assert_nothing_charged(setup, waiting=waiting, paused=paused)


def test_black_holed_destination_pauses_it_within_three_timeouts(sync_env, dovecot_pair, black_hole):
    setup = sync_env()
    hole = black_hole()
    setup.env |= {"OUTLOOK_IMAP_HOST": hole.host, "OUTLOOK_IMAP_PORT": str(hole.port), "IMAP_TIMEOUT": str(IMAP_TIMEOUT)}
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))

    done, took = timed_drain(setup)

    print(f"black-holed destination: drain took {took:.1f} s")
    assert_paused_by(setup, done, took, endpoint=f"{hole.host}:{hole.port}", paused="destination")
    assert "route work: 0 copied, 0 skipped, 0 failed," in done.stdout
    assert hole.connections == 3  # three tries, then left alone: no connection per message


@pytest.mark.parametrize("tls", [False, True], ids=["accepts-tcp-only", "accepts-tls-never-replies"])
def test_black_holed_microsoft_authority_pauses_the_destination(sync_env, dovecot_pair, black_hole, tls):
    setup = sync_env()
    hole = black_hole(tls=tls)
    authority = hole.url("/consumers")
    setup.env |= {"MS_AUTHORITY": authority, "IMAP_TIMEOUT": str(IMAP_TIMEOUT)}
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))

    done, took = timed_drain(setup)

    print(f"black-holed Microsoft authority ({'tls' if tls else 'tcp'}): drain took {took:.1f} s")
    assert_paused_by(setup, done, took, endpoint=authority, paused="destination")
    assert "route work: 0 copied, 0 skipped, 0 failed," in done.stdout
    assert hole.connections <= 4  # three timeouts (a fourth connection at most, cut short by the pause)


@pytest.mark.parametrize("tls", [False, True], ids=["accepts-tcp-only", "accepts-tls-never-replies"])
def test_black_holed_google_token_endpoint_pauses_the_account(sync_env, dovecot_pair, black_hole, tls):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    assert setup.cli("scan").returncode == 0  # queued while the endpoint still answered
    hole = black_hole(tls=tls)
    token_uri = hole.url("/token")
    setup.env |= {"GOOGLE_TOKEN_URI": token_uri, "IMAP_TIMEOUT": str(IMAP_TIMEOUT)}

    done, took = timed_drain(setup)

    print(f"black-holed Google token endpoint ({'tls' if tls else 'tcp'}): drain took {took:.1f} s")
    assert_paused_by(setup, done, took, endpoint=token_uri, paused=f"source {user}")
    assert "route work: 0 copied, 0 skipped, 0 failed," in done.stdout
    assert "not scanned: its source account is paused" in done.stdout
    assert hole.connections <= 4


def test_black_holed_gmail_imap_server_pauses_the_account(sync_env, dovecot_pair, black_hole):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    assert setup.cli("scan").returncode == 0  # queued while the server still answered
    hole = black_hole()
    setup.env |= {"GMAIL_IMAP_HOST": hole.host, "GMAIL_IMAP_PORT": str(hole.port), "IMAP_TIMEOUT": str(IMAP_TIMEOUT)}

    done, took = timed_drain(setup)

    print(f"black-holed Gmail IMAP server: drain took {took:.1f} s")
    assert_paused_by(setup, done, took, endpoint=f"{hole.host}:{hole.port}", paused=f"source {user}")
    assert "not scanned: its source account is paused" in done.stdout
    assert hole.connections == 3


def test_destination_gone_silent_mid_append_is_paused_and_the_message_charged_nothing(
    sync_env, dovecot_pair, imap_proxy
):
    """The server answered the first APPEND, then nothing: not the second APPEND, not a new
    connection. The APPEND's fate is unknown, so it is not repeated; a new session finds the
    server down: the destination pauses, and the message waits, to be looked for first."""
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.outlook)
    setup.env |= {"OUTLOOK_IMAP_PORT": str(proxy.port), "IMAP_TIMEOUT": str(IMAP_TIMEOUT)}
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    proxy.go_silent(b" APPEND ", nth=2)

    done, took = timed_drain(setup)

    print(f"destination silent from its second APPEND: drain took {took:.1f} s")
    assert_paused_by(setup, done, took, endpoint=f"127.0.0.1:{proxy.port}", paused="destination", waiting=2)
    assert "route work: 1 copied, 0 skipped, 0 failed," in done.stdout
    assert (proxy.sent(b" APPEND "), proxy.unanswered) == (2, 2)  # not repeated; two new connections


def test_a_destination_silent_after_the_last_append_does_not_hold_the_run_at_logout(sync_env, dovecot_pair, imap_proxy):
    """Every APPEND answered, then no answer to LOGOUT: the run is over, and nothing is left to
    learn from the session. drain used to wait IMAP_TIMEOUT for that answer (a round trip at
    the end of every run when the server does answer); it sends LOGOUT and closes."""
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.outlook)
    timeout = 40
    setup.env |= {"OUTLOOK_IMAP_PORT": str(proxy.port), "IMAP_TIMEOUT": str(timeout)}
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    proxy.go_silent(b" LOGOUT")

    done, took = timed_drain(setup)

    print(f"destination silent at LOGOUT: drain took {took:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed\n" in done.stdout
    assert proxy.sent(b" LOGOUT") == 1
    assert took < timeout, (took, done.stdout, done.stderr)


# ---- the adapters on their own, in this process -----------------------------------------------
SHORT = 0.5  # seconds: the timeout the adapters are given here


@pytest.mark.parametrize("tls", [False, True], ids=["accepts-tcp-only", "accepts-tls-never-replies"])
def test_token_sources_wait_our_timeout_once_per_refresh(black_hole, trust_test_ca, tls):
    """google-auth's own default wait is 120 s, msal retries each timeout once: ours is one wait
    of `timeout`, then TokenEndpointTimedOut naming the endpoint."""
    hole = black_hole(tls=tls)
    google = GoogleTokenSource(
        account="a@gmail.test", refresh_token="rt-google", client_id="id", client_secret="black-hole-client-secret",
        token_uri=hole.url("/token"), timeout=SHORT,
    )
    microsoft = MicrosoftTokenSource(
        account="me@outlook.test", refresh_token="rt-ms", client_id="id", authority=hole.url("/consumers"), timeout=SHORT
    )
    for source, endpoint in ((google, hole.url("/token")), (microsoft, hole.url("/consumers"))):
        connections = hole.connections
        started = time.monotonic()
        with pytest.raises(TokenEndpointTimedOut) as timed_out:
            source.access_token()
        assert time.monotonic() - started < SHORT + 1.5
        assert timed_out.value.endpoint == endpoint and f"no answer from {endpoint} within {SHORT:g} s" in str(timed_out.value)
        assert hole.connections == connections + 1  # no hidden retry


def test_open_session_gives_a_black_holed_server_three_timeouts_then_calls_it_down(black_hole, test_ca):
    hole = black_hole()
    endpoint = ImapEndpoint(hole.host, hole.port, ca_bundle=test_ca.ca_bundle_path, timeout=SHORT)
    account = ImapAccount("destination me@outlook.test", "me@outlook.test", endpoint, password=SecretStr("pw"))
    started = time.monotonic()

    with pytest.raises(ImapEndpointDown) as down:
        open_session(account)

    assert time.monotonic() - started < 3 * SHORT + 4  # three timeouts and SESSION's short waits
    assert hole.connections == retry.ENDPOINT_DOWN_AFTER
    assert str(down.value) == (
        f"destination me@outlook.test: IMAP server {hole.host}:{hole.port} not answering: "
        f"3 tries in a row got no answer within {SHORT:g} s"
    )
    assert isinstance(down.value, EndpointDown) and down.value.retry_after == retry.ENDPOINT_DOWN_PAUSE_SECONDS
    # Still down: the next try is given one timeout, not three.
    with pytest.raises(ImapEndpointDown):
        open_session(account)
    assert hole.connections == retry.ENDPOINT_DOWN_AFTER + 1



def test_a_login_that_times_out_is_tried_on_a_new_connection_with_the_same_token(
    imap_proxy, dovecot_pair, oauth_server, trust_test_ca
):
    """A timed-out AUTHENTICATE says nothing about the token: no refresh, no second login on
    the silent connection; a new one, which answers."""
    server = dovecot_pair.outlook
    proxy = imap_proxy(server)
    user = server.new_user("slowlogin")
    tokens = GoogleTokenSource(
        account=user, refresh_token=oauth_server.issue_refresh_token(user, "google"),
        client_id=oauth_server.google_client_id, client_secret=oauth_server.google_client_secret,
        token_uri=oauth_server.google_token_uri, timeout=5,
    )
    endpoint = ImapEndpoint(proxy.host, proxy.port, ca_bundle=server.ca_bundle_path, timeout=SHORT)
    refreshes = oauth_server.refresh_count("google")
    proxy.stall(b"AUTHENTICATE", SHORT + 1)

    open_session(ImapAccount("destination", user, endpoint, token_source=tokens)).logout()

    assert (proxy.sent(b"AUTHENTICATE"), proxy.connections) == (2, 2)
    assert oauth_server.refresh_count("google") == refreshes + 1  # the first token, kept
