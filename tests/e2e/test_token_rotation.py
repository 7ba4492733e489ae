"""Microsoft's rotating refresh token through the whole pipeline, and refused tokens on both sides.

Each `drain` is a new process: it redeems the newest refresh token it can find and Microsoft's
stand-in answers with a new one (tests/harness/oauth.py records which token each came from, so
a test can tell how many rotations lie behind a token). The newest must be kept where the next
process finds it, in a token file of its own (never the state store) when MS_REFRESH_TOKEN came
from the environment, in the Secrets Manager secret when it came from one, and the first
token's end must not matter.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

from shared.tokens.store import TokenFile
from tests.harness.aws import unique_name
from tests.harness.mail import corpus_seed, read_folder, seed


def token_dir(setup) -> Path:
    return Path(setup.env["STATE_DB"]).with_name("state-tokens")


def stored_token(setup):
    """The newest rotation of the configured MS_REFRESH_TOKEN kept in the token file."""
    return TokenFile(token_dir(setup) / "microsoft.db", setup.env["MS_REFRESH_TOKEN"]).stored()


def state_files_bytes(setup) -> bytes:
    """The state database as it lies on disk, its write-ahead log included."""
    db = Path(setup.env["STATE_DB"])
    return b"".join(path.read_bytes() for path in db.parent.glob(db.name + "*"))


def new_mail(dovecot_pair, user: str, folder: str = "INBOX", count: int = 1) -> None:
    already = len(read_folder(dovecot_pair.gmail, user, folder))
    seed(dovecot_pair.gmail, user, folder, corpus_seed(already + count)[already:])


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def test_the_newest_token_is_kept_locally_and_outlives_the_first(sync_env, dovecot_pair, oauth_server):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    for run in (1, 2):
        new_mail(dovecot_pair, user)
        done = setup.cli("drain")

        assert done.returncode == 0, output(done)
        assert "route work: 1 copied" in done.stdout
        stored = stored_token(setup)
        # One rotation per run, each stored on top of the last one.
        assert stored.version == run == oauth_server.rotation_depth(stored.token)
        assert stored.token in oauth_server.refresh_tokens_of(setup.outlook_user)
        assert stored.token not in output(done)
        assert stored.token.encode() not in state_files_bytes(setup)
        if run == 1:
            # The configured token's life ends (revoked, or 90 days on): the kept one goes on.
            oauth_server.revoke(setup.ms_refresh_token)

    assert len(read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")) == 2
    # Only its owner can enter the token file's directory (SQLite's journal lies there too).
    assert stat.S_IMODE(token_dir(setup).stat().st_mode) == 0o700
    status = setup.cli("status").stdout
    assert re.search(
        rf"^destination {re.escape(setup.outlook_user)}: refresh token from the environment; its newest rotation "
        rf"\(2 stored, last \S+\) in token file {re.escape(str(token_dir(setup) / 'microsoft.db'))}$",
        status,
        re.MULTILINE,
    ), status


def test_the_newest_token_goes_back_into_its_secret(sync_env, dovecot_pair, oauth_server, aws_env, aws_client):
    setup = sync_env()
    secrets = aws_client("secretsmanager")
    secret_id = unique_name("mail-syncer/destination")
    in_secret = {"OUTLOOK_USER": setup.outlook_user, "MS_CLIENT_ID": oauth_server.ms_client_id}
    secrets.create_secret(Name=secret_id, SecretString=json.dumps({**in_secret, "MS_REFRESH_TOKEN": setup.ms_refresh_token}))
    for name in ("OUTLOOK_USER", "MS_CLIENT_ID", "MS_REFRESH_TOKEN"):
        del setup.env[name]
    setup.env.update(aws_env | {"AWS_SECRETS_MANAGER_SECRET_IDS": secret_id})
    user = setup.routes[0].gmail_user

    for run in (1, 2):
        new_mail(dovecot_pair, user)
        done = setup.cli("drain")

        assert done.returncode == 0, output(done)
        secret = json.loads(secrets.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"])
        assert secret.keys() == {*in_secret, "MS_REFRESH_TOKEN"}
        assert {k: secret[k] for k in in_secret} == in_secret
        assert oauth_server.rotation_depth(secret["MS_REFRESH_TOKEN"]) == run
        assert secret["MS_REFRESH_TOKEN"] not in output(done)
        if run == 1:
            oauth_server.revoke(setup.ms_refresh_token)

    # The secret was the place: no token file was made.
    assert not token_dir(setup).exists()
    assert len(read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")) == 2


CONCURRENT = 3


def test_processes_refreshing_at_once_keep_one_of_the_newest(sync_env, oauth_server):
    setup = sync_env()
    for _ in range(2):
        # `check` logs in to the destination: each process redeems the newest token it finds.
        running = [
            subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "check"], env=setup.env, cwd=setup.workdir,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for _ in range(CONCURRENT)
        ]
        finished = [(process.communicate(timeout=120), process.returncode) for process in running]
        assert all(code == 0 for _, code in finished), finished

        stored = stored_token(setup)
        issued = oauth_server.refresh_tokens_of(setup.outlook_user)
        # Whatever the interleaving: every stored write went on top of the one before it (so
        # the version counts the rotations behind the token), and no process that got a newer
        # token left an older one stored.
        assert oauth_server.rotation_depth(stored.token) == stored.version
        assert stored.version == max(oauth_server.rotation_depth(token) for token in issued)
    assert stored.version >= 2


def test_refused_tokens_name_the_route_or_the_destination_and_the_fix(sync_env, dovecot_pair, oauth_server):
    setup = sync_env(routes=(("alpha", "INBOX", "Alpha"), ("beta", "INBOX", "Beta")))
    setup.env["MAX_RECEIVE_COUNT"] = "1"  # a refused message is dead-lettered at its first failure
    alpha, beta = setup.routes
    new_mail(dovecot_pair, alpha.gmail_user)
    new_mail(dovecot_pair, beta.gmail_user)

    # Google refuses route alpha's refresh token: alpha is named with the fix, beta goes on.
    oauth_server.revoke(alpha.refresh_token)
    done = setup.cli("drain")

    assert done.returncode == 5, output(done)
    assert "route beta: 1 copied" in done.stdout
    gmail_fix = "`python -m shared.cli auth gmail` and put it in route alpha's gmail_refresh_token in SYNC_ROUTES_JSON"
    for shown in (done.stdout, setup.cli("status").stdout):
        alpha_lines = [line for line in shown.splitlines() if "invalid_grant" in line]
        assert alpha_lines and all(f"route alpha source {alpha.gmail_user}" in line for line in alpha_lines), shown
        assert gmail_fix in shown
    checked = setup.cli("check")
    assert checked.returncode == 5
    assert re.search(rf"^FAIL  route alpha .*invalid_grant.*{re.escape(gmail_fix)}", checked.stdout, re.MULTILINE), checked.stdout
    assert re.search(r"^ok    route beta ", checked.stdout, re.MULTILINE)

    # The person runs `auth gmail` again and configures the new token: alpha is copied.
    alpha.refresh_token = oauth_server.issue_refresh_token(alpha.gmail_user, "google")
    setup.set_routes([alpha.as_json(), beta.as_json()])
    done = setup.cli("drain")
    assert done.returncode == 0, output(done)
    assert "route alpha: 1 copied" in done.stdout

    # Microsoft refuses the destination's token (every one: the rotated ones kept too).
    oauth_server.revoke_all(setup.outlook_user)
    new_mail(dovecot_pair, beta.gmail_user)
    done = setup.cli("drain")

    assert done.returncode == 1, output(done)
    ms_fix = "`python -m shared.cli auth microsoft` and set MS_REFRESH_TOKEN in the environment"
    assert f"destination {setup.outlook_user}" in done.stdout and "invalid_grant" in done.stdout
    assert ms_fix in done.stdout
    status = setup.cli("status").stdout
    assert re.search(r"^  token REFUSED since \S+ \(last \S+\): .*invalid_grant.*" + re.escape(ms_fix), status, re.MULTILINE), status
    checked = setup.cli("check")
    assert checked.returncode == 5
    assert re.search(rf"^FAIL  destination .*invalid_grant.*{re.escape(ms_fix)}", checked.stdout, re.MULTILINE), checked.stdout

    # `auth microsoft` again: the new configured token wins over the refused chain kept in
    # the token file, the dead letter goes back, and the problem is cleared once a refresh works.
    setup.env["MS_REFRESH_TOKEN"] = oauth_server.issue_refresh_token(setup.outlook_user, "microsoft")
    assert setup.cli("redrive").returncode == 0
    done = setup.cli("drain")
    assert done.returncode == 0, output(done)
    assert "route beta: 1 copied" in done.stdout
    assert "REFUSED" not in setup.cli("status").stdout
    assert oauth_server.rotation_depth(stored_token(setup).token) == 1
    assert len(read_folder(dovecot_pair.outlook, setup.outlook_user, "Beta")) == 2
