"""Dead letters and `redrive` end to end (guarantee 5): a message that fails on every try ends in
the dead letters with its reason in `status`; once the cause is fixed, `redrive` puts it back
and it is copied exactly once.

The failure is real: the route's destination folder is `~Work`, a name Dovecot refuses to
create ("Invalid mailbox name: Begins with '~'"), so every copy fails until the route is
corrected to `Work`. The embedded backend runs through the CLI; SQS and DynamoDB on moto run
through the Lambda handlers, with the CLI's `status` and `redrive` on the same queues.
"""

from __future__ import annotations

import json

import pytest

from producer import handler as producer
from tests.harness.aws import LambdaContext, cold_start, lambda_deployment, run_consumer_until_empty
from tests.harness.mail import assert_copied_exactly, corpus_seed, read_folder, seed

REFUSED_FOLDER = "~Work"
REFUSAL = f"create folder '{REFUSED_FOLDER}' failed: create failed: [CANNOT] Invalid mailbox name: Begins with '~'"
MAX_RECEIVE_COUNT = 2


def status_json(setup) -> dict:
    done = setup.cli("status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def fix_the_route(setup) -> None:
    setup.set_routes([setup.routes[0].as_json() | {"outlook_folder": "Work"}])


def assert_dead_with_reasons(setup, route_status: dict) -> None:
    """Both messages are dead letters: the first failed on every try, the second waited behind
    it (FIFO per route) in every batch and so ran out of receives too, without a failure of its own."""
    dead = route_status["dead_letters"]
    assert dead["count"] == 2
    assert len(dead["reasons"]) == 2
    failed_reason = next(reason for reason in dead["reasons"] if reason.startswith("ImapFailure: "))
    assert REFUSAL in failed_reason
    held_back_reason = next(reason for reason in dead["reasons"] if reason != failed_reason)
    assert held_back_reason.startswith("max receive count") and "without a failure of its own" in held_back_reason
    for secret in setup.secrets:
        assert secret not in json.dumps(route_status)


def test_a_message_failing_every_time_is_dead_lettered_then_redriven_and_copied_once(sync_env, dovecot_pair):
    setup = sync_env(routes=(("work", "INBOX", REFUSED_FOLDER),))
    setup.env["MAX_RECEIVE_COUNT"] = str(MAX_RECEIVE_COUNT)
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(2))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")

    failed = setup.cli("drain")

    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "route work: 0 copied, 0 skipped, 1 failed" in failed.stdout
    assert REFUSAL in failed.stdout
    status = status_json(setup)
    (route,) = status["routes"]
    assert_dead_with_reasons(setup, route)
    # Both were claimed in one batch: the first failed; the second was let go unsent (claimable
    # again at once, and its dead-letter reason says it had no failure of its own).
    assert route["claims"] == {"failed": 2}
    assert (status["queue"]["queued"], status["queue"]["in_flight"], status["queue"]["dead"]) == (0, 0, 2)
    assert status["queue"]["dead_letters_complete"] is True
    text = setup.cli("status").stdout
    assert "  dead letters (`redrive` puts them back on the queue): 2" in text
    assert f"    1 x ImapFailure: destination {setup.outlook_user}" in text

    fix_the_route(setup)
    dry = setup.cli("redrive", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert dry.stdout.splitlines() == ["route work: would move 2 back to the queue", "total: would move 2 (dry run: nothing was moved)"]
    redriven = setup.cli("redrive")

    assert redriven.returncode == 0, redriven.stdout + redriven.stderr
    assert redriven.stdout.splitlines()[0] == "route work: moved 2 back to the queue"
    assert redriven.stdout.splitlines()[1].startswith("total: moved 2")
    copied = setup.cli("drain")
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert "route work: 2 copied, 0 skipped, 0 failed" in copied.stdout
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))
    status = status_json(setup)
    assert status["routes"][0]["claims"] == {"done": 2}
    assert status["routes"][0]["dead_letters"] == {"count": 0, "reasons": {}}
    assert status["queue"]["dead"] == 0
    assert setup.cli("redrive").stdout.splitlines() == ["total: moved 0"]  # nothing left to move


def test_redrive_refuses_an_unknown_route(sync_env):
    setup = sync_env()

    done = setup.cli("redrive", "--route", "nosuch")

    assert done.returncode == 2
    assert done.stderr.strip() == "redrive --route: unknown route 'nosuch' (routes: work)"


@pytest.fixture
def aws_pipeline(sync_env, aws_env, aws_client, monkeypatch):
    """The Lambda pipeline on moto (DynamoDB table, FIFO queue and DLQ), its route refused."""
    setup = sync_env(routes=(("work", "INBOX", REFUSED_FOLDER),))
    with lambda_deployment(setup, aws_env, aws_client, monkeypatch, max_receive_count=MAX_RECEIVE_COUNT) as queue_url:
        yield setup, queue_url


def test_redrive_on_sqs_and_dynamodb(aws_pipeline, dovecot_pair, aws_client, monkeypatch):
    setup, queue_url = aws_pipeline
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(2))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    sqs = aws_client("sqs")
    # Garbage ahead of the route's references: quarantined at once, it heads the route's group
    # in the DLQ, where SQS FIFO hands out nothing behind it while it is held.
    sqs.send_message(QueueUrl=queue_url, MessageBody="garbage", MessageGroupId="work", MessageDeduplicationId="junk")
    producer.handler({}, LambdaContext())

    answers = run_consumer_until_empty(sqs, queue_url)  # until SQS moved both references to the DLQ

    assert [len(answer["batchItemFailures"]) for answer in answers] == [2] * MAX_RECEIVE_COUNT
    status = status_json(setup)
    assert_dead_with_reasons(setup, status["routes"][0])
    assert (status["queue"]["queued"], status["queue"]["dead"]) == (0, 3)
    not_json = "queue body: not JSON (Expecting value: line 1 column 1 (char 0))"
    assert status["queue"]["dead_letters_not_routed"] == {"count": 1, "reasons": {not_json: 1}}

    fix_the_route(setup)
    redriven = setup.cli("redrive", "--route", "work")

    assert redriven.returncode == 0, redriven.stdout + redriven.stderr
    lines = redriven.stdout.splitlines()
    assert lines[0] == "route work: moved 2 back to the queue"
    assert lines[1].startswith("left in the dead letters: message ") and lines[1].endswith(f"(group work): {not_json}")
    queue = status_json(setup)["queue"]
    assert (queue["queued"], queue["dead"], queue["dead_letters_not_routed"]["count"]) == (2, 1, 1)
    monkeypatch.setenv("SYNC_ROUTES_JSON", setup.env["SYNC_ROUTES_JSON"])
    cold_start()  # a new deployment with the fixed route
    answers = run_consumer_until_empty(sqs, queue_url)
    assert all(answer == {"batchItemFailures": []} for answer in answers)
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))
    status = status_json(setup)
    assert status["routes"][0]["claims"] == {"done": 2}
    assert status["routes"][0]["dead_letters"]["count"] == 0
    assert status["queue"]["dead"] == 1  # the garbage, still listed
