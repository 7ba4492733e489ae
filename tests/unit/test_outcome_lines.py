"""The consumer's line per message, as Lambda's JSON log format writes it: its fields are keys,
and a secret in them is scrubbed like one in the text."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging

import pytest

from shared.logs import configure_logging
from shared.message_ref import UidKey
from shared.outcome_lines import log_outcomes
from shared.pipeline.copier import CopyResult, Outcome
from shared.queue import ReceivedMessage
from shared.redaction import REDACTED, register_secret

SECRET = "refresh-TOKEN-in-an-outcome"
STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class RuntimeJsonFormatter(logging.Formatter):
    """What the Lambda runtime's formatter (awslambdaric JsonFormatter, log format JSON) writes:
    the message, level and logger, the exception from exc_info, and every other attribute of
    the record (the `extra=` fields) as a key of its own."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"level": record.levelname, "message": record.getMessage(), "logger": record.name}
        if record.exc_info:
            line["errorMessage"] = str(record.exc_info[1])
        line |= {k: v for k, v in vars(record).items() if k not in STANDARD and k not in line}
        return json.dumps(line)


@pytest.fixture
def lambda_log(monkeypatch) -> io.StringIO:
    """The root logger as the runtime leaves it in JSON format, then configured as a cold start does."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(RuntimeJsonFormatter())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("INFO")
    return out


def _lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _message(message_id: str) -> ReceivedMessage:
    return ReceivedMessage(receipt="r", body="{}", message_id=message_id, group_id="alice", receive_count=1)


def test_each_message_has_a_line_with_route_uid_outcome_and_message_id(lambda_log) -> None:
    arrived = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)
    results = [
        (
            _message("m-1"),
            CopyResult(
                Outcome.COPIED, UidKey("alice", 7, 41), dest_uid=9, size=2048, internaldate=arrived, elapsed_ms=35
            ),
        ),
        (_message("m-2"), CopyResult(Outcome.SKIPPED, UidKey("alice", 7, 42), "duplicate of UID 41")),
        (_message("m-3"), CopyResult(Outcome.FAILED, UidKey("alice", 7, 43), "BYE server shutting down", attempts=2)),
        (_message("m-4"), CopyResult(Outcome.QUARANTINED, None, "queue body: not JSON")),
    ]

    log_outcomes(results)

    copied, skipped, failed, quarantined = _lines(lambda_log)
    assert copied == {
        "level": "INFO", "logger": "mail_syncer.outcome",
        "message": "route alice UID 41 copied as UID 9, 2048 bytes, 35 ms",
        "route": "alice", "uid": 41, "outcome": "copied", "message_id": "m-1", "dest_uid": 9, "bytes": 2048, "elapsed_ms": 35,
    }  # fmt: skip
    assert skipped | {"level": "INFO"} == skipped
    assert {k: skipped[k] for k in ("route", "uid", "outcome", "message_id", "detail")} == {
        "route": "alice", "uid": 42, "outcome": "skipped", "message_id": "m-2", "detail": "duplicate of UID 41",
    }  # fmt: skip
    assert (failed["level"], failed["outcome"], failed["message"]) == (
        "WARNING",
        "failed",
        "route alice UID 43 failed (attempt 2): BYE server shutting down",
    )
    assert (quarantined["level"], quarantined["route"], quarantined["message_id"]) == ("ERROR", None, "m-4")
    assert quarantined["message"] == "queue message m-4 quarantined: queue body: not JSON"


def test_a_secret_in_a_message_line_never_reaches_the_log(lambda_log) -> None:
    register_secret(SECRET)
    failed = CopyResult(Outcome.FAILED, UidKey("alice", 7, 43), f"login refused for {SECRET}", attempts=1)

    log_outcomes([(_message("m-1"), failed)])

    assert SECRET not in lambda_log.getvalue()
    (line,) = _lines(lambda_log)
    assert line["detail"] == f"login refused for {REDACTED}"
    assert line["message"] == f"route alice UID 43 failed (attempt 1): login refused for {REDACTED}"


def test_every_extra_field_is_scrubbed_and_ready_for_json(lambda_log) -> None:
    register_secret(SECRET)

    class Token:
        def __str__(self) -> str:
            return f"Token({SECRET})"

    extra = {"token": SECRET, "nested": {"list": [f"a {SECRET}", 3], SECRET: None}, "object": Token(), "count": 2}
    logging.getLogger("mail_syncer.test").warning("with fields", extra=extra)

    assert SECRET not in lambda_log.getvalue()
    (line,) = _lines(lambda_log)
    assert line["token"] == REDACTED
    assert line["nested"] == {"list": [f"a {REDACTED}", 3], REDACTED: None}
    assert (line["object"], line["count"]) == (f"Token({REDACTED})", 2)


def test_a_traceback_is_kept_scrubbed_as_a_field_for_json_formatters(lambda_log) -> None:
    register_secret(SECRET)
    try:
        raise RuntimeError(f"refused {SECRET}")
    except RuntimeError:
        logging.getLogger("mail_syncer.test").exception("unexpected")

    assert SECRET not in lambda_log.getvalue()
    (line,) = _lines(lambda_log)
    assert "errorMessage" not in line  # the raw exception is gone before any formatter
    assert line["traceback"].endswith(f"RuntimeError: refused {REDACTED}")
