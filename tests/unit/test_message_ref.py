"""The queue message: round trip, and every malformed body named for what is wrong."""

from __future__ import annotations

import json

import pytest

from shared.errors import MalformedMessageRef
from shared.message_ref import MessageRef, UidKey

GOOD = {"v": 1, "route": "work", "uidvalidity": 7, "uid": 42, "fingerprint": "gm:1234", "size": 900}


def test_round_trip_and_identity():
    ref = MessageRef("work", 7, 42, "gm:1234", 900)
    assert json.loads(ref.to_body()) == GOOD
    assert MessageRef.from_body(ref.to_body()) == ref
    assert MessageRef.from_body(ref.to_body().encode()) == ref
    assert ref.key == UidKey("work", 7, 42)
    assert (ref.group_id, ref.dedup_id) == ("work", "work:7:42")


def test_optional_fields_may_be_null():
    ref = MessageRef.from_body(json.dumps({**GOOD, "fingerprint": None, "size": None}))
    assert (ref.fingerprint, ref.size) == (None, None)


SNS_ENVELOPE = {
    "Type": "Notification",
    "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
    "TopicArn": "arn:aws:sns:us-east-1:123456789012:mail",
    "Message": json.dumps(GOOD),
    "Timestamp": "2024-05-01T12:00:00.000Z",
    "SignatureVersion": "1",
}
S3_EVENT = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}}}]}
UID_RANGE = "missing or not an integer from 1 to 4294967295"


def without(field: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != field}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # Not JSON at all.
        (b"\xff\xfe", "queue body: not UTF-8 (invalid start byte at byte 0)"),
        ("", "queue body: not JSON (Expecting value: line 1 column 1 (char 0))"),
        ("{", "queue body: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ("route=work&uid=1", "queue body: not JSON (Expecting value: line 1 column 1 (char 0))"),
        # Oversized: refused by size before any parsing, in bytes (a non-ASCII character is several).
        ("x" * 5000, "queue body: 5000 bytes, more than 4096 bytes"),
        (b"{" * 4097, "queue body: 4097 bytes, more than 4096 bytes"),
        ("\u00e9" * 2049, "queue body: 4098 bytes, more than 4096 bytes"),
        (json.dumps({**GOOD, "fingerprint": "f" * 5000}), f"queue body: {len(json.dumps(GOOD)) + 4993} bytes, more than 4096 bytes"),
        # JSON, but not an object.
        ("[]", "queue body: a JSON list, not an object"),
        ('"a string"', "queue body: a JSON string, not an object"),
        ("42", "queue body: a JSON number, not an object"),
        ("null", "queue body: a JSON null, not an object"),
        # Foreign bodies: what they are is told by their field names, never their values.
        (json.dumps(SNS_ENVELOPE), "queue body.v: missing, not a message reference (fields: 'Type', 'MessageId', 'TopicArn', 'Message', 'Timestamp' and 1 more)"),
        (json.dumps(S3_EVENT), "queue body.v: missing, not a message reference (fields: 'Records')"),
        ("{}", "queue body.v: missing, not a message reference (fields: none)"),
        (json.dumps({"k" * 100: 1}), f"queue body.v: missing, not a message reference (fields: '{'k' * 40}...')"),
        # Other versions and wrong types for the version.
        (json.dumps({**GOOD, "v": 2}), "queue body.v: 2, expected 1"),
        (json.dumps({**GOOD, "v": 0}), "queue body.v: 0, expected 1"),
        (json.dumps({**GOOD, "v": "1"}), "queue body.v: a JSON string, expected 1"),
        (json.dumps({**GOOD, "v": "rt-looks-like-a-secret"}), "queue body.v: a JSON string, expected 1"),
        (json.dumps({**GOOD, "v": True}), "queue body.v: a JSON boolean, expected 1"),
        (json.dumps({**GOOD, "v": 1.0}), "queue body.v: a JSON number, expected 1"),
        (json.dumps({**GOOD, "v": None}), "queue body.v: a JSON null, expected 1"),
        # Extra fields.
        (json.dumps({**GOOD, "extra": 1}), "queue body: unknown field 'extra'"),
        (json.dumps({**GOOD, "body": "the message itself", "a": 1}), "queue body: unknown field 'a' and 1 more"),
        # The route.
        (json.dumps(without("route")), "queue body.route: missing or not a route name"),
        (json.dumps({**GOOD, "route": "Not A Slug"}), "queue body.route: missing or not a route name"),
        (json.dumps({**GOOD, "route": "work\n"}), "queue body.route: missing or not a route name"),
        (json.dumps({**GOOD, "route": ["work"]}), "queue body.route: missing or not a route name"),
        (json.dumps({**GOOD, "route": ""}), "queue body.route: missing or not a route name"),
        # UIDVALIDITY and UID: positive 32-bit integers.
        (json.dumps(without("uidvalidity")), f"queue body.uidvalidity: {UID_RANGE}"),
        (json.dumps({**GOOD, "uidvalidity": "7"}), f"queue body.uidvalidity: {UID_RANGE}"),
        (json.dumps(without("uid")), f"queue body.uid: {UID_RANGE}"),
        (json.dumps({**GOOD, "uid": 0}), f"queue body.uid: {UID_RANGE}"),
        (json.dumps({**GOOD, "uid": -5}), f"queue body.uid: {UID_RANGE}"),
        (json.dumps({**GOOD, "uid": 2**32}), f"queue body.uid: {UID_RANGE}"),
        (json.dumps({**GOOD, "uid": 42.0}), f"queue body.uid: {UID_RANGE}"),
        (json.dumps({**GOOD, "uid": True}), f"queue body.uid: {UID_RANGE}"),
        (json.dumps({**GOOD, "uid": None}), f"queue body.uid: {UID_RANGE}"),
        # The optional fields.
        (json.dumps({**GOOD, "size": -1}), "queue body.size: not a non-negative integer"),
        (json.dumps({**GOOD, "size": "900"}), "queue body.size: not a non-negative integer"),
        (json.dumps({**GOOD, "fingerprint": ""}), "queue body.fingerprint: not a string of 1 to 200 printable characters without spaces"),
        (json.dumps({**GOOD, "fingerprint": "a b"}), "queue body.fingerprint: not a string of 1 to 200 printable characters without spaces"),
        (json.dumps({**GOOD, "fingerprint": "f" * 201}), "queue body.fingerprint: not a string of 1 to 200 printable characters without spaces"),
        (json.dumps({**GOOD, "fingerprint": 1234}), "queue body.fingerprint: not a string of 1 to 200 printable characters without spaces"),
    ],
)
def test_malformed_bodies(body, expected):
    with pytest.raises(MalformedMessageRef) as caught:
        MessageRef.from_body(body)
    assert str(caught.value) == expected


def test_the_largest_body_a_reference_can_have_is_accepted():
    # The longest route name, 32-bit UIDs, the longest fingerprint and a large size: the cut at
    # 4096 bytes leaves room for every reference the producer can make.
    ref = MessageRef("r" * 63, 2**32 - 1, 2**32 - 1, "f" * 200, 2**53)
    assert len(ref.to_body()) < 4096 // 8
    assert MessageRef.from_body(ref.to_body()) == ref
