"""The consumer Lambda: copy each message of an SQS FIFO batch; report the ones to retry.

Returns `batchItemFailures` (the function uses ReportBatchItemFailures): messages not
acknowledged, and after one of those the rest of its route's messages, unprocessed, so SQS
redelivers them in order. A message failed by a throttle is made visible again after the
server's suggested wait (at least), instead of the queue's visibility timeout.

Each message gets a log line with its route, UID, outcome and SQS message id (shared.outcome_lines);
the batch's counts go to CloudWatch as embedded metrics on stdout (shared.metrics).
"""

from __future__ import annotations

import time
from typing import Any

from shared import bootstrap, metrics
from shared.claim_owners import lambda_invocation
from shared.outcome_lines import log_outcomes
from shared.pipeline.copier import copy_batch, throttled_visibility
from shared.queue import ReceivedMessage
from shared.redaction import scrubbed_exceptions

# A claim outlives the invocation by this much, so a function killed at its timeout leaves a
# claim that expires shortly after, and the redelivery can take it.
LEASE_MARGIN_SECONDS = 30


# The runtime reports an uncaught exception itself, past the log filter.
@scrubbed_exceptions()
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    app = bootstrap.lambda_app()
    messages = [_received(record) for record in event.get("Records", [])]
    copier = app.copier(lambda: _invocation_end(context) + LEASE_MARGIN_SECONDS, owner=lambda_invocation(context.aws_request_id))
    results = copy_batch(messages, copier=copier, queue=app.queue)
    for message, result in results:
        wait = throttled_visibility(result)
        if wait is not None:
            # Back as the throttling server asked, not after the queue's (long) visibility timeout.
            app.queue.extend_visibility(message, wait)
    log_outcomes(results)
    namespace = metrics.namespace_for(getattr(context, "function_name", None))
    metrics.write(metrics.batch_documents([result for _, result in results], namespace=namespace, now=time.time()))
    retry = [message.message_id for message, result in results if not result.outcome.acknowledged]
    return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in retry]}


def _invocation_end(context: Any) -> float:
    """When this invocation will be stopped: the same instant for every claim of the batch."""
    return time.time() + context.get_remaining_time_in_millis() / 1000


def _received(record: dict[str, Any]) -> ReceivedMessage:
    attributes = record.get("attributes", {})
    return ReceivedMessage(
        receipt=record["receiptHandle"],
        body=record["body"],
        message_id=record["messageId"],
        group_id=attributes.get("MessageGroupId", ""),
        receive_count=int(attributes.get("ApproximateReceiveCount", "1")),
    )
