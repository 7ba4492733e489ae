"""Run the real `drain` (shared.cli.main) or the real Lambda handlers in this process, and kill it
with SIGKILL at one named point of the pipeline, as `kill -9` would; or stop it there with
SIGSTOP, so that a test can break a server under it and then let it go on (SIGCONT).

    python -m tests.e2e.crash_driver drain  [--kill-at POINT | --stop-at POINT] [--uid N] [--chunk N]
    python -m tests.e2e.crash_driver lambda [--kill-at POINT | --stop-at POINT] [--uid N] [--chunk N]

Without a point it is a plain run: `drain`, or the Lambda runtime's part played here (the
producer handler once, then real SQS receive batches handed to the consumer handler, deleting
what it acknowledged, until the queue is empty). Settings come from the environment.

Production code has no test hooks: a point patches the one function at which it fires. Points
about one message fire for source UID `--uid`; the producer's fire at their first chance.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable

from shared.mailbox.imap import ImapDestination, ImapSource
from shared.queue import sqlite as sqlite_queue
from shared.queue.sqs import SqsQueue
from shared.state import ClaimOutcome
from shared.state.dynamodb import DynamoStateStore
from shared.state.sqlite import SqliteStateStore

STATE_STORES = (SqliteStateStore, DynamoStateStore)

# The Lambda runtime played here, scaled down from AWS's numbers so a killed invocation's message
# comes back in seconds: the queue's visibility timeout stays above the claim's lease (remaining
# time plus margin), as in the deployment (visibility at least 6x the function's timeout).
LAMBDA_VISIBILITY_SECONDS = 3
LAMBDA_REMAINING_MILLIS = 1000
LAMBDA_LEASE_MARGIN_SECONDS = 1
LAMBDA_DEADLINE_SECONDS = 120


class Signal:
    """Sends this process `number` the first time it is called; a stopped process that goes on
    must not stop again when it meets the point a second time (a retry)."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.sent = False

    def __call__(self) -> None:
        if self.sent:
            return
        self.sent = True
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), self.number)


def _after(cls: type, name: str, should_fire: Callable[..., bool], action: Signal) -> None:
    """Patch cls.name to call the original, then `action` when should_fire(result, *args)."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if should_fire(result, *args):
            action()
        return result

    setattr(cls, name, patched)


def _nth_call(n: int) -> Callable[..., bool]:
    calls = 0

    def should_fire(*_) -> bool:
        nonlocal calls
        calls += 1
        return calls == n

    return should_fire


def install(point: str, uid: int, action: Signal) -> None:
    if point == "after-claim":

        def claimed_it(claimed, key, *_) -> bool:
            return key.uid == uid and claimed.outcome is ClaimOutcome.CLAIMED

        def claimed_it_in_batch(results, keys, *_) -> bool:
            return any(k.uid == uid and r.outcome is ClaimOutcome.CLAIMED for k, r in zip(keys, results, strict=False))

        for store in STATE_STORES:
            _after(store, "claim_uid", claimed_it, action)
            _after(store, "claim_many", claimed_it_in_batch, action)
    elif point == "after-fetch":
        _after(ImapSource, "fetch", lambda fetched, asked: asked == uid and fetched is not None, action)
        _after(ImapSource, "fetch_many", lambda fetched, asked: uid in asked and uid in fetched, action)
    elif point in ("during-append", "after-append", "appends-sent"):
        _watch_appends(point, uid, action)
    elif point == "after-finalize":
        def finalized_it_in_batch(lost, copies, *_) -> bool:
            return any(c.key.uid == uid and failed is None for c, failed in zip(copies, lost, strict=True))

        for store in STATE_STORES:
            _after(store, "finalize", lambda _, key, *__: key.uid == uid, action)
            _after(store, "finalize_many", finalized_it_in_batch, action)
    elif point == "during-send":
        # Local: inside the queue's send transaction, its first row inserted, not committed.
        # SQS: after the first SendMessageBatch of several was accepted.
        should_fire = _nth_call(2)
        original_dedup = sqlite_queue._is_new_dedup_id

        def is_new_dedup_id(*args):
            if should_fire():
                action()
            return original_dedup(*args)

        sqlite_queue._is_new_dedup_id = is_new_dedup_id
        _before(SqsQueue, "_send_batch", _nth_call(2), action)
    elif point == "after-send":
        # The references are in the queue; the watermark has not moved yet.
        for store in STATE_STORES:
            _before(store, "advance_watermark", _nth_call(1), action)
    else:
        raise SystemExit(f"unknown point {point!r}")


def _before(cls: type, name: str, should_fire: Callable[..., bool], action: Signal) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        if should_fire():
            action()
        return original(self, *args, **kwargs)

    setattr(cls, name, patched)


def _watch_appends(point: str, uid: int, action: Signal) -> None:
    """Points in the APPENDs of the batch holding `uid` (ImapDestination.append_many; `append`
    is one of those), seen on its session's socket:

    - during-append: `uid`'s APPEND has its command and half its literal written, then `action`;
      if the process goes on (SIGCONT after SIGSTOP), the rest follows on the same socket;
    - after-append: `uid`'s tagged answer has been read (and those before it), not the later
      ones of its batch: a kill then leaves k of B APPENDs answered and not finalized;
    - appends-sent: the batch's last APPEND has been written, no answer read yet."""
    original = ImapDestination.append_many

    @functools.wraps(original)
    def append_many(self, folder, messages):
        body = next((message.body for message in messages if message.uid == uid), None)
        if body is None or action.sent:
            return original(self, folder, messages)
        imap = self._client._imap
        real_send, real_new_tag, real_get_response = imap.send, imap._new_tag, imap._get_response
        tags = {"last": None, "watched": None}

        def new_tag():
            tags["last"] = real_new_tag()
            return tags["last"]

        def send(data: bytes) -> None:
            if point == "during-append" and body in data and not action.sent:
                half = data.index(body) + len(body) // 2
                real_send(data[:half])
                action()
                real_send(data[half:])
                return
            real_send(data)
            if body in data:
                tags["watched"] = tags["last"]  # the literal's command took the newest tag
            if point == "appends-sent" and messages[-1].body in data:
                action()

        def get_response():
            answer = real_get_response()
            watched = tags["watched"]
            if point == "after-append" and watched is not None and imap.tagged_commands.get(watched) is not None:
                action()
            return answer

        imap.send, imap._new_tag, imap._get_response = send, new_tag, get_response
        try:
            return original(self, folder, messages)
        finally:
            del imap.send, imap._new_tag, imap._get_response

    ImapDestination.append_many = append_many


# ---- the runs --------------------------------------------------------------------------------
def run_drain() -> int:
    from shared.cli.main import main

    return main(["drain"])


class LambdaContext:
    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return LAMBDA_REMAINING_MILLIS


def run_lambda() -> int:
    import boto3

    from consumer import handler as consumer
    from producer import handler as producer

    consumer.LEASE_MARGIN_SECONDS = LAMBDA_LEASE_MARGIN_SECONDS
    producer.handler({"source": "aws.events"}, LambdaContext())
    sqs = boto3.client("sqs", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ["AWS_REGION"])
    url = os.environ["QUEUE_URL"]
    deadline = time.monotonic() + LAMBDA_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        received = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=LAMBDA_VISIBILITY_SECONDS,
            WaitTimeSeconds=1,
            MessageSystemAttributeNames=["All"],
        ).get("Messages", [])
        if not received:
            depth = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
            if depth["ApproximateNumberOfMessages"] == depth["ApproximateNumberOfMessagesNotVisible"] == "0":
                return 0
            continue
        records = [
            {"messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
             "attributes": m["Attributes"]}
            for m in received
        ]
        answer = consumer.handler({"Records": records}, LambdaContext())
        print(f"consumed a batch of {len(records)}", flush=True)
        retry = {failure["itemIdentifier"] for failure in answer["batchItemFailures"]}
        for message in received:
            # As Lambda does: acknowledged ones deleted, the others back after their visibility timeout.
            if message["MessageId"] not in retry:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    print(f"the queue did not empty in {LAMBDA_DEADLINE_SECONDS}s", file=sys.stderr)
    return 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.crash_driver")
    parser.add_argument("path", choices=["drain", "lambda"])
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--kill-at", metavar="POINT", help="SIGKILL this process at POINT")
    when.add_argument("--stop-at", metavar="POINT", help="SIGSTOP this process at POINT (the test sends SIGCONT)")
    parser.add_argument("--uid", type=int, default=0, help="the source UID a message's point fires for")
    parser.add_argument(
        "--chunk", type=int, metavar="N", help="fetch and append in chunks of N (so that a small batch has several)"
    )
    args = parser.parse_args(argv)
    if args.chunk:
        from shared.pipeline import copier

        copier.CHUNK_MESSAGES = args.chunk
    if args.kill_at:
        install(args.kill_at, args.uid, Signal(signal.SIGKILL))
    elif args.stop_at:
        install(args.stop_at, args.uid, Signal(signal.SIGSTOP))
    return run_drain() if args.path == "drain" else run_lambda()


if __name__ == "__main__":
    sys.exit(main())
