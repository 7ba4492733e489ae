"""moto's server mode over HTTP, as boto3 reaches real AWS: one per test session; a deployment in
miniature on it (`lambda_deployment`, `lambda_env`), and the Lambda runtime's part played by the
tests (`cold_start`, `LambdaContext`, `lambda_records`, `run_consumer_until_empty`)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
import pytest
from moto.dynamodb.responses import DynamoHandler
from moto.server import ThreadedMotoServer

REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_server():
    """The endpoint URL of a moto server on loopback, its DynamoDB made atomic."""
    with pytest.MonkeyPatch.context() as patch:
        _serialise_dynamodb(patch)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
        server.stop()


def _serialise_dynamodb(patch: pytest.MonkeyPatch) -> None:
    """Handle moto's DynamoDB requests one at a time.

    Real DynamoDB applies each conditional write atomically. moto's threaded server reads the
    item, evaluates the condition and writes in plain Python with no lock: an update of a new
    item stores the bare key first and the attributes after, so a racing request can find an
    item with no `status`, or two can both pass `attribute_not_exists`; a cancelled transaction
    restores a deep copy of the whole table, undoing other requests' writes. Serialising the
    requests gives back the atomicity the adapter relies on, so race tests fail only for the
    adapter's own faults.
    """
    lock = threading.Lock()
    original = DynamoHandler.call_action

    def call_action(self):
        with lock:
            return original(self)

    patch.setattr(DynamoHandler, "call_action", call_action)


@pytest.fixture(scope="session", autouse=False)
def aws_env(moto_server):
    """Environment for boto3 (and the CLI in a subprocess) pointed at moto, with fake keys."""
    values = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield values
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def aws_client(aws_env):
    """boto3 clients on moto: aws_client("sqs")."""

    def make(service: str):
        return boto3.client(service, endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name=REGION)

    return make


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextmanager
def lambda_deployment(setup, aws_env, aws_client, monkeypatch, *, max_receive_count: int = 3) -> Iterator[str]:
    """A deployed pipeline in miniature for a SyncEnv: the table and the FIFO queue pair on moto,
    the functions' environment set in this process, and a cold start. Yields the queue URL."""
    from shared.queue.sqs import create_fifo_queue_pair
    from shared.state.dynamodb import create_state_table

    table = unique_name("state")
    create_state_table(aws_client("dynamodb"), table)
    queue_url, dlq_url = create_fifo_queue_pair(aws_client("sqs"), unique_name("refs"), max_receive_count=max_receive_count)
    setup.env.update(aws_env | {"STATE_TABLE": table, "QUEUE_URL": queue_url, "DLQ_URL": dlq_url})
    for key, value in setup.env.items():
        monkeypatch.setenv(key, value)
    cold_start()
    try:
        yield queue_url
    finally:
        cold_start()


# ---- the Lambda runtime's part, played by the tests ---------------------------------------------
def cold_start() -> None:
    """A new Lambda container: the warm App (its sessions and clients) closed and forgotten."""
    from shared import bootstrap

    if bootstrap.lambda_app.cache_info().currsize:
        bootstrap.lambda_app().close()
    bootstrap.lambda_app.cache_clear()


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
    from consumer import handler as consumer

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
