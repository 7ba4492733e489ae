"""A FETCH that is answered OK but not with the message asked for (issue 13, item 3): without the
body, with nothing, with another UID's data, or by sequence number. None of these is proof that
the message is gone: it is a failure, retried, unless a SEARCH in a new session cannot find it.

Real Dovecot behind the IMAP proxy, which rewrites the consumer's FETCH (command or response)
once; `drain` must still copy every message exactly once, byte for byte, and skip none.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from shared.mailbox.imap import ImapSource
from shared.mailbox.session import ImapAccount, ImapEndpoint, open_session
from tests.harness.imap_proxy import without_body
from tests.harness.mail import assert_copied_exactly, corpus_seed, expunge, read_folder, seed

BODY_FETCH = b"BODY.PEEK[]"  # the consumer's FETCH; the producer's asks for BODY.PEEK[HEADER.FIELDS ...]


def seeded_with_a_gap(server, user: str) -> list[int]:
    """Four messages, the first expunged: UIDs 2, 3, 4 at sequence numbers 1, 2, 3."""
    uids = seed(server, user, "INBOX", corpus_seed(4))
    expunge(server, user, uids[0])
    return uids[1:]


def searches_for(proxy, uid: int) -> int:
    """`UID SEARCH UID <uid>` commands sent (not the producer's `UID SEARCH UID n:*`)."""
    return sum(line.upper().endswith(b" UID SEARCH UID %d" % uid) for line in proxy.commands)


def fetch_of(uids: str) -> bytes:
    """The consumer's FETCH of the UID set `uids` ("2" for one message, "2:4" for a batch)."""
    return b"FETCH %s (BODY.PEEK[]" % uids.encode()


def arm(proxy, fault: str, uids: list[int]) -> None:
    """Spoil the answer to the batch FETCH of UIDs 2, 3, 4 for its first message, UID 2."""
    batch = f"{uids[0]}:{uids[-1]}"
    if fault == "ok-without-the-body":
        proxy.rewrite_fetch(fetch_of(batch), without_body)
    elif fault == "ok-with-no-data":
        proxy.rewrite_fetch(fetch_of(batch), lambda response: b"")
    elif fault == "another-uids-data":
        others = f"{uids[1]}:{uids[-1]}"
        proxy.rewrite_command(fetch_of(batch), lambda line: line.replace(fetch_of(batch), fetch_of(others)))
    elif fault == "by-sequence-number":
        # A server that takes UID FETCH for FETCH: sequence numbers 1 to 3 are UIDs 2 to 4 here,
        # answered without their UID items.
        proxy.rewrite_command(fetch_of(batch), lambda line: line.replace(b" UID " + fetch_of(batch), b" " + fetch_of("1:3")))
    else:
        raise ValueError(fault)


@pytest.mark.parametrize("fault", ["ok-without-the-body", "ok-with-no-data", "another-uids-data", "by-sequence-number"])
def test_a_fetch_not_answered_with_the_message_is_retried_and_every_message_copied_once(
    sync_env, dovecot_pair, imap_proxy, fault
):
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.gmail)
    setup.env["GMAIL_IMAP_PORT"] = str(proxy.port)
    user = setup.routes[0].gmail_user
    uids = seeded_with_a_gap(dovecot_pair.gmail, user)
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    assert [m.uid for m in source] == uids
    arm(proxy, fault, uids)

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout, done.stdout + done.stderr
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))
    # A failure of that message, once, retried by the queue; found by a SEARCH in a new session.
    failures = re.findall(r"route work UID (\d+) failed \(attempt (\d+)\)", done.stderr)
    assert failures == [(str(uids[0]), "1")], done.stderr
    assert searches_for(proxy, uids[0]) == 1


def test_a_message_expunged_after_it_was_queued_is_skipped_as_gone_after_a_search(sync_env, dovecot_pair, imap_proxy):
    setup = sync_env()
    proxy = imap_proxy(dovecot_pair.gmail)
    setup.env["GMAIL_IMAP_PORT"] = str(proxy.port)
    user = setup.routes[0].gmail_user
    uids = seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(3))
    assert setup.cli("scan").returncode == 0
    expunge(dovecot_pair.gmail, user, uids[1])

    done = setup.cli("consume")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 2 copied, 1 skipped (gone from the source: 1), 0 failed" in done.stdout
    assert searches_for(proxy, uids[1]) == 1
    assert_copied_exactly(
        read_folder(dovecot_pair.gmail, user, "INBOX"), read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    )


# ---- the adapter ---------------------------------------------------------------------------------
def source_at(host: str, port: int, server, user: str) -> ImapSource:
    endpoint = ImapEndpoint(host, port, ssl=True, ca_bundle=Path(server.ca_bundle_path), timeout=30)
    account = ImapAccount(f"test account {user}", user, endpoint, password=SecretStr(server.password))
    source = ImapSource(open_session(account), account)
    source.examine("INBOX")
    return source


def test_fetch_never_takes_another_messages_answer_for_the_uid_asked(dovecot_pair, imap_proxy):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("seqfetch")
    uids = seeded_with_a_gap(gmail, user)
    proxy = imap_proxy(gmail)
    source = source_at(proxy.host, proxy.port, gmail, user)
    try:
        first, second = str(uids[0]), str(uids[1])
        proxy.rewrite_command(fetch_of(first), lambda line: line.replace(b" UID FETCH ", b" FETCH "))
        assert source.fetch(uids[0]) is None  # sequence number 2 is UID 3, answered without its UID
        proxy.rewrite_command(fetch_of(first), lambda line: line.replace(fetch_of(first), fetch_of(second)))
        assert source.fetch(uids[0]) is None
        proxy.rewrite_fetch(fetch_of(first), without_body)
        assert source.fetch(uids[0]) is None
        assert source.fetch(uids[0]).body == read_folder(gmail, user, "INBOX")[0].body
    finally:
        source._client.logout()


@pytest.mark.parametrize("through", ["dovecot", "gmail-front"])
def test_has_uid_finds_a_listed_message_and_not_an_expunged_or_unassigned_one(dovecot_pair, gmail_front, through):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("hasuid")
    uids = seed(gmail, user, "INBOX", corpus_seed(3))
    expunge(gmail, user, uids[1])
    if through == "gmail-front":
        front = gmail_front(gmail)
        host, port = front.host, front.port
    else:
        host, port = gmail.host, gmail.imaps_port
    source = source_at(host, port, gmail, user)
    try:
        assert [source.has_uid(uid) for uid in (*uids, uids[-1] + 1)] == [True, False, True, False]
        assert source.fetch(uids[1]) is None
    finally:
        source._client.logout()
