"""The sample mail `make demo` seeds: made here with the stdlib email package, no real mail.

A few dozen messages of the kinds a real mailbox holds: plain text, HTML with a text part,
attachments (a PDF, a PNG, a CSV, a calendar invite), 8-bit UTF-8 bodies and non-ASCII names,
raw UTF-8 headers, a thread (In-Reply-To, References), flags, and dates spread over a month, so
that the start window (FALLBACK_SINCE_DAYS, 7 days by default) leaves the older ones out.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

DOMAIN = "demo.mail-syncer.test"
# Within the default start window (7 days) with a day to spare either side, whatever the zone.
RECENT_DAYS = 5
OLDER_DAYS = (10, 30)

PEOPLE = [
    ("Ada Lovelace", "ada@example.org"),
    ("Zoë Brontë", "zoe@example.net"),
    ("Jürgen Weiß", "juergen@example.de"),
    ("Li Lei", "lilei@example.cn"),
    ("Amélie Poulain", "amelie@example.fr"),
    ("Björk Guðmundsdóttir", "bjork@example.is"),
]
SHOP = ("Corner Bookshop", "receipts@bookshop.example.com")


@dataclass(frozen=True)
class SampleMessage:
    folder: str  # the Gmail folder it is seeded into
    data: bytes  # the RFC 5322 message, CRLF line endings
    flags: tuple[str, ...]
    internaldate: datetime
    recent: bool  # within RECENT_DAYS: inside the default start window


def sample_mailbox(now: datetime, me: str) -> list[SampleMessage]:
    """INBOX: 30 messages, 24 of the last RECENT_DAYS days; Receipts: 10, 8 recent. `now` is
    timezone-aware; `me` is the Gmail user they are addressed to."""
    rng = random.Random(15)  # the same mailbox each run, but for the dates, which follow `now`
    inbox = [
        *(_plain(rng, me, n) for n in range(6)),
        *(_newsletter(rng, me, n) for n in range(5)),
        _with_attachment(me, "Slides for Thursday", "talk.pdf", "application/pdf", _pdf("Thursday: the slides")),
        _with_attachment(me, "Photo from the hike", "summit.png", "image/png", _png()),
        _with_attachment(me, "Budget, third quarter", "budget.csv", "text/csv", _csv(rng)),
        _invite(me),
        *(_eight_bit(rng, me, n) for n in range(3)),
        _utf8_headers(me),
        *_thread(me, 5),
    ]
    older_inbox = [_plain(rng, me, n + 10) for n in range(3)] + [_newsletter(rng, me, n + 10) for n in range(3)]
    receipts = [_receipt(me, order) for order in range(1001, 1011)]
    messages = []
    for folder, recent, older in (("INBOX", inbox, older_inbox), ("Receipts", receipts[:8], receipts[8:])):
        for index, message in enumerate(recent):
            # Oldest first, as mail arrives; a thread's replies come after what they answer.
            when = now - timedelta(days=RECENT_DAYS) + timedelta(hours=index * RECENT_DAYS * 24 / (len(recent) + 1))
            messages.append(_dated(folder, message, when, rng, recent=True))
        for message in older:
            when = now - timedelta(days=rng.uniform(*OLDER_DAYS))
            messages.append(_dated(folder, message, when, rng, recent=False))
    return sorted(messages, key=lambda m: (m.folder, m.internaldate))


def _dated(folder: str, message: EmailMessage, when: datetime, rng: random.Random, *, recent: bool) -> SampleMessage:
    when = when.replace(microsecond=0)
    message["Date"] = format_datetime(when)
    flags = ("\\Answered", "\\Seen") if message["In-Reply-To"] else rng.choice([(), ("\\Seen",), ("\\Seen",), ("\\Flagged",)])
    if not recent:
        flags = ("\\Seen",)
    raw_utf8 = getattr(message, "raw_utf8_headers", False)
    data = message.as_bytes(policy=policy.SMTPUTF8 if raw_utf8 else policy.SMTP)
    return SampleMessage(folder, data, flags, when, recent)


def _message(sender: tuple[str, str], me: str, subject: str) -> EmailMessage:
    message = EmailMessage(policy=policy.SMTP)
    name, address = sender
    message["From"] = Address(name, addr_spec=address)
    message["To"] = me
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain=DOMAIN)
    return message


def _plain(rng: random.Random, me: str, n: int) -> EmailMessage:
    sender = PEOPLE[n % len(PEOPLE)]
    topics = ["Lunch on Friday?", "The keys", "Notes from the call", "Train times", "Re-reading Middlemarch",
              "Garden plans", "Old photos", "A question about the lease", "Weekend", "Book club", "Plumber",
              "Your parcel", "Hello again"]
    message = _message(sender, me, topics[n % len(topics)])
    lines = [f"Hi,\n\n{rng.choice(['Just a note', 'Quick one', 'As promised'])}: item {n} of the list.\n"]
    lines += [f"- point {i}: {rng.choice(['yes', 'no', 'maybe', 'later'])}" for i in range(rng.randint(2, 8))]
    message.set_content("\n".join(lines) + f"\n\n{sender[0].split()[0]}\n")
    return message


def _newsletter(rng: random.Random, me: str, n: int) -> EmailMessage:
    message = _message(("The Weekly Loop", "news@loop.example.com"), me, f"The Weekly Loop, issue {40 + n}")
    stories = [f"Story {i}: {rng.choice(['rivers', 'bridges', 'printing', 'tides', 'owls'])}" for i in range(4)]
    message.set_content("\n".join(stories) + "\n\nUnsubscribe: https://loop.example.com/u\n")
    items = "".join(f"<li><a href='https://loop.example.com/{i}'>{s}</a></li>" for i, s in enumerate(stories))
    message.add_alternative(
        f"<html><body style='font-family:sans-serif'><h1>The Weekly Loop #{40 + n}</h1><ul>{items}</ul>"
        "<p style='color:#888'>You subscribed at loop.example.com.</p></body></html>",
        subtype="html",
    )
    message["List-Unsubscribe"] = "<https://loop.example.com/u>"
    return message


def _with_attachment(me: str, subject: str, filename: str, mime: str, payload: bytes) -> EmailMessage:
    message = _message(PEOPLE[0], me, subject)
    message.set_content(f"Attached: {filename} ({len(payload)} bytes).\n")
    maintype, subtype = mime.split("/")
    message.add_attachment(payload, maintype=maintype, subtype=subtype, filename=filename)
    return message


def _invite(me: str) -> EmailMessage:
    message = _message(PEOPLE[4], me, "Invitation: planning meeting")
    message.set_content("You are invited: planning meeting, Tuesday 10:00.\n")
    calendar = (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//mail_syncer demo//EN\r\nMETHOD:REQUEST\r\n"
        f"BEGIN:VEVENT\r\nUID:planning@{DOMAIN}\r\nDTSTART:20300102T100000Z\r\nDTEND:20300102T110000Z\r\n"
        "SUMMARY:Planning meeting\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    message.add_attachment(calendar.encode(), maintype="text", subtype="calendar", filename="invite.ics")
    return message


def _eight_bit(rng: random.Random, me: str, n: int) -> EmailMessage:
    """UTF-8 body sent as 8bit (no base64 or quoted-printable), non-ASCII name and subject."""
    sender = PEOPLE[1 + n % (len(PEOPLE) - 1)]
    subjects = ["Grüße aus München", "Crème brûlée, la recette", "Þakka þér fyrir"]
    message = _message(sender, me, subjects[n % len(subjects)])
    text = ["Schöne Grüße, ça va? Ünïcödé everywhere: ½ € ∑ 日本語 ✓", f"Zeile {n}: {rng.random():.6f}"]
    message.set_content("\n".join(text) + "\n", charset="utf-8", cte="8bit")
    return message


def _utf8_headers(me: str) -> EmailMessage:
    """Raw UTF-8 in the headers (RFC 6532), as some senders write them."""
    message = _message(PEOPLE[2], me, "Straße, café, 東京: raw UTF-8 headers")
    message.raw_utf8_headers = True  # written with policy.SMTPUTF8: see _dated
    message.set_content("The headers of this message are UTF-8, not encoded-words.\n", charset="utf-8", cte="8bit")
    return message


def _thread(me: str, length: int) -> list[EmailMessage]:
    """A conversation: each reply names the one before (In-Reply-To) and all before (References)."""
    messages, ids = [], []
    for n in range(length):
        sender = PEOPLE[n % 2 + 2]
        message = _message(sender, me, ("Re: " if n else "") + "Trip in May")
        if ids:
            message["In-Reply-To"] = ids[-1]
            message["References"] = " ".join(ids)
        quoted = "".join(f"> earlier message {i}\n" for i in range(n))
        message.set_content(f"Message {n + 1} of the thread.\n\n{quoted}")
        ids.append(message["Message-ID"])
        messages.append(message)
    return messages


def _receipt(me: str, order: int) -> EmailMessage:
    message = _message(SHOP, me, f"Your receipt, order {order}")
    total = f"{(order % 7) * 3 + 9.5:.2f}"
    message.set_content(f"Order {order}\nTotal: EUR {total}\n\nThank you for shopping with us.\n")
    message.add_alternative(
        f"<html><body><h2>Order {order}</h2><table><tr><td>Total</td><td>&euro; {total}</td></tr></table></body></html>",
        subtype="html",
    )
    message.add_attachment(_pdf(f"Receipt {order}: EUR {total}"), maintype="application", subtype="pdf",
                           filename=f"receipt-{order}.pdf")
    return message


def _csv(rng: random.Random) -> bytes:
    rows = ["month,spent,budget"] + [f"{m},{rng.randint(100, 900)},{500}" for m in ("Jul", "Aug", "Sep")]
    return ("\r\n".join(rows) + "\r\n").encode()


def _png(size: int = 16) -> bytes:
    """A small gradient, a valid PNG made by hand (8-bit RGB, one IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(v for x in range(size) for v in (x * 16, y * 16, 128)) for y in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _pdf(text: str) -> bytes:
    """A one-page PDF showing `text`, with a correct cross-reference table."""
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
