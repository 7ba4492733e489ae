"""The queue port: message references in, batches out, FIFO per route.

Adapters: `shared.queue.sqs.SqsQueue` (SQS FIFO) and `shared.queue.sqlite.SqliteQueue` (a durable
local queue with the same semantics). Both pass `tests/integration/test_queue_contract.py`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from shared.message_ref import MessageRef

# SQS's limits, kept by both adapters so a caller's mistake is a ValueError on either.
MAX_BATCH = 10  # entries per SendMessageBatch / ReceiveMessage
MAX_WAIT_SECONDS = 20  # longest long poll
MAX_VISIBILITY_SECONDS = 43200  # 12 hours


@dataclass(frozen=True)
class ReceivedMessage:
    receipt: str  # handle for delete / extend_visibility; a new one on every receive
    body: str  # raw: the consumer parses it, so a bad body can be quarantined with its reason
    message_id: str
    group_id: str
    receive_count: int  # 1 on first delivery


@dataclass(frozen=True)
class QueueDepths:
    visible: int  # waiting to be received
    in_flight: int  # received, not yet deleted or visible again
    dead: int  # in the dead-letter queue / table


class MessageQueue(abc.ABC):
    """FIFO per group (= route): while a message of a group is in flight, no later message of
    that group is delivered. A message received more than `max_receive_count` times goes to the
    dead letters instead of being delivered again. Sends with a deduplication id already seen
    recently are accepted and dropped. Adapters raise `shared.errors.QueueUnavailable` when
    the backend cannot be reached."""

    @abc.abstractmethod
    def send_refs(self, refs: Sequence[MessageRef]) -> None:
        """Send in batches of MAX_BATCH (group = ref.group_id, dedup = ref.dedup_id). Returns
        only when every ref was accepted; otherwise raises QueueUnavailable naming how many
        failed (some may have been sent: dedup and the UID claim make a resend harmless)."""

    @abc.abstractmethod
    def receive(
        self, max_messages: int = MAX_BATCH, visibility_timeout: int = 60, wait_seconds: int = 0
    ) -> list[ReceivedMessage]:
        """Up to `max_messages` (<= MAX_BATCH), invisible for `visibility_timeout` seconds."""

    @abc.abstractmethod
    def delete(self, message: ReceivedMessage) -> None:
        """Acknowledge. A stale receipt (the message was received again since) deletes nothing."""

    @abc.abstractmethod
    def extend_visibility(self, message: ReceivedMessage, seconds: int) -> None:
        """Keep the message invisible for `seconds` from now (0: visible again at once). A stale
        receipt changes nothing and raises nothing, as in `delete`."""

    @abc.abstractmethod
    def quarantine(self, message: ReceivedMessage, reason: str) -> None:
        """Move to the dead letters now, with `reason`, without further retries."""

    @abc.abstractmethod
    def depths(self) -> QueueDepths: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the queue lives, for messages: `SQS queue URL`, `SQLite /path`."""

    def close(self) -> None:  # noqa: B027 - optional for adapters
        """Release connections."""


def check_receive_arguments(max_messages: int, visibility_timeout: int, wait_seconds: int) -> None:
    if not 1 <= max_messages <= MAX_BATCH:
        raise ValueError(f"max_messages: {max_messages}, expected 1 to {MAX_BATCH}")
    if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
        raise ValueError(f"wait_seconds: {wait_seconds}, expected 0 to {MAX_WAIT_SECONDS}")
    check_visibility(visibility_timeout)


def check_visibility(seconds: int) -> None:
    if not 0 <= seconds <= MAX_VISIBILITY_SECONDS:
        raise ValueError(f"visibility timeout: {seconds}, expected 0 to {MAX_VISIBILITY_SECONDS}")
