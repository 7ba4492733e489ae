"""`drain` end to end on the embedded backends: real Dovecot pair, XOAUTH2 with real token
refresh, the CLI in a subprocess, exactly as a user runs it."""

from __future__ import annotations

import json
from collections import Counter

from tests.harness.mail import assert_copied_exactly, corpus_seed, read_folder, seed, uidnext


def test_drain_copies_the_corpus_exactly_once(sync_env, dovecot_pair, oauth_server, servers):
    setup = sync_env(routes=(("corpus", "INBOX", "Gmail/Corpus"),))
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed())
    source_before = read_folder(dovecot_pair.gmail, user, "INBOX")
    refreshes = oauth_server.refresh_count("google"), oauth_server.refresh_count("microsoft")

    done = setup.cli("drain", timeout=600)

    # What the destination refuses for good (Outlook.com: a line over 9,900 characters) is
    # skipped with its reason; everything else is copied.
    refused = Counter(reason for m in source_before if (reason := servers.refusal(m.body)))
    taken = [m for m in source_before if not servers.refusal(m.body)]
    assert done.returncode == 0, done.stdout + done.stderr
    reasons = " (" + ", ".join(f"{r}: {n}" for r, n in sorted(refused.items())) + ")" if refused else ""
    assert f"route corpus: {len(taken)} copied, {refused.total()} skipped{reasons}, 0 failed" in done.stdout
    destination = read_folder(dovecot_pair.outlook, setup.outlook_user, "Gmail/Corpus")
    assert_copied_exactly(taken, destination, kept=servers.kept)
    # The source is unchanged: EXAMINE and BODY.PEEK[] only, no \Seen added.
    assert read_folder(dovecot_pair.gmail, user, "INBOX") == source_before
    # XOAUTH2 on both sides, with tokens from real refresh calls.
    assert oauth_server.refresh_count("google") > refreshes[0]
    assert oauth_server.refresh_count("microsoft") > refreshes[1]
    for secret in setup.secrets:
        assert secret not in done.stdout + done.stderr

    # Run again: nothing new, zero APPENDs (the destination's UIDNEXT does not move).
    top = uidnext(dovecot_pair.outlook, setup.outlook_user, "Gmail/Corpus")
    again = setup.cli("drain")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "route corpus: 0 copied, 0 skipped, 0 failed" in again.stdout
    assert uidnext(dovecot_pair.outlook, setup.outlook_user, "Gmail/Corpus") == top

    status = json.loads(setup.cli("status", "--json").stdout)
    (route,) = status["routes"]
    assert route["claims"] == {"done": len(taken)} | ({"skipped": refused.total()} if refused else {})
    assert route["skipped_reasons"] == dict(refused)
    assert route["watermark"]["last_uid"] == source_before[-1].uid
    assert status["queue"]["queued"] == status["queue"]["in_flight"] == status["queue"]["dead"] == 0


def test_new_messages_between_runs(sync_env, dovecot_pair, servers):
    setup = sync_env()
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(5))
    assert setup.cli("drain").returncode == 0

    seed(dovecot_pair.gmail, user, "INBOX", corpus_seed(8)[5:])
    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    copied = read_folder(dovecot_pair.outlook, setup.outlook_user, "Work")
    assert_copied_exactly(read_folder(dovecot_pair.gmail, user, "INBOX"), copied, kept=servers.kept)


def test_one_route_down_the_other_is_copied(sync_env, dovecot_pair, servers):
    setup = sync_env(routes=(("up", "INBOX", "Up"), ("down", "INBOX", "Down/Nested")))
    up, down = setup.routes
    seed(dovecot_pair.gmail, up.gmail_user, "INBOX", corpus_seed(4))
    seed(dovecot_pair.gmail, down.gmail_user, "INBOX", corpus_seed(2))
    routes = [up.as_json(), down.as_json() | {"gmail_imap_port": 9}]  # nothing listens on port 9
    setup.set_routes(routes)

    done = setup.cli("drain")

    assert done.returncode == 5, done.stdout + done.stderr
    assert "route up: 4 copied, 0 skipped, 0 failed" in done.stdout
    assert f"route down: 0 copied, 0 skipped, 0 failed; scan failed: route down source {down.gmail_user} at 127.0.0.1:9: connect failed: connection refused" in done.stdout
    copied = read_folder(dovecot_pair.outlook, setup.outlook_user, "Up")
    assert_copied_exactly(read_folder(dovecot_pair.gmail, up.gmail_user, "INBOX"), copied, kept=servers.kept)
    status = setup.cli("status")
    assert "route down" in status.stdout and "connect failed: connection refused" in status.stdout


def test_gate_state_store_unreachable_opens_no_imap_connection(sync_env, dovecot_pair, tmp_path):
    setup = sync_env()
    seed(dovecot_pair.gmail, setup.routes[0].gmail_user, "INBOX", corpus_seed(2))
    logins_before = dovecot_pair.gmail.logins(setup.routes[0].gmail_user)
    (tmp_path / "blocker").write_text("")
    setup.env["STATE_DB"] = str(tmp_path / "blocker" / "state.db")

    done = setup.cli("drain")

    assert done.returncode == 4, done.stdout + done.stderr
    assert "FAIL  state store" in done.stdout
    assert "stopped: no mailbox is opened while the state store fails; run again once it works" in done.stderr
    assert dovecot_pair.gmail.logins(setup.routes[0].gmail_user) == logins_before
    assert dovecot_pair.outlook.logins(setup.outlook_user) == 0
    assert "Traceback" not in done.stdout + done.stderr


def test_routes_of_three_accounts_are_copied_over_at_most_outlook_max_connections_sessions(sync_env, dovecot_pair, servers):
    setup = sync_env((("ann", "INBOX", "Ann"), ("bob", "INBOX", "Bob"), ("cy", "INBOX", "Cy")))
    setup.env["OUTLOOK_MAX_CONNECTIONS"] = "2"
    sources = {}
    for account in setup.routes:
        seed(dovecot_pair.gmail, account.gmail_user, "INBOX", corpus_seed(15))
        sources[account.name] = read_folder(dovecot_pair.gmail, account.gmail_user, "INBOX")

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    # Two routes at a time, one Outlook session each: two logins for the three routes.
    assert dovecot_pair.outlook.logins(setup.outlook_user) == 2, done.stderr
    for account in setup.routes:
        assert f"route {account.name}: 15 copied, 0 skipped, 0 failed" in done.stdout
        copied = read_folder(dovecot_pair.outlook, setup.outlook_user, account.outlook_folder)
        assert_copied_exactly(sources[account.name], copied, kept=servers.kept)


def test_a_first_drain_says_where_it_starts_and_what_older_mail_it_leaves(sync_env, dovecot_pair):
    """Issue 15: older mail was left out without a word. The first drain names its start date
    and the number of older messages in the folder it will never copy, and how to include them."""
    import datetime as dt

    setup = sync_env()
    setup.env["FALLBACK_SINCE_DAYS"] = "7"
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    old = [(f"Subject: old {n}\r\n\r\nold\r\n".encode(), (), now - dt.timedelta(days=40 + n)) for n in range(3)]
    new = [(f"Subject: new {n}\r\n\r\nnew\r\n".encode(), (), now - dt.timedelta(hours=n)) for n in range(2)]
    seed(dovecot_pair.gmail, setup.routes[0].gmail_user, "INBOX", old + new)

    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    start = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=7)).isoformat()
    line = next(line for line in done.stdout.splitlines() if "first scan" in line)
    assert line.startswith(f"route work: first scan, from {start} (FALLBACK_SINCE_DAYS=7): 2 new; "), line
    assert "3 older message(s) in INBOX are not copied" in line and "since" in line, line
    assert "route work: 2 copied, 0 skipped, 0 failed" in done.stdout
    again = setup.cli("drain")
    assert "first scan" not in again.stdout
