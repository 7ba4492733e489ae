"""SqsQueue.redrive through SQS's own message move task (StartMessageMoveTask).

moto's server has no message move task (it answers HTTP 500), so the integration suite covers
only the fallback (receive, send, delete). This drives the task path with botocore's Stubber,
which checks every request against the SQS API model: the ARNs sent, the polling, the outcome.
"""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from shared.errors import QueueUnavailable
from shared.queue import Redriven
from shared.queue.sqs import MOVE_TASK_POLL_SECONDS, SqsQueue

QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/refs.fifo"
DLQ_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/refs-dlq.fifo"
QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:refs.fifo"
DLQ_ARN = "arn:aws:sqs:us-east-1:123456789012:refs-dlq.fifo"


@pytest.fixture
def stubbed():
    client = boto3.client("sqs", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    sleeps: list[float] = []
    queue = SqsQueue(QUEUE_URL, client=client, dlq_url=DLQ_URL, sleep=sleeps.append)
    with Stubber(client) as stub:
        stub.add_response("get_queue_attributes", {"Attributes": {"QueueArn": DLQ_ARN}}, {"QueueUrl": DLQ_URL, "AttributeNames": ["QueueArn"]})
        stub.add_response("get_queue_attributes", {"Attributes": {"QueueArn": QUEUE_ARN}}, {"QueueUrl": QUEUE_URL, "AttributeNames": ["QueueArn"]})
        stub.add_response("start_message_move_task", {"TaskHandle": "task-1"}, {"SourceArn": DLQ_ARN, "DestinationArn": QUEUE_ARN})
        yield queue, stub, sleeps
        stub.assert_no_pending_responses()


def task_status(status: str, moved: int, **extra) -> dict:
    return {"Results": [{"Status": status, "SourceArn": DLQ_ARN, "ApproximateNumberOfMessagesMoved": moved, **extra}]}


LIST_PARAMS = {"SourceArn": DLQ_ARN, "MaxResults": 1}


def test_redrive_without_a_filter_waits_for_the_move_task_and_reports_its_count(stubbed):
    queue, stub, sleeps = stubbed
    stub.add_response("list_message_move_tasks", task_status("RUNNING", 3, TaskHandle="task-1"), LIST_PARAMS)
    stub.add_response("list_message_move_tasks", task_status("COMPLETED", 7), LIST_PARAMS)

    assert queue.redrive() == Redriven(moved_by_service=7)
    assert sleeps == [MOVE_TASK_POLL_SECONDS]


def test_a_failed_move_task_is_reported_with_its_reason(stubbed):
    queue, stub, _ = stubbed
    stub.add_response(
        "list_message_move_tasks", task_status("FAILED", 2, FailureReason="AWS.SimpleQueueService.NonExistentQueue"), LIST_PARAMS
    )

    with pytest.raises(QueueUnavailable, match=r"message move task FAILED: AWS\.SimpleQueueService\.NonExistentQueue$"):
        queue.redrive()
