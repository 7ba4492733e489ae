"""The command-line options a user of imapsync or mbsync reaches for (issue 15, items 2 and 3),
run as a user runs them against the two Dovecot servers: `--route`, `drain --since`, `-v`,
`--log-format json`."""

from __future__ import annotations

import datetime as dt
import json
import re

from tests.harness.mail import assert_copied_exactly, connect, read_folder, seed


def dated(subject: str, when: dt.datetime) -> tuple[bytes, tuple, dt.datetime]:
    body = f"From: Alice <alice@mail.test>\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@mail.test>\r\n\r\nHi\r\n"
    return body.encode(), (), when


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def test_route_copies_only_the_routes_named_and_an_unknown_name_is_a_usage_error(sync_env, dovecot_pair):
    setup = sync_env(routes=(("alpha", "INBOX", "Alpha"), ("beta", "INBOX", "Beta"), ("gamma", "INBOX", "Gamma")))
    for route in setup.routes:
        seed(dovecot_pair.gmail, route.gmail_user, "INBOX", [dated(f"{route.name} {n}", now()) for n in range(2)])
    # beta's references are queued already (a scan ran): a run for alpha must leave them there.
    assert setup.cli("scan", "--route", "beta").returncode == 0

    done = setup.cli("drain", "--route", "alpha", "--route", "gamma")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route alpha: 2 copied, 0 skipped, 0 failed" in done.stdout
    assert "route gamma: 2 copied, 0 skipped, 0 failed" in done.stdout
    assert "route beta" not in done.stdout
    outlook = setup.outlook_user
    assert [len(read_folder(dovecot_pair.outlook, outlook, f)) for f in ("Alpha", "Gamma")] == [2, 2]
    client = connect(dovecot_pair.outlook, outlook)
    try:
        assert not client.folder_exists("Beta")
    finally:
        client.logout()
    status = json.loads(setup.cli("status", "--json").stdout)
    assert status["queue"]["queued"] == 2  # beta's two, untouched

    wrong = setup.cli("drain", "--route", "alpha", "--route", "delta")
    assert wrong.returncode == 2
    assert "--route: unknown route 'delta' (routes: alpha, beta, gamma)" in wrong.stderr
    rest = setup.cli("consume", "--route", "beta")
    assert rest.returncode == 0 and "route beta: 2 copied" in rest.stdout, rest.stdout + rest.stderr
    assert len(read_folder(dovecot_pair.outlook, outlook, "Beta")) == 2


def test_drain_since_copies_the_older_mail_the_first_run_left_and_nothing_twice(sync_env, dovecot_pair):
    setup = sync_env()
    setup.env["FALLBACK_SINCE_DAYS"] = "7"
    user = setup.routes[0].gmail_user
    older = [dated(f"older {n}", now() - dt.timedelta(days=20 + n)) for n in range(3)]
    oldest = [dated("oldest", now() - dt.timedelta(days=90))]
    recent = [dated(f"recent {n}", now() - dt.timedelta(hours=n)) for n in range(2)]
    seed(dovecot_pair.gmail, user, "INBOX", oldest + older + recent)
    first = setup.cli("drain")
    assert "route work: 2 copied" in first.stdout and "4 older message(s) in INBOX are not copied" in first.stdout
    assert "drain --since YYYY-MM-DD" in first.stdout

    since = (now() - dt.timedelta(days=30)).date().isoformat()
    dry = setup.cli("drain", "--since", since, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"route work: from {since} (--since): 3 older message(s) never copied before, to copy; 2 copied or tried before" in dry.stdout
    assert [s for s in re.findall(r"older \d", dry.stdout)] == ["older 0", "older 1", "older 2"]  # in UID order
    backfill = setup.cli("drain", "--since", since)

    assert backfill.returncode == 0, backfill.stdout + backfill.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in backfill.stdout
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    copied = read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    assert_copied_exactly(source[1:], copied)  # all but the oldest, each once
    # status says where the route starts now, and that only the oldest one is left behind.
    shown = setup.cli("status").stdout
    assert f"  started {since} (its since, or drain --since); 1 older message not copied" in shown, shown
    again = setup.cli("drain", "--since", since)
    assert "route work: 0 copied" in again.stdout and "0 older message(s) never copied before" in again.stdout
    assert len(read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")) == 5


def test_verbose_prints_a_line_per_message_and_json_logs_are_one_object_a_line(sync_env, dovecot_pair):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    uids = seed(dovecot_pair.gmail, user, "INBOX", [dated(f"note {n}", now()) for n in range(3)])
    setup.env["LOG_LEVEL"] = "DEBUG"

    done = setup.cli("--log-format", "json", "drain", "-v")

    assert done.returncode == 0, done.stdout + done.stderr
    copied = read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    lines = re.findall(r"^route work UID (\d+) copied as UID (\d+), (\d+) bytes, (\d+) ms$", done.stdout, re.M)
    by_uid = {int(uid): (int(dest), int(size)) for uid, dest, size, _ in lines}
    sources = {m.uid: m for m in read_folder(dovecot_pair.gmail, user, "INBOX")}
    assert sorted(by_uid) == uids
    assert sorted(dest for dest, _ in by_uid.values()) == [m.uid for m in copied]
    assert all(size == len(sources[uid].body) for uid, (_, size) in by_uid.items())
    # stderr is JSON, a line an object: no progress line drawn among them.
    records = [json.loads(line) for line in done.stderr.splitlines()]
    per_message = [r for r in records if r["logger"] == "mail_syncer.outcome"]
    assert sorted(r["uid"] for r in per_message) == uids
    assert {(r["route"], r["outcome"], r["level"]) for r in per_message} == {("work", "copied", "DEBUG")}
    assert all(r["bytes"] == len(sources[r["uid"]].body) for r in per_message)
    assert not any("done:" in r["message"] for r in records)
