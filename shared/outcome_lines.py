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
    for message, result in results:
        fields = outcome_fields(message, result)
        log.log(LEVELS.get(result.outcome, logging.INFO), "%s", _text(fields), extra=fields)


def outcome_fields(message: ReceivedMessage, result: CopyResult) -> dict[str, Any]:
    """route, uid, outcome and message_id always (route and uid None for a body that is no
    reference); dest_uid, bytes, elapsed_ms and detail when known."""
    fields: dict[str, Any] = {
        "route": result.key.route if result.key else None,
        "uid": result.key.uid if result.key else None,
        "outcome": str(result.outcome),
        "message_id": message.message_id,
    }
    known = {
        "dest_uid": result.dest_uid,
        "bytes": result.size,
        "elapsed_ms": result.elapsed_ms,
        "detail": result.detail,
    }
    return fields | {name: value for name, value in known.items() if value not in (None, "")}


def _text(fields: dict[str, Any]) -> str:
    where = (
        f"route {fields['route']} UID {fields['uid']}" if fields["route"] else f"queue message {fields['message_id']}"
    )
    text = f"{where} {fields['outcome']}"
    if "dest_uid" in fields:
        text += f" as UID {fields['dest_uid']}"
    facts = [
        f"{fields['bytes']} bytes" if "bytes" in fields else "",
        f"{fields['elapsed_ms']} ms" if "elapsed_ms" in fields else "",
    ]
    if any(facts):
        text += f" ({', '.join(f for f in facts if f)})"
    if "detail" in fields:
        text += f": {fields['detail']}"
    return text
