"""Logging set-up: one line per event, secrets scrubbed before any handler sees them.

Text for a person, or JSON (one object a line: time, level, logger, message, and the fields a
record carries, such as route and uid) for a log collector. A progress line redrawn in place on
a terminal (shared.cli.progress) is cleared before a log line is written and drawn again after,
so the two never share a line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
from collections.abc import Callable
from typing import Literal

from shared.redaction import RECORD_ATTRIBUTES, ScrubbingFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "requests", "msal", "google", "imapclient")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: the record's own keys, then each field passed with `extra=`
    (ScrubbingFilter scrubbed them, and put the scrubbed traceback in `traceback`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in RECORD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


class _LiveLine:
    """The one line a terminal shows redrawn in place (the progress), if any: cleared before a
    log line and drawn again after it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.clear: Callable[[], None] | None = None
        self.redraw: Callable[[], None] | None = None


live_line = _LiveLine()


class _LineKeepingHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        with live_line.lock:
            if live_line.clear is not None:
                live_line.clear()
            super().emit(record)
            if live_line.redraw is not None:
                live_line.redraw()


def configure_logging(level: str | None = None, log_format: Literal["text", "json"] = "text") -> None:
    """Scrub every record and keep the libraries' debug output off. Without `level` (before the
    settings are read, as a Lambda cold start does) the root level is left as it is: reading
    the settings from Secrets Manager must not reach a handler at DEBUG through botocore."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_LineKeepingHandler(sys.stderr))
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT)
    for handler in root.handlers:
        if isinstance(handler, _LineKeepingHandler):
            handler.setFormatter(formatter)
        # On every handler, including the one the Lambda runtime installs before our code runs.
        if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
            handler.addFilter(ScrubbingFilter())
    if level is not None:
        root.setLevel(level)
    # Their debug output carries request and response bodies: botocore's has Secrets Manager's
    # answers in full, and tokens are registered for scrubbing only once read and validated.
    floor = max(logging.WARNING, logging.getLevelName(level or "WARNING"))
    for noisy in LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(floor)
