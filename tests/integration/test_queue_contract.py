"""The queue contract: one suite for SqliteQueue and SqsQueue (SQS FIFO on moto's server, over HTTP).

Time: the SQLite queue runs on a fake clock that the tests move; SQS runs on real, short timeouts.
Either way a test that waits for something polls for it with a deadline (`receive_when_available`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.aws import make_client
from shared.errors import QueueUnavailable
from shared.message_ref import MessageRef
from shared.queue.port import MessageQueue, QueueDepths, ReceivedMessage
from shared.queue.sqlite import SCHEMA, SqliteQueue
from shared.queue.sqs import SqsQueue, create_fifo_queue_pair
from shared.state import HolderState
from tests.fakes.queue import FakeQueue
from tests.harness.aws import REGION, unique_name

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_RECEIVE_COUNT = 2
# Upper bound on a condition wait; the conditions themselves come true within about a second.
WAIT_DEADLINE_SECONDS = 10
POLL_STEP_SECONDS = 0.2


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclasses.dataclass
class Backend:
    queue: MessageQueue
    pass_time: Callable[[float], None]  # SQLite: moves the fake clock; SQS: sleeps
    dead_letter_reasons: Callable[[], list[str | None]]


@pytest.fixture(params=["sqlite", "sqs", "memory"])
def backend(request, tmp_path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield sqlite_backend(tmp_path / "state" / "mail_syncer.db")
    elif request.param == "memory":
        yield memory_backend()
    else:
        yield from sqs_backend(request.getfixturevalue("aws_env"), request.getfixturevalue("aws_client")("sqs"))


@pytest.fixture
def queue(backend) -> MessageQueue:
    return backend.queue


def sqlite_backend(path: Path) -> Backend:
    clock = FakeClock()

    def dead_letter_reasons() -> list[str | None]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return [reason for (reason,) in conn.execute("SELECT reason FROM queue_dead_letters ORDER BY seq")]

    queue = SqliteQueue(path, max_receive_count=MAX_RECEIVE_COUNT, clock=clock)
    return Backend(queue, clock.advance, dead_letter_reasons)


def memory_backend() -> Backend:
    """The unit tests' in-memory fake, held to the same contract."""
    clock = FakeClock()
    queue = FakeQueue(max_receive_count=MAX_RECEIVE_COUNT, clock=clock)
    return Backend(queue, clock.advance, lambda: [dead.reason for dead in queue.dead_letters()])


def sqs_backend(aws_env: dict, admin) -> Iterator[Backend]:
    queue_url, dlq_url = create_fifo_queue_pair(admin, unique_name("contract"), max_receive_count=MAX_RECEIVE_COUNT)

    def dead_letter_reasons() -> list[str | None]:
        response = admin.receive_message(
            QueueUrl=dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=0, MessageAttributeNames=["All"]
        )
        return [
            raw.get("MessageAttributes", {}).get("quarantine_reason", {}).get("StringValue")
            for raw in response.get("Messages", [])
        ]

    # No dlq_url: the adapter finds the DLQ from the RedrivePolicy, as it does in production.
    queue = SqsQueue(queue_url, client=make_client("sqs", aws_env["AWS_ENDPOINT_URL"], REGION))
    yield Backend(queue, time.sleep, dead_letter_reasons)
    for url in (queue_url, dlq_url):
        admin.delete_queue(QueueUrl=url)


def refs(route: str, *uids: int) -> list[MessageRef]:
    return [MessageRef(route, 7, uid, fingerprint=f"fp-{route}-{uid}", size=1000 + uid) for uid in uids]


def body(route: str, uid: int) -> str:
    return refs(route, uid)[0].to_body()


def uids_of(messages: list[ReceivedMessage]) -> list[int]:
    return [json.loads(message.body)["uid"] for message in messages]


def receive_when_available(backend: Backend, within: float = WAIT_DEADLINE_SECONDS, **receive_args):
    """Receive until something comes, letting at most `within` seconds pass (real or fake)."""
    waited = 0.0
    while True:
        messages = backend.queue.receive(**receive_args)
        if messages or waited >= within:
            return messages
        backend.pass_time(POLL_STEP_SECONDS)
        waited += POLL_STEP_SECONDS


def drain(queue: MessageQueue, max_messages: int = 10) -> list[ReceivedMessage]:
    """Receive and delete until the queue gives nothing more; everything received, in order."""
    received = []
    for _ in range(100):
        batch = queue.receive(max_messages=max_messages)
        if not batch:
            return received
        received.extend(batch)
        for message in batch:
            queue.delete(message)
    raise AssertionError("the queue never ran dry")


# --- sending and receiving -----------------------------------------------------------------------


def test_25_refs_sent_in_one_call_are_all_received(queue):
    sent = [ref for uid in range(1, 26) for ref in refs(f"route-{uid % 3}", uid)]

    queue.send_refs(sent)

    received = drain(queue)
    assert sorted(m.body for m in received) == sorted(ref.to_body() for ref in sent)
    assert all(m.group_id == json.loads(m.body)["route"] for m in received)
    assert all(m.receive_count == 1 for m in received)
    assert len({m.message_id for m in received}) == 25


def test_order_within_a_group_holds_across_receives(queue):
    queue.send_refs([ref for uid in range(1, 7) for ref in refs("alpha", uid) + refs("beta", uid)])

    received = drain(queue, max_messages=3)

    assert uids_of([m for m in received if m.group_id == "alpha"]) == [1, 2, 3, 4, 5, 6]
    assert uids_of([m for m in received if m.group_id == "beta"]) == [1, 2, 3, 4, 5, 6]


def test_a_group_with_a_message_in_flight_delivers_nothing_more_but_other_groups_flow(queue):
    queue.send_refs(refs("alpha", 1, 2) + refs("beta", 1))

    [alpha_1] = queue.receive(max_messages=1)
    assert alpha_1.body == body("alpha", 1)
    assert [m.body for m in queue.receive()] == [body("beta", 1)]
    assert queue.receive() == []

    queue.delete(alpha_1)
    assert [m.body for m in queue.receive()] == [body("alpha", 2)]


def test_receive_waits_for_a_message_sent_meanwhile(queue):
    sender = threading.Timer(0.5, queue.send_refs, args=(refs("alpha", 1),))
    started = time.monotonic()
    sender.start()
    try:
        received = queue.receive(wait_seconds=5)
    finally:
        sender.join()
    assert [m.body for m in received] == [body("alpha", 1)]
    assert time.monotonic() - started < 4


def test_receive_on_an_empty_queue_waits_then_returns_nothing(queue):
    started = time.monotonic()
    assert queue.receive(wait_seconds=1) == []
    assert time.monotonic() - started >= 0.9


# --- visibility and acknowledgement --------------------------------------------------------------


def test_an_undeleted_message_comes_back_after_its_visibility_timeout(backend):
    queue = backend.queue
    queue.send_refs(refs("alpha", 1))
    [first] = queue.receive(visibility_timeout=1)
    assert queue.receive() == []  # in flight

    [again] = receive_when_available(backend, visibility_timeout=60)

    assert (again.message_id, again.body, again.receive_count) == (first.message_id, first.body, 2)
    assert again.receipt != first.receipt


def test_delete_acknowledges(queue):
    queue.send_refs(refs("alpha", 1))
    [message] = queue.receive()

    queue.delete(message)

    assert queue.depths() == QueueDepths(visible=0, in_flight=0, dead=0)
    assert queue.receive() == []


def test_a_receive_gives_up_to_its_backends_most_and_refuses_to_be_asked_more(queue):
    assert queue.max_receive >= 10
    queue.send_refs(refs("alpha", *range(1, queue.max_receive + 3)))
    with pytest.raises(ValueError, match=f"max_messages: {queue.max_receive + 1}, expected 1 to {queue.max_receive}"):
        queue.receive(queue.max_receive + 1)

    assert len(queue.receive(queue.max_receive)) == queue.max_receive


def test_delete_many_acknowledges_those_given_and_no_other(queue):
    queue.send_refs(refs("alpha", 1, 2, 3) + refs("beta", 1))
    received = queue.receive()
    assert len(received) == 4

    queue.delete_many([received[0], received[2]])
    queue.delete_many([])

    assert queue.depths() == QueueDepths(visible=0, in_flight=2, dead=0)
    for message in (received[1], received[3]):
        queue.extend_visibility(message, 0)
    assert sorted(m.body for m in queue.receive()) == sorted([received[1].body, received[3].body])


def test_extend_visibility_to_zero_makes_the_message_visible_at_once(backend):
    queue = backend.queue
    queue.send_refs(refs("alpha", 1))
    [first] = queue.receive(visibility_timeout=60)

    queue.extend_visibility(first, 0)

    # moto compares its millisecond clock strictly, so allow a poll step; far below the 60 s.
    [again] = receive_when_available(backend, within=2)
    assert (again.message_id, again.receive_count) == (first.message_id, 2)


def test_extend_visibility_keeps_the_message_in_flight(backend):
    queue = backend.queue
    queue.send_refs(refs("alpha", 1))
    [message] = queue.receive(visibility_timeout=1)

    queue.extend_visibility(message, 60)

    assert receive_when_available(backend, within=1.6) == []  # past the first 1 s timeout
    assert queue.depths().in_flight == 1


@pytest.mark.parametrize("backend", ["sqlite", "memory"], indirect=True)
def test_in_flight_past_counts_the_messages_left_to_wait_longer(backend):
    queue = backend.queue
    queue.send_refs(refs("alpha", 1) + refs("beta", 1) + refs("gamma", 1))
    alpha, beta, gamma = queue.receive(visibility_timeout=30)
    queue.extend_visibility(alpha, 3600)
    queue.extend_visibility(beta, 1000)

    assert queue.in_flight_past(900) == 2
    assert queue.in_flight_past(1200) == 1
    backend.pass_time(200)
    assert queue.in_flight_past(900) == 1
    queue.delete(alpha)
    assert queue.in_flight_past(0) == 1  # beta: gamma is due again already


def test_sqs_cannot_say_when_in_flight_messages_are_due(aws_env, aws_client):
    (backend,) = sqs_backend(aws_env, aws_client("sqs"))
    assert backend.queue.in_flight_past(900) is None


# SQLite only: moto honours every receipt handle a message ever had, where real SQS FIFO refuses
# an expired one and changes nothing. The SQS adapter's handling of that refusal is covered by
# the test of a receipt the queue never issued.
@pytest.mark.parametrize("backend", ["sqlite", "memory"], indirect=True)
def test_a_stale_receipt_changes_nothing(backend):
    queue = backend.queue
    queue.send_refs(refs("alpha", 1))
    [stale] = queue.receive(visibility_timeout=60)
    queue.extend_visibility(stale, 0)
    [current] = receive_when_available(backend, within=2, visibility_timeout=60)

    queue.delete(stale)  # raises nothing
    queue.extend_visibility(stale, 0)  # raises nothing

    assert queue.depths() == QueueDepths(visible=0, in_flight=1, dead=0)
    queue.delete(current)
    assert queue.depths() == QueueDepths(visible=0, in_flight=0, dead=0)


def test_a_receipt_the_queue_never_issued_is_ignored(queue):
    queue.send_refs(refs("alpha", 1))
    [message] = queue.receive()
    unknown = dataclasses.replace(message, receipt="not-a-receipt-handle")

    queue.delete(unknown)
    queue.extend_visibility(unknown, 0)

    assert queue.depths() == QueueDepths(visible=0, in_flight=1, dead=0)


# --- dead letters --------------------------------------------------------------------------------


def test_a_message_received_too_often_goes_to_the_dead_letters_and_unblocks_its_group(backend):
    queue = backend.queue
    queue.send_refs(refs("alpha", 1, 2))
    for attempt in range(1, MAX_RECEIVE_COUNT + 1):
        [message] = receive_when_available(backend, within=2, max_messages=1)
        assert (uids_of([message]), message.receive_count) == ([1], attempt)
        queue.extend_visibility(message, 0)  # a failed attempt

    [next_message] = receive_when_available(backend, within=2, max_messages=1)

    assert (uids_of([next_message]), next_message.receive_count) == ([2], 1)
    assert queue.depths() == QueueDepths(visible=0, in_flight=1, dead=1)


def test_quarantine_moves_the_message_to_the_dead_letters_at_once(backend):
    queue = backend.queue
    queue.send_refs(refs("alpha", 1, 2))
    [message] = queue.receive(max_messages=1)
    reason = "queue body.uid: missing or not an integer " + "x" * 5000

    queue.quarantine(message, reason)

    assert queue.depths() == QueueDepths(visible=1, in_flight=0, dead=1)
    assert [m.body for m in queue.receive()] == [body("alpha", 2)]
    [kept_reason] = backend.dead_letter_reasons()
    assert reason.startswith(kept_reason) and 100 < len(kept_reason) <= 1000


# --- deduplication and depths --------------------------------------------------------------------


def test_a_resend_of_a_dedup_id_still_queued_is_dropped(queue):
    queue.send_refs(refs("alpha", 1))

    queue.send_refs(refs("alpha", 1, 2))

    assert queue.depths().visible == 2
    assert uids_of(drain(queue)) == [1, 2]


def test_depths_count_visible_in_flight_and_dead(queue):
    assert queue.depths() == QueueDepths(visible=0, in_flight=0, dead=0)
    queue.send_refs(refs("alpha", 1) + refs("beta", 1) + refs("gamma", 1))
    assert queue.depths() == QueueDepths(visible=3, in_flight=0, dead=0)

    [message] = queue.receive(max_messages=1)
    assert queue.depths() == QueueDepths(visible=2, in_flight=1, dead=0)

    queue.quarantine(message, "malformed")
    assert queue.depths() == QueueDepths(visible=2, in_flight=0, dead=1)


def test_sqlite_a_view_of_some_groups_receives_and_counts_only_theirs(tmp_path):
    # `--route`: a run copies the messages of its routes and waits for none of the others'.
    queue = sqlite_backend(tmp_path / "q.db").queue
    queue.send_refs(refs("alpha", 1, 2) + refs("beta", 1) + refs("gamma", 1))
    view = queue.of_groups(["alpha", "gamma"])

    assert view.depths() == QueueDepths(visible=3, in_flight=0, dead=0)
    received = view.receive()
    assert [m.body for m in received] == [body("alpha", 1), body("alpha", 2), body("gamma", 1)]
    assert view.depths() == QueueDepths(visible=0, in_flight=3, dead=0)
    view.quarantine(received[0], "malformed")
    view.delete_many(received[1:])
    assert view.depths() == QueueDepths(visible=0, in_flight=0, dead=1)
    assert view.receive() == []
    # The whole queue is as before for everyone else: beta's message waits.
    assert [m.body for m in queue.receive() if m.group_id == "beta"] == [body("beta", 1)]


def test_sqs_cannot_give_one_groups_messages_alone(aws_env, aws_client):
    from shared.queue.port import GroupsNotSelectable

    backend = next(sqs_backend(aws_env, aws_client("sqs")))
    with pytest.raises(GroupsNotSelectable, match="cannot hand out one route's messages alone"):
        backend.queue.of_groups(["alpha"])


# --- redrive -------------------------------------------------------------------------------------


def dead_letter_all(queue: MessageQueue, sent: list[MessageRef]) -> None:
    """Send `sent`, then quarantine each as it is received, with the reason `bad <route> <uid>`."""
    queue.send_refs(sent)
    for _ in range(100):
        batch = queue.receive()
        if not batch:
            assert queue.depths().dead == len(sent)
            return
        for message in batch:
            queue.quarantine(message, f"bad {message.group_id} {json.loads(message.body)['uid']}")
    raise AssertionError("the queue never ran dry")


def by_group(bodies: list[str]) -> dict[str, list[int]]:
    """UIDs per route, in the order given (SQS orders groups as it likes, never a group's messages)."""
    groups: dict[str, list[int]] = {}
    for text in bodies:
        data = json.loads(text)
        groups.setdefault(data["route"], []).append(data["uid"])
    return groups


def test_dead_letters_are_listed_with_their_reasons_and_stay_where_they_are(backend):
    queue = backend.queue
    dead_letter_all(queue, refs("alpha", 1, 2) + refs("beta", 1))
    queue.send_refs(refs("gamma", 1))
    for _ in range(MAX_RECEIVE_COUNT):
        [message] = receive_when_available(backend, within=2)
        queue.extend_visibility(message, 0)  # a failed attempt
    assert receive_when_available(backend, within=1) == []  # gamma 1 went to the dead letters

    listed = queue.dead_letters()

    assert by_group([dead.body for dead in listed]) == {"alpha": [1, 2], "beta": [1], "gamma": [1]}
    reasons = {(dead.group_id, json.loads(dead.body)["uid"]): dead.reason for dead in listed}
    assert reasons[("alpha", 1)] == "bad alpha 1" and reasons[("beta", 1)] == "bad beta 1"
    assert re.fullmatch(r"max receive count (\d+ )?exceeded", reasons[("gamma", 1)])
    assert queue.dead_letters() == listed  # looking moved nothing, and left them visible
    assert queue.depths() == QueueDepths(visible=0, in_flight=0, dead=4)


def test_redrive_puts_every_dead_letter_back_as_a_new_message(queue):
    sent = refs("alpha", 1, 2, 3) + refs("beta", 1)
    dead_letter_all(queue, sent)
    dead_ids = {dead.message_id for dead in queue.dead_letters()}

    redriven = queue.redrive()

    assert redriven.total == 4
    assert by_group([dead.body for dead in redriven.moved]) == {"alpha": [1, 2, 3], "beta": [1]}
    assert queue.depths() == QueueDepths(visible=4, in_flight=0, dead=0)
    received = drain(queue)
    assert by_group([m.body for m in received]) == {"alpha": [1, 2, 3], "beta": [1]}
    assert all(m.receive_count == 1 and m.group_id == json.loads(m.body)["route"] for m in received)
    assert not dead_ids & {m.message_id for m in received}


def test_redrive_leaves_what_it_does_not_select_visible_in_the_dead_letters(queue):
    # More unwanted alpha dead letters than one receive returns, ahead of the wanted ones: SQS
    # FIFO hands out nothing of a group behind a message in flight.
    unwanted_alpha = list(range(100, 111))
    dead_letter_all(queue, refs("alpha", *unwanted_alpha, 1, 2) + refs("beta", 1, 2))
    offered = []

    def select(dead) -> bool:
        key = (dead.group_id, json.loads(dead.body)["uid"])
        offered.append(key)
        return key in {("alpha", 1), ("alpha", 2)}

    redriven = queue.redrive(select)

    assert [json.loads(dead.body)["uid"] for dead in redriven.moved] == [1, 2]
    assert sorted(offered) == sorted([("alpha", uid) for uid in [*unwanted_alpha, 1, 2]] + [("beta", 1), ("beta", 2)])
    assert by_group([m.body for m in drain(queue)]) == {"alpha": [1, 2]}
    assert queue.depths() == QueueDepths(visible=0, in_flight=0, dead=13)
    left = queue.dead_letters()  # visible at once: this look receives them
    assert by_group([dead.body for dead in left])["beta"] == [1, 2]
    assert by_group([dead.body for dead in left])["alpha"] == unwanted_alpha[: len(left) - 2]  # in order
    assert {dead.reason for dead in left} >= {"bad alpha 100", "bad beta 1", "bad beta 2"}
    assert queue.redrive().total == 13
    assert by_group([m.body for m in drain(queue)]) == {"alpha": unwanted_alpha, "beta": [1, 2]}


def test_redrive_moves_at_most_limit_oldest_first(queue):
    dead_letter_all(queue, refs("alpha", 1, 2, 3))

    first = queue.redrive(limit=2)

    assert [json.loads(dead.body)["uid"] for dead in first.moved] == [1, 2]
    assert queue.depths() == QueueDepths(visible=2, in_flight=0, dead=1)
    assert [json.loads(dead.body)["uid"] for dead in queue.redrive(limit=2).moved] == [3]
    assert uids_of(drain(queue)) == [1, 2, 3]


def test_a_redriven_message_can_die_and_be_redriven_again(backend):
    queue = backend.queue
    dead_letter_all(queue, refs("alpha", 1))  # within the 5 minutes its dedup id is remembered
    for round_number in (1, 2):
        assert queue.redrive().total == 1
        for attempt in range(1, MAX_RECEIVE_COUNT + 1):
            [message] = receive_when_available(backend, within=2)
            assert (message.body, message.receive_count) == (body("alpha", 1), attempt)
            queue.extend_visibility(message, 0)  # a failed attempt
        assert receive_when_available(backend, within=1) == []
        assert queue.depths() == QueueDepths(visible=0, in_flight=0, dead=1), f"round {round_number}"


def test_redrive_of_an_empty_dead_letter_queue_moves_nothing(queue):
    assert queue.dead_letters() == []
    assert queue.redrive().total == 0
    assert queue.redrive(lambda dead: True, limit=5).total == 0


@pytest.mark.parametrize("backend", ["sqlite", "memory"], indirect=True)
def test_sqlite_a_message_handed_back_after_its_last_receive_is_dead_lettered_at_once(backend):
    # SQS dead-letters it at the next receive; nothing can receive it in between either way, so
    # the local queue spares the caller the wait.
    queue = backend.queue
    queue.send_refs(refs("alpha", 1))
    for _ in range(MAX_RECEIVE_COUNT - 1):
        [message] = queue.receive()
        queue.extend_visibility(message, 0)
    [last] = queue.receive()

    queue.extend_visibility(last, 60)

    assert queue.depths() == QueueDepths(visible=0, in_flight=0, dead=1)
    assert [dead.reason for dead in queue.dead_letters()] == [f"max receive count {MAX_RECEIVE_COUNT} exceeded"]


def test_an_sqs_queue_without_a_dead_letter_queue_has_none_to_list_and_refuses_redrive(aws_env, aws_client):
    admin = aws_client("sqs")
    url = admin.create_queue(QueueName=f"{unique_name('no-dlq')}.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    queue = SqsQueue(url, client=make_client("sqs", aws_env["AWS_ENDPOINT_URL"], REGION))
    try:
        assert queue.dead_letters() == []
        with pytest.raises(QueueUnavailable, match="no dead-letter queue"):
            queue.redrive()
    finally:
        admin.delete_queue(QueueUrl=url)


# --- unavailable backends ------------------------------------------------------------------------


def test_an_sqs_queue_that_does_not_exist_is_unavailable(aws_env):
    url = f"{aws_env['AWS_ENDPOINT_URL']}/123456789012/{unique_name('missing')}.fifo"
    queue = SqsQueue(url, client=make_client("sqs", aws_env["AWS_ENDPOINT_URL"], REGION))

    for operation in (queue.receive, queue.depths, lambda: queue.send_refs(refs("alpha", 1))):
        with pytest.raises(QueueUnavailable, match=rf"^SQS {re.escape(url)}: \S*NonExistentQueue\S*: "):
            operation()


def test_an_sqs_endpoint_where_nothing_listens_fails_fast(aws_env):
    url = "http://127.0.0.1:9/123456789012/nowhere.fifo"
    queue = SqsQueue(url, client=make_client("sqs", "http://127.0.0.1:9", REGION))
    with pytest.raises(QueueUnavailable, match=rf"^SQS {re.escape(url)}: EndpointConnectionError: "):
        queue.receive()


def test_quarantine_on_an_sqs_queue_without_a_dead_letter_queue_is_refused(aws_env, aws_client):
    admin = aws_client("sqs")
    url = admin.create_queue(QueueName=f"{unique_name('no-dlq')}.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    queue = SqsQueue(url, client=make_client("sqs", aws_env["AWS_ENDPOINT_URL"], REGION))
    try:
        queue.send_refs(refs("alpha", 1))
        [message] = queue.receive()

        with pytest.raises(QueueUnavailable, match="no dead-letter queue"):
            queue.quarantine(message, "malformed")
        assert queue.depths() == QueueDepths(visible=0, in_flight=1, dead=0)
    finally:
        admin.delete_queue(QueueUrl=url)


def test_an_sqlite_queue_whose_parent_is_a_file_is_unavailable(tmp_path):
    (tmp_path / "not-a-directory").write_text("")
    queue = SqliteQueue(tmp_path / "not-a-directory" / "queue.db")

    for operation in (queue.depths, queue.receive, lambda: queue.send_refs(refs("alpha", 1))):
        with pytest.raises(QueueUnavailable, match=r"^SQLite queue .*not-a-directory"):
            operation()


# --- SQLite only: one file, several processes ----------------------------------------------------

# Two threads that receive and delete until the queue is empty; prints the message ids it got and
# exits non-zero if a thread failed.
RECEIVER = """
import json, sys, threading, time
from shared.queue.sqlite import SqliteQueue

queue = SqliteQueue(sys.argv[1])
start_at = float(sys.argv[2])
received = []
failures = []

def receive_until_empty():
    try:
        take_messages()
    except BaseException as exc:
        failures.append(repr(exc))

def take_messages():
    while True:
        batch = queue.receive(max_messages=3, visibility_timeout=600)
        if not batch:
            if queue.depths().visible == 0:
                return
            time.sleep(0.005)  # the rest is behind groups another receiver holds
        for message in batch:
            received.append(message.message_id)
            time.sleep(0.002)  # the copy: holding messages in flight is what the test is about
            queue.delete(message)

time.sleep(max(0.0, start_at - time.time()))  # both processes start together
threads = [threading.Thread(target=receive_until_empty) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(received))
sys.exit("; ".join(failures) or None)
"""


def test_two_processes_never_receive_the_same_in_flight_message(tmp_path):
    path = tmp_path / "queue.db"
    SqliteQueue(path).send_refs([ref for uid in range(1, 301) for ref in refs(f"route-{uid % 60}", uid)])
    start_at = time.time() + 1.5

    receivers = [
        subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(path), str(start_at)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [receiver.communicate(timeout=120) for receiver in receivers]

    for receiver, (_, stderr) in zip(receivers, outputs, strict=True):
        assert receiver.returncode == 0, stderr
    per_process = [json.loads(stdout) for stdout, _ in outputs]
    everything = [message_id for ids in per_process for message_id in ids]
    assert len(everything) == len(set(everything)) == 300
    assert all(per_process), "one process received nothing: the test did not run them concurrently"


# -- the local queue: receivers that are gone ----------------------------------------------------


def receivers_judged(states: dict[str, HolderState]) -> Callable[[str], HolderState]:
    return lambda receiver: states.get(receiver, HolderState.UNKNOWN)


def test_sqlite_messages_a_gone_receiver_held_are_due_at_once(tmp_path):
    # A drain killed with -9 (or a crash, a reboot) told the queue nothing: the rerun must not
    # sit out the visibility timeout (LEASE_SECONDS) before it sees those messages.
    path, states = tmp_path / "queue.db", {"killed": HolderState.ALIVE}
    SqliteQueue(path).send_refs(refs("work", 1, 2))
    killed = SqliteQueue(path, receiver="killed", receiver_state=receivers_judged(states))
    assert len(killed.receive(10, visibility_timeout=3600)) == 2
    rerun = SqliteQueue(path, receiver="rerun", receiver_state=receivers_judged(states))
    assert rerun.receive(10, visibility_timeout=60) == []  # its receiver is still at work

    states["killed"] = HolderState.GONE
    again = rerun.receive(10, visibility_timeout=60)

    assert uids_of(again) == [1, 2]
    assert [m.receive_count for m in again] == [2, 2]


def test_sqlite_a_message_waiting_on_a_timer_is_not_taken_from_a_gone_receiver(tmp_path):
    # A retry delay or a pause (hours, for Gmail's download limit) set by a run that ended: the
    # wait is the message's own, and ending it early would only spend a receive on it.
    path, states = tmp_path / "queue.db", {"ended": HolderState.GONE}
    SqliteQueue(path).send_refs(refs("work", 1))
    ended = SqliteQueue(path, receiver="ended", receiver_state=receivers_judged(states))
    (message,) = ended.receive(10, visibility_timeout=60)
    ended.extend_visibility(message, 3600)

    rerun = SqliteQueue(path, receiver="rerun", receiver_state=receivers_judged(states))

    assert rerun.receive(10, visibility_timeout=60) == []
    assert rerun.depths() == QueueDepths(visible=0, in_flight=1, dead=0)


def test_sqlite_a_queue_file_from_before_receivers_were_recorded_is_upgraded(tmp_path):
    path = tmp_path / "queue.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        old_schema = re.sub(r",\s*receiver TEXT", "", SCHEMA)
        assert old_schema != SCHEMA
        conn.executescript(old_schema)
        conn.execute(
            "INSERT INTO queue_messages (message_id, group_id, body, sent_at) VALUES ('m1', 'work', ?, 0)",
            (refs("work", 7)[0].to_body(),),
        )
        conn.commit()

    (message,) = SqliteQueue(path, receiver="new", receiver_state=receivers_judged({})).receive(10, visibility_timeout=60)

    assert uids_of([message]) == [7]


def test_sqlite_a_done_message_another_run_put_off_is_deleted_by_its_first_receiver(tmp_path):
    # A drain frozen (SIGSTOP) past its visibility timeout; another run received the message
    # meanwhile, met its claim's holder stopped and put the message off for 20 minutes. The
    # frozen drain goes on, copies it and deletes it with its now stale receipt: the message is
    # gone, and the route's next message does not wait the 20 minutes behind it.
    path, clock = tmp_path / "queue.db", FakeClock()
    queue = SqliteQueue(path, clock=clock)
    queue.send_refs(refs("work", 1, 2))
    [frozen] = queue.receive(1, visibility_timeout=20)
    clock.advance(21)
    [again] = queue.receive(1, visibility_timeout=20)
    queue.extend_visibility(again, 20 * 60)

    queue.delete(frozen)

    assert uids_of(queue.receive(10, visibility_timeout=20)) == [2]


def test_sqlite_a_stale_delete_leaves_a_message_another_receiver_holds_now(tmp_path):
    path, clock = tmp_path / "queue.db", FakeClock()
    queue = SqliteQueue(path, clock=clock)
    queue.send_refs(refs("work", 1))
    [stale] = queue.receive(1, visibility_timeout=20)
    clock.advance(21)
    [held] = queue.receive(1, visibility_timeout=20)

    queue.delete(stale)

    assert queue.depths() == QueueDepths(visible=0, in_flight=1, dead=0)
    queue.delete(held)
    assert queue.depths() == QueueDepths(visible=0, in_flight=0, dead=0)


def test_the_local_queue_keeps_no_connection_of_a_thread_that_ended(tmp_path):
    """drain's lanes are threads that come and go, each using the queue: open files must not
    pile up over a long run."""
    queue = SqliteQueue(tmp_path / "queue.db")
    queue.depths()

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    def use_in_a_thread() -> None:
        worker = threading.Thread(target=queue.depths)
        worker.start()
        worker.join()

    use_in_a_thread()
    before = open_files()
    for _ in range(50):
        use_in_a_thread()
    assert open_files() <= before + 2  # the last thread's connection, and its journal perhaps
    queue.close()
