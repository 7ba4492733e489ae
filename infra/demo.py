"""`make demo`: mail_syncer copying mail, with no account and no settings.

Two throwaway Dovecot IMAP servers on 127.0.0.1 stand in for Gmail and Outlook.com, and a local
OAuth endpoint for Google's and Microsoft's token services: the real `drain` gets its access
tokens through google-auth's and msal's real refresh code and logs in with XOAUTH2. These are
the tests' own servers (tests/harness), imported, not copied. It seeds the sample mail of
infra/sample_mail.py, runs `python -m shared.cli drain` and then `status` as a user would (their
output as they print it), checks each copy byte for byte against its source, and then stops the
servers and removes every file it made, also after Ctrl-C, SIGTERM or a failure.

    .venv/bin/python infra/demo.py      (what `make demo` runs, once Dovecot and .venv are there)
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from infra.sample_mail import RECENT_DAYS, sample_mailbox  # noqa: E402
from tests.harness.mail import DovecotServer, assert_copied_exactly, read_folder, seed  # noqa: E402
from tests.harness.oauth import OAuthServer  # noqa: E402
from tests.harness.sync_env import RouteAccount, settings_env  # noqa: E402
from tests.harness.tls import make_local_ca  # noqa: E402

# (route, Gmail folder, Outlook folder)
ROUTES = (("inbox", "INBOX", "Gmail/Inbox"), ("receipts", "Receipts", "Gmail/Receipts"))
# How long a drain is given to end after Ctrl-C before it is killed (it takes about 2 s).
CLI_STOP_SECONDS = 15


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main() -> int:
    # SIGTERM (a closed terminal, a CI timeout) ends the demo as Ctrl-C does: with the cleanup.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    cleanup = ExitStack()
    made = Made()
    try:
        code = run(cleanup, made)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception as exc:  # noqa: BLE001 - e.g. Dovecot would not start: say it, then clean up
        print(f"demo: failed: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave a server running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup.close()
    took = f"{time.monotonic() - started:.0f} s in all"
    if made.servers:
        say(f"stopped {' and '.join(made.servers)}")
    if made.folders:
        say(f"removed {', '.join(map(str, made.folders))} ({took})")
    return code


@dataclass
class Made:
    """What the demo started and wrote, to say at the end that it is gone."""

    servers: list[str] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)


def run(cleanup: ExitStack, made: Made) -> int:
    say("no accounts needed: two throwaway Dovecot IMAP servers on 127.0.0.1 play Gmail and Outlook.com,")
    say("and a local OAuth endpoint plays Google's and Microsoft's token services (real XOAUTH2 logins)")
    workdir = Path(tempfile.mkdtemp(prefix="mail-syncer-demo-"))
    cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
    made.folders.append(workdir)
    ca = make_local_ca(workdir / "tls")
    oauth = OAuthServer(ca)
    cleanup.callback(oauth.close)
    gmail = DovecotServer("demo-gmail", "gmail.test", ca, oauth.introspection_url)
    outlook = DovecotServer("demo-outlook", "outlook.test", ca, oauth.introspection_url)
    for label, server in (("Gmail", gmail), ("Outlook.com", outlook)):
        cleanup.callback(server.close)  # before start(): a server that half started is stopped too
        made.folders.append(server.root)
        server.start()
        made.servers.append(f"the {label} stand-in (Dovecot pid {server.pid}, 127.0.0.1:{server.imaps_port})")

    user = gmail.new_user("alice")
    token = oauth.issue_refresh_token(user, "google")
    outlook_user = outlook.new_user("me")
    mail = sample_mailbox(datetime.now(timezone.utc), user)
    for _, folder, _ in ROUTES:
        seed(gmail, user, folder, [(m.data, m.flags, m.internaldate) for m in mail if m.folder == folder])
    say(f"Gmail stand-in: {user} on 127.0.0.1:{gmail.imaps_port} (Dovecot pid {gmail.pid}), seeded with:")
    for name, folder, target in ROUTES:
        here = [m for m in mail if m.folder == folder]
        recent = sum(m.recent for m in here)
        say(f"  {folder}: {len(here)} messages, {recent} of the last {RECENT_DAYS} days, {len(here) - recent} "
            f"older than 7 days; route {name} copies it to {target!r}")
    say("  (plain text, HTML, attachments, 8-bit UTF-8, a thread, flags; made by infra/sample_mail.py)")
    say(f"Outlook.com stand-in: {outlook_user} on 127.0.0.1:{outlook.imaps_port} (Dovecot pid {outlook.pid}), empty")
    say("settings: SYNC_ROUTES_JSON, OAuth clients and refresh tokens in the environment (no .env);"
        " FALLBACK_SINCE_DAYS left at 7")

    accounts = [RouteAccount(name, user, token, folder, target) for name, folder, target in ROUTES]
    ms_token = oauth.issue_refresh_token(outlook_user, "microsoft")
    env = settings_env(gmail, outlook, oauth, ca, accounts, outlook_user, ms_token, workdir / "state" / "state.db")
    drained = run_cli("drain", env=env, cwd=workdir)
    shown = run_cli("status", env=env, cwd=workdir)

    try:
        for _, folder, target in ROUTES:
            in_window = {m.data for m in mail if m.folder == folder and m.recent}
            source = [stored for stored in read_folder(gmail, user, folder) if stored.body in in_window]
            assert_copied_exactly(source, read_folder(outlook, outlook_user, target))
    except AssertionError as exc:
        print(f"demo: the copies do not match their sources: {exc}", file=sys.stderr, flush=True)
        return 1
    copied = sum(m.recent for m in mail)
    say(f"checked: the Outlook.com stand-in holds {copied} messages, each the exact bytes, flags and date of a")
    say(f"source message of the last 7 days; the {len(mail) - copied} older ones were left, as the start window says")
    say("to sync your own mail: cp .env.example .env, fill it in (README: Configuration), make check, make drain")
    return drained or shown


def run_cli(command: str, *, env: dict[str, str], cwd: Path) -> int:
    """`python -m shared.cli COMMAND` with its output going straight to the user's terminal."""
    say(f"$ python -m shared.cli {command}")
    process = subprocess.Popen([sys.executable, "-m", "shared.cli", command], env=env, cwd=cwd)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the drain too (same terminal); SIGTERM may have reached only this process.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=CLI_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise


if __name__ == "__main__":
    sys.exit(main())
