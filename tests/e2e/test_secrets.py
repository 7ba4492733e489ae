"""Secrets never leak (guarantee 8): every command and both Lambda handlers, run with known fake
secrets at LOG_LEVEL=DEBUG, on the happy path and where a leak is likeliest (a refused refresh
token, a wrong password, a destination refusing the login, bad settings next to a token, the
state store unreachable, an internal error). No secret may appear in what a person or a log
can read: stdout and stderr, log records of every logger, exception texts and tracebacks, the
state (every SQLite row and the file bytes, the DynamoDB table), the queues (SQLite rows and
dead letters, the SQS queue and its DLQ).

One place holds a secret by design: the local state's `tokens` table keeps Microsoft's newest
rotated refresh token when the configured one came from the environment (issue 6). Its column
is left out of the row check, and rotated tokens out of the file-bytes check.

The secrets: the refresh tokens (rotated ones too) and access tokens the OAuth stand-in issued,
the Gmail app password of a password route, MS_CLIENT_SECRET, GMAIL_CLIENT_SECRET, and the
token-like strings put into bad settings.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import subprocess
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from consumer import handler as consumer
from producer import handler as producer
from shared import bootstrap
from shared.logs import LIBRARY_LOGGERS
from shared.queue.sqs import create_fifo_queue_pair
from shared.state.dynamodb import create_state_table
from tests.harness.aws import LambdaContext, cold_start, run_consumer_until_empty, unique_name
from tests.harness.mail import corpus_seed, read_folder, seed


def token_like() -> str:
    """A string shaped like a refresh token, for the places a user might paste one by mistake."""
    return f"1//0g-{secrets.token_urlsafe(24)}"


def leaks(places: dict[str, str | bytes], known: list[str]) -> list[str]:
    """'place: secret' for every secret found in a place (bytes are searched as UTF-8)."""
    found = []
    for place, text in places.items():
        for secret in set(known):
            needle = secret.encode() if isinstance(text, bytes) else secret
            if needle in text:
                found.append(f"{place}: {secret}")
    return sorted(found)


def state_files(directory: Path) -> dict[str, bytes]:
    """Every file of the SQLite state (the database, its WAL and shared memory): state, queue
    rows and dead letters, as the bytes on disk."""
    return {f"file {path.name}": path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def state_rows(db: Path) -> dict[str, str]:
    """Every row of every table of the SQLite state and queue (dead letters included), as text.
    Without the `token` column of `tokens`: the vault that keeps Microsoft's rotated refresh
    token where the configured one came from the environment (issue 6's design)."""
    rows = {}
    with sqlite3.connect(db) as conn:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            for index, row in enumerate(cursor):
                shown = {c: v for c, v in zip(columns, row) if not (table == "tokens" and c == "token")}
                rows[f"table {table} row {index}"] = repr(shown)
    conn.close()
    return rows


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


# -- every command, on the embedded backends ---------------------------------------------


INTERNAL_ERROR = """
import os, sys
import shared.cli.status
from shared.cli.main import main

def broken(args, app, report):
    # A bug whose exception text carries secrets it should never have held.
    raise RuntimeError("unexpected reply with " + os.environ["MS_REFRESH_TOKEN"] + " for " + os.environ["GMAIL_CLIENT_SECRET"])

shared.cli.status.status = broken
sys.exit(main(["status"]))
"""


def test_no_command_leaks_a_secret(sync_env, dovecot_pair, oauth_server, tmp_path):
    setup = sync_env(routes=(("xo", "INBOX", "Xo"),))
    xo = setup.routes[0]
    gmail = dovecot_pair.gmail
    pw_user = gmail.new_user("pw")
    pw_route = {"name": "pw", "gmail_user": pw_user, "gmail_password": gmail.password, "auth": "password", "outlook_folder": "Pw"}
    routes = [xo.as_json(), pw_route]
    setup.set_routes(routes)
    ms_client_secret = f"ms-client-secret-{secrets.token_urlsafe(16)}"
    setup.env.update({"MS_CLIENT_SECRET": ms_client_secret, "LOG_LEVEL": "DEBUG", "MAX_RECEIVE_COUNT": "1"})
    known = [*setup.secrets, gmail.password, ms_client_secret]
    runs: dict[str, subprocess.CompletedProcess] = {}

    def python(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)

    def run(label: str, *args: str, env: dict[str, str] | None = None, expect: int | None = None) -> subprocess.CompletedProcess:
        done = python(["-m", "shared.cli", *args], env or setup.env, setup.workdir)
        runs[label] = done
        if expect is not None:
            assert done.returncode == expect, f"{label}: {output(done)}"
        return done

    unseeded = corpus_seed(4)

    def new_mail() -> None:
        """One new message in each route's source, another one each time."""
        message = unseeded.pop(0)
        seed(gmail, xo.gmail_user, "INBOX", [message])
        seed(gmail, pw_user, "INBOX", [message])

    # The happy path: every command.
    new_mail()
    run("check", "check", expect=0)
    run("scan --dry-run", "scan", "--dry-run", expect=0)
    run("run-once --dry-run", "run-once", "--dry-run", expect=0)
    run("scan", "scan", expect=0)
    run("consume", "consume", expect=0)
    new_mail()
    run("run-once", "run-once", expect=0)
    new_mail()
    run("drain", "drain", expect=0)
    assert len(read_folder(dovecot_pair.outlook, setup.outlook_user, "Pw")) == 3

    # The destination refuses the login (a wrong password): the failure text goes into state.
    refused_login = dict(setup.env, OUTLOOK_PASSWORD=f"wrong-outlook-{secrets.token_urlsafe(12)}")
    del refused_login["MS_REFRESH_TOKEN"]
    known.append(refused_login["OUTLOOK_PASSWORD"])
    new_mail()
    run("check, destination login refused", "check", env=refused_login, expect=5)
    run("drain, destination login refused", "drain", env=refused_login, expect=1)
    assert "login failed" in runs["drain, destination login refused"].stdout

    # The destination's refresh token refused (every one, the rotated ones the state keeps
    # too): failures recorded, dead-lettered, redriven.
    oauth_server.revoke_all(setup.outlook_user)
    run("redrive --dry-run", "redrive", "--dry-run", expect=0)
    assert "total: moved 2" in run("redrive", "redrive", expect=0).stdout
    run("drain, Microsoft token refused", "drain", expect=1)
    assert "invalid_grant" in runs["drain, Microsoft token refused"].stdout
    run("status, after failures", "status", expect=0)
    run("status --json, after failures", "status", "--json", expect=0)
    run("check, Microsoft token refused", "check", expect=5)

    # The sources refuse: a revoked Google refresh token, a wrong app password.
    oauth_server.revoke(xo.refresh_token)
    wrong_password = f"wrong-app-password-{secrets.token_urlsafe(12)}"
    known.append(wrong_password)
    setup.set_routes([xo.as_json(), {**pw_route, "gmail_password": wrong_password}])
    run("check, sources refused", "check", expect=5)
    run("drain, sources refused", "drain", expect=5)
    assert "route xo: 0 copied" in runs["drain, sources refused"].stdout
    assert "invalid_grant" in runs["drain, sources refused"].stdout
    setup.set_routes(routes)

    # The failures below touch neither the state nor the mailboxes: run side by side.
    # Bad settings next to secrets, and secret-looking values where they do not belong.
    pasted = {name: token_like() for name in ("port", "level", "auth", "unknown", "route token", "json", "dotenv", "name")}
    known.extend(pasted.values())
    bad_values = dict(setup.env, GMAIL_IMAP_PORT=pasted["port"], LOG_LEVEL=pasted["level"])
    with_dotenv = tmp_path / "with-dotenv"
    with_dotenv.mkdir()
    (with_dotenv / ".env").write_text(f"GMAIL_USR={pasted['dotenv']}\n")
    bad_route = {**xo.as_json(), "name": "Not A Slug", "gmail_refresh_token": pasted["route token"]}
    odd_route = {**pw_route, "gmail_imap_port": pasted["port"], "auth": pasted["auth"], pasted["name"]: pasted["unknown"]}
    bad_routes = dict(setup.env, SYNC_ROUTES_JSON=json.dumps([bad_route, odd_route]))
    not_json = dict(setup.env, SYNC_ROUTES_JSON='[{"name": "xo", "gmail_refresh_token": "' + pasted["json"] + '",]')
    # The state store cannot be reached: the gate's error.
    (tmp_path / "not-a-folder").write_text("")
    unreachable = dict(setup.env, STATE_DB=str(tmp_path / "not-a-folder" / "state.db"))
    side_by_side = [
        ("settings: bad values, unknown .env line", ["-m", "shared.cli", "check"], bad_values, with_dotenv, 3),
        ("settings: bad route fields", ["-m", "shared.cli", "check"], bad_routes, setup.workdir, 3),
        ("settings: routes not JSON", ["-m", "shared.cli", "drain"], not_json, setup.workdir, 3),
        ("drain, state store unreachable", ["-m", "shared.cli", "drain"], unreachable, setup.workdir, 4),
        ("check, state store unreachable", ["-m", "shared.cli", "check"], unreachable, setup.workdir, 4),
        # An internal error: its traceback is logged, scrubbed.
        ("internal error", ["-c", INTERNAL_ERROR], setup.env, setup.workdir, 70),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        for label, done in zip([case[0] for case in side_by_side], pool.map(lambda case: python(*case[1:4]), side_by_side)):
            runs[label] = done
    for label, _, _, _, expected in side_by_side:
        assert runs[label].returncode == expected, f"{label}: {output(runs[label])}"
    assert "GMAIL_IMAP_PORT" in runs["settings: bad values, unknown .env line"].stdout
    assert "GMAIL_USR: unknown setting in .env" in runs["settings: bad values, unknown .env line"].stdout
    bad_fields = runs["settings: bad route fields"].stdout
    assert "SYNC_ROUTES_JSON[0].name" in bad_fields and "SYNC_ROUTES_JSON[1].auth" in bad_fields
    assert "SYNC_ROUTES_JSON[1].(a key that is not a name, not shown): unknown key" in bad_fields
    assert "RuntimeError: unexpected reply with [REDACTED] for [REDACTED]" in runs["internal error"].stderr

    everything = [*known, *oauth_server.issued_tokens()]
    places: dict[str, str | bytes] = {label: output(done) for label, done in runs.items()}
    db = Path(setup.env["STATE_DB"])
    places.update(state_rows(db))
    found = leaks(places, everything)
    # The raw bytes too (WAL, free pages), for all but Microsoft's rotated refresh tokens: the
    # state keeps the newest one on purpose (see state_rows), and SQLite leaves older ones in
    # pages it has not reused yet.
    rotated = set(oauth_server.refresh_tokens_of(setup.outlook_user)) - {setup.ms_refresh_token}
    found += leaks(state_files(db.parent), [secret for secret in everything if secret not in rotated])
    assert not found, "secrets found:\n" + "\n".join(found)
    # The state was looked at where the failures are: their texts are in it.
    assert any("invalid_grant" in text for place, text in places.items() if place.startswith("table failures"))


# -- the Lambda handlers, with the secrets in Secrets Manager ----------------------------


@pytest.fixture
def fresh_container_logging(caplog):
    """Call it to get logging as a fresh Lambda container has it with its log level at DEBUG:
    the runtime's handler on the root logger (here caplog's) at DEBUG, library loggers at their
    defaults (earlier tests in this process quieted them). Returns the records captured since,
    those of the code under test only (not moto's server, which runs in threads of this
    process and stands for AWS)."""
    saved = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    started = []

    def start():
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        caplog.set_level(logging.DEBUG)
        caplog.clear()
        started.append(threading.get_ident())

        def records() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.thread == started[0]]

        return records

    yield start
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def everything_in(sqs, queue_url: str) -> list[dict]:
    """Every message of a FIFO queue with all its attributes, put back visible when read."""
    messages, receipts = [], []
    while True:
        batch = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=30, MessageSystemAttributeNames=["All"], MessageAttributeNames=["All"]
        ).get("Messages", [])
        if not batch:
            break
        messages.extend(batch)
        receipts.extend(m["ReceiptHandle"] for m in batch)
    for receipt in receipts:
        sqs.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=receipt, VisibilityTimeout=0)
    return messages


def test_lambda_handlers_leak_no_secret(sync_env, dovecot_pair, oauth_server, aws_env, aws_client, monkeypatch, fresh_container_logging, capsys):
    setup = sync_env(routes=(("xo", "INBOX", "Xo"),))
    xo = setup.routes[0]
    gmail = dovecot_pair.gmail
    pw_user = gmail.new_user("pw")
    routes = [xo.as_json(), {"name": "pw", "gmail_user": pw_user, "gmail_password": gmail.password, "outlook_folder": "Pw"}]
    ms_client_secret = f"ms-client-secret-{secrets.token_urlsafe(16)}"
    # The secrets live in Secrets Manager only, as deployed; the function's environment names the secret.
    secret_id = unique_name("mail-syncer/secrets")
    in_secret = {
        "SYNC_ROUTES_JSON": routes,
        "MS_REFRESH_TOKEN": setup.ms_refresh_token,
        "GMAIL_CLIENT_SECRET": setup.env["GMAIL_CLIENT_SECRET"],
        "MS_CLIENT_SECRET": ms_client_secret,
    }
    aws_client("secretsmanager").create_secret(Name=secret_id, SecretString=json.dumps(in_secret))
    table = unique_name("state")
    dynamodb = aws_client("dynamodb")
    create_state_table(dynamodb, table)
    sqs = aws_client("sqs")
    queue_url, dlq_url = create_fifo_queue_pair(sqs, unique_name("refs"), max_receive_count=3)
    env = {k: v for k, v in setup.env.items() if k not in in_secret}
    env.update(aws_env | {"STATE_TABLE": table, "QUEUE_URL": queue_url, "DLQ_URL": dlq_url, "AWS_SECRETS_MANAGER_SECRET_IDS": secret_id, "LOG_LEVEL": "DEBUG"})
    for key in in_secret:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    known = [*setup.secrets, gmail.password, ms_client_secret]
    errors: dict[str, str] = {}

    def call(label: str, handler, event: dict) -> dict | None:
        """The handler's answer; an exception it raises is kept as Lambda's runtime reports it
        (the message and the stack trace)."""
        try:
            return handler(event, LambdaContext())
        except Exception as exc:  # noqa: BLE001 - the test looks at what the runtime would show
            errors[label] = "".join(traceback.format_exception(exc))
            return None

    # The happy path: a cold start reads the secrets, then produce and consume.
    seed(gmail, xo.gmail_user, "INBOX", corpus_seed(1))
    seed(gmail, pw_user, "INBOX", corpus_seed(1))
    log_records = fresh_container_logging()
    cold_start()
    answer = call("producer", producer.handler, {})
    assert answer is not None, errors
    assert [r["enqueued"] for r in answer["routes"]] == [1, 1]
    queued = everything_in(sqs, queue_url)
    assert len(queued) == 2
    assert all(answer == {"batchItemFailures": []} for answer in run_consumer_until_empty(sqs, queue_url))
    assert len(read_folder(dovecot_pair.outlook, setup.outlook_user, "Pw")) == 1

    # Refresh tokens refused on both sides, after a cold start: the producer fails for route xo
    # (its error is raised for the function's Errors metric), the consumer records failures.
    oauth_server.revoke(xo.refresh_token)
    oauth_server.revoke_all(setup.outlook_user)  # the rotated ones written back to the secret too
    seed(gmail, pw_user, "INBOX", corpus_seed(2)[1:])
    cold_start()
    assert call("producer, token refused", producer.handler, {}) is None
    assert "invalid_grant" in errors["producer, token refused"]
    queued += everything_in(sqs, queue_url)
    answers = run_consumer_until_empty(sqs, queue_url)
    assert answers[0]["batchItemFailures"], answers

    # An internal error inside the consumer (a bug) whose exception text carries a secret.
    cold_start()
    app = bootstrap.lambda_app()

    def broken_claim(*args, **kwargs):
        raise RuntimeError(f"unexpected reply with {setup.ms_refresh_token} for {ms_client_secret}")

    monkeypatch.setattr(app.state, "claim_uid", broken_claim)
    monkeypatch.setattr(app.state, "claim_many", broken_claim)  # a batch's claims are taken at once
    sqs.send_message(QueueUrl=queue_url, MessageBody=queued[-1]["Body"], MessageGroupId="pw", MessageDeduplicationId="again")
    received = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"])["Messages"]
    assert call("consumer, internal error", consumer.handler, _records(received)) is None
    assert "ScrubbedError: RuntimeError: unexpected reply with [REDACTED] for [REDACTED]" in errors["consumer, internal error"]

    known.extend(oauth_server.issued_tokens())
    places: dict[str, str | bytes] = {f"exception from {label}": text for label, text in errors.items()}
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    places.update({f"log record {index} ({r.name})": formatter.format(r) for index, r in enumerate(log_records())})
    captured = capsys.readouterr()
    places["stdout"], places["stderr"] = captured.out, captured.err
    places["DynamoDB table"] = json.dumps(dynamodb.scan(TableName=table)["Items"])
    places["SQS queue, as sent"] = json.dumps(queued)
    places["SQS queue, left"] = json.dumps(everything_in(sqs, queue_url))
    places["SQS DLQ"] = json.dumps(everything_in(sqs, dlq_url))
    found = leaks(places, known)
    assert not found, "secrets found:\n" + "\n".join(found)
    # What was searched holds what it should: the failures, the dead letters, the failures' log lines.
    assert "invalid_grant" in places["DynamoDB table"]
    assert json.loads(places["SQS DLQ"])
    assert any("invalid_grant" in r.getMessage() for r in log_records())


def _records(messages: list[dict]) -> dict:
    return {
        "Records": [
            {"messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"], "attributes": m["Attributes"]}
            for m in messages
        ]
    }
