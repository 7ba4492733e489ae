"""The queue on SQS FIFO, with its dead-letter queue found from the RedrivePolicy.

Stale receipts: SQS FIFO answers a delete or a visibility change with a receipt handle that is no
longer current (the visibility timeout ran out, or the message was received again) with an error
and changes nothing. The caller cannot do anything about it that the redelivery will not do, so
this adapter keeps "changes nothing" and drops the error, as `SqliteQueue` does.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator, Sequence

from botocore.exceptions import BotoCoreError, ClientError

from shared.errors import QueueUnavailable
from shared.message_ref import MessageRef
from shared.queue.port import (
    MAX_BATCH,
    MessageQueue,
    QueueDepths,
    ReceivedMessage,
    check_receive_arguments,
    check_visibility,
)

# SQS caps a long poll at 20 s; the read timeout must outlast it or every idle poll fails.
# Enough to act on in the DLQ, far below the 256 KiB message limit.
MAX_REASON_CHARS = 1000
REASON_ATTRIBUTE = "quarantine_reason"
# Error codes SQS uses for a receipt handle that is not (or no longer) the current one.
STALE_RECEIPT_CODES = {"ReceiptHandleIsInvalid", "MessageNotInflight"}


def create_fifo_queue_pair(
    client, name: str, *, max_receive_count: int, visibility_timeout: int = 60
) -> tuple[str, str]:
    """Create `<name>-dlq.fifo` and `<name>.fifo` redriving to it; returns (queue_url, dlq_url).

    For tests and local development; production queues come from serverless.yml."""
    fifo = {"FifoQueue": "true", "ContentBasedDeduplication": "false"}
    dlq_url = client.create_queue(QueueName=f"{name}-dlq.fifo", Attributes=fifo)["QueueUrl"]
    dlq_arn = client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive_policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)})
    attributes = {**fifo, "VisibilityTimeout": str(visibility_timeout), "RedrivePolicy": redrive_policy}
    queue_url = client.create_queue(QueueName=f"{name}.fifo", Attributes=attributes)["QueueUrl"]
    return queue_url, dlq_url


class SqsQueue(MessageQueue):
    def __init__(self, queue_url: str, *, client, dlq_url: str | None = None):
        self._url = queue_url
        self._client = client
        self._dlq_url = dlq_url  # found from the RedrivePolicy on first need when None

    def describe(self) -> str:
        return f"SQS {self._url}"

    def send_refs(self, refs: Sequence[MessageRef]) -> None:
        for start in range(0, len(refs), MAX_BATCH):
            self._send_batch(refs[start : start + MAX_BATCH])

    def _send_batch(self, refs: Sequence[MessageRef]) -> None:
        entries = [
            {
                "Id": str(index),
                "MessageBody": ref.to_body(),
                "MessageGroupId": ref.group_id,
                "MessageDeduplicationId": ref.dedup_id,
            }
            for index, ref in enumerate(refs)
        ]
        with self._errors_as_unavailable(self._url):
            response = self._client.send_message_batch(QueueUrl=self._url, Entries=entries)
        failed = response.get("Failed", [])
        if failed:
            first = failed[0]
            raise QueueUnavailable(
                f"SQS {self._url}: {len(failed)} of {len(entries)} messages in a batch were not accepted "
                f"(first: {first.get('Code')}: {first.get('Message', '')})"
            )

    def receive(
        self, max_messages: int = MAX_BATCH, visibility_timeout: int = 60, wait_seconds: int = 0
    ) -> list[ReceivedMessage]:
        check_receive_arguments(max_messages, visibility_timeout, wait_seconds)
        with self._errors_as_unavailable(self._url):
            response = self._client.receive_message(
                QueueUrl=self._url,
                MaxNumberOfMessages=max_messages,
                VisibilityTimeout=visibility_timeout,
                WaitTimeSeconds=wait_seconds,
                MessageSystemAttributeNames=["ApproximateReceiveCount", "MessageGroupId"],
                # botocore's retries resend the same id, so a retry after a lost response gets the
                # same messages back instead of leaving their groups locked for a visibility timeout.
                ReceiveRequestAttemptId=uuid.uuid4().hex,
            )
        return [_received_message(raw) for raw in response.get("Messages", [])]

    def delete(self, message: ReceivedMessage) -> None:
        with self._errors_as_unavailable(self._url), _ignoring_stale_receipt():
            self._client.delete_message(QueueUrl=self._url, ReceiptHandle=message.receipt)

    def extend_visibility(self, message: ReceivedMessage, seconds: int) -> None:
        check_visibility(seconds)
        with self._errors_as_unavailable(self._url), _ignoring_stale_receipt():
            self._client.change_message_visibility(
                QueueUrl=self._url, ReceiptHandle=message.receipt, VisibilityTimeout=seconds
            )

    def quarantine(self, message: ReceivedMessage, reason: str) -> None:
        dlq_url = self._dead_letter_queue_url()
        if dlq_url is None:
            raise QueueUnavailable(f"SQS {self._url}: no dead-letter queue (no DLQ url given, no RedrivePolicy)")
        # Sent before the delete: a crash in between leaves a copy in both queues (the UID claim
        # makes that harmless), never the message in neither.
        with self._errors_as_unavailable(dlq_url):
            self._client.send_message(
                QueueUrl=dlq_url,
                MessageBody=message.body,
                MessageGroupId=message.group_id,
                # Quarantining the same message twice (a retry) leaves one copy.
                MessageDeduplicationId=message.message_id,
                MessageAttributes={
                    REASON_ATTRIBUTE: {"DataType": "String", "StringValue": _cut_reason(reason)},
                },
            )
        self.delete(message)

    def depths(self) -> QueueDepths:
        attributes = self._attributes(
            self._url, ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )
        dead = 0
        dlq_url = self._dead_letter_queue_url()
        if dlq_url is not None:
            dlq_attributes = self._attributes(
                dlq_url, ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
            )
            dead = sum(int(value) for value in dlq_attributes.values())
        return QueueDepths(
            visible=int(attributes["ApproximateNumberOfMessages"]),
            in_flight=int(attributes["ApproximateNumberOfMessagesNotVisible"]),
            dead=dead,
        )

    def _dead_letter_queue_url(self) -> str | None:
        """The DLQ given, else the RedrivePolicy's target; None when the queue has neither."""
        if self._dlq_url is None:
            policy = self._attributes(self._url, ["RedrivePolicy"]).get("RedrivePolicy")
            if policy:
                self._dlq_url = self._queue_url_of_arn(json.loads(policy)["deadLetterTargetArn"])
        return self._dlq_url

    def _queue_url_of_arn(self, arn: str) -> str:
        # arn:aws:sqs:<region>:<account>:<name>
        *_, account, name = arn.split(":")
        with self._errors_as_unavailable(self._url):
            return self._client.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]

    def _attributes(self, url: str, names: list[str]) -> dict[str, str]:
        with self._errors_as_unavailable(url):
            return self._client.get_queue_attributes(QueueUrl=url, AttributeNames=names).get("Attributes", {})

    @staticmethod
    @contextlib.contextmanager
    def _errors_as_unavailable(url: str) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise QueueUnavailable(f"SQS {url}: {error.get('Code')}: {error.get('Message', '')}") from exc
        except BotoCoreError as exc:
            raise QueueUnavailable(f"SQS {url}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _ignoring_stale_receipt() -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        if not _is_stale_receipt(exc):
            raise


def _is_stale_receipt(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    code = error.get("Code", "")
    # A FIFO queue says "Value ... for parameter ReceiptHandle is invalid. Reason: The receipt
    # handle has expired."; InvalidParameterValue about anything else (a visibility beyond the
    # 12 h limit) is a real refusal.
    return code in STALE_RECEIPT_CODES or (
        code == "InvalidParameterValue" and "ReceiptHandle" in error.get("Message", "")
    )


def _received_message(raw: dict) -> ReceivedMessage:
    attributes = raw.get("Attributes", {})
    return ReceivedMessage(
        receipt=raw["ReceiptHandle"],
        body=raw["Body"],
        message_id=raw["MessageId"],
        group_id=attributes.get("MessageGroupId", ""),
        receive_count=int(attributes.get("ApproximateReceiveCount", "1")),
    )


def _cut_reason(reason: str) -> str:
    # An empty String attribute is refused by SQS.
    return reason[:MAX_REASON_CHARS] or "(no reason given)"


