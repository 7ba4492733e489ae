"""The queue port: message references in, batches out, FIFO per route.

Adapters: `shared.queue.sqs.SqsQueue` (SQS FIFO) and `shared.queue.sqlite.SqliteQueue` (a durable
local queue with the same semantics). Both pass `tests/integration/test_queue_contract.py`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.errors import MailSyncerError
from shared.message_ref import MessageRef

# SQS's limits, kept by both adapters so a caller's mistake is a ValueError on either.
MAX_BATCH = 10  # entries per SendMessageBatch / ReceiveMessage
MAX_WAIT_SECONDS = 20  # longest long poll
MAX_VISIBILITY_SECONDS = 43200  # 12 hours
# How many dead letters `dead_letters` looks at unless told otherwise (status reports on them).
DEAD_LETTER_PEEK_LIMIT = 1000


@dataclass(frozen=True)
class ReceivedMessage:
    receipt: str  # handle for delete / extend_visibility; a new one on every receive
    body: str  # raw: the consumer parses it, so a bad body can be quarantined with its reason
    message_id: str
    group_id: str
    receive_count: int  # 1 on first delivery


@dataclass(frozen=True)
class DeadLetter:
    """A message in the dead letters, as `dead_letters` and `redrive` see it."""

    message_id: str
    group_id: str
    body: str  # raw, as it was sent: it may be a body the consumer quarantined as malformed
    reason: str  # why it is there: the quarantine reason, or that its max receive count ran out


@dataclass(frozen=True)
class Redriven:
    """What `redrive` put back on the main queue."""

    moved: tuple[DeadLetter, ...] = ()  # moved one by one, in order
    # Moved by the queue service itself (SQS's message move task), which reports a count only.
    moved_by_service: int = 0

    @property
    def total(self) -> int:
        return len(self.moved) + self.moved_by_service


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

    # The most one receive gives: SQS's 10; the local queue gives more (one process copies them,
    # a batch's FETCH and APPENDs each one round trip however many it holds).
    max_receive: int = MAX_BATCH

    @abc.abstractmethod
    def receive(
        self, max_messages: int = MAX_BATCH, visibility_timeout: int = 60, wait_seconds: int = 0
    ) -> list[ReceivedMessage]:
        """Up to `max_messages` (<= max_receive), invisible for `visibility_timeout` seconds."""

    @abc.abstractmethod
    def delete(self, message: ReceivedMessage) -> None:
        """Acknowledge. A stale receipt (the message was received again since) deletes nothing."""

    def delete_many(self, messages: Sequence[ReceivedMessage]) -> None:
        """`delete` each; an adapter that can does it in one request or transaction."""
        for message in messages:
            self.delete(message)

    @abc.abstractmethod
    def extend_visibility(self, message: ReceivedMessage, seconds: int) -> None:
        """Keep the message invisible for `seconds` from now (0: visible again at once). A stale
        receipt changes nothing and raises nothing, as in `delete`. A message handed back after
        its last allowed receive may go to the dead letters at once: it cannot be delivered again."""

    @abc.abstractmethod
    def quarantine(self, message: ReceivedMessage, reason: str) -> None:
        """Move to the dead letters now, with `reason`, without further retries."""

    @abc.abstractmethod
    def depths(self) -> QueueDepths: ...

    def in_flight_past(self, seconds: float) -> int | None:
        """In-flight messages due again only more than `seconds` from now (left to wait out a
        long pause), when the backend can tell; None when it cannot (SQS does not say)."""
        return None

    @abc.abstractmethod
    def dead_letters(self, limit: int = DEAD_LETTER_PEEK_LIMIT) -> list[DeadLetter]:
        """Up to `limit` dead letters, oldest first, left where they are. SQS FIFO shows no
        message of a group behind one in flight, so there this can be the first few of each
        group only (compare the count with `depths().dead`)."""

    @abc.abstractmethod
    def redrive(self, select: Callable[[DeadLetter], bool] | None = None, *, limit: int | None = None) -> Redriven:
        """Put dead letters back on the main queue, oldest first: those `select` accepts (None:
        all), at most `limit` (None: no limit). Each comes back as a new message (receive count
        0, group kept, a fresh deduplication id so a recent send of the same reference cannot
        drop it). Each is sent before it is removed from the dead letters, so an interruption
        leaves a copy in both, never in neither (the UID claim makes the copy harmless). Those
        not accepted stay in the dead letters and are visible there again when this returns.
        With `select` and `limit` both None an adapter may let the queue service move them."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the queue lives, for messages: `SQS queue URL`, `SQLite /path`."""

    def of_groups(self, groups: Sequence[str]) -> MessageQueue:
        """This queue as one that receives, and counts in `depths` and `in_flight_past`, only the
        messages of `groups` (a CLI's `--route`); sending and the dead letters are unchanged.
        An adapter that cannot receive by group (SQS) raises GroupsNotSelectable."""
        raise GroupsNotSelectable(f"{self.describe()} cannot hand out one route's messages alone")

    def close(self) -> None:  # noqa: B027 - optional for adapters
        """Release connections."""


def check_receive_arguments(max_messages: int, visibility_timeout: int, wait_seconds: int, most: int = MAX_BATCH) -> None:
    if not 1 <= max_messages <= most:
        raise ValueError(f"max_messages: {max_messages}, expected 1 to {most}")
    if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
        raise ValueError(f"wait_seconds: {wait_seconds}, expected 0 to {MAX_WAIT_SECONDS}")
    check_visibility(visibility_timeout)


def check_visibility(seconds: int) -> None:
    if not 0 <= seconds <= MAX_VISIBILITY_SECONDS:
        raise ValueError(f"visibility timeout: {seconds}, expected 0 to {MAX_VISIBILITY_SECONDS}")


class GroupsNotSelectable(MailSyncerError):
    """The queue hands out every group's messages: a run cannot copy one route's alone."""

