"""Logging set-up: one line per event, secrets scrubbed before any handler sees them."""

from __future__ import annotations

import logging
import sys

from shared.redaction import ScrubbingFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "requests", "msal", "google", "imapclient")


def configure_logging(level: str | None = None) -> None:
    """Scrub every record and keep the libraries' debug output off. Without `level` (before the
    settings are read, as a Lambda cold start does) the root level is left as it is: reading
    the settings from Secrets Manager must not reach a handler at DEBUG through botocore."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    # On every handler, including the one the Lambda runtime installs before our code runs.
    for handler in root.handlers:
        if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
            handler.addFilter(ScrubbingFilter())
    if level is not None:
        root.setLevel(level)
    # Their debug output carries request and response bodies: botocore's has Secrets Manager's
    # answers in full, and tokens are registered for scrubbing only once read and validated.
    floor = max(logging.WARNING, logging.getLevelName(level or "WARNING"))
    for noisy in LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(floor)
