"""Keeping Microsoft's rotated refresh token: the stores' compare-and-set, step by step.

Two keepers stand for two processes (each with its own store adapter on the same SQLite file,
DynamoDB table or Secrets Manager secret on moto's server), and the test decides the order of
their reads and writes, so each interleaving that matters is run exactly. The processes racing
for real are in tests/e2e/test_token_rotation.py.
"""

from __future__ import annotations

import json

import pytest

from shared.aws import make_client
from shared.state.dynamodb import DynamoStateStore, create_state_table
from shared.state.sqlite import SqliteStateStore
from shared.token_store import (
    PersistedRefreshToken,
    SecretTokenStore,
    StateTokenStore,
    merge_secret_key,
    token_digest,
)
from tests.harness.aws import REGION, unique_name

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "dynamodb"])
def open_state(request, tmp_path):
    """Opens the one state store as another process would: a new adapter each call."""
    opened = []
    if request.param == "sqlite":
        path = tmp_path / "state.db"

        def open_one():
            opened.append(SqliteStateStore(path))
            return opened[-1]
    else:
        client = make_client("dynamodb", request.getfixturevalue("aws_env")["AWS_ENDPOINT_URL"], REGION)
        table = unique_name("state")
        create_state_table(client, table)

        def open_one():
            opened.append(DynamoStateStore(table, client=client))
            return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def keeper(open_state, configured: str) -> PersistedRefreshToken:
    return PersistedRefreshToken(configured, StateTokenStore(open_state(), configured))


def test_a_rotation_is_stored_and_wins_at_the_next_start(open_state):
    first = keeper(open_state, "rt-configured")
    assert first.current() == "rt-configured"  # nothing stored yet

    first.rotated("rt-configured", "rt-1")

    assert first.current() == "rt-1"
    # The next process, configured with the same (now older) token, starts from the stored one.
    assert keeper(open_state, "rt-configured").current() == "rt-1"
    stored = open_state().read_token("microsoft")
    assert (stored.token, stored.version, stored.origin) == ("rt-1", 1, token_digest("rt-configured"))


def test_a_stale_writer_never_overwrites_the_newer_token(open_state):
    a = keeper(open_state, "rt-0")
    b = keeper(open_state, "rt-0")
    assert a.current() == b.current() == "rt-0"

    # Both refresh rt-0 at once; a stores first, b finds it there and adopts it.
    a.rotated("rt-0", "rt-a1")
    b.rotated("rt-0", "rt-b1")
    assert (a.current(), b.current()) == ("rt-a1", "rt-a1")

    # b refreshes again and stores; a, still on rt-a1, refreshes it too and loses the race.
    b.rotated("rt-a1", "rt-b2")
    a.rotated("rt-a1", "rt-a2")
    assert (a.current(), b.current()) == ("rt-b2", "rt-b2")
    stored = open_state().read_token("microsoft")
    assert (stored.token, stored.version) == ("rt-b2", 2)


def test_a_new_configured_token_replaces_an_older_chain(open_state):
    old = keeper(open_state, "rt-old")
    old.current()
    old.rotated("rt-old", "rt-old-1")

    # The person ran `auth microsoft` again and configured the new token: it is newer than
    # anything rotated from the old one, so it is used, and its first rotation replaces the chain.
    new = keeper(open_state, "rt-new")
    assert new.current() == "rt-new"
    new.rotated("rt-new", "rt-new-1")

    stored = open_state().read_token("microsoft")
    assert (stored.token, stored.version, stored.origin) == ("rt-new-1", 2, token_digest("rt-new"))
    assert keeper(open_state, "rt-new").current() == "rt-new-1"


def test_a_store_that_cannot_be_written_keeps_the_token_in_memory(aws_env, caplog):
    client = make_client("dynamodb", aws_env["AWS_ENDPOINT_URL"], REGION)
    table = unique_name("state")
    create_state_table(client, table)
    kept = PersistedRefreshToken("rt-0", StateTokenStore(DynamoStateStore(table, client=client), "rt-0"))
    assert kept.current() == "rt-0"
    client.delete_table(TableName=table)  # the store goes away mid-run

    kept.rotated("rt-0", "rt-1")

    assert kept.current() == "rt-1"
    assert f"could not store the new Microsoft refresh token in the state store (DynamoDB table {table})" in caplog.text
    assert "rt-1" not in caplog.text


# -- Secrets Manager ------------------------------------------------------------------------


@pytest.fixture
def secrets_client(aws_env):
    return make_client("secretsmanager", aws_env["AWS_ENDPOINT_URL"], REGION)


def read_secret(client, secret_id: str) -> dict:
    return json.loads(client.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"])


def test_the_secret_gets_each_rotation_and_keeps_its_other_keys(secrets_client):
    secret_id = unique_name("mail-syncer/destination")
    others = {"OUTLOOK_USER": "me@outlook.com", "MS_CLIENT_ID": "client"}
    # The key spelled as the person wrote it (settings are read case-insensitively).
    secrets_client.create_secret(Name=secret_id, SecretString=json.dumps({**others, "ms_refresh_token": "rt-0"}))
    kept = PersistedRefreshToken("rt-0", SecretTokenStore(secrets_client, secret_id))
    assert kept.current() == "rt-0"

    kept.rotated("rt-0", "rt-1")
    kept.rotated("rt-1", "rt-2")

    assert read_secret(secrets_client, secret_id) == {**others, "ms_refresh_token": "rt-2"}
    assert kept.current() == "rt-2"


def test_a_stale_secret_writer_adopts_the_newer_token(secrets_client):
    secret_id = unique_name("mail-syncer/destination")
    secrets_client.create_secret(Name=secret_id, SecretString=json.dumps({"MS_REFRESH_TOKEN": "rt-0"}))
    a = PersistedRefreshToken("rt-0", SecretTokenStore(secrets_client, secret_id))
    b = PersistedRefreshToken("rt-0", SecretTokenStore(secrets_client, secret_id))
    a.current(), b.current()

    a.rotated("rt-0", "rt-a1")
    b.rotated("rt-0", "rt-b1")

    assert read_secret(secrets_client, secret_id) == {"MS_REFRESH_TOKEN": "rt-a1"}
    assert b.current() == "rt-a1"


def test_an_edit_of_another_key_between_read_and_write_is_not_lost(secrets_client):
    secret_id = unique_name("mail-syncer/destination")
    secrets_client.create_secret(Name=secret_id, SecretString=json.dumps({"MS_REFRESH_TOKEN": "rt-0", "LOG_LEVEL": "INFO"}))
    store = SecretTokenStore(secrets_client, secret_id)
    real_read = secrets_client.get_secret_value
    edited = []

    def read_then_someone_edits(**kwargs):
        answer = real_read(**kwargs)
        if not edited:  # after our read, before our write: another writer changes LOG_LEVEL
            edited.append(True)
            merge_secret_key(secrets_client, secret_id, "LOG_LEVEL", "DEBUG")
        return answer

    kept = PersistedRefreshToken("rt-0", store)
    assert kept.current() == "rt-0"
    secrets_client.get_secret_value = read_then_someone_edits
    try:
        kept.rotated("rt-0", "rt-1")
    finally:
        secrets_client.get_secret_value = real_read

    # The first write was refused (AWSCURRENT had moved), read again, merged again.
    assert read_secret(secrets_client, secret_id) == {"MS_REFRESH_TOKEN": "rt-1", "LOG_LEVEL": "DEBUG"}
