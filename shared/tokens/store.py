"""Keeping Microsoft's rotating refresh token, so the pipeline outlives the first one.

Microsoft answers every refresh with a new refresh token. `PersistedRefreshToken` hands the
newest one to `MicrosoftTokenSource` and, on each rotation, stores the new one where the
configured one came from (see `Settings.source_of`):
- `SecretTokenStore`: the key in the Secrets Manager secret it was read from (AWS);
- `TokenFile`: a file of its own, readable by its owner alone, when it came from the
  environment or `.env` (which are not written back). Never the state store: secrets stay out
  of state, whose tables are exported, backed up and read by `status`.

Two processes may refresh at once. Every store write is a compare-and-set against what the
writer last saw, so a writer that lost the race never overwrites the newer token: it adopts
the stored one instead (its own new token stays valid at Microsoft, just unused).

`merge_secret_key` is also how `auth ... --write-secret-id` puts a new token in a secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from shared.aws import SecretMissing, SecretUnreadable, error_code, read_json_secret
from shared.errors import MailSyncerError, StateStoreUnavailable, TokenRefreshFailed
from shared.redaction import register_secret, scrub
from shared.state.port import StateStore
from shared.tokens.health import MICROSOFT, token_problem_name, token_tag
from shared.tokens.sources import TokenSource

log = logging.getLogger("mail_syncer.tokens")

# A staging label of our own: a version put with it is not current until the compare-and-set
# moves AWSCURRENT onto it.
PENDING_STAGE = "MAIL_SYNCER_PENDING"
# Writers that keep losing the race on the same secret (someone editing other keys) give up here.
SECRET_WRITE_TRIES = 5


class TokenStoreUnavailable(MailSyncerError):
    """Where rotated tokens are kept could not be read or written; names the place, never a value."""


class SecretWriteFailed(TokenStoreUnavailable):
    """A Secrets Manager secret could not be read or written; names the secret, never a value."""


@dataclass(frozen=True)
class KnownToken:
    """A refresh token and the store's version of it as this process last saw it (None: not
    from the store, e.g. the configured token, or a new one the store refused to take)."""

    token: str
    version: int | str | None = None


class TokenStore(Protocol):
    where: str  # for messages: "secret mail-syncer/destination", "SQLite /path"

    def read(self) -> KnownToken | None:
        """The stored token that is newer than the configured one, or None."""

    def replace(self, new: str, *, expected: KnownToken) -> KnownToken:
        """Store `new` unless the store has changed since `expected`; returns what is stored
        afterwards (the new token, or the one another process stored first)."""


# -- the keeper -------------------------------------------------------------------------------


class PersistedRefreshToken:
    """The newest refresh token of one account: loaded from the store on first use (a token a
    previous run stored wins over the configured one), stored again on every rotation."""

    def __init__(self, configured: str, store: TokenStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._current: str | None = None
        # What the store holds, as far as this process knows: the base of its next compare-and-set.
        self._base = KnownToken(configured)
        register_secret(configured)

    def current(self) -> str:
        with self._lock:
            if self._current is None:
                try:
                    stored = self._store.read()
                except TokenStoreUnavailable as exc:
                    # The configured token still works unless it is past its lifetime.
                    log.warning("could not read the kept Microsoft refresh token from %s: %s", self._store.where, scrub(str(exc)))
                    stored = None
                if stored is not None:
                    register_secret(stored.token)
                    self._base = stored
                self._current = self._base.token
            return self._current

    def rotated(self, used: str, issued: str) -> None:
        register_secret(issued)
        with self._lock:
            if used != self._current:
                return  # a token this process has already moved on from
            try:
                stored = self._store.replace(issued, expected=self._base)
            except TokenStoreUnavailable as exc:
                # Keep going on the new token; the next rotation tries the store again.
                log.warning("could not store the new Microsoft refresh token in %s: %s", self._store.where, scrub(str(exc)))
                self._current = issued
                return
            register_secret(stored.token)
            if stored.token != issued:
                log.info("another process stored a newer Microsoft refresh token in %s first; using it", self._store.where)
            self._base = stored
            self._current = stored.token


# -- the stores -------------------------------------------------------------------------------


def token_digest(token: str) -> str:
    """Names a configured token in the store without storing it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class StoredToken:
    """A rotated refresh token in a `TokenFile`."""

    token: str
    version: int  # 1 for the first stored, +1 for each rotation stored after it
    origin: str  # token_digest of the configured token this chain of rotations started from
    updated_at: float


class TokenFile:
    """A SQLite file of its own for a token configured in the environment or `.env`, in a
    directory only its owner can enter (so SQLite's journal is covered too). A stored chain
    started from another configured token (the user ran `auth microsoft` again and configured
    the new one) is older than the configuration: it is not used, and the first rotation
    replaces it. SQLite's write lock makes the compare-and-set safe across processes."""

    def __init__(self, path: Path, configured: str, name: str = MICROSOFT, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._name = name
        self._origin = token_digest(configured)
        self._clock = clock
        # The version of another chain found by read(): the configured token replaces it.
        self._other_chain_version = 0
        self.where = f"token file {path}"

    def stored(self) -> StoredToken | None:
        """The newest rotation of the configured token, or None (for `status`)."""
        found = self._found()
        return found if found is not None and found.origin == self._origin else None

    def read(self) -> KnownToken | None:
        found = self._found()
        if found is None:
            return None
        if found.origin != self._origin:
            self._other_chain_version = found.version
            return None
        return KnownToken(found.token, found.version)

    def _found(self) -> StoredToken | None:
        """What the file holds, whichever configured token its chain started from."""
        if not self._path.exists():
            return None
        with self._transaction() as db:
            return self._select(db)

    def replace(self, new: str, *, expected: KnownToken) -> KnownToken:
        version = expected.version if isinstance(expected.version, int) else self._other_chain_version
        with self._transaction() as db:
            found = self._select(db)
            if found is not None and found.version != version:
                return KnownToken(found.token, found.version)  # another process stored its token first
            db.execute(
                "INSERT OR REPLACE INTO tokens (name, token, version, origin, updated_at) VALUES (?, ?, ?, ?, ?)",
                (self._name, new, version + 1, self._origin, self._clock()),
            )
        return KnownToken(new, version + 1)

    def _select(self, db: sqlite3.Connection) -> StoredToken | None:
        row = db.execute("SELECT token, version, origin, updated_at FROM tokens WHERE name = ?", (self._name,)).fetchone()
        return None if row is None else StoredToken(*row)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self._path.parent, 0o700)
            db = sqlite3.connect(self._path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise TokenStoreUnavailable(f"{self.where}: cannot be opened: {exc}") from None
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "CREATE TABLE IF NOT EXISTS tokens (name TEXT PRIMARY KEY, token TEXT NOT NULL,"
                " version INTEGER NOT NULL, origin TEXT NOT NULL, updated_at REAL NOT NULL)"
            )
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise TokenStoreUnavailable(f"{self.where}: {exc}") from None
        finally:
            db.close()


class SecretTokenStore:
    """In the Secrets Manager secret the configured token was read from, under its key there.

    The compare-and-set: read the current version; if the token in it is no longer the one
    this process last saw, another process rotated first (adopt it); else put a new version
    under our own staging label and move AWSCURRENT onto it from the version read, which
    Secrets Manager refuses if AWSCURRENT has moved meanwhile."""

    def __init__(self, client: Any, secret_id: str, setting: str = "MS_REFRESH_TOKEN") -> None:
        self._client = client
        self._secret_id = secret_id
        self._setting = setting
        self.where = f"secret {secret_id}"

    def read(self) -> KnownToken | None:
        # The configured token was read from this very secret moments ago.
        return None

    def replace(self, new: str, *, expected: KnownToken) -> KnownToken:
        for _ in range(SECRET_WRITE_TRIES):
            version_id, data = _read_json_secret(self._client, self._secret_id)
            key = _key_in(data, self._setting)
            found = data.get(key)
            if isinstance(found, str) and found != expected.token:
                return KnownToken(found, version_id)
            data[key] = new
            if _put_if_current(self._client, self._secret_id, data, version_id):
                return KnownToken(new, None)
            # AWSCURRENT moved between our read and our move: read again and judge afresh.
        raise SecretWriteFailed(f"secret {self._secret_id}: changed by others on each of {SECRET_WRITE_TRIES} tries")


# -- Secrets Manager --------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretWrite:
    secret_id: str
    key: str
    created: bool  # the secret did not exist and was created with this one key


def merge_secret_key(client: Any, secret_id: str, key: str, value: str) -> SecretWrite:
    """Set `key` in the JSON object of secret `secret_id` to `value`, leaving its other keys as
    they were (compare-and-set, so a concurrent edit of another key is not lost); create the
    secret when it does not exist."""
    register_secret(value)
    for _ in range(SECRET_WRITE_TRIES):
        try:
            version_id, data = _read_json_secret(client, secret_id)
        except SecretMissing:
            if _create_secret(client, secret_id, {key: value}):
                return SecretWrite(secret_id, key, created=True)
            continue  # created by someone else meanwhile: merge into theirs
        data[key] = value
        if _put_if_current(client, secret_id, data, version_id):
            return SecretWrite(secret_id, key, created=False)
    raise SecretWriteFailed(f"secret {secret_id}: changed by others on each of {SECRET_WRITE_TRIES} tries")


def _read_json_secret(client: Any, secret_id: str) -> tuple[str, dict]:
    try:
        version_id, data = read_json_secret(client, secret_id)
    except SecretUnreadable as exc:
        raise SecretWriteFailed(f"{exc}: a token cannot be merged into it") from None
    for value in data.values():
        if isinstance(value, str):
            register_secret(value)
    return version_id, data


def _put_if_current(client: Any, secret_id: str, data: dict, version_id: str) -> bool:
    """Put `data` as a new version and make it current only if `version_id` still is."""
    place = f"secret {secret_id}"
    try:
        put = client.put_secret_value(
            SecretId=secret_id,
            SecretString=json.dumps(data),
            ClientRequestToken=str(uuid.uuid4()),
            VersionStages=[PENDING_STAGE],
        )
    except ClientError as exc:
        raise SecretWriteFailed(f"{place}: cannot be written: {error_code(exc)}") from None
    except BotoCoreError as exc:
        raise SecretWriteFailed(f"{place}: cannot be written: {type(exc).__name__}: {exc}") from None
    try:
        client.update_secret_version_stage(
            SecretId=secret_id,
            VersionStage="AWSCURRENT",
            MoveToVersionId=put["VersionId"],
            RemoveFromVersionId=version_id,
        )
    except ClientError as exc:
        if error_code(exc) == "InvalidParameterException":
            return False  # AWSCURRENT is no longer on version_id: someone wrote first
        raise SecretWriteFailed(f"{place}: cannot be made current: {error_code(exc)}") from None
    except BotoCoreError as exc:
        raise SecretWriteFailed(f"{place}: cannot be made current: {type(exc).__name__}: {exc}") from None
    return True


def _create_secret(client: Any, secret_id: str, data: dict) -> bool:
    try:
        client.create_secret(Name=secret_id, SecretString=json.dumps(data), ClientRequestToken=str(uuid.uuid4()))
    except ClientError as exc:
        if error_code(exc) == "ResourceExistsException":
            return False
        raise SecretWriteFailed(f"secret {secret_id}: cannot be created: {error_code(exc)}") from None
    except BotoCoreError as exc:
        raise SecretWriteFailed(f"secret {secret_id}: cannot be created: {type(exc).__name__}: {exc}") from None
    return True


def _key_in(data: dict, setting: str) -> str:
    """The key as the secret spells it (settings are read case-insensitively)."""
    return next((key for key in data if key.lower() == setting.lower()), setting)


# -- how each token is doing, in state ----------------------------------------------------


class RecordingTokens:
    """A token source that records in the state store how its refresh token is doing, for
    `status` and `check` (shared.tokens.health): when a refresh worked, and why one was refused
    (invalid_grant) until a refresh works again. Every refresh passes here, and an XOAUTH2 login
    only ever uses the access token a refresh just gave, so this is the one place to record it.

    A refresh that worked is told by a new access token; it is recorded with the configured
    token's tag (never the token), and the store writes it once an hour at most."""

    def __init__(self, inner: TokenSource, state: StateStore, *, provider: str, account: str, configured: str) -> None:
        self._inner = inner
        self._state = state
        self._provider = provider
        self._account = account
        self._tag = token_tag(configured)
        self._problem_name = token_problem_name(provider, account)
        self._cleared = False
        self._last_token: str | None = None
        self.endpoint = getattr(inner, "endpoint", None)  # where a refresh goes (session.py reads it)

    def access_token(self) -> str:
        try:
            token = self._inner.access_token()
        except TokenRefreshFailed as exc:
            if exc.refused:
                self._recorded(self._state.record_token_problem, self._problem_name, scrub(str(exc)))
                self._cleared = False
            raise
        if token != self._last_token:
            self._last_token = token
            self._recorded(self._state.record_token_worked, self._provider, self._account, self._tag)
        if not self._cleared:
            self._recorded(self._state.record_token_problem, self._problem_name, None)  # once per process
            self._cleared = True
        return token

    def invalidate(self) -> None:
        self._inner.invalidate()

    def _recorded(self, record: Callable[..., object], *args: object) -> None:
        try:
            record(*args)
        except StateStoreUnavailable as exc:
            # The token's own error (or its access token) is what the caller needs; this is for `status`.
            log.warning("could not record the state of the %s token of %s: %s", self._provider, self._account, exc)
