"""Keeps secrets out of everything a person or a log can read.

Every secret the process learns (refresh tokens, access tokens, passwords, client secrets) is
registered here the moment it is known; `scrub` replaces each with `[REDACTED]`. The log filter
applies it to every record, and error texts pass through it before they are printed or stored.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections.abc import Iterator

REDACTED = "[REDACTED]"
# Shorter values would match ordinary words; no real token or password we handle is this short.
MIN_SECRET_LENGTH = 6


class SecretScrubber:
    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str | None) -> None:
        if value and len(value) >= MIN_SECRET_LENGTH:
            with self._lock:
                self._secrets.add(value)

    def scrub(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


scrubber = SecretScrubber()


def register_secret(value: str | None) -> None:
    scrubber.add(value)


def scrub(text: str) -> str:
    return scrubber.scrub(text)


# What every LogRecord has (and what formatters and the Lambda runtime add): anything else on a
# record came from `extra=` and is scrubbed like the message.
RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "aws_request_id"}
# The scrubbed traceback of a record that had one, as a field of its own: JSON formatters (the
# Lambda runtime's) read only exc_info, which the filter drops, never exc_text.
TRACEBACK_FIELD = "traceback"


class ScrubbingFilter(logging.Filter):
    """Formats each record's message once, scrubbed, so no handler sees the raw text; scrubs the
    fields passed with `extra=` too, which JSON formatters write out as keys."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = scrub(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks carry exception text; format it here, scrubbed, and drop the raw one.
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = scrub(formatted)
            record.exc_info = None
            setattr(record, TRACEBACK_FIELD, record.exc_text)
        for name, value in list(vars(record).items()):
            if name not in RECORD_ATTRIBUTES and not name.startswith("_"):
                setattr(record, name, _scrubbed_field(value))
        return True


def _scrubbed_field(value: object) -> object:
    """A JSON-ready copy of an `extra=` value with every secret replaced; a value JSON cannot
    hold becomes its scrubbed text (the Lambda runtime's encoder would refuse it)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_scrubbed_field(item) for item in value]
    if isinstance(value, dict):
        return {scrub(str(key)): _scrubbed_field(item) for key, item in value.items()}
    return scrub(str(value))


class ScrubbedError(Exception):
    """Stands in for an unexpected exception whose text carried a secret: same type name and
    text, the secrets replaced."""


@contextlib.contextmanager
def scrubbed_exceptions(log: logging.Logger | None = None) -> Iterator[None]:
    """Let no secret out in an exception's text. Around a Lambda handler: the runtime reports an
    uncaught exception (its text and stack) itself, past every log filter.

    An exception whose text, or a chained one's, carries a registered secret is logged scrubbed
    (the traceback included, for the bug hunt) and replaced by a ScrubbedError; any other goes
    on as it is. Usable as a decorator."""
    try:
        yield
    except Exception as exc:
        text = "".join(traceback.format_exception(exc))
        if scrub(text) == text:
            raise
        (log or logging.getLogger("mail_syncer")).error(
            "unexpected %s (secrets scrubbed)", type(exc).__name__, exc_info=exc
        )
        raise ScrubbedError(f"{type(exc).__name__}: {scrub(str(exc))}") from None
