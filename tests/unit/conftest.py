"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from shared.pipeline import copier
from shared.settings import Settings


@pytest.fixture
def one_message_per_batch(monkeypatch):
    """Each message of a route copied in a batch of its own (as large messages are): the route's
    order then holds message by message, which tests of holding back rely on. Within a batch,
    APPENDs go out together, and a refused one does not hold back those sent with it."""
    monkeypatch.setattr(copier, "MAX_BATCH_BYTES", 1)


@pytest.fixture
def bare(monkeypatch, tmp_path):
    """No setting in the environment, an empty folder (no .env), and main's signal handlers kept
    out of pytest's process: the CLI run in-process as on a fresh clone."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("AWS_SECRETS_MANAGER_SECRET_IDS", raising=False)
    monkeypatch.setattr("signal.signal", lambda *args: None)
    monkeypatch.chdir(tmp_path)
    return tmp_path
