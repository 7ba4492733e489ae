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

# The one log line of each message's outcome, for the Lambda consumer and the CLI alike (the
# copier logs none of its own). What an operator should look at is a WARNING or an ERROR: a
# message sent to the dead letters, then a failure to be retried; skips are INFO.
LEVELS = {
    Outcome.FAILED: logging.WARNING,
    Outcome.DEAD_LETTERED: logging.ERROR,
    Outcome.QUARANTINED: logging.ERROR,
    Outcome.SKIPPED: logging.INFO,
}
# The work going as it should (a pause is said by the copier once, with its reason): INFO in
# Lambda; the CLI logs these at DEBUG, where its progress line and summary say the same.
ROUTINE_LEVEL = logging.INFO
# How a line says the outcome, where its name alone would not.
WORDS = {Outcome.DEAD_LETTERED: "moved to the dead letters"}


def log_outcomes(results: Sequence[tuple[ReceivedMessage, CopyResult]]) -> None:
    """The Lambda consumer's lines: each with its SQS messageId."""
    for message, result in results:
        log_outcome(result, message_id=message.message_id)


def log_outcome(result: CopyResult, *, message_id: str | None = None, routine_level: int = ROUTINE_LEVEL) -> None:
    level = LEVELS.get(result.outcome, routine_level)
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
    """`route alice UID 41 copied as UID 9, 2048 bytes, 35 ms`; `route alice UID 43 failed
    (attempt 2): BYE server shutting down`; `queue message m-4 quarantined: queue body: not
    JSON`. Also what `-v` prints, a line per message."""
    where = f"route {result.key.route} UID {result.key.uid}" if result.key else f"queue message {message_id or '(no id)'}"
    text = f"{where} {WORDS.get(result.outcome, result.outcome.value)}"
    if result.dest_uid is not None:
        text += f" as UID {result.dest_uid}"
    facts = [f"{result.size} bytes" if result.size is not None else "", f"{result.elapsed_ms} ms" if result.elapsed_ms is not None else ""]
    if any(facts):
        text += ", " + ", ".join(fact for fact in facts if fact)
    if result.outcome is Outcome.FAILED and result.attempts:
        text += f" (attempt {result.attempts})"
    return text + (f": {result.detail}" if result.detail else "")
