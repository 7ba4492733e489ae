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
ROUTE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


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
        """Parse a queue body; MalformedMessageRef names the field that is wrong."""
        if isinstance(body, bytes):
            try:
                body = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MalformedMessageRef(f"queue body: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if len(body.encode("utf-8")) > MAX_BODY_BYTES:
            raise MalformedMessageRef(f"queue body: {len(body)} characters, more than {MAX_BODY_BYTES}")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise MalformedMessageRef(f"queue body: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise MalformedMessageRef(f"queue body: a JSON {type(data).__name__}, not an object")
        if data.get("v") != VERSION:
            raise MalformedMessageRef(f"queue body.v: {data.get('v')!r}, expected {VERSION}")
        unknown = sorted(set(data) - {"v", "route", "uidvalidity", "uid", "fingerprint", "size"})
        if unknown:
            raise MalformedMessageRef(f"queue body: unknown field {unknown[0]!r}")
        route = data.get("route")
        if not isinstance(route, str) or not ROUTE_NAME_PATTERN.match(route):
            raise MalformedMessageRef("queue body.route: missing or not a route name")
        uidvalidity = _positive_int(data, "uidvalidity")
        uid = _positive_int(data, "uid")
        fingerprint = data.get("fingerprint")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not 0 < len(fingerprint) <= 200):
            raise MalformedMessageRef("queue body.fingerprint: not a string of 1 to 200 characters")
        size = data.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise MalformedMessageRef("queue body.size: not a non-negative integer")
        return cls(route, uidvalidity, uid, fingerprint, size)


def _positive_int(data: dict, field: str) -> int:
    value = data.get(field)
    # bool is an int in Python; a JSON true is not a UID.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**32:
        raise MalformedMessageRef(f"queue body.{field}: missing or not an integer from 1 to 4294967295")
    return value
