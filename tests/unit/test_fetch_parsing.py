"""The quick FETCH parser (`_parse_plain_fetch`) against imapclient's own parser.

Every answer it takes must come out exactly as imapclient's parse_fetch_response gives it, since
the copier's bytes, flags and dates come from there; every answer it does not fully understand
must be left to imapclient (None), never half-read.
"""

from __future__ import annotations

import random

import pytest
from imapclient.response_parser import parse_fetch_response

from shared.mailbox.imap import _parse_plain_fetch


def imapclient_parse(data: list) -> dict:
    return {seq: dict(items) for seq, items in parse_fetch_response(data, False, uid_is_key=False).items()}


BODY = b"From: a@example.com\r\nSubject: x\r\n\r\nbody ) ( { } \" \\ \r\n\x00\xff"

PLAIN = [
    # Dovecot, Gmail and Exchange: UID first, the body's literal last, then ")"
    [(b'1 (UID 17 FLAGS (\\Seen $Forwarded) INTERNALDATE "17-Jul-1996 02:44:25 -0700" BODY[] {%d}' % len(BODY), BODY), b")"],
    # no flags, two messages, items in another order
    [
        (b'3 (FLAGS () UID 5 INTERNALDATE " 1-Dec-2026 10:00:00 +0000" BODY[] {3}', b"abc"),
        b")",
        (b'4 (INTERNALDATE "01-Dec-2026 10:00:01 +0100" UID 6 FLAGS (\\Seen) BODY[] {0}', b""),
        b")",
    ],
    # items after the literal (some servers send FLAGS last)
    [(b'9 (UID 20 BODY[] {3}', b"xyz"), b' FLAGS (\\Answered) INTERNALDATE "02-Jan-2025 23:59:59 -1200")'],
    # the scan's summaries: a header-fields literal and RFC822.SIZE
    [
        (
            b'2 (UID 8 RFC822.SIZE 2310 INTERNALDATE "30-Nov-2026 08:00:00 +0000" '
            b"BODY[HEADER.FIELDS (MESSAGE-ID DATE FROM SUBJECT)] {24}",
            b"Message-ID: <a@b>\r\n\r\n\r\n\r\n"[:24],
        ),
        b")",
    ],
    # a flags-only response (another session's STORE) mixed in, merged by sequence number
    [b"7 (UID 30 FLAGS (\\Seen))", (b'7 (UID 30 INTERNALDATE "01-Dec-2026 10:00:00 +0000" BODY[] {2}', b"hi"), b")"],
    # lower-case item names
    [(b'1 (uid 2 flags (\\Seen) internaldate "01-Dec-2026 10:00:00 +0000" body[] {1}', b"x"), b")"],
]

ODD = [
    # Dovecot's answer for a message expunged meanwhile
    [b'5 (UID 5 FLAGS () INTERNALDATE "01-Dec-2026 10:00:00 +0000" BODY[] NIL)'],
    # a quoted flag is not an atom; a literal inside FLAGS
    [(b'1 (UID 1 FLAGS ("odd flag") BODY[] {1}', b"x"), b")"],
    # two literals in one response
    [(b"1 (UID 1 BODY[HEADER] {1}", b"x"), (b" BODY[] {1}", b"y"), b")"],
    # an item the quick path does not know
    [(b"1 (UID 1 X-GM-LABELS (\\Inbox) BODY[] {1}", b"x"), b")"],
    [(b"1 (UID 1 MODSEQ (12) BODY[] {1}", b"x"), b")"],
    # a literal with nothing after it, and an unfinished tail
    [(b"1 (UID 1 BODY[] {1}", b"x")],
    [(b"1 (UID 1 BODY[] {1}", b"x"), b" FLAGS (\\Seen"],
    # an INTERNALDATE that is no date
    [(b'1 (UID 1 INTERNALDATE "yesterday" BODY[] {1}', b"x"), b")"],
    # a section with a part number
    [(b"1 (UID 1 BODY[1] {1}", b"x"), b")"],
    # garbage
    [b"* garbled"],
    [None],
]


@pytest.mark.parametrize("data", PLAIN, ids=range(len(PLAIN)))
def test_plain_answers_come_out_as_imapclient_reads_them(data):
    quick = _parse_plain_fetch(data, False)
    assert quick is not None
    assert quick == imapclient_parse(data)


@pytest.mark.parametrize("data", ODD, ids=range(len(ODD)))
def test_other_answers_are_left_to_imapclient(data):
    assert _parse_plain_fetch(data, False) is None


def test_random_plain_answers_agree_with_imapclient():
    rng = random.Random(14)
    flags = [b"\\Seen", b"\\Answered", b"\\Flagged", b"\\Draft", b"$Label1", b"NonJunk", b"$MDNSent"]
    for _ in range(300):
        data: list = []
        for seq in range(1, rng.randint(1, 6)):
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
            items = [
                b"UID %d" % rng.randint(1, 10**9),
                b"FLAGS (%s)" % b" ".join(rng.sample(flags, rng.randint(0, 3))),
                b'INTERNALDATE "%02d-Mar-20%02d %02d:%02d:%02d %s"'
                % (rng.randint(1, 28), rng.randint(0, 30), rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59),
                   rng.choice([b"+0000", b"-0700", b"+0530"])),
            ]
            rng.shuffle(items)
            cut = rng.randint(0, len(items))
            head = b"%d (%s" % (seq, b"".join(item + b" " for item in items[:cut]))
            data.append((head + b"BODY[] {%d}" % len(body), body))
            data.append(b"".join(b" " + item for item in items[cut:]) + b")")
        quick = _parse_plain_fetch(data, False)
        assert quick == imapclient_parse(data), data
