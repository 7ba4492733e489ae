"""When each refresh token last worked, as `check` and `status` show it, through the real token
refresh against the local OAuth endpoints (tests/harness/oauth.py), Dovecot and a SQLite state file.

Weeks cannot pass in a test: what earlier runs recorded is put into the state file first, at
the times it would have been recorded, with the tag of the configured token as a run records it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time

from shared.state.sqlite import SqliteStateStore
from shared.tokens.health import DAY, token_tag
from tests.harness.mail import seed


def record_worked(setup, provider: str, account: str, token: str, *days_ago: float) -> None:
    """What runs `days_ago` recorded: the token's refreshes that worked."""
    now = time.time()
    for ago in days_ago:
        store = SqliteStateStore(setup.env["STATE_DB"], clock=lambda ago=ago: now - ago * DAY)
        store.record_token_worked(provider, account, token_tag(token))
        store.close()


def date(days_ago: float) -> str:
    return dt.datetime.fromtimestamp(time.time() - days_ago * DAY, dt.timezone.utc).date().isoformat()


def test_check_names_a_google_token_refused_a_week_after_it_first_worked_as_a_testing_clients(sync_env, oauth_server):
    setup = sync_env()
    [route] = setup.routes
    # It worked from a week ago until this morning; today Google refuses it, as it refuses
    # every refresh token of a client in Testing 7 days after the consent.
    record_worked(setup, "google", route.gmail_user, route.refresh_token, 7, 0.5)
    oauth_server.revoke(route.refresh_token)

    done = setup.cli("check")

    assert done.returncode == 5, done.stdout + done.stderr
    out = done.stdout.splitlines()
    what = f"token google {route.gmail_user}"
    [last_worked] = [line for line in out if line.startswith(f"FAIL  {what}")]
    assert re.fullmatch(
        rf"FAIL  {re.escape(what)} last worked {date(0.5)}T\S+ \(first {date(7)}T\S+\); REFUSED since {date(0)}T\S+",
        last_worked,
    ), last_worked
    [warning] = [line for line in out if line.startswith("warn")]
    assert warning.startswith(f"warn  {what} refused 7 days after it first worked here ({date(7)}): the 7-day life of")
    assert 'OAuth client in "Testing"' in warning
    assert f"(it expired about {date(0)})" in warning
    assert 'publish the OAuth client\'s app "In production" (README "Google: the OAuth client", step 5)' in warning
    # The destination's token worked, just now, and says so.
    assert any(re.fullmatch(rf"ok    token microsoft {re.escape(setup.outlook_user)} +last worked \S+ \(first \S+\)", line) for line in out), out
    for secret in setup.secrets:
        assert secret not in done.stdout + done.stderr


def test_status_warns_of_a_microsoft_token_unused_for_60_days_until_a_refresh_works(sync_env):
    setup = sync_env()
    record_worked(setup, "microsoft", setup.outlook_user, setup.ms_refresh_token, 100, 61)

    shown = setup.cli("status")

    assert shown.returncode == 0, shown.stdout + shown.stderr
    what = f"token microsoft {setup.outlook_user}"
    assert re.search(rf"^{re.escape(what)}: last worked {date(61)}T\S+ \(first {date(100)}T\S+\)$", shown.stdout, re.MULTILINE), shown.stdout
    expected = (
        f"  WARNING: not used since {date(61)}: Microsoft expires a refresh token unused for 90 days, this one on "
        f"{date(61 - 90)}; a `drain` or `check` before then keeps it alive"
    )
    assert expected in shown.stdout.splitlines()
    [token] = [t for t in json.loads(setup.cli("status", "--json").stdout)["tokens"] if t["provider"] == "microsoft"]
    assert token["warnings"] == [expected.removeprefix("  WARNING: ")]

    # check refreshes it: it works, and the warning is gone.
    checked = setup.cli("check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(rf"^ok    {re.escape(what)} +last worked {date(0)}T\S+ \(first {date(100)}T\S+\)$", checked.stdout, re.MULTILINE), checked.stdout
    assert "WARNING" not in setup.cli("status").stdout


def test_status_shows_where_each_route_started_and_what_it_left(sync_env, dovecot_pair):
    setup = sync_env(routes=(("alpha", "INBOX", "Alpha"), ("beta", "INBOX", "Beta")))
    alpha, beta = setup.routes
    now = dt.datetime.now(dt.timezone.utc)
    old = [(f"Subject: old {n}\r\n\r\nx\r\n".encode(), (), now - dt.timedelta(days=30)) for n in range(3)]
    seed(dovecot_pair.gmail, alpha.gmail_user, "INBOX", [*old, (b"Subject: new\r\n\r\ny\r\n", (), now)])
    setup.set_routes([alpha.as_json(), beta.as_json() | {"since": "2020-01-01"}])
    assert setup.cli("drain").returncode == 0

    shown = setup.cli("status")

    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    started = date(7)  # FALLBACK_SINCE_DAYS defaults to 7
    assert f"  started {started} (FALLBACK_SINCE_DAYS=7); 3 older messages not copied (drain --since DATE copies them)" in lines
    assert "  started 2020-01-01 (its since, or drain --since)" in lines
    routes = json.loads(setup.cli("status", "--json").stdout)["routes"]
    assert routes[0]["start"] | {"first_scan": None} == {
        "since": started, "from": "FALLBACK_SINCE_DAYS=7", "older_not_copied": 3, "first_scan": None,
    }


def test_status_route_shows_only_the_routes_named(sync_env):
    setup = sync_env(routes=(("alpha", "INBOX", "Alpha"), ("beta", "INBOX", "Beta"), ("gamma", "INBOX", "Gamma")))

    shown = json.loads(setup.cli("status", "--json", "--route", "gamma", "--route", "alpha").stdout)

    assert [route["route"] for route in shown["routes"]] == ["alpha", "gamma"]
    assert [spent["account"] for spent in shown["downloads"]] == [setup.routes[0].gmail_user, setup.routes[2].gmail_user]
    text = setup.cli("status", "--route", "beta").stdout
    assert "route beta:" in text and "route alpha:" not in text and "route gamma:" not in text

    unknown = setup.cli("status", "--route", "beta", "--route", "nope")

    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "status --route: unknown route 'nope' (routes: alpha, beta, gamma)"
    assert unknown.stdout == ""
