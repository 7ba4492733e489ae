"""A complete mail_syncer environment against the harness's servers, for the CLI in a subprocess.

`sync_env(routes=...)` makes fresh Gmail users (one per route) and a fresh Outlook user, issues
their refresh tokens at the OAuth stand-in, and returns a `SyncEnv` whose `env` points every
endpoint at 127.0.0.1 and whose `cli(...)` runs `python -m shared.cli` with it. The mail servers
are reached as the `servers` fixture says: Dovecot itself, or a front speaking Outlook.com's
dialect before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
# The Outlook.com front's default max_line_length (tests/harness/outlook_front.py).
OUTLOOK_MAX_LINE = 9900


@dataclass
class RouteAccount:
    name: str
    gmail_user: str
    refresh_token: str
    gmail_folder: str
    outlook_folder: str

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "gmail_user": self.gmail_user,
            "gmail_refresh_token": self.refresh_token,
            "gmail_folder": self.gmail_folder,
            "outlook_folder": self.outlook_folder,
        }


@dataclass
class SyncEnv:
    env: dict[str, str]
    routes: list[RouteAccount]
    outlook_user: str
    ms_refresh_token: str
    workdir: Path
    secrets: list[str] = field(default_factory=list)

    def set_routes(self, routes: list[dict]) -> None:
        self.env["SYNC_ROUTES_JSON"] = json.dumps(routes)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "shared.cli", *args],
            env=self.env,
            cwd=self.workdir,  # no .env there unless a test writes one
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _clean_environment() -> dict[str, str]:
    """The test process's environment without any mail_syncer or AWS setting."""
    ours = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def settings_env(
    gmail, outlook, oauth_server, ca, accounts: list[RouteAccount], outlook_user: str, ms_refresh_token: str, state_db: Path
) -> dict[str, str]:
    """The environment of a `python -m shared.cli` that syncs `accounts` (on Dovecot `gmail`) into
    `outlook_user` (on Dovecot `outlook`), with tokens from `oauth_server` and TLS trusting `ca`:
    for sync_env, and for `make demo` (infra/demo.py), which runs the same servers."""
    return _clean_environment() | {
        "SYNC_ROUTES_JSON": json.dumps([a.as_json() for a in accounts]),
        "GMAIL_CLIENT_ID": oauth_server.google_client_id,
        "GMAIL_CLIENT_SECRET": oauth_server.google_client_secret,
        "OUTLOOK_USER": outlook_user,
        "MS_CLIENT_ID": oauth_server.ms_client_id,
        "MS_REFRESH_TOKEN": ms_refresh_token,
        "GMAIL_IMAP_HOST": gmail.host,
        "GMAIL_IMAP_PORT": str(gmail.imaps_port),
        "OUTLOOK_IMAP_HOST": outlook.host,
        "OUTLOOK_IMAP_PORT": str(outlook.imaps_port),
        "IMAP_CA_BUNDLE": ca.ca_bundle_path,
        # The token endpoints are https with the test certificate.
        "REQUESTS_CA_BUNDLE": ca.ca_bundle_path,
        "GOOGLE_TOKEN_URI": oauth_server.google_token_uri,
        "MS_AUTHORITY": oauth_server.ms_authority,
        "STATE_DB": str(state_db),
    }


@dataclass(frozen=True)
class Servers:
    """The mail servers as the code under test reaches them: `name` says which dialect, `env` the
    settings that point at them. Tests always read and seed the Dovecot servers behind."""

    # "dovecot"; "gmail" or "outlook": that front (tests/harness/gmail_front.py, outlook_front.py)
    # before its Dovecot; "fronts": both, as the product meets them.
    name: str
    env: dict[str, str]

    def refusal(self, body: bytes) -> str | None:
        """The skip reason the destination's refusal of `body` is recorded with, or None when it
        takes it: the Outlook.com front refuses a line over 9,900 characters with Command Error. 10
        (tests/harness/outlook_front.py cites imapsync's FAQ.Exchange.txt)."""
        if self.name in ("outlook", "fronts") and any(len(line) > OUTLOOK_MAX_LINE for line in body.split(b"\n")):
            return "rejected by the destination: Command Error. 10 (a line longer than it accepts)"
        return None

    def kept(self, flag: bytes) -> bool:
        """Whether the destination stores `flag`: Outlook.com keeps system flags and $MDNSent
        only (its PERMANENTFLAGS; tests/harness/outlook_front.py cites the sources)."""
        return self.name not in ("outlook", "fronts") or flag.startswith(b"\\") or flag.lower() == b"$mdnsent"


@pytest.fixture
def servers(request, dovecot_pair) -> Servers:
    """Plain Dovecot, unless a test is parametrized (indirectly) with another dialect: see
    tests/e2e/conftest.py, which runs the end-to-end suite against each."""
    name = getattr(request, "param", "dovecot")
    if name not in ("dovecot", "outlook", "gmail", "fronts"):
        raise ValueError(f"no such servers: {name!r}")
    env = {}
    if name in ("gmail", "fronts"):
        source = request.getfixturevalue("gmail_front")(dovecot_pair.gmail)
        env |= {"GMAIL_IMAP_HOST": source.host, "GMAIL_IMAP_PORT": str(source.port)}
    if name in ("outlook", "fronts"):
        destination = request.getfixturevalue("outlook_front")(dovecot_pair.outlook)
        env |= {"OUTLOOK_IMAP_HOST": destination.host, "OUTLOOK_IMAP_PORT": str(destination.port)}
    return Servers(name, env)


@pytest.fixture
def sync_env(dovecot_pair, oauth_server, test_ca, tmp_path, servers):
    def make(routes: tuple[tuple[str, str, str], ...] = (("work", "INBOX", "Work"),)) -> SyncEnv:
        gmail, outlook = dovecot_pair.gmail, dovecot_pair.outlook
        accounts = []
        for name, gmail_folder, outlook_folder in routes:
            user = gmail.new_user(name)
            token = oauth_server.issue_refresh_token(user, "google")
            accounts.append(RouteAccount(name, user, token, gmail_folder, outlook_folder))
        outlook_user = outlook.new_user("me")
        ms_token = oauth_server.issue_refresh_token(outlook_user, "microsoft")
        env = settings_env(
            gmail, outlook, oauth_server, test_ca, accounts, outlook_user, ms_token, tmp_path / "state" / "state.db"
        ) | servers.env
        secrets = [a.refresh_token for a in accounts] + [ms_token, oauth_server.google_client_secret]
        return SyncEnv(env, accounts, outlook_user, ms_token, tmp_path, secrets)

    return make
