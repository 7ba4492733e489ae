"""The queue message: a reference to one source message, never its content.

Body (DESIGN.md): {"v": 1, "route", "uidvalidity", "uid", "fingerprint", "size"}.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from shared.errors import MalformedMessageRef

VERSION = 1
# A body is a few hundred bytes; anything far larger is not ours.
MAX_BODY_BYTES = 4096
ROUTE_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# What shared.mailbox.fingerprint makes (gm:..., h:..., hh:...), with room to grow; it becomes
# part of a state key, so no spaces or control characters.
FINGERPRINT_PATTERN = re.compile(r"[\x21-\x7e]{1,200}")
FIELDS = frozenset({"v", "route", "uidvalidity", "uid", "fingerprint", "size"})
# Field names of a foreign body are shown (they tell an SNS envelope from an S3 event), cut short.
MAX_SHOWN_FIELDS = 5
MAX_SHOWN_FIELD_CHARS = 40


@dataclass(frozen=True)
class UidKey:
    """One source message, as the state store knows it."""

    route: str
    uidvalidity: int
    uid: int


@dataclass(frozen=True)
class MessageRef:
    route: str
    uidvalidity: int
    uid: int
    fingerprint: str | None = None
    size: int | None = None

    @property
    def key(self) -> UidKey:
        return UidKey(self.route, self.uidvalidity, self.uid)

    @property
    def group_id(self) -> str:
        # Ordered per route, parallel across routes.
        return self.route

    @property
    def dedup_id(self) -> str:
        return f"{self.route}:{self.uidvalidity}:{self.uid}"

    def to_body(self) -> str:
        return json.dumps(
            {
                "v": VERSION,
                "route": self.route,
                "uidvalidity": self.uidvalidity,
                "uid": self.uid,
                "fingerprint": self.fingerprint,
                "size": self.size,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_body(cls, body: str | bytes) -> MessageRef:
        """Parse a queue body; MalformedMessageRef names the field that is wrong.

        Queue bodies can come from anywhere that can send to the queue (a mis-wired SNS topic, an
        S3 notification, an older or newer producer), so the error says what the body is without
        echoing its values: they end up in logs and the dead letters."""
        # Cut off before decoding or parsing: nothing this large is ours, and a huge body must not
        # cost a full parse. A character is at least one byte, so the cheap length test is safe.
        if len(body) > MAX_BODY_BYTES:
            raise MalformedMessageRef(f"queue body: {_size_of(body)}, more than {MAX_BODY_BYTES} bytes")
        if isinstance(body, bytes):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MalformedMessageRef(f"queue body: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        elif len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
            raise MalformedMessageRef(f"queue body: {_size_of(body)}, more than {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except ValueError as exc:
            # json's message gives a position, never the text.
            raise MalformedMessageRef(f"queue body: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise MalformedMessageRef(f"queue body: a JSON {_json_type(data)}, not an object")
        if "v" not in data:
            raise MalformedMessageRef(f"queue body.v: missing, not a message reference (fields: {_field_names(data)})")
        version = data["v"]
        if not _is_int(version) or version != VERSION:
            shown = version if _is_int(version) else f"a JSON {_json_type(version)}"
            raise MalformedMessageRef(f"queue body.v: {shown}, expected {VERSION}")
        unknown = sorted(set(data) - FIELDS)
        if unknown:
            raise MalformedMessageRef(f"queue body: unknown field {_field_names(unknown, limit=1)}")
        route = data.get("route")
        # fullmatch: `$` would let a trailing newline through.
        if not isinstance(route, str) or not ROUTE_NAME_PATTERN.fullmatch(route):
            raise MalformedMessageRef("queue body.route: missing or not a route name")
        uidvalidity = _positive_int(data, "uidvalidity")
        uid = _positive_int(data, "uid")
        fingerprint = data.get("fingerprint")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not FINGERPRINT_PATTERN.fullmatch(fingerprint)):
            raise MalformedMessageRef(
                "queue body.fingerprint: not a string of 1 to 200 printable characters without spaces"
            )
        size = data.get("size")
        if size is not None and (not _is_int(size) or size < 0):
            raise MalformedMessageRef("queue body.size: not a non-negative integer")
        return cls(route, uidvalidity, uid, fingerprint, size)


def _positive_int(data: dict, field: str) -> int:
    value = data.get(field)
    if not _is_int(value) or not 0 < value < 2**32:
        raise MalformedMessageRef(f"queue body.{field}: missing or not an integer from 1 to 4294967295")
    return value


def _is_int(value: object) -> bool:
    # bool is an int in Python, and 1.0 == 1: a JSON true or 1.0 is not a version or a UID.
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _field_names(fields, *, limit: int = MAX_SHOWN_FIELDS) -> str:
    names = [repr(name if len(name) <= MAX_SHOWN_FIELD_CHARS else name[:MAX_SHOWN_FIELD_CHARS] + "...") for name in fields]
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _size_of(body: str | bytes) -> str:
    return f"{len(body)} bytes" if isinstance(body, bytes) else f"{len(body.encode('utf-8', 'surrogatepass'))} bytes"
