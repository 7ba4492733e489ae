"""Fuzz: queue bodies (issue 13, item 11). Anything can be sent to the queue (a mis-wired topic,
an older or newer producer, a person with the console): a body either is a reference, which
survives its own round trip, or is refused with MalformedMessageRef naming the place that is
wrong, and the consumer then dead-letters it with that reason, once, never copying, dropping or
crashing on it. No value of the body is ever quoted back: bodies can carry tokens.
"""

from __future__ import annotations

import json
import re
import tempfile

from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

from shared.errors import MalformedMessageRef
from shared.message_ref import FIELDS, MAX_BODY_BYTES, ROUTE_NAME_PATTERN, MessageRef
from shared.pipeline.consume import consume_queue
from shared.pipeline.copier import Outcome
from shared.queue import QueueDepths
from tests.fakes import FakeWorld
from tests.fakes.world import LEASE_SECONDS
from tests.harness.fuzz import counted

# Every error names its place: the body as a whole, or one of its fields.
PLACE = re.compile(r"queue body(\.(%s))?: " % "|".join(sorted(FIELDS)))
# A value a body may carry that must never come back in an error text (a token pasted there).
SECRET = "tok-SECRET-8b1f0c"
UINT32 = st.integers(min_value=1, max_value=2**32 - 1)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40), st.floats(allow_nan=False), st.text()
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8
)
valid_fields = {
    "v": st.just(1),
    "route": st.from_regex(ROUTE_NAME_PATTERN, fullmatch=True),
    "uidvalidity": UINT32,
    "uid": UINT32,
    "fingerprint": st.none() | st.from_regex(r"[\x21-\x7e]{1,200}", fullmatch=True),
    "size": st.none() | st.integers(min_value=0, max_value=2**53),
}
# Nearly right (the edges of the ranges, the same number as another type) or anything, a secret
# among them; and fields that are not a reference's.
wrong_values = {
    "v": st.sampled_from([0, 2, -1, 1.0, "1", True, None, SECRET]) | json_values,
    "route": st.sampled_from(["", "Work", "work\n", "-work", "r" * 64, SECRET]) | json_values,
    "uidvalidity": st.sampled_from([0, -1, 2**32, 7.0, "7", True, None, SECRET]) | json_values,
    "uid": st.sampled_from([0, -1, 2**32, 42.0, "42", False, None, SECRET]) | json_values,
    "fingerprint": st.sampled_from(["", "a b", "f" * 201, "gm:1\n", SECRET + " x", 1234]) | json_values,
    "size": st.sampled_from([-1, 1.5, "900", True, SECRET]) | json_values,
    "extra": json_values,
    "Records": json_values,
}


@st.composite
def reference_shaped(draw) -> dict:
    """A valid reference's fields, with a few of them dropped, made wrong, or added."""
    data = {name: draw(values) for name, values in valid_fields.items()}
    for name in draw(st.sets(st.sampled_from(sorted(wrong_values)), max_size=3)):
        if name in data and draw(st.booleans()):
            del data[name]
        else:
            data[name] = draw(wrong_values[name])
    return data


json_bodies = st.one_of(reference_shaped(), json_values).map(lambda data: json.dumps(data, ensure_ascii=False))
bodies = st.one_of(
    json_bodies,
    json_bodies.map(str.encode),
    st.text(),
    st.binary(),
    # Past the size cut: a huge body must be refused by its size, not parsed.
    st.integers(min_value=MAX_BODY_BYTES - 2, max_value=MAX_BODY_BYTES + 2).map(lambda n: '{"v":1,"x":"' + "y" * n + '"}'),
)


def parsed(body: str | bytes) -> MessageRef | MalformedMessageRef:
    """The reference, or the error that refused the body; any other exception fails the test."""
    try:
        return MessageRef.from_body(body)
    except MalformedMessageRef as refused:
        return refused


@settings(max_examples=600)
@given(body=bodies)
@example(body=b'{"v":1,"route":"work","uidvalidity":7,"uid":1}\xff')
@example(body='{"v":1,"route":"work","uidvalidity":7,"uid":1,"fingerprint":"\ud800"}')
@example(body=json.dumps({"v": 1, "route": SECRET, "uidvalidity": 7, "uid": 1}))
@counted
def test_a_body_is_a_reference_that_round_trips_or_an_error_naming_its_place(body):
    result = parsed(body)

    event("a reference" if isinstance(result, MessageRef) else str(result).partition(":")[0])
    if isinstance(result, MessageRef):
        assert MessageRef.from_body(result.to_body()) == result
        assert ROUTE_NAME_PATTERN.fullmatch(result.route)
        assert 0 < result.uidvalidity < 2**32 and 0 < result.uid < 2**32
        assert result.size is None or result.size >= 0
    else:
        text = str(result)
        assert PLACE.match(text), text
        assert SECRET not in text
        assert len(text) < 300  # one line in a log and in the dead letters, whatever the body


@settings(max_examples=80)
@given(body=st.one_of(json_bodies, st.text()))
@counted
def test_a_body_that_is_not_a_reference_of_a_route_is_dead_lettered_once_and_the_rest_copied(body):
    refused = parsed(body)
    # A valid reference of a configured route is a message to copy, not a bad body: left out.
    assume(not (isinstance(refused, MessageRef) and refused.route in ("work", "home", "news")))
    reason = (
        str(refused) if isinstance(refused, MalformedMessageRef) else f"queue body.route: unknown route {refused.route!r}"
    )
    with tempfile.TemporaryDirectory() as directory:
        world = FakeWorld.build(directory)
        try:
            bad_id = world.queue.send_raw(body, "work")
            good = world.arrive("work")  # behind it in the same FIFO group
            world.queue.send_refs([good])
            seen = []

            consume_queue(world.queue, world.copier(), visibility_timeout=LEASE_SECONDS, on_result=seen.append)

            assert [result.outcome for result in seen] == [Outcome.QUARANTINED, Outcome.COPIED]
            assert [(letter.message_id, letter.body, letter.reason) for letter in world.queue.dead_letters()] == [
                (bad_id, body, reason)
            ]
            assert world.queue.depths() == QueueDepths(visible=0, in_flight=0, dead=1)
            assert world.destination.bodies("Work") == [world.source_of("work").message("INBOX", good.uid).body]
            assert world.state.calls_to("claim_uid") == 1  # the good one's only: nothing claimed for the bad body
        finally:
            world.close()
