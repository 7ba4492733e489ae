"""The queue on SQS FIFO, with its dead-letter queue found from the RedrivePolicy.

Redrive: without a filter, SQS's own message move task (StartMessageMoveTask) moves the dead
letters back where the endpoint has it; else (a filter, or an endpoint without it, such as
moto) this adapter receives from the DLQ, sends to the main queue, then deletes from the DLQ.
A FIFO queue hands out nothing of a group behind a message in flight, so a dead letter the
filter leaves must not stay in flight while the rest of its group waits behind it: it is sent
to the back of the DLQ (again send, then delete) and the walk goes on.

Stale receipts: SQS FIFO answers a delete or a visibility change with a receipt handle that is no
longer current (the visibility timeout ran out, or the message was received again) with an error
and changes nothing. The caller cannot do anything about it that the redelivery will not do, so
this adapter keeps "changes nothing" and drops the error, as `SqliteQueue` does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from shared.errors import QueueUnavailable
from shared.message_ref import MessageRef
from shared.queue.port import (
    DEAD_LETTER_PEEK_LIMIT,
    MAX_BATCH,
    DeadLetter,
    MessageQueue,
    QueueDepths,
    ReceivedMessage,
    Redriven,
    check_receive_arguments,
    check_visibility,
)

log = logging.getLogger("mail_syncer.queue")

# SQS caps a long poll at 20 s; the read timeout must outlast it or every idle poll fails.
# Enough to act on in the DLQ, far below the 256 KiB message limit.
MAX_REASON_CHARS = 1000
REASON_ATTRIBUTE = "quarantine_reason"
# Error codes SQS uses for a receipt handle that is not (or no longer) the current one.
STALE_RECEIPT_CODES = {"ReceiptHandleIsInvalid", "MessageNotInflight"}
# What a dead letter without a quarantine reason is there for: SQS moved it (RedrivePolicy).
MAX_RECEIVE_COUNT_REASON = "max receive count exceeded"
# Dead letters received to be looked at, or to be moved, stay hidden this long at most: they are
# made visible again as soon as the look or the redrive is over.
DEAD_LETTER_HOLD_SECONDS = 60
# SQS's message move task runs on its own; redrive waits for it, polling, this long at most.
MOVE_TASK_POLL_SECONDS = 2
MOVE_TASK_WAIT_SECONDS = 900
# A receive that finds nothing while the DLQ counts visible messages is asked again with this
# long poll before the DLQ counts as empty.
EMPTY_CHECK_WAIT_SECONDS = 1


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
    def __init__(
        self, queue_url: str, *, client, dlq_url: str | None = None, sleep: Callable[[float], None] = time.sleep
    ):
        self._url = queue_url
        self._client = client
        self._dlq_url = dlq_url  # found from the RedrivePolicy on first need when None
        self._sleep = sleep  # between polls of a message move task

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
        dlq_url = self._required_dead_letter_queue_url()
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

    def dead_letters(self, limit: int = DEAD_LETTER_PEEK_LIMIT) -> list[DeadLetter]:
        dlq_url = self._dead_letter_queue_url()
        if dlq_url is None:
            return []
        seen: dict[str, _Received] = {}
        try:
            while len(seen) < limit:
                batch = self._receive_dead_letters(dlq_url, min(MAX_BATCH, limit - len(seen)))
                fresh = [received for received in batch if received.dead.message_id not in seen]
                seen.update((received.dead.message_id, received) for received in batch)
                if not fresh:
                    break  # nothing left, or only what was seen (its hold ran out)
        finally:
            self._make_visible(dlq_url, [received.receipt for received in seen.values()])
        return [received.dead for received in seen.values()]

    def redrive(self, select: Callable[[DeadLetter], bool] | None = None, *, limit: int | None = None) -> Redriven:
        if limit is not None and limit < 0:
            raise ValueError(f"limit: {limit}, expected 0 or more")
        dlq_url = self._required_dead_letter_queue_url()
        if select is None and limit is None:
            moved_by_service = self._move_by_service(dlq_url)
            if moved_by_service is not None:
                return Redriven(moved_by_service=moved_by_service)
        moved: list[DeadLetter] = []
        sent_to_back: set[str] = set()  # message ids of the copies this walk put at the back
        held: dict[str, str] = {}  # message id -> receipt: hidden until the walk is over
        try:
            while limit is None or len(moved) < limit:
                batch = self._receive_dead_letters(dlq_url, MAX_BATCH)
                if not batch:
                    break
                chosen: list[_Received] = []
                skipped: list[_Received] = []
                for received in batch:
                    message_id = received.dead.message_id
                    full = limit is not None and len(moved) + len(chosen) >= limit
                    if full or message_id in sent_to_back or message_id in held:
                        held[message_id] = received.receipt  # hidden, so the next receive gives others
                    elif select is None or select(received.dead):
                        chosen.append(received)
                    else:
                        skipped.append(received)
                moved.extend(self._move(chosen, dlq_url, to_url=self._url))
                # To the back of the DLQ: the rest of its group can come out now.
                sent_to_back.update(self._move(skipped, dlq_url, to_url=dlq_url).values())
        finally:
            self._make_visible(dlq_url, list(held.values()))
        return Redriven(moved=tuple(moved))

    def _receive_dead_letters(self, dlq_url: str, max_messages: int) -> list[_Received]:
        """Up to `max_messages` dead letters, hidden for DEAD_LETTER_HOLD_SECONDS."""
        received = self._poll_dead_letters(dlq_url, max_messages, wait_seconds=0)
        if received:
            return received
        visible = self._attributes(dlq_url, ["ApproximateNumberOfMessages"])["ApproximateNumberOfMessages"]
        if not int(visible):
            return []
        # A short poll may miss messages that are there; a long poll asks every server. (Visible
        # messages of a group held in flight are not handed out either: then this waits for nothing.)
        return self._poll_dead_letters(dlq_url, max_messages, wait_seconds=EMPTY_CHECK_WAIT_SECONDS)

    def _poll_dead_letters(self, dlq_url: str, max_messages: int, *, wait_seconds: int) -> list[_Received]:
        with self._errors_as_unavailable(dlq_url):
            response = self._client.receive_message(
                QueueUrl=dlq_url,
                MaxNumberOfMessages=max_messages,
                VisibilityTimeout=DEAD_LETTER_HOLD_SECONDS,
                WaitTimeSeconds=wait_seconds,
                MessageSystemAttributeNames=["MessageGroupId"],
                MessageAttributeNames=["All"],
                ReceiveRequestAttemptId=uuid.uuid4().hex,
            )
        return [_received_dead_letter(raw) for raw in response.get("Messages", [])]

    def _move(self, messages: Sequence[_Received], dlq_url: str, *, to_url: str) -> dict[DeadLetter, str]:
        """Send each to `to_url` (its group kept, a fresh deduplication id), then delete it from
        the DLQ; those moved, in order, with their new message ids. A send that fails is raised
        after the rest of its batch was moved; what was not sent stays in the DLQ."""
        back_to_dlq = to_url == dlq_url
        done: dict[DeadLetter, str] = {}
        for start in range(0, len(messages), MAX_BATCH):
            batch = messages[start : start + MAX_BATCH]
            entries = []
            for index, received in enumerate(batch):
                entry = {
                    "Id": str(index),
                    "MessageBody": received.dead.body,
                    "MessageGroupId": received.dead.group_id,
                    # Fresh: SQS drops a FIFO send whose id it saw in the last 5 minutes.
                    "MessageDeduplicationId": f"redrive-{uuid.uuid4().hex}",
                }
                if back_to_dlq and received.attributes:
                    entry["MessageAttributes"] = received.attributes  # the quarantine reason stays
                entries.append(entry)
            with self._errors_as_unavailable(to_url):
                response = self._client.send_message_batch(QueueUrl=to_url, Entries=entries)
            sent = {int(entry["Id"]): entry["MessageId"] for entry in response.get("Successful", [])}
            if sent:
                with self._errors_as_unavailable(dlq_url):
                    self._client.delete_message_batch(
                        QueueUrl=dlq_url,
                        Entries=[{"Id": str(index), "ReceiptHandle": batch[index].receipt} for index in sorted(sent)],
                    )
                done.update((batch[index].dead, sent[index]) for index in sorted(sent))
            failed = response.get("Failed", [])
            if failed:
                self._make_visible(dlq_url, [batch[int(entry["Id"])].receipt for entry in failed])
                raise QueueUnavailable(
                    f"SQS {to_url}: {len(failed)} of {len(entries)} dead letters were not accepted "
                    f"(first: {failed[0].get('Code')}: {failed[0].get('Message', '')}); they stay in the DLQ"
                )
        return done

    def _move_by_service(self, dlq_url: str) -> int | None:
        """Let SQS move every dead letter back (StartMessageMoveTask) and wait for it; how many it
        moved, or None where the endpoint refuses the task (then the caller moves them itself)."""
        dlq_arn = self._attributes(dlq_url, ["QueueArn"])["QueueArn"]
        queue_arn = self._attributes(self._url, ["QueueArn"])["QueueArn"]
        try:
            self._client.start_message_move_task(SourceArn=dlq_arn, DestinationArn=queue_arn)
        except ClientError as exc:
            # Not offered (moto answers HTTP 500), not allowed, or a task already running: the
            # one-by-one move needs only receive, send and delete.
            error = exc.response.get("Error", {})
            log.info("SQS %s: no message move task (%s); moving dead letters one by one", dlq_url, error.get("Code"))
            return None
        except BotoCoreError as exc:
            raise QueueUnavailable(f"SQS {dlq_url}: {type(exc).__name__}: {exc}") from exc
        waited = 0.0
        while True:
            with self._errors_as_unavailable(dlq_url):
                # The newest task first; a queue runs one at a time, so it is the one just started.
                tasks = self._client.list_message_move_tasks(SourceArn=dlq_arn, MaxResults=1).get("Results", [])
            task = tasks[0] if tasks else {"Status": "RUNNING"}
            status = task.get("Status")
            if status == "COMPLETED":
                return int(task.get("ApproximateNumberOfMessagesMoved", 0))
            if status != "RUNNING":
                raise QueueUnavailable(
                    f"SQS {dlq_url}: message move task {status}: {task.get('FailureReason') or 'no reason given'}"
                )
            if waited >= MOVE_TASK_WAIT_SECONDS:
                raise QueueUnavailable(
                    f"SQS {dlq_url}: message move task still running after {MOVE_TASK_WAIT_SECONDS} s "
                    f"({task.get('ApproximateNumberOfMessagesMoved', 0)} moved so far); it goes on by itself"
                )
            self._sleep(MOVE_TASK_POLL_SECONDS)
            waited += MOVE_TASK_POLL_SECONDS

    def _make_visible(self, url: str, receipts: Sequence[str]) -> None:
        for start in range(0, len(receipts), MAX_BATCH):
            entries = [
                {"Id": str(index), "ReceiptHandle": receipt, "VisibilityTimeout": 0}
                for index, receipt in enumerate(receipts[start : start + MAX_BATCH])
            ]
            # A stale receipt (the hold ran out) fails its entry only: that message is visible already.
            with self._errors_as_unavailable(url):
                self._client.change_message_visibility_batch(QueueUrl=url, Entries=entries)

    def _required_dead_letter_queue_url(self) -> str:
        dlq_url = self._dead_letter_queue_url()
        if dlq_url is None:
            raise QueueUnavailable(f"SQS {self._url}: no dead-letter queue (no DLQ url given, no RedrivePolicy)")
        return dlq_url

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


@dataclass(frozen=True)
class _Received:
    """A dead letter as received from the DLQ: what the port shows, and what moving it needs."""

    dead: DeadLetter
    receipt: str
    attributes: dict  # its message attributes (the quarantine reason), kept when it is moved


def _received_dead_letter(raw: dict) -> _Received:
    # As SendMessage takes them back: the list fields a receive may add are refused there.
    attributes = {
        name: {key: value[key] for key in ("DataType", "StringValue", "BinaryValue") if key in value}
        for name, value in raw.get("MessageAttributes", {}).items()
    }
    reason = attributes.get(REASON_ATTRIBUTE, {}).get("StringValue") or MAX_RECEIVE_COUNT_REASON
    dead = DeadLetter(
        message_id=raw["MessageId"],
        group_id=raw.get("Attributes", {}).get("MessageGroupId", ""),
        body=raw["Body"],
        reason=reason,
    )
    return _Received(dead, raw["ReceiptHandle"], attributes)


def _cut_reason(reason: str) -> str:
    # An empty String attribute is refused by SQS.
    return reason[:MAX_REASON_CHARS] or "(no reason given)"


