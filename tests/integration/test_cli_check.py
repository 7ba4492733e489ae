"""`python -m shared.cli check` as a user runs it: real Dovecot, real token refresh, moto.

Each bad input ends with exit code != 0, a line naming what failed, no traceback, and no
secret in anything printed.
"""

from __future__ import annotations

import json
import re

import pytest

from shared.cli.report import SETTINGS_HINT
from tests.harness.aws import unique_name
from tests.harness.mail import seed


# What follows the settings' problems: where every setting is described, and how to check them.
HINT = " ".join(SETTINGS_HINT.split())


def lines(done) -> list[str]:
    return [" ".join(line.split()) for line in (done.stdout + done.stderr).splitlines()]


def assert_clean(done, setup) -> None:
    text = done.stdout + done.stderr
    assert "Traceback" not in text
    for secret in setup.secrets:
        assert secret not in text


def test_all_good_sqlite(sync_env, dovecot_pair):
    setup = sync_env(routes=(("work", "INBOX", "Gmail/Work"), ("home", "Lists", "Gmail/Home")))
    work, home = setup.routes
    seed(dovecot_pair.gmail, work.gmail_user, "INBOX", [b"Subject: a\r\n\r\nx\r\n", b"Subject: b\r\n\r\ny\r\n"])
    seed(dovecot_pair.gmail, home.gmail_user, "Lists", [b"Subject: c\r\n\r\nz\r\n"])
    seed(dovecot_pair.outlook, setup.outlook_user, "Gmail/Work", [b"Subject: old\r\n\r\n\r\n"])

    done = setup.cli("check")

    assert done.returncode == 0, done.stdout + done.stderr
    out = lines(done)
    assert out[0] == f"ok settings 2 route(s) (work, home), destination {setup.outlook_user}"
    assert out[1] == f"ok state store SQLite {setup.env['STATE_DB']}"
    assert out[2] == f"ok queue SQLite {setup.env['STATE_DB']} (0 queued, 0 in flight, 0 dead)"
    port = setup.env["GMAIL_IMAP_PORT"]
    assert out[3] == f"ok route work {work.gmail_user} at 127.0.0.1:{port}, folder 'INBOX': 2 messages, UIDVALIDITY " + out[3].split()[-1]
    assert out[4].startswith(f"ok route home {home.gmail_user} at 127.0.0.1:{port}, folder 'Lists': 1 messages")
    assert out[5] == (
        f"ok destination {setup.outlook_user} at 127.0.0.1:{setup.env['OUTLOOK_IMAP_PORT']}: "
        "'Gmail/Home' will be created, 'Gmail/Work' exists"
    )
    # Each refresh token, as the logins above left it: it worked just now, for the first time.
    worked = r"last worked (\S+) \(first \1\)"
    assert re.fullmatch(rf"ok token google {re.escape(work.gmail_user)} {worked}", out[6]), out[6]
    assert re.fullmatch(rf"ok token google {re.escape(home.gmail_user)} {worked}", out[7]), out[7]
    assert re.fullmatch(rf"ok token microsoft {re.escape(setup.outlook_user)} {worked}", out[8]), out[8]
    assert len(out) == 9
    assert_clean(done, setup)


def test_all_good_on_dynamodb_and_sqs(sync_env, aws_client, aws_env):
    from shared.queue.sqs import create_fifo_queue_pair
    from shared.state.dynamodb import create_state_table

    setup = sync_env()
    table = unique_name("state")
    create_state_table(aws_client("dynamodb"), table)
    queue_url, _ = create_fifo_queue_pair(aws_client("sqs"), unique_name("q"), max_receive_count=3)
    setup.env.update(aws_env | {"STATE_TABLE": table, "QUEUE_URL": queue_url})

    done = setup.cli("check")

    assert done.returncode == 0, done.stdout + done.stderr
    out = lines(done)
    assert out[1] == f"ok state store DynamoDB table {table}"
    assert out[2] == f"ok queue SQS {queue_url} (0 queued, 0 in flight, 0 dead)"
    assert_clean(done, setup)


ROUTE = {"name": "work", "gmail_user": "alice@gmail.test", "gmail_refresh_token": "rt-SECRET-in-json", "outlook_folder": "Work"}


@pytest.mark.parametrize(
    ("routes_json", "expected"),
    [
        ('[{"name": "work",', "FAIL settings SYNC_ROUTES_JSON: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 18 (char 17))"),
        (json.dumps([ROUTE, ROUTE]), "FAIL settings SYNC_ROUTES_JSON[1].name: duplicate route name 'work'"),
        (json.dumps([{k: v for k, v in ROUTE.items() if k != "gmail_refresh_token"}]), "FAIL settings SYNC_ROUTES_JSON[0]: needs gmail_refresh_token or gmail_password"),
        (json.dumps([ROUTE | {"gmail_folders": "INBOX"}]), "FAIL settings SYNC_ROUTES_JSON[0].gmail_folders: unknown key"),
    ],
    ids=["malformed", "duplicate-names", "no-credentials", "unknown-key"],
)
def test_bad_routes(sync_env, routes_json, expected):
    setup = sync_env()
    setup.env["SYNC_ROUTES_JSON"] = routes_json
    done = setup.cli("check")
    assert done.returncode == 3
    assert lines(done) == [expected, HINT]
    assert "rt-SECRET-in-json" not in done.stdout + done.stderr
    assert_clean(done, setup)


def test_missing_secret_id(sync_env, aws_env, aws_client):
    setup = sync_env()
    present = unique_name("mail-syncer/destination")
    aws_client("secretsmanager").create_secret(Name=present, SecretString=json.dumps({"OUTLOOK_IMAP_SSL": "true"}))
    missing = unique_name("mail-syncer/routes")
    setup.env.update(aws_env | {"AWS_SECRETS_MANAGER_SECRET_IDS": f"{present},{missing}"})
    done = setup.cli("check")
    assert done.returncode == 3
    assert lines(done) == [f"FAIL settings secret {missing} (AWS_SECRETS_MANAGER_SECRET_IDS): not found", HINT]
    assert_clean(done, setup)


def test_secret_that_is_not_an_object(sync_env, aws_env, aws_client):
    setup = sync_env()
    name = unique_name("mail-syncer/routes")
    aws_client("secretsmanager").create_secret(Name=name, SecretString='["rt-SECRET-in-list"]')
    setup.env.update(aws_env | {"AWS_SECRETS_MANAGER_SECRET_IDS": name})
    done = setup.cli("check")
    assert done.returncode == 3
    assert lines(done) == [f"FAIL settings secret {name} is not a JSON object", HINT]
    assert "rt-SECRET-in-list" not in done.stdout


def test_settings_from_secrets_manager(sync_env, aws_env, aws_client):
    """The tokens live only in the secret; the environment names the secret."""
    setup = sync_env()
    name = unique_name("mail-syncer/all")
    moved = {key: setup.env.pop(key) for key in ("SYNC_ROUTES_JSON", "MS_REFRESH_TOKEN", "GMAIL_CLIENT_SECRET")}
    moved["SYNC_ROUTES_JSON"] = json.loads(moved["SYNC_ROUTES_JSON"])  # a nested list is fine too
    aws_client("secretsmanager").create_secret(Name=name, SecretString=json.dumps(moved))
    setup.env.update(aws_env | {"AWS_SECRETS_MANAGER_SECRET_IDS": name})
    done = setup.cli("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_clean(done, setup)


@pytest.mark.parametrize("backend", ["dynamodb-nothing-listening", "dynamodb-no-table", "sqlite-unwritable"])
def test_state_store_unreachable_shuts_the_gate(sync_env, dovecot_pair, aws_env, backend, tmp_path):
    setup = sync_env()
    if backend == "dynamodb-nothing-listening":
        setup.env.update(aws_env | {"STATE_TABLE": "mail-syncer-state", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
        expected = "FAIL state store DynamoDB table mail-syncer-state: "
    elif backend == "dynamodb-no-table":
        setup.env.update(aws_env | {"STATE_TABLE": "no-such-table"})
        expected = "FAIL state store DynamoDB table no-such-table: ResourceNotFoundException"
    else:
        (tmp_path / "a-file").write_text("")
        setup.env["STATE_DB"] = str(tmp_path / "a-file" / "state.db")
        expected = f"FAIL state store SQLite {tmp_path / 'a-file' / 'state.db'}: "

    done = setup.cli("check")

    assert done.returncode == 4, done.stdout + done.stderr
    out = lines(done)
    assert out[1].startswith(expected), out
    assert out[2] == "skip mailboxes not contacted: the state store must work before any IMAP connection"
    assert len(out) == 3
    # The gate held: not one IMAP login by any of this setup's accounts.
    assert dovecot_pair.gmail.logins(setup.routes[0].gmail_user) == 0
    assert dovecot_pair.outlook.logins(setup.outlook_user) == 0
    assert_clean(done, setup)


def test_refused_gmail_token_names_the_route(sync_env, oauth_server):
    setup = sync_env(routes=(("work", "INBOX", "Work"), ("home", "INBOX", "Home")))
    oauth_server.revoke(setup.routes[0].refresh_token)

    done = setup.cli("check")

    assert done.returncode == 5
    out = lines(done)
    work = next(line for line in out if line.startswith("FAIL route work"))
    assert work.startswith(f"FAIL route work source {setup.routes[0].gmail_user}: token refresh failed: ")
    assert "invalid_grant" in work
    # The other route and the destination are still checked, and fine.
    assert any(line.startswith("ok route home") for line in out)
    assert any(line.startswith("ok destination") for line in out)
    assert_clean(done, setup)


def test_refused_microsoft_token_names_the_destination(sync_env, oauth_server):
    setup = sync_env()
    oauth_server.revoke(setup.ms_refresh_token)
    done = setup.cli("check")
    assert done.returncode == 5
    out = lines(done)
    [destination] = [line for line in out if line.startswith("FAIL destination")]
    assert destination.startswith(f"FAIL destination destination {setup.outlook_user}: token refresh failed: Microsoft token refresh")
    assert "invalid_grant" in destination
    assert re.fullmatch(rf"FAIL token microsoft {re.escape(setup.outlook_user)} has not worked here yet; REFUSED since \S+", out[-1])
    assert_clean(done, setup)


def test_untrusted_certificate_is_refused(sync_env):
    setup = sync_env()
    del setup.env["IMAP_CA_BUNDLE"]
    done = setup.cli("check")
    assert done.returncode == 5
    out = lines(done)
    assert any(
        line.startswith(f"FAIL route work source {setup.routes[0].gmail_user} at 127.0.0.1:")
        and "TLS verification failed: " in line
        for line in out
    ), out


def test_starttls_and_password_login(sync_env, dovecot_pair):
    setup = sync_env()
    gmail = dovecot_pair.gmail
    route = {"name": "plain", "gmail_user": setup.routes[0].gmail_user, "gmail_password": gmail.password, "outlook_folder": "Plain"}
    setup.env.update(
        {
            "SYNC_ROUTES_JSON": json.dumps([route]),
            "GMAIL_IMAP_PORT": str(gmail.plain_port),
            "GMAIL_IMAP_SSL": "false",
        }
    )
    done = setup.cli("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert gmail.password not in done.stdout + done.stderr


def test_wrong_password(sync_env, dovecot_pair):
    setup = sync_env()
    route = {"name": "plain", "gmail_user": setup.routes[0].gmail_user, "gmail_password": "wrong-PASSWORD-1", "outlook_folder": "Plain"}
    setup.env["SYNC_ROUTES_JSON"] = json.dumps([route])
    done = setup.cli("check")
    assert done.returncode == 5
    failed = [line for line in lines(done) if line.startswith("FAIL")]
    assert len(failed) == 1
    assert failed[0].startswith(f"FAIL route plain source {setup.routes[0].gmail_user} at 127.0.0.1:")
    # The server's words as text, not a bytes repr.
    assert failed[0].endswith("login failed: [AUTHENTICATIONFAILED] Authentication failed."), failed[0]
    assert "wrong-PASSWORD-1" not in done.stdout + done.stderr


def test_missing_source_folder(sync_env):
    setup = sync_env(routes=(("work", "Nope/Missing", "Work"),))
    done = setup.cli("check")
    assert done.returncode == 5
    line = next(line for line in lines(done) if line.startswith("FAIL"))
    assert line.startswith(f"FAIL route work {setup.routes[0].gmail_user} at 127.0.0.1:")
    assert "folder 'Nope/Missing'" in line


def test_help_lists_only_working_commands(sync_env):
    setup = sync_env()
    done = setup.cli("--help")
    assert done.returncode == 0
    # argparse lists each command indented by four spaces under "positional arguments".
    assert re.findall(r"^    ([a-z][a-z-]*)\s", done.stdout, flags=re.MULTILINE) == ["drain", "run-once", "scan", "consume", "status", "redrive", "reconcile", "check", "auth"]
    assert "Exit codes: 0 ok" in " ".join(done.stdout.split())
