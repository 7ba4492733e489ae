"""`Copier.copy_message`, one branch at a time, on fakes: what lands in the destination, what
the claim says in state, and what the queue is told (the result).

The state store is a real SqliteStateStore on tmp_path and a fake clock; the mailboxes are
tests.fakes. Each test says what a user would check: the bytes in the destination folder, how
many copies, the claim's status and reason, the failure record.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils as email_utils
import math
import threading
from dataclasses import replace

import pytest

from shared.errors import StateStoreUnavailable
from shared.message_ref import MessageRef
from shared.pipeline.copier import (
    STOPPED_HOLDER_WAIT_SECONDS,
    THROTTLE_MARGIN_SECONDS,
    CopyResult,
    Outcome,
    lease_for,
    throttled_visibility,
)
from shared.queue.port import MAX_VISIBILITY_SECONDS
from shared.redaction import register_secret
from shared.state import ClaimOutcome, ClaimStatus, HolderState
from tests.fakes import ConnectionLost, FakeWorld, email
from tests.fakes.world import LEASE_SECONDS
from tests.harness.mail import wait_for


@pytest.fixture
def world(tmp_path):
    world = FakeWorld.build(tmp_path)
    yield world
    world.close()


def crashed_mid_append(world: FakeWorld, ref: MessageRef, *, landed: bool, floor_recorded: bool = True) -> None:
    """Another process claimed `ref`, marked it appending with where its APPEND would land (as the
    copier does; `floor_recorded=False`: as an earlier version did, without) and died, its APPEND
    landed or not; then its lease ran out."""
    folder = world.routes[ref.route].outlook_folder
    world.destination.create_folder(folder)
    floor = world.destination.folders[folder]
    world.state.inner.claim_uid(ref.key, "crashed", world.clock() + LEASE_SECONDS)
    if floor_recorded:
        world.state.inner.mark_appending(
            ref.key, "crashed", dest_uidvalidity=floor.uidvalidity, dest_uid_floor=floor.uidnext
        )
    else:
        world.state.inner.mark_appending(ref.key, "crashed")
    if landed:
        source = world.source_of(ref.route)
        message = source.message(world.routes[ref.route].gmail_folder, ref.uid).as_source_message()
        world.destination.append(folder, message)
    world.clock.advance(LEASE_SECONDS + 1)


def as_exchange_serves(stored: bytes) -> bytes:
    """Headers as Exchange Online serves a message it stored: rebuilt from its properties, so in
    another order, Date in UTC, the display name unquoted, the subject RFC 2047 encoded, headers of
    its own added; the body is not looked at here."""
    block, _, body = stored.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in block.split(b"\r\n"))
    date = email_utils.parsedate_to_datetime(fields[b"Date"].decode()) if b"Date" in fields else None
    subject = base64.b64encode(fields.get(b"Subject", b"")).decode()
    lines = [
        b"Received: from BN8PR01MB1234.prod.outlook.com; " + b"Mon, 6 May 2024 11:08:09 +0000",
        b"Subject: =?utf-8?B?" + subject.encode() + b"?=",
        b"From: " + fields[b"From"].replace(b'"', b""),
        b"Message-ID: " + fields.get(b"Message-ID", b"<DM6PR01MB5555.added@outlook.com>"),
    ]
    if date is not None:
        lines.append(b"Date: " + email_utils.format_datetime(date.astimezone(dt.timezone.utc)).encode())
    lines.append(b"X-MS-Exchange-Organization-AuthAs: Internal")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- copied --------------------------------------------------------------------------------------


def test_a_new_message_is_copied_byte_for_byte_with_flags_and_date_and_recorded_done(world):
    body = email("Quarterly report", body="Numbers\r\n\r\n-- \r\nAlice")
    ref = world.arrive("work", body, flags=("\\Seen", "\\Flagged", "$Important", "\\Recent"))

    result = world.copier().copy_message(ref)

    [copy] = world.destination.messages("Work")
    assert result == CopyResult(Outcome.COPIED, ref.key, "", dest_uid=copy.uid)
    assert copy.body == body
    assert copy.flags == ("\\Seen", "\\Flagged", "$Important")  # \Recent belongs to a session
    assert copy.internaldate == world.source_of("work").message("INBOX", ref.uid).internaldate
    # What -v and the metrics say of it.
    assert (result.size, result.internaldate) == (len(body), copy.internaldate)
    assert result.elapsed_ms is not None and result.elapsed_ms >= 0
    claim = world.claim(ref)
    assert (claim.status, claim.dest_uid, claim.fingerprint, claim.owner) == (
        ClaimStatus.DONE, copy.uid, ref.fingerprint, "consumer-1"
    )
    assert world.state.inner.find_copied(ref.fingerprint, ["work"]).uid == ref.uid
    assert world.failure(ref) is None


def test_the_destination_folder_is_created_when_missing(world):
    ref = world.arrive("news")
    assert "News" not in world.destination.folders

    assert world.copier().copy_message(ref).outcome is Outcome.COPIED

    assert len(world.destination.bodies("News")) == 1


def test_a_destination_without_uidplus_still_copies_and_records_no_destination_uid(world):
    world.destination.uidplus = False
    ref = world.arrive("work")

    result = world.copier().copy_message(ref)

    assert (result.outcome, result.dest_uid, world.claim(ref).dest_uid) == (Outcome.COPIED, None, None)
    assert len(world.destination.bodies("Work")) == 1


# -- final already -------------------------------------------------------------------------------


def test_a_redelivered_copied_message_is_acknowledged_without_touching_the_mailboxes(world):
    ref = world.arrive("work")
    world.copier().copy_message(ref)
    fetches, appends = len(world.source_of("work").calls_to("fetch")), world.destination.appends

    again = world.copier("consumer-2").copy_message(ref)

    assert again == CopyResult(Outcome.ALREADY_DONE, ref.key, "")
    assert len(world.destination.bodies("Work")) == 1
    assert (len(world.source_of("work").calls_to("fetch")), world.destination.appends) == (fetches, appends)


def test_a_redelivered_skipped_message_is_acknowledged_with_its_reason(world):
    ref = world.arrive("work")
    world.source_of("work").expunge("INBOX", ref.uid)
    world.copier().copy_message(ref)

    again = world.copier().copy_message(ref)

    assert again == CopyResult(Outcome.ALREADY_DONE, ref.key, "gone from the source")


# -- busy ----------------------------------------------------------------------------------------


def test_a_message_claimed_by_another_live_owner_is_busy_until_its_lease_ends(world):
    ref = world.arrive("work")
    holder_lease = world.clock() + 25
    world.state.inner.claim_uid(ref.key, "consumer-2", holder_lease)

    result = world.copier().copy_message(ref)

    assert result == CopyResult(Outcome.BUSY, ref.key, "claimed by consumer-2", busy_until=holder_lease)
    assert not result.outcome.acknowledged
    assert world.source_of("work").calls_to("fetch") == [] and world.destination.appends == 0
    claim = world.claim(ref)
    assert (claim.owner, claim.lease_until, claim.status) == ("consumer-2", holder_lease, ClaimStatus.IN_PROGRESS)


def test_a_holder_alive_past_its_lease_keeps_its_claim_and_a_holder_gone_loses_it_at_once(world):
    """A drain stopped mid-APPEND (SIGSTOP) may still land its copy: its claim is not taken over,
    lease or not. One that is gone (crashed) is taken over without waiting out its lease."""
    stopped, crashed = world.arrive("work"), world.arrive("home")
    world.state.inner.claim_uid(stopped.key, "stopped", world.clock() + LEASE_SECONDS)
    world.state.inner.mark_appending(stopped.key, "stopped")
    states = {"stopped": HolderState.ALIVE, "crashed": HolderState.GONE}
    copier = replace(world.copier(), holder_state=lambda owner: states.get(owner, HolderState.UNKNOWN))
    world.clock.advance(LEASE_SECONDS + 1)
    world.state.inner.claim_uid(crashed.key, "crashed", world.clock() + LEASE_SECONDS)

    held = copier.copy_message(stopped)

    assert held.outcome is Outcome.BUSY and held.detail.startswith("held by stopped, alive past its lease (stopped?)")
    assert held.busy_until == world.clock() + STOPPED_HOLDER_WAIT_SECONDS
    assert world.claim(stopped).owner == "stopped" and world.destination.appends == 0
    # Its lease is live, but its holder is gone: taken over at once.
    assert copier.copy_message(crashed).outcome is Outcome.COPIED


def test_a_claim_whose_holder_died_before_appending_is_taken_over_and_copied(world):
    ref = world.arrive("work")
    world.state.inner.claim_uid(ref.key, "crashed", world.clock() + LEASE_SECONDS)
    world.clock.advance(LEASE_SECONDS + 1)

    result = world.copier().copy_message(ref)

    assert result.outcome is Outcome.COPIED
    assert world.destination.calls_to("find_copies") == []  # it never appended: nothing to look for
    assert len(world.destination.bodies("Work")) == 1
    claim = world.claim(ref)
    assert (claim.status, claim.owner, claim.attempts) == (ClaimStatus.DONE, "consumer-1", 2)


# -- duplicates ----------------------------------------------------------------------------------


def test_a_message_copied_through_another_route_into_the_same_folder_is_skipped_as_duplicate(world):
    body = email("Sent to both")
    first = world.arrive("home", body, gmail_msgid=4242)
    world.copier().copy_message(first)
    twin = world.arrive("work", body, gmail_msgid=4242)
    assert twin.fingerprint == first.fingerprint == "gm:4242"

    result = world.copier().copy_message(twin)

    reason = f"duplicate of route home UID {first.uid}"
    assert result == CopyResult(Outcome.SKIPPED, twin.key, reason)
    assert world.destination.bodies("Work") == [body]
    assert world.source_of("work").calls_to("fetch") == []  # decided before fetching
    claim = world.claim(twin)
    assert (claim.status, claim.reason) == (ClaimStatus.SKIPPED, reason)
    assert world.state.inner.route_counts("work").skipped_reasons == {reason: 1}


def test_the_same_message_routed_into_another_folder_is_not_a_duplicate(world):
    body = email("Also a newsletter")
    world.copier().copy_message(world.arrive("work", body, gmail_msgid=7))
    news = world.arrive("news", body, gmail_msgid=7)

    assert world.copier().copy_message(news).outcome is Outcome.COPIED

    assert world.destination.bodies("News") == [body]


# -- the source changed --------------------------------------------------------------------------


def test_a_reference_from_before_a_uidvalidity_change_is_skipped_naming_the_new_one(world):
    ref = world.arrive("work")
    world.source_of("work").renumber("INBOX", uidvalidity=9999)

    result = world.copier().copy_message(ref)

    reason = "UIDVALIDITY changed to 9999 since it was queued"
    assert result == CopyResult(Outcome.SKIPPED, ref.key, reason)
    assert world.source_of("work").calls_to("fetch") == []  # the UID names another message now
    assert world.destination.bodies("Work") == []
    assert (world.claim(ref).status, world.claim(ref).reason) == (ClaimStatus.SKIPPED, reason)


def test_a_message_deleted_from_the_source_is_skipped_as_gone_once_a_new_session_cannot_find_it(world):
    ref = world.arrive("work")
    world.source_of("work").expunge("INBOX", ref.uid)

    result = world.copier().copy_message(ref)

    assert result == CopyResult(Outcome.SKIPPED, ref.key, "gone from the source")
    assert world.destination.bodies("Work") == []
    assert (world.claim(ref).status, world.claim(ref).reason) == (ClaimStatus.SKIPPED, "gone from the source")
    # Looked for (UID SEARCH) in a session opened after the FETCH, not in the one that fetched.
    assert world.source_of("work").calls_to("has_uid") == [("has_uid", ref.uid)]
    assert world.mailboxes.sources_opened == ["work", "work"]
    assert world.failure(ref) is None


def test_a_listed_message_another_session_expunged_is_skipped_as_gone_after_a_fresh_look(world):
    # Dovecot answers "BODY[] NIL" to a session that still lists a message expunged elsewhere.
    ref = world.arrive("work")
    source = world.source_of("work")
    source.before_next("fetch", lambda: source.expunge("INBOX", ref.uid))
    source.fetch_answers_without_body()

    assert world.copier().copy_message(ref) == CopyResult(Outcome.SKIPPED, ref.key, "gone from the source")
    assert source.calls_to("has_uid") == [("has_uid", ref.uid)]


def test_a_fetch_answered_ok_without_the_body_fails_and_the_retry_copies_the_message(world):
    ref = world.arrive("work")
    source = world.source_of("work")
    source.fetch_answers_without_body()

    failed = world.copier().copy_message(ref)

    # Still there (a new session's SEARCH finds it): a failure for the queue to retry, not "gone".
    assert failed.outcome is Outcome.FAILED, failed
    assert "without the message" in failed.detail and f"UID {ref.uid}" in failed.detail
    claim = world.claim(ref)
    assert (claim.status, claim.owner, claim.reason) == (ClaimStatus.FAILED, None, None)  # not final
    assert world.failure(ref).attempts == 1
    assert world.destination.bodies("Work") == []
    assert source.calls_to("has_uid") == [("has_uid", ref.uid)]
    assert world.mailboxes.sources_opened[:2] == ["work", "work"]  # the SEARCH ran in a new session

    again = world.copier().copy_message(ref)

    assert again.outcome is Outcome.COPIED
    assert world.destination.bodies("Work") == [source.message("INBOX", ref.uid).body]
    assert world.failure(ref) is None


def test_a_fetch_answered_with_another_uids_message_never_copies_that_body_as_this_one(world):
    first, second = world.arrive("work"), world.arrive("work")
    source = world.source_of("work")
    source.fetch_answers_with("INBOX", second.uid)

    failed = world.copier().copy_message(first)

    assert failed.outcome is Outcome.FAILED, failed
    assert world.destination.bodies("Work") == []
    assert world.claim(first).status is ClaimStatus.FAILED
    # Each is then copied once, with its own bytes.
    assert world.copier().copy_message(first).outcome is Outcome.COPIED
    assert world.copier().copy_message(second).outcome is Outcome.COPIED
    assert world.destination.bodies("Work") == [source.message("INBOX", uid).body for uid in (first.uid, second.uid)]


def test_another_uids_message_in_the_answer_of_an_expunged_one_is_not_copied_and_it_is_gone(world):
    gone, other = world.arrive("work"), world.arrive("work")
    source = world.source_of("work")
    source.expunge("INBOX", gone.uid)
    source.fetch_answers_with("INBOX", other.uid)

    assert world.copier().copy_message(gone) == CopyResult(Outcome.SKIPPED, gone.key, "gone from the source")
    assert world.destination.bodies("Work") == []


def test_a_throttle_met_while_looking_for_a_message_again_pauses_the_source(world):
    ref = world.arrive("work")
    source = world.source_of("work")
    source.fetch_answers_without_body()
    source.throttle_next("has_uid", retry_after=60)

    result = world.copier().copy_message(ref)

    assert (result.outcome, result.retry_after) == (Outcome.PAUSED, 60)
    account = world.routes["work"].gmail_user
    assert [pause.name for pause in world.state.inner.pauses()] == [f"source {account}"] == [result.paused_by]
    assert world.failure(ref) is None


def test_a_uid_the_source_has_not_assigned_yet_fails_instead_of_being_skipped(world):
    world.arrive("work")
    uidnext = world.source_of("work").folder("INBOX").uidnext
    forged = MessageRef("work", world.source_of("work").folder("INBOX").uidvalidity, uidnext)

    result = world.copier().copy_message(forged)

    assert result.outcome is Outcome.FAILED
    assert result.detail == f"not in use yet in the source (UIDNEXT {uidnext})"
    claim = world.claim(forged)
    assert (claim.status, claim.owner, claim.lease_until) == (ClaimStatus.FAILED, None, 0)  # not final
    failure = world.failure(forged)
    assert (failure.error_class, failure.attempts) == ("UidNotAssigned", 1)
    assert world.mailboxes.sources_opened == ["work", "work"]  # a fresh session saw a fresh UIDNEXT

    # The message that then gets the UID is copied like any other.
    arrived = world.arrive("work")
    assert arrived.uid == uidnext
    assert world.copier().copy_message(forged).outcome is Outcome.COPIED
    assert world.destination.bodies("Work") == [world.source_of("work").message("INBOX", uidnext).body]


def test_a_message_that_arrived_and_went_after_the_session_opened_is_skipped_as_gone_by_a_fresh_look(world):
    # The session's UIDNEXT is from its EXAMINE: a UID above it cannot be told from one never
    # assigned until a fresh session looks, which it does before anything is skipped.
    world.copier().copy_message(world.arrive("work"))
    late = world.arrive("work")
    world.source_of("work").expunge("INBOX", late.uid)

    result = world.copier().copy_message(late)

    assert (result.outcome, result.detail) == (Outcome.SKIPPED, "gone from the source")
    assert world.mailboxes.sources_opened == ["work", "work"]


# -- an interrupted APPEND -----------------------------------------------------------------------


def test_an_interrupted_append_that_landed_is_found_in_the_destination_and_not_appended_again(world):
    ref = world.arrive("work", flags=("\\Seen",))
    crashed_mid_append(world, ref, landed=True)
    [landed] = world.destination.messages("Work")
    appends = world.destination.appends

    result = world.copier().copy_message(ref)

    assert result == CopyResult(
        Outcome.COPIED, ref.key, "found in the destination after an interrupted APPEND", dest_uid=landed.uid
    )
    assert world.destination.appends == appends
    assert world.destination.messages("Work") == [landed]
    claim = world.claim(ref)
    assert (claim.status, claim.dest_uid, claim.attempts) == (ClaimStatus.DONE, landed.uid, 2)


def test_an_interrupted_append_that_did_not_land_is_appended_once(world):
    ref = world.arrive("work")
    crashed_mid_append(world, ref, landed=False)

    result = world.copier().copy_message(ref)

    assert (result.outcome, result.detail) == (Outcome.COPIED, "")
    assert len(world.destination.calls_to("find_copies")) == 1  # looked first
    assert world.destination.appends == 1
    assert world.destination.bodies("Work") == [world.source_of("work").message("INBOX", ref.uid).body]
    assert world.claim(ref).status is ClaimStatus.DONE


def test_an_interrupted_append_is_found_though_the_destination_serves_other_bytes(world):
    """Exchange stores no MIME: what it serves of the copy is not what was appended. The copy is
    found by INTERNALDATE and identity at or above where the APPEND was to land."""
    world.destination.served = as_exchange_serves
    body = email("Invoice 2024-05", extra_headers=["Date: Mon, 6 May 2024 07:08:09 -0400"])
    ref = world.arrive("work", body)
    crashed_mid_append(world, ref, landed=True)
    [landed] = world.destination.messages("Work")

    result = world.copier().copy_message(ref)

    assert (result.outcome, result.dest_uid) == (Outcome.COPIED, landed.uid)
    assert result.detail == "found in the destination after an interrupted APPEND"
    assert world.destination.appends == 1  # the crashed one only
    assert world.destination.bodies("Work") == [body]


def test_a_claim_records_where_its_append_lands_before_the_append(world):
    world.destination.create_folder("Work")
    for subject in ("one", "two", "three"):  # UIDs 1 to 3 are taken
        earlier = world.arrive("work", email(subject))
        world.destination.append("Work", world.source_of("work").message("INBOX", earlier.uid).as_source_message())
    ref = world.arrive("work", email("four"))
    seen = []
    world.destination.before_next("append", lambda: seen.append(world.claim(ref)))

    world.copier().copy_message(ref)

    [claim] = seen
    assert (claim.status, claim.dest_uidvalidity, claim.dest_uid_floor) == (
        ClaimStatus.APPENDING, world.destination.folders["Work"].uidvalidity, 4
    )
    assert world.claim(ref).dest_uid == 4


def test_a_message_another_consumer_appended_meanwhile_is_not_taken_for_the_copy(world):
    """Same INTERNALDATE, same folder, above the floor: told apart by its identity."""
    ref = world.arrive("work", email("ours"))
    crashed_mid_append(world, ref, landed=False)
    theirs = world.source_of("home").message("INBOX", world.arrive("home", email("theirs")).uid).as_source_message()
    world.destination.append("Work", theirs)

    result = world.copier().copy_message(ref)

    assert (result.outcome, result.detail) == (Outcome.COPIED, "")
    assert sorted(world.destination.bodies("Work")) == sorted([theirs.body, email("ours")])


def test_a_message_sharing_its_message_id_is_not_taken_for_the_copy(world):
    ref = world.arrive("work", email("the original", message_id="<same@mail.test>"))
    crashed_mid_append(world, ref, landed=False)
    other = email("a resend", message_id="<same@mail.test>")
    theirs = world.source_of("home").message("INBOX", world.arrive("home", other).uid).as_source_message()
    world.destination.append("Work", theirs)

    assert world.copier().copy_message(ref).detail == ""  # appended, not "found"
    assert len(world.destination.bodies("Work")) == 2


def test_an_interrupted_append_recorded_without_a_floor_is_still_found(world):
    """A claim left APPENDING by an earlier version has no floor: the whole folder is looked at."""
    ref = world.arrive("work")
    crashed_mid_append(world, ref, landed=True, floor_recorded=False)

    result = world.copier().copy_message(ref)

    assert result.detail == "found in the destination after an interrupted APPEND"
    assert len(world.destination.bodies("Work")) == 1
    [(_, (_, _, since))] = world.destination.calls_to("find_copies")
    assert since is None


# -- refusals and throttles ----------------------------------------------------------------------


def test_a_permanent_refusal_is_skipped_with_its_reason_and_not_retried(world):
    ref = world.arrive("work")
    world.destination.refuse_next_append("too large for the destination", permanent=True)

    result = world.copier().copy_message(ref)

    assert result == CopyResult(Outcome.SKIPPED, ref.key, "too large for the destination")
    assert result.outcome.acknowledged
    claim = world.claim(ref)
    assert (claim.status, claim.reason) == (ClaimStatus.SKIPPED, "too large for the destination")
    assert world.failure(ref) is None
    assert world.destination.bodies("Work") == []
    assert world.copier().copy_message(ref).outcome is Outcome.ALREADY_DONE


def test_a_transient_refusal_fails_and_releases_the_claim_for_a_plain_retry(world):
    ref = world.arrive("work")
    world.destination.refuse_next_append("refused for now by the destination: [UNAVAILABLE] try later", permanent=False)

    result = world.copier().copy_message(ref)

    assert result.outcome is Outcome.FAILED and result.retry_after is None
    assert "[UNAVAILABLE] try later" in result.detail
    claim = world.claim(ref)
    # FAILED, not APPENDING: a refusal means the APPEND did not land (append_outcome_unknown False).
    assert (claim.status, claim.owner, claim.lease_until) == (ClaimStatus.FAILED, None, 0)
    failure = world.failure(ref)
    assert (failure.error_class, failure.attempts) == ("AppendRejected", 1)
    assert "[UNAVAILABLE]" in failure.error_text
    # A refusal is an answer, not a broken session: both are kept.
    assert (world.mailboxes.destination_drops, world.mailboxes.source_drops["work"]) == (0, 0)

    # The retry appends without looking in the destination first, and once.
    assert world.copier().copy_message(ref).outcome is Outcome.COPIED
    assert world.destination.calls_to("find_copies") == []
    assert len(world.destination.bodies("Work")) == 1
    assert world.failure(ref) is None  # finalize clears it


def test_a_throttled_append_pauses_the_destination_and_spends_no_attempt(world):
    ref = world.arrive("work")
    world.destination.refuse_next_append(
        "throttled by the destination (suggested backoff 2500 ms)", permanent=False, retry_after=2.5
    )

    result = world.copier().copy_message(ref)

    assert (result.outcome, result.retry_after, result.paused_by) == (Outcome.PAUSED, 2.5, "destination")
    assert result.detail.startswith("destination paused until ") and "suggested backoff 2500 ms" in result.detail
    assert throttled_visibility(result) == 4  # ceil(2.5) + 1: never received a moment early
    assert world.claim(ref).status is ClaimStatus.FAILED  # released: a refusal, nothing landed
    assert world.failure(ref) is None  # not a failure of its own
    pause = world.state.inner.read_pause("destination")
    assert pause.until == world.clock() + 2.5
    assert world.destination.bodies("Work") == []


def test_a_throttled_fetch_pauses_the_source_account_and_drops_the_sessions(world):
    # Gmail's bandwidth limit comes as MailboxThrottled from the source, not as a refusal.
    ref = world.arrive("work")
    world.source_of("work").throttle_next("fetch", retry_after=60)

    result = world.copier().copy_message(ref)

    assert (result.outcome, result.retry_after, throttled_visibility(result)) == (Outcome.PAUSED, 60, 61)
    assert world.claim(ref).status is ClaimStatus.FAILED  # nothing was appended
    assert world.failure(ref) is None
    account = world.routes["work"].gmail_user
    assert [pause.name for pause in world.state.inner.pauses()] == [f"source {account}"]
    assert world.mailboxes.source_drops["work"] == 1


def test_a_throttle_raised_by_the_destination_session_pauses_it_with_its_wait(world):
    ref = world.arrive("work")
    world.destination.throttle_next("append", retry_after=0.2)

    result = world.copier().copy_message(ref)

    assert (result.outcome, throttled_visibility(result)) == (Outcome.PAUSED, 2)
    assert result.retry_after == pytest.approx(0.2)
    assert world.state.inner.read_pause("destination") is not None


def test_while_the_destination_is_paused_no_route_sends_it_anything(world):
    """Outlook's throttle is the mailbox's budget: the other routes into it wait too, without
    a claim or a download, and go on once the pause has run out."""
    first, other = world.arrive("work"), world.arrive("news")
    world.destination.refuse_next_append("throttled by the destination", permanent=False, retry_after=300)
    copier = world.copier()
    assert copier.copy_message(first).outcome is Outcome.PAUSED
    fetches = len(world.source_of("news").calls_to("fetch"))

    waiting = copier.copy_message(other)
    elsewhere = world.copier("consumer-2").copy_message(other)  # another process reads the pause

    for result in (waiting, elsewhere):
        assert (result.outcome, result.retry_after) == (Outcome.PAUSED, 300)
    assert world.claim(other) is None and len(world.source_of("news").calls_to("fetch")) == fetches
    assert world.destination.appends == 1
    world.clock.advance(301)
    assert copier.copy_message(other).outcome is Outcome.COPIED
    assert copier.copy_message(first).outcome is Outcome.COPIED


@pytest.mark.parametrize(
    ("retry_after", "visibility"),
    [(None, None), (0, 1), (0.001, 2), (2.0, 3), (2.5, 4), (10**9, MAX_VISIBILITY_SECONDS)],
)
def test_throttled_visibility_is_the_wait_rounded_up_plus_a_margin_within_the_queues_limit(retry_after, visibility):
    result = CopyResult(Outcome.FAILED, retry_after=retry_after)
    assert throttled_visibility(result) == visibility
    if retry_after is not None and visibility < MAX_VISIBILITY_SECONDS:
        assert visibility == math.ceil(retry_after) + THROTTLE_MARGIN_SECONDS


# -- a slow APPEND -------------------------------------------------------------------------------


def test_the_lease_is_renewed_while_a_slow_append_runs_so_no_one_takes_the_claim_over(world):
    ref = world.arrive("work")
    gate = world.destination.block_next_append()
    results: list[CopyResult] = []
    copying = threading.Thread(target=lambda: results.append(world.copier().copy_message(ref)))
    copying.start()
    try:
        gate.wait_until_started()
        first_lease = world.claim(ref).lease_until
        assert first_lease == world.clock() + LEASE_SECONDS
        # Far past the lease taken at the start: without renewal the claim would be free now.
        world.clock.advance(3 * LEASE_SECONDS)
        wait_for(
            lambda: world.claim(ref).lease_until > world.clock(), timeout=5, what="the lease to be renewed"
        )
        renewed = world.claim(ref)
        assert renewed.lease_until == world.clock() + LEASE_SECONDS
        assert (renewed.status, renewed.owner) == (ClaimStatus.APPENDING, "consumer-1")
        # Another consumer gets the message meanwhile (a redelivery): it must wait, not append.
        other = world.copier("consumer-2").copy_message(ref)
        assert (other.outcome, other.busy_until) == (Outcome.BUSY, renewed.lease_until)
    finally:
        gate.release()
        copying.join(timeout=10)
    assert not copying.is_alive()
    assert [result.outcome for result in results] == [Outcome.COPIED]
    assert len(world.destination.bodies("Work")) == 1
    assert world.destination.appends == 1


# -- the state store is down ---------------------------------------------------------------------


def test_a_state_store_down_at_the_claim_propagates_and_nothing_is_read_or_written(world):
    ref = world.arrive("work")
    world.state.fail("claim_uid")

    with pytest.raises(StateStoreUnavailable, match="claim_uid"):
        world.copier().copy_message(ref)

    assert world.source_of("work").calls == [] and world.destination.calls == []
    assert world.mailboxes.sources_opened == []


def test_a_state_store_lost_after_the_append_propagates_and_the_retry_finds_the_copy(world):
    ref = world.arrive("work")
    world.state.fail("finalize", times=1)

    with pytest.raises(StateStoreUnavailable):
        world.copier().copy_message(ref)

    # Not recorded as a failure of the message (the store is down); the claim stays appending,
    # so whoever takes it over when the lease ends looks in the destination first.
    assert world.state.calls_to("record_failure") == 0
    claim = world.claim(ref)
    assert (claim.status, claim.owner) == (ClaimStatus.APPENDING, "consumer-1")
    world.clock.advance(LEASE_SECONDS + 1)
    result = world.copier("consumer-2").copy_message(ref)
    assert (result.outcome, result.detail) == (Outcome.COPIED, "found in the destination after an interrupted APPEND")
    assert len(world.destination.bodies("Work")) == 1


# -- a lost connection ---------------------------------------------------------------------------


def test_a_connection_lost_mid_append_after_it_landed_is_resolved_by_the_next_attempt_without_a_second_copy(world):
    ref = world.arrive("work")
    world.destination.lose_connection_in_next_append(landed=True)

    failed = world.copier().copy_message(ref)

    assert (failed.outcome, failed.retry_after) == (Outcome.FAILED, None)
    assert "connection lost during APPEND" in failed.detail
    claim = world.claim(ref)
    # Outcome unknown: released, but still appending, so the next attempt looks first.
    assert (claim.status, claim.owner, claim.lease_until) == (ClaimStatus.APPENDING, None, 0)
    assert world.failure(ref).error_class == "ConnectionLost"
    assert (world.mailboxes.destination_drops, world.mailboxes.source_drops["work"]) == (1, 1)

    again = world.copier().copy_message(ref)

    assert (again.outcome, again.detail) == (Outcome.COPIED, "found in the destination after an interrupted APPEND")
    assert world.destination.appends == 1
    assert len(world.destination.bodies("Work")) == 1
    assert world.mailboxes.destinations_opened == 2  # a new session after the drop


def test_a_connection_lost_mid_append_before_it_landed_is_appended_once_by_the_next_attempt(world):
    ref = world.arrive("work")
    world.destination.lose_connection_in_next_append(landed=False)

    assert world.copier().copy_message(ref).outcome is Outcome.FAILED
    assert world.claim(ref).status is ClaimStatus.APPENDING

    assert world.copier().copy_message(ref).outcome is Outcome.COPIED
    assert len(world.destination.calls_to("find_copies")) == 1
    assert world.destination.appends == 2
    assert len(world.destination.bodies("Work")) == 1


def test_a_connection_lost_before_the_append_releases_the_claim_as_failed(world):
    ref = world.arrive("work")
    world.source_of("work").fail_next("fetch", ConnectionLost("source: connection lost during FETCH"))

    result = world.copier().copy_message(ref)

    assert result.outcome is Outcome.FAILED
    assert world.claim(ref).status is ClaimStatus.FAILED  # no APPEND was sent: nothing to look for
    assert world.mailboxes.source_drops["work"] == 1
    assert world.copier().copy_message(ref).outcome is Outcome.COPIED
    assert world.destination.calls_to("find_copies") == []


def test_a_failure_text_is_scrubbed_of_secrets_before_it_is_stored(world):
    secret = "tok-3f9a1c7e5b2d"  # an access token an error text might echo
    register_secret(secret)
    ref = world.arrive("work")
    world.source_of("work").fail_next("fetch", ConnectionLost(f"source: lost while using {secret}"))

    result = world.copier().copy_message(ref)

    assert secret not in result.detail and "[REDACTED]" in result.detail
    assert secret not in world.failure(ref).error_text


def test_lease_for_counts_from_the_clock_at_each_call(world):
    lease_until = lease_for(30, world.clock)
    first = lease_until()
    world.clock.advance(5)
    assert (first, lease_until()) == (world.clock() - 5 + 30, world.clock() + 30)


# -- found bugs ----------------------------------------------------------------------------------


def test_a_claim_taken_over_during_a_slow_fetch_gives_a_result_instead_of_ending_the_batch(world):
    ref = world.arrive("work")

    def fetch_outlasts_the_lease() -> None:
        world.clock.advance(LEASE_SECONDS + 1)
        assert world.state.inner.claim_uid(ref.key, "consumer-2", world.clock() + LEASE_SECONDS).outcome is (
            ClaimOutcome.CLAIMED
        )

    world.source_of("work").before_next("fetch", fetch_outlasts_the_lease)

    result = world.copier().copy_message(ref)

    # Busy until the new owner's lease ends, as if it had held the claim from the start.
    assert (result.outcome, result.busy_until) == (Outcome.BUSY, world.clock() + LEASE_SECONDS)
    assert "is not held by" in result.detail
    assert world.destination.bodies("Work") == []
    claim = world.claim(ref)
    assert (claim.owner, claim.status) == ("consumer-2", ClaimStatus.IN_PROGRESS)  # left to its new owner
    assert world.failure(ref) is None  # nothing failed: no failure is recorded against its claim


@pytest.mark.parametrize("landed", [True, False], ids=["it landed", "it did not land"])
@pytest.mark.parametrize("gmail_msgid", [77, None], ids=["X-GM-MSGID", "Message-ID hash"])
def test_an_interrupted_append_followed_by_a_uidvalidity_change_is_copied_exactly_once(world, landed, gmail_msgid):
    ref = world.arrive("work", gmail_msgid=gmail_msgid)
    crashed_mid_append(world, ref, landed=landed)
    new_uids = world.source_of("work").renumber("INBOX")

    stale = world.copier().copy_message(ref)  # its UID names another message now
    again = world.copier().copy_message(world.ref("work", new_uids[ref.uid]))  # the producer's rescan

    assert stale.outcome is Outcome.SKIPPED and "interrupted APPEND is looked for" in stale.detail
    assert again.outcome is Outcome.COPIED
    assert again.detail == ("found in the destination after an interrupted APPEND" if landed else "")
    assert world.destination.bodies("Work") == [world.source_of("work").message("INBOX", new_uids[ref.uid]).body]
    assert world.destination.appends == 1
    # Resolved: a third look at the fingerprint sees a plain copy.
    third = world.arrive("home", world.source_of("work").message("INBOX", new_uids[ref.uid]).body, gmail_msgid=gmail_msgid)
    assert world.copier().copy_message(third).outcome is Outcome.SKIPPED
