"""Poison input (guarantee 9): queue bodies that are not message references, sent among good
ones, through the local `consume` command (SQLite queue) and the consumer Lambda handler (SQS
FIFO on moto's server).

Each bad body is dead-lettered at once with its reason and one log line naming its message id;
the good messages around it, in the same FIFO group before and after it, are still copied byte
for byte. A reference to a message deleted from the source is skipped as gone, not retried.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import uuid

from producer import handler as producer
from shared.queue.sqlite import SqliteQueue
from tests.harness.aws import LambdaContext, run_consumer_until_empty
from tests.harness.mail import assert_copied_exactly, connect, corpus_seed, expunge, read_folder, seed


def poison(route: str) -> list[tuple[str, str, str]]:
    """(FIFO group, body, the reason it is dead-lettered with). All but the unknown route's are
    in the route's own group, between its good messages."""
    good = {"v": 1, "route": route, "uidvalidity": 1, "uid": 1, "fingerprint": None, "size": 10}
    sns = {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:mail",
        "Message": json.dumps(good),
    }
    s3 = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"object": {"key": "k"}}}]}
    oversized = json.dumps({**good, "fingerprint": "f" * 8000})
    uid_range = "missing or not an integer from 1 to 4294967295"
    return [
        (route, "{route: " + route + "}", "queue body: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        (route, json.dumps(sns), "queue body.v: missing, not a message reference (fields: 'Type', 'MessageId', 'TopicArn', 'Message')"),
        (route, json.dumps(s3), "queue body.v: missing, not a message reference (fields: 'Records')"),
        (route, json.dumps({**good, "v": 2}), "queue body.v: 2, expected 1"),
        (route, json.dumps({**good, "v": 0}), "queue body.v: 0, expected 1"),
        (route, json.dumps({**good, "uid": "1"}), f"queue body.uid: {uid_range}"),
        (route, json.dumps({**good, "uid": -1}), f"queue body.uid: {uid_range}"),
        (route, json.dumps({**good, "uidvalidity": None}), f"queue body.uidvalidity: {uid_range}"),
        (route, json.dumps({**good, "body": "the message itself"}), "queue body: unknown field 'body'"),
        (route, oversized, f"queue body: {len(oversized)} bytes, more than 4096 bytes"),
        ("nobody", json.dumps({**good, "route": "nobody"}), "queue body.route: unknown route 'nobody'"),
    ]


def uidvalidity_of(server, user: str, folder: str = "INBOX") -> int:
    client = connect(server, user)
    try:
        return client.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"]
    finally:
        client.logout()


def stale_reference(route: str, uidvalidity: int) -> str:
    """A well-formed reference from before a UIDVALIDITY change: its UID names nothing now."""
    return json.dumps({"v": 1, "route": route, "uidvalidity": uidvalidity + 1, "uid": 1, "fingerprint": None, "size": 10})


# -- the local consumer ------------------------------------------------------------------


def put_raw(db_path: str, group: str, body: str) -> str:
    """Send a body the producer would never send: straight into the local queue's table (the
    adapter sends only MessageRefs). Returns its message id."""
    message_id = uuid.uuid4().hex
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO queue_messages (message_id, group_id, body, sent_at) VALUES (?, ?, ?, ?)",
            (message_id, group, body, time.time()),
        )
    conn.close()
    return message_id


def test_consume_quarantines_poison_and_copies_the_rest(sync_env, dovecot_pair):
    setup = sync_env()
    user, db = setup.routes[0].gmail_user, setup.env["STATE_DB"]
    messages = corpus_seed(5)
    seed(dovecot_pair.gmail, user, "INBOX", messages[:3])
    assert setup.cli("scan").returncode == 0
    first_uids = [m.uid for m in read_folder(dovecot_pair.gmail, user, "INBOX")]
    expunge(dovecot_pair.gmail, user, first_uids[1])
    uidvalidity = uidvalidity_of(dovecot_pair.gmail, user)
    bad = {put_raw(db, group, body): (body, reason) for group, body, reason in poison("work")}
    put_raw(db, "work", stale_reference("work", uidvalidity))
    seed(dovecot_pair.gmail, user, "INBOX", messages[3:])
    assert setup.cli("scan").returncode == 0

    done = setup.cli("consume")

    # Quarantined bodies count as failures of the run (exit 1), named in the summary.
    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        f"route work: 4 copied, 2 skipped (UIDVALIDITY changed to {uidvalidity} since it was queued: 1, "
        "gone from the source: 1), 0 failed" in done.stdout
    )
    assert f"{len(bad)} queue message(s) quarantined (not valid references; see the log)" in done.stdout
    assert_copied_exactly(read_folder(dovecot_pair.gmail, user, "INBOX"), read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))
    # Each bad body is in the dead letters, as sent, with its reason; nothing else is.
    dead = {letter.message_id: (letter.body, letter.reason) for letter in SqliteQueue(db).dead_letters()}
    assert dead == bad
    # One log line each, naming the message and why.
    for message_id, (_, reason) in bad.items():
        lines = [line for line in done.stderr.splitlines() if message_id in line]
        assert len(lines) == 1, lines
        assert lines[0].endswith(f"quarantined: {reason}")
    assert "Traceback" not in done.stderr
    # The skipped references are final, not retried: no failure record, nothing left queued.
    status = json.loads(setup.cli("status", "--json").stdout)
    (route,) = status["routes"]
    assert route["claims"] == {"done": 4, "skipped": 2}
    assert route["failures"] == {}
    assert (status["queue"]["queued"], status["queue"]["in_flight"], status["queue"]["dead"]) == (0, 0, len(bad))


# -- the consumer Lambda -----------------------------------------------------------------


def drain_dead_letter_queue(sqs, dlq_url: str) -> dict[str, str]:
    """Every message in the DLQ: body -> quarantine reason. Deleted as read, so a FIFO group's
    later messages come out too."""
    found = {}
    while True:
        received = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]).get("Messages", [])
        if not received:
            return found
        for message in received:
            found[message["Body"]] = message["MessageAttributes"]["quarantine_reason"]["StringValue"]
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message["ReceiptHandle"])


def test_consumer_handler_quarantines_poison_and_copies_the_rest(lambda_env, dovecot_pair, aws_client, caplog):  # noqa: F811
    setup, queue_url = lambda_env
    user = setup.routes[0].gmail_user
    sqs = aws_client("sqs")
    messages = corpus_seed(5)
    seed(dovecot_pair.gmail, user, "INBOX", messages[:3])
    producer.handler({}, LambdaContext())
    first_uids = [m.uid for m in read_folder(dovecot_pair.gmail, user, "INBOX")]
    expunge(dovecot_pair.gmail, user, first_uids[1])
    uidvalidity = uidvalidity_of(dovecot_pair.gmail, user)
    bad = {}
    for index, (group, body, reason) in enumerate([*poison("corpus")]):
        sent = sqs.send_message(QueueUrl=queue_url, MessageBody=body, MessageGroupId=group, MessageDeduplicationId=f"poison-{index}")
        bad[sent["MessageId"]] = (body, reason)
    sqs.send_message(
        QueueUrl=queue_url, MessageBody=stale_reference("corpus", uidvalidity), MessageGroupId="corpus", MessageDeduplicationId="stale"
    )
    seed(dovecot_pair.gmail, user, "INBOX", messages[3:])
    producer.handler({}, LambdaContext())

    answers = run_consumer_until_empty(sqs, queue_url)

    # Nothing handed back for a retry: quarantined and skipped messages are acknowledged.
    assert all(answer == {"batchItemFailures": []} for answer in answers)
    assert_copied_exactly(read_folder(dovecot_pair.gmail, user, "INBOX"), read_folder(dovecot_pair.outlook, setup.outlook_user, "Gmail/Corpus"))
    assert drain_dead_letter_queue(sqs, setup.env["DLQ_URL"]) == dict(bad.values())
    for message_id, (_, reason) in bad.items():
        records = [r for r in caplog.records if message_id in r.getMessage()]
        assert len(records) == 1, [r.getMessage() for r in records]
        assert records[0].levelname == "ERROR"
        assert records[0].getMessage().endswith(f"quarantined: {reason}")
    skips = sorted(m.group(1) for r in caplog.records if (m := re.search(r"route corpus UID \d+ skipped: (.*)", r.getMessage())))
    assert skips == [f"UIDVALIDITY changed to {uidvalidity} since it was queued", "gone from the source"]


def test_reference_to_a_uid_not_yet_in_use_does_not_shadow_the_message_that_gets_it(sync_env, dovecot_pair):
    """A forged (or corrupted) reference to a UID the source has not handed out yet fails instead
    of being skipped as gone: otherwise the real message that later gets that UID would be taken
    for done, and never copied."""
    setup = sync_env()
    setup.env["MAX_RECEIVE_COUNT"] = "2"
    user, db = setup.routes[0].gmail_user, setup.env["STATE_DB"]
    messages = corpus_seed(3)
    seed(dovecot_pair.gmail, user, "INBOX", messages[:2])
    assert setup.cli("scan").returncode == 0
    client = connect(dovecot_pair.gmail, user)
    try:
        status = client.folder_status("INBOX", [b"UIDVALIDITY", b"UIDNEXT"])
    finally:
        client.logout()
    uidvalidity, next_uid = status[b"UIDVALIDITY"], status[b"UIDNEXT"]
    forged = json.dumps({"v": 1, "route": "work", "uidvalidity": uidvalidity, "uid": next_uid, "fingerprint": None, "size": 10})
    put_raw(db, "work", forged)

    first = setup.cli("drain")

    assert first.returncode == 1, first.stdout + first.stderr
    (letter,) = SqliteQueue(db).dead_letters()
    assert letter.body == forged
    assert letter.reason == "max receive count 2 exceeded"
    assert f"route work: 2 copied, 0 skipped, 1 failed\n  UID {next_uid}: not in use yet in the source (UIDNEXT {next_uid})" in first.stdout
    assert "open failure records (UidNotAssigned: 1)" in setup.cli("status").stdout
    # The message that then gets the UID is copied, like every other.
    seed(dovecot_pair.gmail, user, "INBOX", messages[2:])
    assert [m.uid for m in read_folder(dovecot_pair.gmail, user, "INBOX")][-1] == next_uid

    second = setup.cli("drain")

    # Copied; the forged reference still waits in the dead letters, so the run is not all well.
    assert second.returncode == 1, second.stdout + second.stderr
    assert "route work: 1 copied, 0 skipped, 0 failed\n1 message(s) in the dead letters" in second.stdout
    assert_copied_exactly(read_folder(dovecot_pair.gmail, user, "INBOX"), read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))
