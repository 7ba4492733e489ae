"""`auth gmail` and `auth microsoft` as a person runs them, against the local authorization servers.

The command runs in a subprocess; the test plays the person: it reads the URL the command prints
on stderr, opens it in its "browser" (`browser_consent`: signs in, follows the redirect or submits
Microsoft's form_post page to the command's loopback listener), or approves the device code. The
real google-auth-oauthlib and msal code runs on the other side; nothing of theirs is mocked.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time

import pytest

from shared.mailbox.session import ImapAccount, ImapEndpoint, open_session
from shared.tokens.sources import GoogleTokenSource, MicrosoftTokenSource
from tests.harness.aws import unique_name
from tests.harness.oauth import GOOGLE_SCOPE, MS_SCOPE, browser_consent
from tests.harness.sync_env import REPO_ROOT, _clean_environment

AUTHORIZE_URL = re.compile(r"(https://127\.0\.0\.1:\d+/\S+/authorize\?\S+)")
DEVICE_CODE = re.compile(r"enter the code (\S+) to authenticate")


class RunningCommand:
    """`python -m shared.cli ...` in the background, its stderr read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args],
            env=env,
            cwd=REPO_ROOT / "tests",  # no .env there
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: re.Pattern, timeout: float = 60) -> re.Match:
        """The first stderr line matching `pattern`; fails if the command ends or goes quiet first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"no line matching {pattern.pattern} in {timeout} s:\n{''.join(self.stderr_lines)}") from None
            if line is None:
                raise AssertionError(f"the command ended without {pattern.pattern}:\n{''.join(self.stderr_lines)}")
            match = pattern.search(line)
            if match:
                return match

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        stdout = self.proc.stdout.read()
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return code, stdout, "".join(self.stderr_lines)


@pytest.fixture
def auth_env(oauth_server, test_ca) -> dict[str, str]:
    """A shell with no mail_syncer settings but the endpoints pointed at the stand-ins."""
    return _clean_environment() | {
        "REQUESTS_CA_BUNDLE": test_ca.ca_bundle_path,
        "GOOGLE_AUTH_URI": oauth_server.google_auth_uri,
        "GOOGLE_TOKEN_URI": oauth_server.google_token_uri,
        "MS_AUTHORITY": oauth_server.ms_authority,
    }


def consent_in_browser(command: RunningCommand, login: str, ca_bundle: str) -> str:
    url = command.wait_for(AUTHORIZE_URL).group(1)
    page = browser_consent(url, login, ca_bundle)
    assert page.status_code == 200, page.text
    return page.text


def last_authorize_request(oauth_server, provider: str) -> dict[str, str]:
    return [r for r in oauth_server.authorize_requests if r["provider"] == provider][-1]


def logs_in(server, user: str, tokens) -> bool:
    endpoint = ImapEndpoint(server.host, server.imaps_port, ca_bundle=server.ca_bundle_path, timeout=10)
    with open_session(ImapAccount(f"test {user}", user, endpoint, token_source=tokens)) as client:
        return client.noop() is not None


def test_auth_gmail_prints_a_refresh_token_that_logs_in(oauth_server, auth_env, test_ca, dovecot_pair, trust_test_ca):
    user = dovecot_pair.gmail.new_user("consent")
    command = RunningCommand(
        ["auth", "gmail", "--client-id", oauth_server.google_client_id, "--client-secret",
         oauth_server.google_client_secret, "--no-browser", "--timeout", "60"],
        auth_env,
    )

    page = consent_in_browser(command, user, test_ca.ca_bundle_path)
    code, stdout, stderr = command.finish()

    assert code == 0, stderr
    assert "mail_syncer has its refresh token" in page
    printed = json.loads(stdout)
    token = printed["refresh_token"]
    assert token in oauth_server.refresh_tokens_of(user)
    assert printed["account"] == user
    assert printed["env_export"] == f"export GMAIL_REFRESH_TOKEN={token}"
    assert token not in stderr and oauth_server.google_client_secret not in stderr
    # What was asked of Google: the IMAP scope, offline access with consent (so a refresh token
    # comes back every time), PKCE with S256, a loopback redirect.
    asked = last_authorize_request(oauth_server, "google")
    assert GOOGLE_SCOPE in asked["scope"].split()
    assert (asked["access_type"], asked["prompt"], asked["code_challenge_method"]) == ("offline", "consent", "S256")
    assert asked["redirect_uri"].startswith("http://localhost:")
    # The token works as the pipeline uses it: refreshed by google-auth, then an XOAUTH2 login.
    tokens = GoogleTokenSource(
        account=user, refresh_token=token, client_id=oauth_server.google_client_id,
        client_secret=oauth_server.google_client_secret, token_uri=oauth_server.google_token_uri,
    )
    assert logs_in(dovecot_pair.gmail, user, tokens)


def test_auth_microsoft_prints_a_refresh_token_that_logs_in(oauth_server, auth_env, test_ca, dovecot_pair, trust_test_ca):
    user = dovecot_pair.outlook.new_user("consent")
    command = RunningCommand(
        ["auth", "microsoft", "--client-id", oauth_server.ms_client_id, "--tenant", "consumers", "--no-browser",
         "--timeout", "60"],
        auth_env,
    )

    page = consent_in_browser(command, user, test_ca.ca_bundle_path)
    code, stdout, stderr = command.finish()

    assert code == 0, stderr
    assert "mail_syncer has its refresh token" in page
    printed = json.loads(stdout)
    token = printed["refresh_token"]
    assert token in oauth_server.refresh_tokens_of(user)
    assert printed["account"] == user
    assert printed["env_export"] == f"export MS_REFRESH_TOKEN={token}"
    assert token not in stderr
    asked = last_authorize_request(oauth_server, "microsoft")
    assert {MS_SCOPE, "offline_access"} <= set(asked["scope"].split())
    assert asked["code_challenge_method"] == "S256" and asked["response_mode"] == "form_post"
    tokens = MicrosoftTokenSource(
        account=user, refresh_token=token, client_id=oauth_server.ms_client_id, authority=oauth_server.ms_authority
    )
    assert logs_in(dovecot_pair.outlook, user, tokens)


def test_auth_microsoft_device_code_waits_for_the_approval(oauth_server, auth_env):
    user = "device-user@outlook.test"
    polls_before = oauth_server.device_polls()
    command = RunningCommand(
        ["auth", "microsoft", "--client-id", oauth_server.ms_client_id, "--device-code", "--timeout", "60"], auth_env
    )

    user_code = command.wait_for(DEVICE_CODE).group(1)
    # It cannot have finished: nobody has approved. It polls (and is told to wait) until then.
    assert command.proc.poll() is None
    oauth_server.approve_device_code(user_code, user)
    code, stdout, stderr = command.finish()

    assert code == 0, stderr
    printed = json.loads(stdout)
    assert printed["refresh_token"] in oauth_server.refresh_tokens_of(user)
    assert printed["account"] == user
    assert printed["env_export"] == f"export MS_REFRESH_TOKEN={printed['refresh_token']}"
    assert oauth_server.device_polls() > polls_before


def test_write_secret_merges_one_key_and_prints_no_secret(oauth_server, auth_env, test_ca, aws_env, aws_client):
    secrets = aws_client("secretsmanager")
    secret_id = unique_name("mail-syncer/destination")
    others = {"SYNC_ROUTES_JSON": [{"name": "work", "gmail_user": "a@gmail.com"}], "MS_CLIENT_SECRET": "keep-this-client-secret"}
    secrets.create_secret(Name=secret_id, SecretString=json.dumps({**others, "MS_REFRESH_TOKEN": "the-old-refresh-token"}))
    user = "writer@outlook.test"
    command = RunningCommand(
        ["auth", "microsoft", "--client-id", oauth_server.ms_client_id, "--no-browser", "--timeout", "60",
         "--write-secret-id", secret_id, "--write-secret-key", "MS_REFRESH_TOKEN"],
        auth_env | aws_env,
    )

    consent_in_browser(command, user, test_ca.ca_bundle_path)
    code, stdout, stderr = command.finish()

    assert code == 0, stderr
    assert json.loads(stdout) == {"provider": "microsoft", "account": user, "written_to": secret_id,
                                  "key": "MS_REFRESH_TOKEN", "created": False}
    stored = json.loads(secrets.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"])
    (issued,) = oauth_server.refresh_tokens_of(user)
    assert stored == {**others, "MS_REFRESH_TOKEN": issued}
    for secret in (issued, "the-old-refresh-token", "keep-this-client-secret"):
        assert secret not in stdout + stderr


def test_write_secret_creates_a_missing_secret(oauth_server, auth_env, test_ca, aws_env, aws_client):
    secret_id = unique_name("mail-syncer/gmail")
    user = "creator@gmail.test"
    command = RunningCommand(
        ["auth", "gmail", "--no-browser", "--timeout", "60", "--write-secret-id", secret_id],
        auth_env | aws_env | {"GMAIL_CLIENT_ID": oauth_server.google_client_id,
                              "GMAIL_CLIENT_SECRET": oauth_server.google_client_secret},
    )

    consent_in_browser(command, user, test_ca.ca_bundle_path)
    code, stdout, stderr = command.finish()

    assert code == 0, stderr
    printed = json.loads(stdout)
    assert (printed["written_to"], printed["key"], printed["created"]) == (secret_id, "GMAIL_REFRESH_TOKEN", True)
    (issued,) = oauth_server.refresh_tokens_of(user)
    stored = json.loads(aws_client("secretsmanager").get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"])
    assert stored == {"GMAIL_REFRESH_TOKEN": issued}
    assert issued not in stdout + stderr


def test_a_refused_exchange_is_a_clear_error(oauth_server, auth_env, test_ca):
    command = RunningCommand(
        ["auth", "gmail", "--client-id", oauth_server.google_client_id, "--client-secret", "not-the-client-secret",
         "--no-browser", "--timeout", "60"],
        auth_env,
    )

    consent_in_browser(command, "refused@gmail.test", test_ca.ca_bundle_path)
    code, stdout, stderr = command.finish()

    assert code == 5
    assert stdout == ""
    assert f"error: Google refused at {oauth_server.google_token_uri}: invalid_client" in stderr
    assert "not-the-client-secret" not in stderr


def test_a_missing_client_id_is_a_usage_error(auth_env):
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "auth", "microsoft", "--no-browser"],
        env=auth_env, cwd=REPO_ROOT / "tests", capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "auth microsoft: needs --client-id (or MS_CLIENT_ID)" in done.stderr
