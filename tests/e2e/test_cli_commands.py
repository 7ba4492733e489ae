"""The producer and consumer commands one at a time, as a user runs them to see what a run will
do: `scan --dry-run` and `run-once --dry-run` write nothing, `scan` then `consume` is `run-once`
in two steps, MAX_ENQUEUE_PER_RUN spreads a backlog over runs (and `drain` loops until it is
gone), and `status` says what happened in words."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid

from tests.harness.mail import assert_copied_exactly, corpus_seed, read_folder, seed


def status_json(setup) -> dict:
    done = setup.cli("status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def email_message(subject: str, *, sender: str, size: int) -> bytes:
    """A message as a mail client writes it: a From with a non-ASCII name (RFC 2047 encoded)."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, "bob@mail.test", subject
    message["Message-ID"] = make_msgid(domain="mail.test")
    message.set_content("x" * size)
    return message.as_bytes(policy=SMTP)


def test_dry_runs_list_what_would_be_sent_and_write_nothing(sync_env, dovecot_pair):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    when = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    seeded = [
        (email_message(f"Quarterly report {n}", sender="Jürgen Alt <jurgen@mail.test>", size=900 * n), (), when)
        for n in (1, 2, 3)
    ]
    uids = seed(dovecot_pair.gmail, user, "INBOX", seeded)
    shown_at = when.astimezone().strftime("%Y-%m-%d %H:%M")

    for command in ("scan", "run-once", "drain"):
        done = setup.cli(command, "--dry-run")

        assert done.returncode == 0, done.stdout + done.stderr
        assert "route work: 3 new, would enqueue 3, 0 left for the next run" in done.stdout
        # What a person checks before copying: which messages, from whom, about what, how big.
        listed = re.findall(r"^  UID (\d+)  (\S+ \S+)  ([\d.]+) kB  (.+?)  (Quarterly report \d)$", done.stdout, re.M)
        sizes = [len(body) for body, _, _ in seeded]
        assert listed == [
            (str(uid), shown_at, f"{size / 1000:.1f}", "Jürgen Alt <jurgen@mail.test>", f"Quarterly report {n}")
            for uid, size, n in zip(uids, sizes, (1, 2, 3), strict=True)
        ], done.stdout
        assert f"total: 3 message(s), {sum(sizes) / 1000:.1f} kB would be copied (dry run: nothing was queued or copied)" in done.stdout
        status = status_json(setup)
        (route,) = status["routes"]
        assert route["watermark"] is None and route["claims"] == {}
        assert status["queue"]["queued"] == 0
    assert dovecot_pair.outlook.logins(setup.outlook_user) == 0


def test_scan_then_consume_copies_what_was_queued(sync_env, dovecot_pair):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(4))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")

    scanned = setup.cli("scan")

    assert scanned.returncode == 0, scanned.stdout + scanned.stderr
    assert re.search(rf"^route work: 4 new, enqueued 4, 0 left for the next run; watermark UIDVALIDITY \d+, UID {source[-1].uid}$", scanned.stdout, re.MULTILINE)
    assert dovecot_pair.outlook.logins(setup.outlook_user) == 0  # the producer copies nothing
    assert status_json(setup)["queue"]["queued"] == 4

    consumed = setup.cli("consume")

    assert consumed.returncode == 0, consumed.stdout + consumed.stderr
    assert "route work: 4 copied, 0 skipped, 0 failed" in consumed.stdout
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))
    queue = status_json(setup)["queue"]
    assert (queue["queued"], queue["in_flight"], queue["dead"]) == (0, 0, 0)

    again = setup.cli("scan")
    assert "route work: 0 new, enqueued 0" in again.stdout


def test_cap_spreads_a_backlog_over_runs_and_drain_loops_until_it_is_gone(sync_env, dovecot_pair):
    setup = sync_env()
    setup.env["MAX_ENQUEUE_PER_RUN"] = "3"
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(8))
    source = read_folder(dovecot_pair.gmail, user, "INBOX")

    first = setup.cli("run-once")

    assert first.returncode == 0, first.stdout + first.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in first.stdout
    copied = read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    assert_copied_exactly(source[:3], copied)  # the oldest first
    assert status_json(setup)["routes"][0]["watermark"]["last_uid"] == source[2].uid

    rest = setup.cli("drain")

    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert "route work: 5 copied, 0 skipped, 0 failed" in rest.stdout
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"))


def test_status_text_says_what_happened_per_route(sync_env, dovecot_pair):
    setup = sync_env(routes=(("alpha", "INBOX", "Alpha"), ("beta", "INBOX", "Beta")))
    alpha, beta = setup.routes
    seed(dovecot_pair.gmail, alpha.gmail_user, "INBOX", corpus_seed(2))
    before = setup.cli("status")
    assert before.returncode == 0, before.stdout + before.stderr
    assert f"route alpha: {alpha.gmail_user} INBOX -> Alpha; watermark none yet" in before.stdout
    assert "  never scanned" in before.stdout

    setup.set_routes([alpha.as_json(), beta.as_json() | {"gmail_imap_port": 9}])  # beta's source is down
    assert setup.cli("drain").returncode == 5
    after = setup.cli("status")

    assert after.returncode == 0, after.stdout + after.stderr
    lines = after.stdout.splitlines()
    alpha_at = lines.index(next(line for line in lines if line.startswith("route alpha:")))
    assert "watermark UIDVALIDITY" in lines[alpha_at]
    assert lines[alpha_at + 1] == "  done 2, skipped 0, to try again 0, in progress 0"
    assert re.fullmatch(r"  last scan \S+ ok", lines[alpha_at + 2])
    beta_block = "\n".join(lines[lines.index(next(line for line in lines if line.startswith("route beta:"))):])
    assert "FAILED (failing since" in beta_block and "connect failed: connection refused" in beta_block
    assert re.search(r"^queue: SQLite \S+: 0 queued, 0 in flight, 0 dead$", after.stdout, re.MULTILINE)


def test_help_names_every_command_and_the_exit_codes(sync_env):
    setup = sync_env()
    done = setup.cli("--help")
    assert done.returncode == 0
    for command in ("drain", "run-once", "scan", "consume", "status", "check"):
        assert re.search(rf"^    {command}\b", done.stdout, re.MULTILINE), command
    assert "Exit codes: 0 ok, 1 messages failed" in done.stdout
    unknown = setup.cli("copy-everything")
    assert unknown.returncode == 2 and "invalid choice: 'copy-everything'" in unknown.stderr
