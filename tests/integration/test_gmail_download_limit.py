"""Gmail's daily IMAP download limit, as `drain` meets it through the Gmail front
(tests/harness/gmail_front.py): our own budget (GMAIL_DAILY_DOWNLOAD_MB) keeps under it, and
Gmail's `[OVERQUOTA]` pauses the account until its window passes. Either way no attempt is
spent, nothing is lost or copied twice, and drain and status say when the account resumes.

A day cannot pass in a test: `a_day_passes` moves every time kept in the run's SQLite state and
queue a day back (the download counts, the pauses, the queued messages' due times), which is
what a day would change there.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timezone

from shared.pipeline.copier import CHUNK_BYTES
from tests.harness.figures import record, stored_appends
from tests.harness.mail import assert_copied_exactly, read_folder, seed

DAY = 24 * 3600
BODY_LINES = 3800  # 78 bytes a line: about 300,000 bytes a message


def big_message(n: int, lines: int = BODY_LINES) -> bytes:
    head = (
        f"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nSubject: Report {n}\r\n"
        f"Message-ID: <report-{n}@example.org>\r\nDate: Mon, 6 May 2024 07:08:{n:02d} +0200\r\n\r\n"
    )
    return head.encode() + (f"{n % 10}" * 76 + "\r\n").encode() * lines


def a_day_passes(state_db: str) -> None:
    with sqlite3.connect(state_db) as db:
        db.execute("UPDATE downloads SET hour = hour - 24")
        db.execute("UPDATE pauses SET until = until - ?", (DAY,))
        db.execute("UPDATE queue_messages SET visible_at = visible_at - ? WHERE visible_at > 0", (DAY,))


def pause_ends(stdout: str, account: str) -> datetime:
    found = re.search(rf"source {re.escape(account)} paused until (\S+): ", stdout)
    assert found, stdout
    return datetime.fromisoformat(found.group(1))


def hours_from_now(when: datetime) -> float:
    return (when - datetime.now(timezone.utc)).total_seconds() / 3600


def figures(behaviour: str, setup, outlook, source, *runs) -> None:
    """The row of the runs together (tests/harness/figures.py): all of them, the day after's too."""
    landed = {"Work": [m.body for m in read_folder(outlook, setup.outlook_user, "Work")]}
    drained = "".join(run.stdout for run in runs)
    row = record(
        behaviour,
        "Gmail",
        wanted={"Work": [m.body for m in source]},
        landed=landed,
        drained=drained,
        appends=stored_appends(outlook, setup.outlook_user, ["Work"]),
    )
    assert row.clean and row.appends == len(source)


def test_past_its_own_daily_budget_an_account_waits_and_every_message_comes_after_the_window(
    sync_env, dovecot_pair, gmail_front
):
    setup = sync_env()
    front = gmail_front(dovecot_pair.gmail)
    setup.env |= {
        "GMAIL_IMAP_HOST": front.host,
        "GMAIL_IMAP_PORT": str(front.port),
        "GMAIL_DAILY_DOWNLOAD_MB": "1",
        "MAX_MESSAGE_BYTES": "400000",
    }
    user = setup.routes[0].gmail_user
    seed(dovecot_pair.gmail, user, "INBOX", [big_message(n) for n in range(1, 6)])
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    assert all(290_000 < len(m.body) < 310_000 for m in source)

    done = setup.cli("drain", timeout=300)

    # Three fit in 1 MB; the fourth waits for the window, the fifth behind it (its route's order).
    assert done.returncode == 6, done.stdout + done.stderr
    assert "route work: 3 copied, 0 skipped, 0 failed" in done.stdout
    assert "2 message(s) wait in the queue for a later run:" in done.stdout
    assert re.search(r"daily download budget spent \(0\.9 MB of 1\.0 MB in 24 hours\)", done.stdout)
    resumes = pause_ends(done.stdout, user)
    assert 22 < hours_from_now(resumes) <= 24  # when the first hour's downloads leave the window
    # Message bodies stayed within the budget; the producer's header reads (a few hundred bytes
    # a message, for fingerprints) are what Gmail counted besides.
    assert front.served_total[user] < 1_000_000 + 5 * 2_000
    assert_copied_exactly(source[:3], read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"), kept=lambda f: True)

    status = setup.cli("status")
    assert f"source {user} paused until {resumes.isoformat()}: daily download budget spent" in status.stdout
    assert f"source {user}: 0.9 MB of 1.0 MB downloaded in the last 24 hours" in status.stdout
    # Waiting is not failing: the claims (the batch took both) are released to be tried again, no
    # attempt was spent.
    assert "  done 3, skipped 0, to try again 2, in progress 0\n" in status.stdout
    assert "open failure records" not in status.stdout

    again = setup.cli("drain", timeout=300)  # the same day: nothing is fetched
    assert again.returncode == 6, again.stdout + again.stderr
    assert "route work: 0 copied, 0 skipped, 0 failed; not scanned: its source account is paused" in again.stdout
    assert front.served_total[user] < 1_000_000 + 5 * 2_000

    a_day_passes(setup.env["STATE_DB"])
    later = setup.cli("drain", timeout=300)

    assert later.returncode == 0, later.stdout + later.stderr
    assert "route work: 2 copied, 0 skipped, 0 failed" in later.stdout
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"), kept=lambda f: True)
    figures("own daily budget spent, then a day later", setup, dovecot_pair.outlook, source, done, again, later)


def test_overquota_pauses_the_account_for_its_window_then_the_rest_is_copied_once(sync_env, dovecot_pair, gmail_front):
    setup = sync_env()
    # Gmail's own count reaches its limit first (the user's phone downloaded too).
    front = gmail_front(dovecot_pair.gmail, download_budget=700_000)
    setup.env |= {"GMAIL_IMAP_HOST": front.host, "GMAIL_IMAP_PORT": str(front.port)}
    user = setup.routes[0].gmail_user
    # Four of 40% of CHUNK_BYTES: a batch is fetched in chunks of at most CHUNK_BYTES, so the
    # first FETCH (two of them) crosses the limit and is served; the next chunk's FETCH is
    # refused. A day later, the other two come in one FETCH.
    lines = int(CHUNK_BYTES * 0.4) // 78
    seed(dovecot_pair.gmail, user, "INBOX", [big_message(n, lines=lines) for n in range(1, 5)])
    source = read_folder(dovecot_pair.gmail, user, "INBOX")
    first = CHUNK_BYTES // len(source[0].body)
    assert 1 < first < len(source)

    done = setup.cli("drain", timeout=300)

    # The front serves the FETCH that crosses its limit, then answers [OVERQUOTA] to everything.
    assert done.returncode == 6, done.stdout + done.stderr
    assert f"route work: {first} copied, 0 skipped, 0 failed, " in done.stdout
    assert "[OVERQUOTA] Account exceeded command or bandwidth limits" in done.stdout
    assert "waits for the daily download window" in done.stdout
    # Nothing of ours is in the window but this hour's: it waits the whole window.
    assert 23 < hours_from_now(pause_ends(done.stdout, user)) <= 24
    status = json.loads(setup.cli("status", "--json").stdout)
    (route,) = status["routes"]
    assert route["failures"] == {} and route["claims"] == {"done": first, "failed": len(source) - first}  # released, never failed
    assert [pause["mailbox"] for pause in status["pauses"]] == [f"source {user}"]
    assert status["downloads"] == [{"account": user, "last_24_hours_bytes": 2_000_000_000, "budget_bytes": 2_000_000_000}]

    front.reset_quota(user)
    a_day_passes(setup.env["STATE_DB"])
    later = setup.cli("drain", timeout=300)

    assert later.returncode == 0, later.stdout + later.stderr
    assert f"route work: {len(source) - first} copied, 0 skipped, 0 failed" in later.stdout
    assert_copied_exactly(source, read_folder(dovecot_pair.outlook, setup.outlook_user, "Work"), kept=lambda f: True)
    figures("[OVERQUOTA], then a day later", setup, dovecot_pair.outlook, source, done, later)
