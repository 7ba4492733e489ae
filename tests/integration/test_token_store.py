"""Keeping Microsoft's rotated refresh token: the stores' compare-and-set, step by step.

Two keepers stand for two processes (each with its own store adapter on the same token file,
or the same Secrets Manager secret on moto's server), and the test decides the order of their
reads and writes, so each interleaving that matters is run exactly. The processes racing for
real are in tests/e2e/test_token_rotation.py.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.aws import make_client
from shared.tokens.store import (
    KnownToken,
    PersistedRefreshToken,
    SecretTokenStore,
    TokenFile,
    merge_secret_key,
    token_digest,
)
from tests.harness.aws import REGION, unique_name


@pytest.fixture
def token_path(tmp_path):
    return tmp_path / "state-tokens" / "microsoft.db"


def keeper(token_path, configured: str) -> PersistedRefreshToken:
    """A new keeper and store adapter each call, as another process would have."""
    return PersistedRefreshToken(configured, TokenFile(token_path, configured))


def stored(token_path, configured: str):
    return TokenFile(token_path, configured).stored()


def test_a_rotation_is_stored_and_wins_at_the_next_start(token_path):
    first = keeper(token_path, "rt-configured")
    assert first.current() == "rt-configured"  # nothing stored yet

    first.rotated("rt-configured", "rt-1")

    assert first.current() == "rt-1"
    # The next process, configured with the same (now older) token, starts from the stored one.
    assert keeper(token_path, "rt-configured").current() == "rt-1"
    kept = stored(token_path, "rt-configured")
    assert (kept.token, kept.version, kept.origin) == ("rt-1", 1, token_digest("rt-configured"))


def test_a_stale_writer_never_overwrites_the_newer_token(token_path):
    a = keeper(token_path, "rt-0")
    b = keeper(token_path, "rt-0")
    assert a.current() == b.current() == "rt-0"

    # Both refresh rt-0 at once; a stores first, b finds it there and adopts it.
    a.rotated("rt-0", "rt-a1")
    b.rotated("rt-0", "rt-b1")
    assert (a.current(), b.current()) == ("rt-a1", "rt-a1")

    # b refreshes again and stores; a, still on rt-a1, refreshes it too and loses the race.
    b.rotated("rt-a1", "rt-b2")
    a.rotated("rt-a1", "rt-a2")
    assert (a.current(), b.current()) == ("rt-b2", "rt-b2")
    kept = stored(token_path, "rt-0")
    assert (kept.token, kept.version) == ("rt-b2", 2)


def test_a_new_configured_token_replaces_an_older_chain(token_path):
    old = keeper(token_path, "rt-old")
    old.current()
    old.rotated("rt-old", "rt-old-1")

    # The person ran `auth microsoft` again and configured the new token: it is newer than
    # anything rotated from the old one, so it is used, and its first rotation replaces the chain.
    new = keeper(token_path, "rt-new")
    assert new.current() == "rt-new"
    new.rotated("rt-new", "rt-new-1")

    kept = stored(token_path, "rt-new")
    assert (kept.token, kept.version, kept.origin) == ("rt-new-1", 2, token_digest("rt-new"))
    assert stored(token_path, "rt-old") is None  # the old chain is gone
    assert keeper(token_path, "rt-new").current() == "rt-new-1"


THREADS = 8


def test_one_rotation_is_stored_when_many_store_at_once(token_path):
    """Each thread its own adapter and SQLite connection, all storing a rotation of the
    configured token at once: one wins, and every other is handed the winner's token."""
    start = threading.Barrier(THREADS, timeout=30)

    def store_one(n: int) -> str:
        adapter = TokenFile(token_path, "rt-0")
        start.wait()
        return adapter.replace(f"rt-{n}", expected=KnownToken("rt-0")).token

    with ThreadPoolExecutor(THREADS) as pool:
        answers = set(pool.map(store_one, range(THREADS)))

    kept = stored(token_path, "rt-0")
    assert kept.version == 1
    assert answers == {kept.token}


def test_a_store_that_cannot_be_written_keeps_the_token_in_memory(token_path, caplog):
    token_path.parent.write_text("")  # a file where its directory would be made
    kept = keeper(token_path, "rt-0")
    assert kept.current() == "rt-0"

    kept.rotated("rt-0", "rt-1")

    assert kept.current() == "rt-1"
    assert f"could not store the new Microsoft refresh token in token file {token_path}" in caplog.text
    assert "rt-1" not in caplog.text


def test_an_unreadable_store_falls_back_to_the_configured_token(token_path, caplog):
    token_path.parent.mkdir()
    token_path.write_text("not a SQLite database, but long enough for SQLite to look at it " * 20)

    assert keeper(token_path, "rt-0").current() == "rt-0"
    assert f"could not read the kept Microsoft refresh token from token file {token_path}" in caplog.text


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
