"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from shared.pipeline import copier


@pytest.fixture
def one_message_per_batch(monkeypatch):
    """Each message of a route copied in a batch of its own (as large messages are): the route's
    order then holds message by message, which tests of holding back rely on. Within a batch,
    APPENDs go out together, and a refused one does not hold back those sent with it."""
    monkeypatch.setattr(copier, "MAX_BATCH_BYTES", 1)
