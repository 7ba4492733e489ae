"""Transient faults and throttling against the real Dovecot pair, with an IMAP proxy in front of
one side that injects throttle replies, dropped connections, cut and slow responses.

Whatever the fault: every message is copied exactly once, byte for byte; a throttled message
waits at least the server's suggested time (in the local queue and, on moto's SQS, through the
consumer handler); a transient fault is retried on a new session without costing the message a
queue retry; an access token that expires mid-run is refreshed and the run goes on.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from consumer import handler as consumer
from producer import handler as producer
from shared import bootstrap
from shared.message_ref import MessageRef
from shared.pipeline.consume import consume_queue
from shared.pipeline.copier import CopyResult, Outcome, lease_for
from shared.queue.port import MAX_VISIBILITY_SECONDS
from shared.queue.sqlite import SqliteQueue
from shared.settings import Settings, load_settings
from tests.harness.aws import LambdaContext, lambda_deployment, lambda_records
from tests.harness.mail import assert_copied_exactly, corpus_seed, read_folder, seed, wait_for

GMAIL_BANDWIDTH = "NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)"
BODY_FETCH = b"BODY.PEEK[]"  # the consumer's FETCH; the producer's asks for BODY.PEEK[HEADER.FIELDS ...]


def through_proxy(setup, proxy, side: str) -> None:
    """Point one side of a SyncEnv at the proxy (IMAPS with the test CA, as before)."""
    setup.env["GMAIL_IMAP_PORT" if side == "source" else "OUTLOOK_IMAP_PORT"] = str(proxy.port)


def in_process_app(setup, monkeypatch) -> bootstrap.App:
    """The App the CLI would build from the SyncEnv, in this process (to watch the queue while it runs)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for key, value in setup.env.items():
        monkeypatch.setenv(key, value)
    return bootstrap.build(load_settings(env_file=None))


def visible_at(state_db: str, uid: int) -> float:
    """The stored time the queued reference to source UID `uid` is visible again."""
    with contextlib.closing(sqlite3.connect(state_db)) as conn:
        rows = conn.execute("SELECT body, visible_at FROM queue_messages").fetchall()
    (when,) = [at for body, at in rows if MessageRef.from_body(body).uid == uid]
    return when


def no_queue_retry(done) -> bool:
    """No message was handed back to the queue: a failure would log "... failed (attempt n)"."""
    return "failed (attempt" not in done.stderr


# ---- throttling ------------------------------------------------------------------------------
def test_throttled_append_waits_the_suggested_time_then_is_copied_once(
    sync_env, dovecot_pair, imap_proxy, monkeypatch
):
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.outlook)
    through_proxy(setup, proxy, "destination")
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(2))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    assert setup.cli("scan").returncode == 0
    app = in_process_app(setup, monkeypatch)
    queue = app.queue
    receives: list[tuple[float, int]] = []  # (when it returned, how many messages)
    real_receive = queue.receive

    def watched_receive(*args, **kwargs):
        received = real_receive(*args, **kwargs)
        receives.append((time.time(), len(received)))
        return received

    monkeypatch.setattr(queue, "receive", watched_receive)
    results: list[CopyResult] = []
    deadlines: list[float] = []

    def on_result(result: CopyResult) -> None:
        results.append(result)
        if result.outcome is Outcome.PAUSED:  # the loop has set the visibility by now
            deadlines.append(visible_at(setup.env["STATE_DB"], result.key.uid))

    # 2.5 s: longer than the loop's first retry delay (2 s), so only honouring it passes.
    proxy.throttle_appends(1, backoff_ms=2500)
    try:
        consume_queue(queue, app.copier(lease_for(60)), visibility_timeout=60, on_result=on_result)
    finally:
        app.close()

    (refused_at,) = proxy.refused_at
    first_uid = source[0].uid
    # The second APPEND went out with the first (pipelined), and its own answer stands.
    assert [(r.outcome, r.key.uid) for r in results] == [
        (Outcome.PAUSED, first_uid),
        (Outcome.COPIED, source[1].uid),
        (Outcome.COPIED, first_uid),
    ]
    assert results[0].retry_after == pytest.approx(2.5, abs=0.1)  # the destination's pause, from now
    assert "throttled" in results[0].detail
    # Invisible for at least the suggested 2.5 s, and the route waited: nothing was received
    # in that time, neither the throttled message nor the one behind it.
    assert deadlines[0] >= refused_at + 2.5
    assert all(count == 0 for at, count in receives if refused_at < at < refused_at + 2.5)
    # One refused APPEND and one APPEND per message: not hammered, copied once.
    assert proxy.sent(b" APPEND ") == 3
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


def test_gmail_overquota_on_fetch_pauses_the_account_until_its_day_has_room(sync_env, dovecot_pair, imap_proxy, monkeypatch):
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.gmail)
    through_proxy(setup, proxy, "source")
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(1))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    assert setup.cli("scan").returncode == 0
    app = in_process_app(setup, monkeypatch)
    results: list[CopyResult] = []

    class Throttled(Exception):
        pass

    def stop_after_throttle(result: CopyResult) -> None:
        results.append(result)
        raise Throttled  # the backoff is in place; waiting it out is the next step

    proxy.refuse(BODY_FETCH, GMAIL_BANDWIDTH)
    try:
        with pytest.raises(Throttled):
            consume_queue(app.queue, app.copier(lease_for(60)), visibility_timeout=60, on_result=stop_after_throttle)
        (result,) = results
        (refused_at,) = proxy.refused_at
        # The day's allowance is spent: nothing of ours is in the window but this hour, so the
        # account waits until this hour has left it (shared/pipeline/budget.py).
        assert result.outcome is Outcome.PAUSED and 23 * 3600 < result.retry_after <= 24 * 3600
        assert "bandwidth limits" in result.detail and "waits for the daily download window" in result.detail
        assert proxy.sent(BODY_FETCH) == 1  # not tried again at once
        # Away as long as the queue keeps a message (12 hours); then it finds the pause again.
        assert visible_at(setup.env["STATE_DB"], source[0].uid) >= refused_at + MAX_VISIBILITY_SECONDS
        assert app.queue.receive(10, visibility_timeout=60) == []

        # A day later (the queue's and the copier's clocks moved on), the copy goes through.
        later = SqliteQueue(setup.env["STATE_DB"], clock=lambda: time.time() + 24 * 3600)
        a_day_on = lambda: time.time() + 24 * 3600  # noqa: E731
        copier = app.copier(lease_for(60))
        copier = replace(copier, clock=a_day_on, download_budget=replace(copier.download_budget, clock=a_day_on))
        copied: list[CopyResult] = []
        consume_queue(later, copier, visibility_timeout=60, on_result=copied.append)
    finally:
        app.close()
    assert [r.outcome for r in copied] == [Outcome.COPIED]
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


@pytest.fixture
def lambda_env_via_proxy(sync_env, aws_env, aws_client, dovecot_pair, imap_proxy, monkeypatch):
    """The Lambda functions' environment (DynamoDB table, FIFO queue pair on moto), with the
    destination reached through the proxy."""
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.outlook)
    through_proxy(setup, proxy, "destination")
    with lambda_deployment(setup, aws_env, aws_client, monkeypatch) as queue_url:
        yield setup, proxy, queue_url


def test_consumer_handler_makes_a_throttled_message_wait_the_suggested_time(
    lambda_env_via_proxy, dovecot_pair, aws_client
):
    setup, proxy, queue_url = lambda_env_via_proxy
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(1))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    sqs = aws_client("sqs")
    assert producer.handler({}, LambdaContext())["routes"][0]["enqueued"] == 1

    def receive() -> list[dict]:
        return sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=300, WaitTimeSeconds=1,
            MessageSystemAttributeNames=["All"],
        ).get("Messages", [])

    proxy.throttle_appends(1, backoff_ms=1500)
    first = receive()
    answer = consumer.handler(lambda_records(first), LambdaContext())

    assert answer == {"batchItemFailures": [{"itemIdentifier": first[0]["MessageId"]}]}
    (refused_at,) = proxy.refused_at
    # Playing Lambda: a reported failure is left alone. Received with a 300 s visibility, it is
    # back within seconds only because the handler set it to the suggested wait; and not sooner.
    again: list[dict] = []
    wait_for(lambda: again.extend(receive()) or again, timeout=30, what="the throttled message to be visible again")
    assert time.time() >= refused_at + 1.5
    assert again[0]["MessageId"] == first[0]["MessageId"]
    assert again[0]["Attributes"]["ApproximateReceiveCount"] == "2"

    assert consumer.handler(lambda_records(again), LambdaContext()) == {"batchItemFailures": []}
    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=again[0]["ReceiptHandle"])
    assert proxy.sent(b" APPEND ") == 2
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


# ---- retried on a new session, within the same attempt -----------------------------------------
@pytest.mark.parametrize(
    "side, arm",
    [
        pytest.param("source", lambda proxy: proxy.cut_response(b"BODY[] {"), id="connection-cut-mid-fetch"),
        pytest.param(
            "source", lambda proxy: proxy.drop_connection(BODY_FETCH), id="connection-dropped-at-fetch"
        ),
        pytest.param("source", lambda proxy: proxy.stall(BODY_FETCH, 6), id="fetch-reply-slower-than-imap-timeout"),
        pytest.param(
            "destination",
            lambda proxy: proxy.refuse(b" APPEND ", "NO [UNAVAILABLE] Try again later"),
            id="append-refused-unavailable",
        ),
        pytest.param(
            "destination", lambda proxy: proxy.drop_connection(b" SELECT "), id="connection-dropped-before-append"
        ),
    ],
)
def test_transient_fault_is_retried_on_a_new_session(sync_env, dovecot_pair, imap_proxy, side, arm):
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.gmail if side == "source" else dovecot_pair.outlook)
    through_proxy(setup, proxy, side)
    setup.env["IMAP_TIMEOUT"] = "2"
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    arm(proxy)

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    assert "trying again" in done.stderr
    assert no_queue_retry(done), done.stderr
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


# ---- a connection lost with an APPEND in flight: the queue's retry, the crash-window check --------
@pytest.mark.parametrize("reached_the_server", [False, True], ids=["append-lost-on-the-way", "append-reply-lost"])
def test_connection_lost_during_append_copies_exactly_once(sync_env, dovecot_pair, imap_proxy, reached_the_server):
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.outlook)
    through_proxy(setup, proxy, "destination")
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    proxy.drop_connection(b" APPEND ", nth=2, when="reply_lost" if reached_the_server else "unsent")

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    assert proxy.connections == 2  # the session was reopened
    # Whether that APPEND landed was unknown: not repeated blindly, looked for first.
    assert proxy.sent(b" APPEND ") == (3 if reached_the_server else 4)
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


def test_session_the_server_closed_between_messages_is_reopened_before_the_next_append(
    sync_env, dovecot_pair, imap_proxy
):
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.outlook)
    through_proxy(setup, proxy, "destination")
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    # As Outlook.com does: the first APPEND is answered, then the session is ended.
    proxy.drop_connection(b" APPEND ", when="after_reply", bye="* BYE Session invalidated - AccessTokenExpired")

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    assert proxy.connections == 2
    # The APPENDs sent with the first (pipelined) were left unanswered by the ended session: no
    # failure of theirs, so not retried through the queue; looked for, and appended if missing,
    # in the batch that follows on the new session.
    assert no_queue_retry(done), done.stderr
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


# ---- tokens and slow servers --------------------------------------------------------------------
def test_access_token_expired_mid_run_is_refreshed(sync_env, dovecot_pair, imap_proxy, oauth_server):
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.gmail)
    through_proxy(setup, proxy, "source")
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    # At the FETCH of the batch every access token stops working and the connection drops, so
    # the source must log in again, with a token it has to refresh first.
    proxy.drop_connection(BODY_FETCH, before=oauth_server.expire_access_tokens)
    refreshes = oauth_server.refresh_count("google")

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    assert oauth_server.refresh_count("google") == refreshes + 2  # at the start, and after expiry
    assert proxy.connections == 2
    assert no_queue_retry(done), done.stderr
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


def test_slow_servers_within_imap_timeout_still_work(sync_env, dovecot_pair, imap_proxy):
    setup = sync_env()
    source_proxy, destination_proxy = imap_proxy(dovecot_pair.gmail), imap_proxy(dovecot_pair.outlook)
    through_proxy(setup, source_proxy, "source")
    through_proxy(setup, destination_proxy, "destination")
    source_proxy.delay = destination_proxy.delay = 0.1  # every reply, each side
    setup.env["IMAP_TIMEOUT"] = "5"
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(2))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 2 copied, 0 skipped, 0 failed" in done.stdout
    assert "trying again" not in done.stderr
    assert source_proxy.connections == destination_proxy.connections == 1
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


# ---- the proxy itself ----------------------------------------------------------------------------
def test_proxy_answers_a_synchronising_literal_itself_and_forwards_the_next(dovecot_pair, imap_proxy, test_ca):
    """imaplib's own APPEND waits for "+" before its literal: the proxy gives it when it answers
    the command itself, and Dovecot gives it otherwise."""
    outlook = dovecot_pair.outlook
    proxy = imap_proxy(outlook)
    user = outlook.new_user("proxy")
    client = IMAPClient(proxy.host, port=proxy.port, ssl=True, ssl_context=test_ca.client_context(), timeout=10)
    try:
        client.login(user, outlook.password)
        proxy.throttle_appends(1, backoff_ms=700)
        with pytest.raises(IMAPClientError, match="Suggested Backoff Time: 700 milliseconds"):
            client.append("INBOX", b"Subject: refused\r\n\r\nbody\r\n")
        client.append("INBOX", b"Subject: stored\r\n\r\nbody\r\n")
        assert client.noop()  # the session goes on after both
    finally:
        client.logout()
    assert [m.body for m in read_folder(outlook, user, "INBOX")] == [b"Subject: stored\r\n\r\nbody\r\n"]
    assert proxy.sent(b" APPEND ") == 2 and len(proxy.refused_at) == 1


# ---- an APPEND longer than the lease ------------------------------------------------------------
def test_an_append_longer_than_the_lease_keeps_its_claim(sync_env, dovecot_pair, imap_proxy):
    """A large message on a slow uplink: the APPEND outlasts LEASE_SECONDS. A second process
    that receives the message meanwhile must find the claim still held (renewed during the
    APPEND), not take it over, find no copy yet, and append a second one."""
    setup = sync_env()
    setup.env["LEASE_SECONDS"] = "2"  # also the local queue's visibility timeout
    proxy = imap_proxy(dovecot_pair.outlook)
    through_proxy(setup, proxy, "destination")
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(1))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    assert setup.cli("scan").returncode == 0
    proxy.slow_upload(b" APPEND ", seconds=7)
    first = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "consume"], env=setup.env, cwd=setup.workdir,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for(lambda: proxy.sent(b" APPEND ") == 1, timeout=60, what="the first APPEND")
    appending_since = time.time()
    wait_for(lambda: time.time() > appending_since + 3, timeout=10, what="the first lease to be over")

    second = setup.cli("consume")  # receives the message again: its visibility ran out too
    first_out, first_err = first.communicate(timeout=120)

    assert first.returncode == 0, first_out + first_err
    assert second.returncode == 0, second.stdout + second.stderr
    assert "route work: 1 copied" in first_out
    assert "1 copied" not in second.stdout, second.stdout
    assert proxy.sent(b" APPEND ") == 1
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))
