"""Fuzz: IMAP server replies (issue 13, item 11). A scripted server (tests/harness/scripted_imap.py)
answers sanely except one reply, spoiled by Hypothesis: cut short, garbage, a literal of the wrong
or a huge size, untagged noise, answers for UIDs not asked for, a refusal, a BYE, a wrong tag, the
connection closed or silent. Through the product's real adapters and the copy use case:

- every call ends, within a bound, in a right answer or one of the port's errors naming the
  account (never another exception, never a hang: IMAP_TIMEOUT is short here, and a call that
  outlives its bound fails the test);
- an APPEND refused (AppendRejected) never landed, and one answered with a UID did;
- copying ends with every message in the destination exactly once, byte for byte, and done:
  never done without a copy that landed, never skipped as gone (the messages are all there, so
  a garbled FETCH or SEARCH can only be a failure, retried).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from shared.errors import MailSyncerError
from shared.mailbox import retry
from shared.mailbox.connections import MailboxConnections
from shared.mailbox.imap import ImapDestination, ImapSource
from shared.mailbox.port import AppendRejected, SourceMessage
from shared.mailbox.session import ImapAccount, ImapEndpoint, close_quietly, open_session
from shared.message_ref import MessageRef
from shared.pipeline.consume import consume_queue
from shared.pipeline.copier import Copier, Outcome, lease_for
from shared.state import ClaimStatus
from shared.state.sqlite import SqliteStateStore
from tests.fakes import FakeClock, FakeQueue, make_route
from tests.harness.fuzz import counted
from tests.harness.scripted_imap import (
    CLOSE,
    SILENT,
    Bye,
    Cut,
    Dropped,
    Fault,
    Garbage,
    GarbageFirst,
    LiteralSize,
    Noise,
    OtherUid,
    Refused,
    ScriptedImapServer,
    WrongTag,
)

# Short, so that a reply that never comes costs half a second, not a minute.
IMAP_TIMEOUT = 0.5
# A call (or a whole copy) that has not ended by then hangs: each may meet one timeout per
# session it opens, and the retry policies below open a few.
CALL_BOUND_SECONDS = 20 * IMAP_TIMEOUT
WHEN = dt.datetime(2024, 5, 1, 12, 30, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))


def mail(n: int) -> bytes:
    return (
        b"Message-ID: <fuzz-%d@example.test>\r\nDate: Wed, 1 May 2024 12:00:0%d +0200\r\n"
        b"From: Alice <alice@example.test>\r\nSubject: fuzz %d\r\n\r\nbody %d\r\n{3}\r\n* 1 FETCH\r\n" % (n, n, n, n)
    )


# Bodies that look like IMAP inside (a literal, an untagged line): only framing tells them apart.
SOURCE_MAIL = [(mail(n), (b"\\Seen",) if n % 2 else (), WHEN + dt.timedelta(minutes=n)) for n in range(1, 4)]

# ---- the mutations -----------------------------------------------------------------------------------
ends = st.sampled_from([CLOSE, CLOSE, CLOSE, CLOSE, SILENT])  # silent costs a timeout: a fifth of them
noise_lines = st.sampled_from(
    [
        b"* 7 EXISTS",
        b"* 2 RECENT",
        b"* 1 FETCH (FLAGS (\\Seen \\Flagged))",
        b"* OK [ALERT] the server will restart at midnight",
        b"* CAPABILITY IMAP4rev1 LITERAL+ UIDPLUS",
        b"* OK still here",
        b"* NO [ALERT] a warning that fails nothing",
    ]
)
mutations = st.one_of(
    st.builds(Cut, at=st.integers(min_value=0, max_value=2000), then=ends),
    st.builds(Garbage, data=st.binary(max_size=200), then=ends),
    st.builds(GarbageFirst, data=st.binary(min_size=1, max_size=80)),
    st.builds(Noise, lines=st.lists(noise_lines, min_size=1, max_size=3).map(tuple), at=st.integers(0, 10)),
    st.builds(
        LiteralSize,
        size=st.one_of(st.integers(min_value=0, max_value=400), st.sampled_from([2**31, 2**40, 2**62, 10**20])),
        then=ends,
    ),
    st.builds(OtherUid, by=st.sampled_from([-2, -1, 1, 2, 1000])),
    st.builds(
        Refused,
        status=st.sampled_from([b"NO", b"BAD"]),
        text=st.one_of(
            st.sampled_from([b"[UNAVAILABLE] try later", b"[SERVERBUG] oops", b"Server Unavailable. 15", b"no"]),
            st.binary(max_size=60),
        ),
    ),
    st.just(Bye()),
    st.just(WrongTag()),
    st.just(Dropped()),
)
# The replies each scenario gets when nothing is spoiled, by command: the fault spoils one of them.
SOURCE_REPLIES = {"GREETING": 1, "CAPABILITY": 2, "LOGIN": 1, "EXAMINE": 1, "UID FETCH": 2, "UID SEARCH": 2}
DESTINATION_REPLIES = {
    **{"GREETING": 1, "CAPABILITY": 2, "LOGIN": 1, "LIST": 2, "CREATE": 2, "SELECT": 1, "APPEND": 1},
    **{"EXAMINE": 2, "UID SEARCH": 2, "UID FETCH": 2},  # find_copies
}
COPY_SOURCE_REPLIES = {"GREETING": 1, "CAPABILITY": 1, "LOGIN": 1, "EXAMINE": 1, "UID FETCH": 3}
COPY_DESTINATION_REPLIES = {"GREETING": 1, "CAPABILITY": 2, "LOGIN": 1, "LIST": 1, "CREATE": 1, "SELECT": 1, "APPEND": 3}


def faults(replies: dict[str, int]) -> st.SearchStrategy[Fault]:
    """One of `replies`, spoiled by one of the mutations."""
    return st.sampled_from(sorted(replies.items())).flatmap(
        lambda command: st.builds(Fault, st.just(command[0]), st.integers(0, command[1] - 1), mutations)
    )


@pytest.fixture(scope="module", autouse=True)
def quick_retries():
    """The retry policies' waits cut to a few milliseconds (their attempts and deadlines kept):
    the examples spend their time on replies, not in sleeps the properties do not look at."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retry, "SESSION", retry.RetryPolicy(attempts=3, first_wait=0.005, max_wait=0.01, deadline=10.0))
        patch.setattr(retry, "COMMAND", retry.RetryPolicy(attempts=3, first_wait=0.005, max_wait=0.01, deadline=15.0))
        yield


def account(server: ScriptedImapServer, label: str) -> ImapAccount:
    endpoint = ImapEndpoint(server.host, server.port, ssl=False, timeout=IMAP_TIMEOUT)
    return ImapAccount(label, server.user, endpoint, password=SecretStr(server.password))


def within_bound(call):
    """`call()`'s result or exception, on a thread that must end within CALL_BOUND_SECONDS."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - judged by the test
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="fuzz-call", daemon=True)
    worker.start()
    worker.join(CALL_BOUND_SECONDS)
    assert not worker.is_alive(), f"no end within {CALL_BOUND_SECONDS} s: a hang"
    return outcome


def port_error(outcome: dict, label: str) -> MailSyncerError | None:
    """The call's error if it had one: it must be one of the port's, naming the account."""
    error = outcome.get("error")
    if error is None:
        return None
    event(f"ended in {type(error).__name__}")
    assert isinstance(error, MailSyncerError), f"a raw {type(error).__name__}: {error!r}"
    assert label in str(error), str(error)
    return error


@contextlib.contextmanager
def scripted(folders, fault: Fault | None):
    server = ScriptedImapServer(folders, fault)
    try:
        yield server
    finally:
        server.close()
        if fault is not None:
            event("reply spoiled" if fault.applied else "no reply spoiled (the command came fewer times)")


# ---- the adapters, one session each ------------------------------------------------------------------
def network_settings(max_examples: int) -> settings:
    """Over sockets, an example's time varies: no deadline; `max_examples` keeps the suite within budget."""
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@network_settings(100)
@given(fault=faults(SOURCE_REPLIES), uid=st.sampled_from([1, 2, 3]))
@example(fault=Fault("UID FETCH", 0, LiteralSize(10**20, CLOSE)), uid=1)
@example(fault=Fault("UID SEARCH", 0, OtherUid(1)), uid=2)
@counted
def test_the_source_answers_right_or_fails_with_a_port_error(fault, uid):
    label = "route work source fuzz"
    with scripted({"INBOX": SOURCE_MAIL}, fault) as server:
        real = server.folders["INBOX"].messages[uid - 1]
        opened = within_bound(lambda: open_session(account(server, label)))
        if port_error(opened, label):
            return
        client = opened["value"]
        try:
            source = ImapSource(client, account(server, label))
            examined = within_bound(lambda: source.examine("INBOX"))
            if port_error(examined, label):
                return
            assert examined["value"].uidvalidity == server.folders["INBOX"].uidvalidity
            for _ in range(2):  # a fault may hit the first or the second of each
                fetched = within_bound(lambda: source.fetch(uid))
                if port_error(fetched, label):
                    return
                message = fetched["value"]
                # None only says "not served": the copier then looks again in a new session.
                if message is not None:
                    assert (message.uid, message.body, message.internaldate) == (uid, real.body, real.internaldate)
                    assert message.flags == tuple(flag.decode() for flag in real.flags)
                found = within_bound(lambda: source.has_uid(uid))
                if port_error(found, label):
                    return
                # Never "not there" for a message that is: that would skip it as gone.
                assert found["value"] is True
        finally:
            close_quietly(client)


def appended(server: ScriptedImapServer, folder: str) -> list[bytes]:
    """What the server holds in `folder`, in UID order."""
    return [message.body for message in server.folders[folder].messages] if folder in server.folders else []


@network_settings(100)
@given(fault=faults(DESTINATION_REPLIES))
@example(fault=Fault("APPEND", 0, Cut(30, CLOSE)))
@example(fault=Fault("APPEND", 0, Refused(b"NO", b"[UNAVAILABLE] try later")))
@counted
def test_the_destination_lands_what_it_says_and_fails_with_a_port_error(fault):
    label = "destination me@outlook.test"
    folder = "Work/Fuzz"
    message = SourceMessage(1, mail(1), ("\\Seen",), WHEN)
    with scripted({"INBOX": []}, fault) as server:
        opened = within_bound(lambda: open_session(account(server, label)))
        if port_error(opened, label):
            return
        client = opened["value"]
        try:
            destination = ImapDestination(client, account(server, label))
            made = within_bound(lambda: destination.ensure_folder(folder))
            if port_error(made, label):
                return
            assert folder in server.folders and "Work" in server.folders
            floor = within_bound(lambda: destination.uid_floor(folder))
            if port_error(floor, label):
                return
            sent = within_bound(lambda: destination.append(folder, message))
            error = port_error(sent, label)
            if isinstance(error, AppendRejected):
                assert appended(server, folder) == [], "refused, yet it landed: a retry would copy it twice"
                return
            if error is None:
                assert appended(server, folder) == [message.body]
                assert sent["value"] == server.folders[folder].messages[0].uid
            # Landed or not (a reply lost after the APPEND was sent), the lookup tells which.
            for _ in range(2):
                found = within_bound(lambda: destination.find_copies(folder, message, floor["value"]))
                if port_error(found, label):
                    return
                assert found["value"] == [m.uid for m in server.folders[folder].messages]
        finally:
            close_quietly(client)


# ---- the copy use case -----------------------------------------------------------------------------
def copy_all(source_server: ScriptedImapServer, destination_server: ScriptedImapServer, directory: Path):
    """Queue a reference to each source message and consume until the queue is empty; the
    state store, the queue and their clock (retry delays pass at once) at the end."""
    route = make_route("work", gmail_user="alice@gmail.test", outlook_folder="Work")
    clock = FakeClock()
    state = SqliteStateStore(directory / "state.db", clock=clock)
    queue = FakeQueue(max_receive_count=20, clock=clock, waits_move_clock=True)
    connections = MailboxConnections(
        lambda route: account(source_server, f"route {route.name} source {route.gmail_user}"),
        lambda: account(destination_server, "destination me@outlook.test"),
    )
    copier = Copier(
        state=state,
        mailboxes=connections,
        routes={route.name: route},
        owner="fuzz-consumer",
        lease_until=lease_for(60, clock),
        max_attempts=5,
        clock=clock,
    )
    folder = source_server.folders["INBOX"]
    refs = [MessageRef(route.name, folder.uidvalidity, m.uid, None, len(m.body)) for m in folder.messages]
    queue.send_refs(refs)
    results = []
    try:
        ended = within_bound(lambda: consume_queue(queue, copier, visibility_timeout=60, on_result=results.append))
        assert "error" not in ended, f"the copy raised {ended.get('error')!r}"
        return refs, results, state, queue
    finally:
        connections.close(abruptly=True)


def copy_and_check_each_copied_once(source_fault: Fault | None, destination_fault: Fault | None) -> None:
    with tempfile.TemporaryDirectory() as directory, scripted(
        {"INBOX": SOURCE_MAIL}, source_fault
    ) as source, scripted({"INBOX": []}, destination_fault) as destination:
        refs, results, state, queue = copy_all(source, destination, Path(directory))
        try:
            assert_each_copied_once(refs, results, state, queue, source, destination)
        finally:
            state.close()


def assert_each_copied_once(refs, results, state, queue, source: ScriptedImapServer, destination: ScriptedImapServer):
    event(f"{sum(r.outcome is Outcome.FAILED for r in results)} failed attempts on the way")
    assert not [r for r in results if r.outcome is Outcome.SKIPPED], "skipped a message the source has"
    assert queue.depths().dead == 0 and queue.depths().visible == 0
    assert [state.get_claim(ref.key).status for ref in refs] == [ClaimStatus.DONE] * len(refs)
    # Exactly once, byte for byte, in order.
    assert appended(destination, "Work") == [m.body for m in source.folders["INBOX"].messages]


@network_settings(40)
@given(fault=faults(COPY_SOURCE_REPLIES))
@example(fault=Fault("UID FETCH", 0, OtherUid(1)))
@example(fault=Fault("UID FETCH", 1, Cut(60, SILENT)))
@counted
def test_copying_from_a_source_with_a_spoiled_reply_copies_each_message_once(fault):
    copy_and_check_each_copied_once(source_fault=fault, destination_fault=None)


@network_settings(40)
@given(fault=faults(COPY_DESTINATION_REPLIES))
@example(fault=Fault("APPEND", 1, Cut(25, CLOSE)))
@example(fault=Fault("APPEND", 0, Garbage(b"", SILENT)))
@counted
def test_copying_to_a_destination_with_a_spoiled_reply_copies_each_message_once(fault):
    copy_and_check_each_copied_once(source_fault=None, destination_fault=fault)
