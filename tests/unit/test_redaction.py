"""Secrets registered once are scrubbed from every log line and exception text."""

from __future__ import annotations

import logging

from shared.logs import configure_logging
from shared.redaction import SecretScrubber, register_secret


def test_scrub_longest_first_and_ignores_short_values():
    scrubber = SecretScrubber()
    scrubber.add("abcdef")
    scrubber.add("abcdef-123456")
    scrubber.add("abc")  # too short to be a real secret; would mangle ordinary words
    assert scrubber.scrub("x abcdef-123456 y abcdef z abc") == "x [REDACTED] y [REDACTED] z abc"


def test_log_records_and_tracebacks_are_scrubbed(capsys, monkeypatch):
    root = logging.getLogger()
    # Our own stderr handler, as in the CLI, instead of pytest's capture handlers.
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("INFO")
    register_secret("refresh-TOKEN-in-a-log")
    log = logging.getLogger("mail_syncer.test")
    log.info("refreshing with %s", "refresh-TOKEN-in-a-log")
    try:
        raise RuntimeError("refused refresh-TOKEN-in-a-log")
    except RuntimeError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert "refresh-TOKEN-in-a-log" not in err
    # The message, the traceback's source line and the exception text.
    assert err.count("[REDACTED]") == 3
    assert "RuntimeError: refused [REDACTED]" in err
