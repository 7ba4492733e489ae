"""The Lambda handlers end to end: SQS FIFO and DynamoDB on moto's server, real Dovecot pair,
real token refresh. The test plays Lambda's part: it receives real batches, calls the consumer
handler with them, and deletes what the handler did not report as failed."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from consumer import handler as consumer
from shared import bootstrap
from producer import handler as producer
from tests.e2e.test_drain import assert_copied_exactly, corpus_seed
from tests.harness.aws import lambda_deployment
from tests.harness.mail import read_folder, seed


class LambdaContext:
    """As the runtime gives it: the time left shrinks as the invocation runs."""

    def __init__(self, timeout_seconds: float = 60) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self._end = time.time() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._end - time.time()) * 1000))


@pytest.fixture
def lambda_env(sync_env, aws_env, aws_client, monkeypatch):
    """A deployed pipeline in miniature: the table, the FIFO queue pair, the functions' env."""
    setup = sync_env(routes=(("corpus", "INBOX", "Gmail/Corpus"),))
    with lambda_deployment(setup, aws_env, aws_client, monkeypatch) as queue_url:
        yield setup, queue_url


def lambda_records(messages: list[dict]) -> dict:
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m["Attributes"],
                "eventSource": "aws:sqs",
            }
            for m in messages
        ]
    }


def run_consumer_until_empty(sqs, queue_url: str) -> list[dict]:
    """Feed real receive batches to the handler until the queue is empty; the handler's answers."""
    answers = []
    for _ in range(200):  # bounded: 107 messages in batches of 10 need far fewer
        received = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=60, MessageSystemAttributeNames=["All"]
        ).get("Messages", [])
        if not received:
            attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
            if attributes["ApproximateNumberOfMessages"] == attributes["ApproximateNumberOfMessagesNotVisible"] == "0":
                return answers
            continue
        answer = consumer.handler(lambda_records(received), LambdaContext())
        answers.append(answer)
        retry = {failure["itemIdentifier"] for failure in answer["batchItemFailures"]}
        for message in received:
            if message["MessageId"] in retry:
                sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
            else:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    raise AssertionError("the queue did not empty")


def test_handlers_copy_the_corpus_exactly_once(lambda_env, dovecot_pair, aws_client):
    setup, queue_url = lambda_env
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed())
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    sqs = aws_client("sqs")

    summary = producer.handler({"source": "aws.events", "detail-type": "Scheduled Event"}, LambdaContext())

    assert summary == {"routes": [{"route": "corpus", "found": len(source), "enqueued": len(source), "left_for_next_run": 0}]}
    answers = run_consumer_until_empty(sqs, queue_url)
    assert all(answer == {"batchItemFailures": []} for answer in answers)
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Gmail/Corpus"))
    assert read_folder(dovecot_pair.gmail, user, "INBOX") == source

    # The next scheduled run finds nothing; redelivered references are acknowledged, not copied.
    assert producer.handler({}, LambdaContext())["routes"][0]["enqueued"] == 0
    assert len(read_folder(dovecot_pair.outlook, setup.outlook_user, "Gmail/Corpus")) == len(source)


def test_consumer_quarantines_a_malformed_body_and_goes_on(lambda_env, dovecot_pair, aws_client):
    setup, queue_url = lambda_env
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    sqs = aws_client("sqs")
    producer.handler({}, LambdaContext())
    sqs.send_message(QueueUrl=queue_url, MessageBody="not a reference", MessageGroupId="corpus", MessageDeduplicationId="junk")
    sqs.send_message(
        QueueUrl=queue_url,
        MessageBody=json.dumps({"v": 1, "route": "nobody", "uidvalidity": 1, "uid": 1}),
        MessageGroupId="nobody",
        MessageDeduplicationId="unknown-route",
    )

    answers = run_consumer_until_empty(sqs, queue_url)

    assert all(answer == {"batchItemFailures": []} for answer in answers)
    assert len(read_folder(dovecot_pair.outlook, setup.outlook_user, "Gmail/Corpus")) == 3
    dead = sqs.receive_message(
        QueueUrl=setup.env["DLQ_URL"], MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    ).get("Messages", [])
    reasons = sorted(m["MessageAttributes"]["quarantine_reason"]["StringValue"] for m in dead)
    assert reasons == [
        "queue body.route: unknown route 'nobody'",
        "queue body: not JSON (Expecting value: line 1 column 1 (char 0))",
    ]


def test_claims_expire_soon_after_the_invocation_ends(lambda_env, dovecot_pair, aws_client, monkeypatch):
    """A consumer killed at its timeout leaves claims that a redelivery can take soon after:
    every claim of a batch, early or late in it, expires LEASE_MARGIN_SECONDS after the
    invocation's end, never a whole function timeout later."""
    setup, queue_url = lambda_env
    seed(dovecot_pair.gmail, setup.routes[0].gmail_user, "INBOX", corpus_seed(3))
    producer.handler({}, LambdaContext())
    leases = []
    real_copier = bootstrap.App.copier

    def copier(app, lease_until, owner=None):
        leases.append(lease_until)
        return real_copier(app, lease_until, owner)

    monkeypatch.setattr(bootstrap.App, "copier", copier)
    sqs = aws_client("sqs")
    received = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"])["Messages"]
    context = LambdaContext(timeout_seconds=20)
    end = time.time() + 20

    answer = consumer.handler(lambda_records(received), context)

    assert answer == {"batchItemFailures": []}
    (lease_until,) = leases
    # Asked now, after the batch was copied, as the last claim of a batch would ask it.
    assert abs(lease_until() - (end + consumer.LEASE_MARGIN_SECONDS)) < 0.05
