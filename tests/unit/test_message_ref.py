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


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\xff\xfe", "queue body: not UTF-8 (invalid start byte at byte 0)"),
        ("{", "queue body: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ("[]", "queue body: a JSON list, not an object"),
        (json.dumps({**GOOD, "v": 2}), "queue body.v: 2, expected 1"),
        (json.dumps({**GOOD, "extra": 1}), "queue body: unknown field 'extra'"),
        (json.dumps({**GOOD, "route": "Not A Slug"}), "queue body.route: missing or not a route name"),
        (json.dumps({**GOOD, "uid": 0}), "queue body.uid: missing or not an integer from 1 to 4294967295"),
        (json.dumps({**GOOD, "uid": True}), "queue body.uid: missing or not an integer from 1 to 4294967295"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "uidvalidity"}), "queue body.uidvalidity: missing or not an integer from 1 to 4294967295"),
        (json.dumps({**GOOD, "size": -1}), "queue body.size: not a non-negative integer"),
        (json.dumps({**GOOD, "fingerprint": ""}), "queue body.fingerprint: not a string of 1 to 200 characters"),
        ("x" * 5000, "queue body: 5000 characters, more than 4096"),
    ],
)
def test_malformed_bodies(body, expected):
    with pytest.raises(MalformedMessageRef) as caught:
        MessageRef.from_body(body)
    assert str(caught.value) == expected
