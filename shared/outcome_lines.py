"""One log line per message of a consumer batch: what became of it, as text for a person and as
fields (`extra=`) for a query. With Lambda's JSON log format the fields are keys of the line, so
CloudWatch Logs Insights can filter on them: `filter route = "alice" and outcome = "failed"`.
The scrubbing filter (shared.redaction) scrubs the fields as it scrubs the text."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from shared.pipeline.copier import CopyResult, Outcome
from shared.queue import ReceivedMessage

log = logging.getLogger("mail_syncer.outcome")

# What an operator should look at: a message sent to the dead letters, then a retried failure or
# a pause; the rest is the work going as it should.
LEVELS = {
    Outcome.FAILED: logging.WARNING,
    Outcome.PAUSED: logging.WARNING,
    Outcome.DEAD_LETTERED: logging.ERROR,
    Outcome.QUARANTINED: logging.ERROR,
}


def log_outcomes(results: Sequence[tuple[ReceivedMessage, CopyResult]]) -> None:
    """The Lambda consumer's lines: each with its SQS messageId, at INFO or above (LEVELS)."""
    for message, result in results:
        log_outcome(result, message_id=message.message_id)


def log_outcome(result: CopyResult, *, message_id: str | None = None, level: int | None = None) -> None:
    """One message's line; `level` None: by its outcome (LEVELS, else INFO). The CLI logs them at
    DEBUG, where its progress line and summary say the same to a person already."""
    level = LEVELS.get(result.outcome, logging.INFO) if level is None else level
    if log.isEnabledFor(level):
        fields = outcome_fields(result, message_id)
        log.log(level, "%s", outcome_text(result, message_id), extra=fields)


def outcome_fields(result: CopyResult, message_id: str | None = None) -> dict[str, Any]:
    """route, uid, outcome and message_id always (route and uid None for a body that is no
    reference; message_id None outside SQS); dest_uid, bytes, elapsed_ms and detail when known."""
    fields: dict[str, Any] = {
        "route": result.key.route if result.key else None,
        "uid": result.key.uid if result.key else None,
        "outcome": str(result.outcome),
        "message_id": message_id,
    }
    known = {
        "dest_uid": result.dest_uid,
        "bytes": result.size,
        "elapsed_ms": result.elapsed_ms,
        "detail": result.detail,
    }
    return fields | {name: value for name, value in known.items() if value not in (None, "")}


def outcome_text(result: CopyResult, message_id: str | None = None) -> str:
    """`route alice UID 41: copied as UID 9, 2048 bytes, 35 ms`; `route alice UID 43: failed
    (attempt 2): BYE server shutting down`. Also what `-v` prints a line per message."""
    if result.key is not None:
        text = f"route {result.key.route} UID {result.key.uid}: {result.outcome}"
    else:
        text = f"queue message {message_id or '(no id)'}: {result.outcome}"
    if result.dest_uid is not None:
        text += f" as UID {result.dest_uid}"
    if result.size is not None:
        text += f", {result.size} bytes"
    if result.elapsed_ms is not None:
        text += f", {result.elapsed_ms} ms"
    if result.outcome is Outcome.FAILED and result.attempts:
        text += f" (attempt {result.attempts})"
    return text + (f": {result.detail}" if result.detail else "")
