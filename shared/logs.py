"""Logging set-up: one line per event, secrets scrubbed before any handler sees them."""

from __future__ import annotations

import logging
import sys

from shared.redaction import ScrubbingFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    # On every handler, including the one the Lambda runtime installs before our code runs.
    for handler in root.handlers:
        if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
            handler.addFilter(ScrubbingFilter())
    root.setLevel(level)
    # The libraries' own debug output can carry request bodies (tokens among them).
    for noisy in ("botocore", "boto3", "urllib3", "msal", "google", "imapclient"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
