"""The `FP#` key: what recognises a message already copied, across UIDs and UIDVALIDITY changes."""

from __future__ import annotations

import datetime as dt

from shared.mailbox.port import MessageSummary, fingerprint

WHEN = dt.datetime(2024, 2, 3, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=-5)))


def summary(**fields) -> MessageSummary:
    return MessageSummary(**({"uid": 3, "size": 1234, "internaldate": WHEN, "message_id": None} | fields))


def test_gmail_and_message_id_fingerprints_are_unchanged():
    """Records written before header hashes existed must still match (values from that code)."""
    assert fingerprint(summary(message_id="<a.b@example.org>", gmail_msgid=1278455344230334865)) == (
        "gm:1278455344230334865"
    )
    assert fingerprint(summary(message_id="<a.b@example.org>")) == "h:e99216e4219da77e6f9f036803ddef7b0374d20f"
    # The header hash, where fetched anyway, does not change them.
    assert fingerprint(summary(message_id="<a.b@example.org>", header_sha256="ab" * 32)).startswith("h:e99216")


def test_without_message_id_the_header_block_internaldate_and_size_decide():
    base = fingerprint(summary(header_sha256="ab" * 32))
    assert base is not None and base.startswith("hh:")
    # The same instant written in another zone, under another UID: the same message.
    assert fingerprint(summary(uid=99, header_sha256="ab" * 32, internaldate=WHEN.astimezone(dt.timezone.utc))) == base
    assert fingerprint(summary(header_sha256="cd" * 32)) != base
    assert fingerprint(summary(header_sha256="ab" * 32, size=1235)) != base
    assert fingerprint(summary(header_sha256="ab" * 32, internaldate=WHEN + dt.timedelta(seconds=1))) != base


def test_no_fingerprint_when_nothing_identifies_the_message():
    assert fingerprint(summary()) is None
