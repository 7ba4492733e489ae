"""Secrets registered once are scrubbed from every log line and exception text."""

from __future__ import annotations

import logging

import pytest

from shared.logs import LIBRARY_LOGGERS, configure_logging
from shared.redaction import ScrubbedError, ScrubbingFilter, SecretScrubber, register_secret, scrubbed_exceptions


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


@pytest.fixture
def library_levels():
    """Library loggers at their defaults for one test, put back (through setLevel, which also
    clears the loggers' cached answers) afterwards."""
    saved = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_library_debug_output_is_off_before_the_settings_are_read(library_levels, monkeypatch):
    # A Lambda container whose runtime handler is at DEBUG, before the level setting is known.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
    monkeypatch.setattr(root, "level", root.level)
    root.setLevel(logging.DEBUG)
    assert logging.getLogger("botocore.parsers").isEnabledFor(logging.DEBUG)

    configure_logging()

    assert root.level == logging.DEBUG  # left as the runtime set it
    assert isinstance(root.handlers[0].filters[0], ScrubbingFilter)
    for name in ("botocore.parsers", "botocore.endpoint", "urllib3.connectionpool", "msal.application", "imapclient.imaplib"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    configure_logging("DEBUG")
    assert not logging.getLogger("botocore.parsers").isEnabledFor(logging.DEBUG)
    configure_logging("ERROR")
    assert not logging.getLogger("botocore.parsers").isEnabledFor(logging.WARNING)


def test_an_exception_carrying_a_secret_is_replaced_scrubbed(caplog):
    register_secret("client-SECRET-in-an-error")

    @scrubbed_exceptions()
    def handler(cause: bool):
        if cause:
            try:
                raise KeyError("client-SECRET-in-an-error")
            except KeyError as exc:
                raise RuntimeError("lookup failed") from exc
        raise RuntimeError("refused client-SECRET-in-an-error")

    with pytest.raises(ScrubbedError) as caught:
        handler(cause=False)
    assert str(caught.value) == "RuntimeError: refused [REDACTED]"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    # A chained exception's text counts too: tracebacks print the chain.
    with pytest.raises(ScrubbedError) as caught:
        handler(cause=True)
    assert str(caught.value) == "RuntimeError: lookup failed"
    # The original is logged, its traceback scrubbed, for whoever hunts the bug.
    assert [r.getMessage() for r in caplog.records] == ["unexpected RuntimeError (secrets scrubbed)"] * 2


def test_an_exception_without_a_secret_goes_on_unchanged():
    original = ValueError("queue body.uid: missing")

    @scrubbed_exceptions()
    def handler():
        raise original

    with pytest.raises(ValueError) as caught:
        handler()
    assert caught.value is original


def test_json_logs_are_one_object_a_line_with_their_fields_scrubbed_and_one_traceback(capsys, monkeypatch):
    import json

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("INFO", "json")
    register_secret("json-TOKEN-in-a-field")
    log = logging.getLogger("mail_syncer.test")
    log.info("route %s: copied", "work", extra={"route": "work", "uid": 7, "detail": "with json-TOKEN-in-a-field"})
    try:
        raise RuntimeError("refused json-TOKEN-in-a-field")
    except RuntimeError:
        log.exception("failed")

    err = capsys.readouterr().err
    assert "json-TOKEN-in-a-field" not in err
    copied, failed = (json.loads(line) for line in err.splitlines())
    assert {k: copied[k] for k in ("level", "logger", "message", "route", "uid", "detail")} == {
        "level": "INFO", "logger": "mail_syncer.test", "message": "route work: copied", "route": "work", "uid": 7,
        "detail": "with [REDACTED]",
    }  # fmt: skip
    assert failed["traceback"].endswith("RuntimeError: refused [REDACTED]") and "exc_text" not in failed
