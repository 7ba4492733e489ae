"""A copy re-rendered by the destination is still recognised, and another message is not."""

from __future__ import annotations

import pytest

from shared.mailbox.identity import Identity, header_block
from tests.harness.mail import corpus

SOURCE = (
    b"Return-Path: <alice@example.com>\r\n"
    b"Message-ID: <abc.123@example.com>\r\n"
    b"Date: Mon, 6 May 2024 07:08:09 -0400\r\n"
    b'From: "Alice Example" <Alice@Example.com>\r\n'
    b"Subject: Quarterly numbers,\r\n and a folded second line\r\n"
    b"\r\n"
    b"body\r\n"
)


def identity(block: bytes) -> Identity:
    return Identity.of(header_block(block))


@pytest.mark.parametrize(
    "rendered",
    [
        pytest.param(SOURCE, id="unchanged"),
        pytest.param(
            b"Subject: Quarterly numbers, and a folded second line\r\n"
            b"From: Alice Example <alice@example.com>\r\n"
            b"Date: Mon, 6 May 2024 11:08:09 +0000\r\n"
            b"Message-ID: <abc.123@example.com>\r\n"
            b"X-MS-Exchange-Organization-SCL: -1\r\n\r\n",
            id="reordered, Date in UTC, display name unquoted, address case",
        ),
        pytest.param(
            b"Message-ID: <abc.123@example.com>\r\n"
            b"Date: Mon, 06 May 2024 07:08:09 -0400\r\n"
            b"From: =?utf-8?q?Alice_Example?= <alice@example.com>\r\n"
            b"Subject: =?utf-8?b?UXVhcnRlcmx5IG51bWJlcnMsIGFuZCBhIGZvbGRlZCBzZWNvbmQgbGluZQ==?=\r\n\r\n",
            id="RFC 2047 re-encoded",
        ),
    ],
)
def test_a_re_rendered_copy_is_the_same(rendered):
    assert identity(SOURCE).same_as(identity(rendered))


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(SOURCE.replace(b"<abc.123@", b"<abc.124@"), id="another Message-ID"),
        pytest.param(SOURCE.replace(b"07:08:09", b"07:08:10"), id="another Date"),
        pytest.param(SOURCE.replace(b"Alice@Example.com", b"bob@example.com"), id="another sender"),
        pytest.param(SOURCE.replace(b"Quarterly", b"Monthly"), id="another subject, same Message-ID"),
        pytest.param(b"Subject: x\r\n\r\n", id="none of the fields"),
    ],
)
def test_another_message_is_not_the_same(other):
    assert not identity(SOURCE).same_as(identity(other))


def test_a_message_id_the_server_added_is_not_held_against_it():
    without = SOURCE.replace(b"Message-ID: <abc.123@example.com>\r\n", b"")
    added = SOURCE.replace(b"<abc.123@example.com>", b"<DM6PR01MB1234@outlook.com>")
    assert identity(without).same_as(identity(added))
    assert not identity(SOURCE).same_as(identity(without))  # but one it had must be kept


def test_a_header_block_the_server_could_not_read_leaves_the_decision_to_the_date_and_floor():
    """Some parsers end the header block at a malformed line and serve the rest as body: no Date,
    From or Subject, and a Message-ID of the server's own."""
    served = b"Received: from x by y\r\nMessage-ID: <1e57ea70@front.outlook.test>\r\nMIME-Version: 1.0\r\n\r\n"
    assert identity(SOURCE).same_as(identity(served))
    assert not identity(SOURCE).same_as(identity(served.replace(b"MIME-Version: 1.0", b"Subject: other")))


def test_a_byte_order_mark_before_the_first_header_is_not_part_of_its_name():
    read = identity(b"\xef\xbb\xbfFrom: <abuse@example.com>\nSubject: FW: Earn money\n\nbody\n")
    assert read.senders == {"abuse@example.com"}


def test_a_raw_8bit_subject_read_in_another_charset_still_matches_on_its_ascii():
    source = b"Message-ID: <x@y>\nSubject: Caf\xc3\xa9 menu 2024\n\nbody\n"
    guessed = b"Message-ID: <x@y>\r\nSubject: =?windows-1252?q?Caf=C3=A9_menu_2024?=\r\n\r\n"
    other = b"Message-ID: <x@y>\r\nSubject: =?windows-1252?q?Caf=C3=A9_menu_2025?=\r\n\r\n"
    assert identity(source).same_as(identity(guessed))
    assert not identity(source).same_as(identity(other))


def test_an_mbox_from_line_and_lf_endings_are_read():
    message = b"From alice@example.com Mon May  6 07:08:09 2024\nMessage-ID: <m@x>\nSubject: Hi\n\nbody\n"
    read = identity(message)
    assert (read.message_id, read.subject) == ("<m@x>", "hi")


def test_every_corpus_message_reads_and_matches_itself_and_only_its_like():
    """Two corpus messages look alike only when they share a Message-ID, Date, sender and subject,
    or one carries none of them (then INTERNALDATE and the UID floor tell them apart)."""
    read = [(message, identity(message.bytes)) for message in corpus()]
    for message, own in read:
        assert own.same_as(own), message.name
        for other, theirs in read:
            if other is message or not own.same_as(theirs):
                continue
            shared_id = own.message_id is not None and own.message_id == theirs.message_id
            bare = own.message_id is None and own.date is None and not own.senders
            assert shared_id or bare or not theirs.described, (message.name, other.name)
