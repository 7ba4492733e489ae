"""`status`: per route where it started, what was copied, skipped and failed and why; dead
letters; the queue; the destination's refresh token; when each refresh token last worked."""

from __future__ import annotations

import argparse
import json
import sys
import time

from shared import bootstrap
from shared.cli.report import ExitCode, Report, UsageProblem
from shared.cli.route_option import selected_routes
from shared.errors import QueueUnavailable, StateStoreUnavailable
from shared.pipeline.budget import in_megabytes
from shared.pipeline.pauses import iso_time
from shared.pipeline.redrive import DeadLetterCounts, report_dead_letters
from shared.redaction import scrub
from shared.state.port import RouteStart
from shared.tokens.health import configured_tokens, read_token_states


def status(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    try:
        shown = selected_routes(args, app.settings)
    except UsageProblem as exc:
        print(f"status {exc}", file=sys.stderr)  # as redrive says it: `status --route: ...`
        return ExitCode.USAGE
    app.state.check_health()
    routes = []
    for route in shown:
        mark = app.state.read_watermark(route.name)
        counts = app.state.route_counts(route.name)
        last_scan = app.state.read_scan(route.name)
        routes.append(
            {
                "route": route.name,
                "source": f"{route.gmail_user} {route.gmail_folder}",
                "destination_folder": route.outlook_folder,
                "watermark": None if mark is None else {"uidvalidity": mark.uidvalidity, "last_uid": mark.last_uid},
                "start": _start(app.state.read_route_start(route.name)),
                "claims": counts.by_status,
                "skipped_reasons": counts.skipped_reasons,
                "failures": counts.failures,
                "last_scan": None if last_scan is None else {
                    "at": iso_time(last_scan.at),
                    "error": last_scan.error,
                    "failing_since": None if last_scan.failing_since is None else iso_time(last_scan.failing_since),
                },
            }
        )
    try:
        depths = app.queue.depths()
        queue = {"where": app.queue.describe(), "queued": depths.visible, "in_flight": depths.in_flight, "dead": depths.dead}
        dead = report_dead_letters(app.queue, app.state, {route.name: route for route in app.settings.routes})
        for item in routes:
            item["dead_letters"] = _dead_letter_counts(dead.by_route.get(item["route"], DeadLetterCounts()))
        # Bodies that are not references of a configured route: `redrive` leaves them (see --include-malformed).
        queue["dead_letters_not_routed"] = _dead_letter_counts(dead.not_routed)
        # False when only some could be looked at: SQS FIFO hides a group's messages behind its first ones.
        queue["dead_letters_complete"] = dead.complete
    except QueueUnavailable as exc:
        queue = {"where": app.queue.describe(), "error": str(exc)}
    destination = _destination_status(app)
    now = time.time()
    tokens = read_token_states(app.state, configured_tokens(app.settings, shown), now)
    # Mailboxes that asked to be left alone and have not had their time yet.
    pauses = [
        {"mailbox": pause.name, "until": iso_time(pause.until), "reason": pause.reason}
        for pause in app.state.pauses()
        if pause.until > now
    ]
    # Each Gmail account's daily download budget, as spent in the last 24 hours.
    budget = app.download_budget()
    downloads = [
        {"account": account, "last_24_hours_bytes": budget.downloaded(account), "budget_bytes": budget.daily_bytes}
        for account in dict.fromkeys(route.gmail_user for route in shown)
    ]
    if args.json:
        everything = {"routes": routes, "queue": queue, "destination": destination, "pauses": pauses}
        tokens_json = [token.as_json() for token in tokens]
        print(json.dumps(everything | {"downloads": downloads, "tokens": tokens_json}, indent=2))
        return ExitCode.OK
    for item in routes:
        mark = item["watermark"]
        where = f"UIDVALIDITY {mark['uidvalidity']}, UID {mark['last_uid']}" if mark else "none yet"
        claims = item["claims"]
        print(f"route {item['route']}: {item['source']} -> {item['destination_folder']}; watermark {where}")
        print(
            f"  done {claims.get('done', 0)}, skipped {claims.get('skipped', 0)}{_reasons(item['skipped_reasons'])}, "
            # A "failed" claim is one released to be tried again: after a failure (the open
            # failure records say which) or a pause, which is no failure of the message.
            f"to try again {claims.get('failed', 0)}, in progress {claims.get('in_progress', 0) + claims.get('appending', 0)}"
        )
        if item["failures"]:
            print(f"  open failure records{_reasons(item['failures'])}")
        _print_dead_letters("  dead letters (`redrive` puts them back on the queue)", item.get("dead_letters"))
        scanned = item["last_scan"]
        if scanned is None:
            print("  never scanned")
        elif scanned["error"]:
            print(f"  last scan {scanned['at']} FAILED (failing since {scanned['failing_since']}): {scanned['error']}")
        else:
            print(f"  last scan {scanned['at']} ok")
        if item["start"] is not None:
            print(f"  {_start_line(item['start'])}")
    _print_destination(destination)
    for token in tokens:
        print(f"{token.what}: {token.summary()}")
        for warning in token.warnings:
            print(f"  WARNING: {warning}")
    for pause in pauses:
        print(f"{pause['mailbox']} paused until {pause['until']}: {pause['reason']}")
    for spent in downloads:
        print(
            f"source {spent['account']}: {in_megabytes(spent['last_24_hours_bytes'])} of"
            f" {in_megabytes(spent['budget_bytes'])} downloaded in the last 24 hours"
        )
    if "error" in queue:
        print(f"queue: {queue['error']}")
    else:
        print(f"queue: {queue['where']}: {queue['queued']} queued, {queue['in_flight']} in flight, {queue['dead']} dead")
        _print_dead_letters("  dead letters of no configured route (left by `redrive`)", queue["dead_letters_not_routed"])
        if not queue["dead_letters_complete"]:
            print("  (dead letters per route: only the first of each route could be looked at)")
    return ExitCode.OK


def report_token_health(app: bootstrap.App, report: Report) -> None:
    """For `check`: a line per refresh token, when it last worked (the logins just made have
    recorded theirs) or since when it is refused, then its warnings."""
    try:
        tokens = read_token_states(app.state, configured_tokens(app.settings, app.settings.routes), time.time())
    except StateStoreUnavailable as exc:
        report.fail("tokens", f"when each token last worked cannot be read: {exc}")
        return
    for token in tokens:
        if token.problem is not None:
            report.fail(token.what, token.summary())
        elif token.health is None:
            report.skip(token.what, token.summary())
        else:
            report.ok(token.what, token.summary())
        for warning in token.warnings:
            report.warn(token.what, warning)


def _start(start: RouteStart | None) -> dict | None:
    if start is None:
        return None
    return {
        "since": start.since.isoformat(),
        # No fallback: the route's own since, or a date a backfill (`drain --since`) reached back to.
        "from": "its since, or drain --since" if start.fallback_days is None else f"FALLBACK_SINCE_DAYS={start.fallback_days}",
        "older_not_copied": start.older,
        "first_scan": iso_time(start.at),
    }


def _start_line(start: dict) -> str:
    """`started 2026-11-24 (FALLBACK_SINCE_DAYS=7); 32 older messages not copied (...)`."""
    line = f"started {start['since']} ({start['from']})"
    older = start["older_not_copied"]
    if older:
        line += f"; {older} older message{'s' if older != 1 else ''} not copied (drain --since DATE copies them)"
    return line


def _dead_letter_counts(counts: DeadLetterCounts) -> dict:
    return {"count": counts.count, "reasons": dict(counts.reasons.most_common())}


def _print_dead_letters(title: str, dead: dict | None) -> None:
    if not dead or not dead["count"]:
        return
    print(f"{title}: {dead['count']}")
    for reason, count in dead["reasons"].items():
        print(f"    {count} x {scrub(reason)}")


def _reasons(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) + ")"


def _destination_status(app: bootstrap.App) -> dict:
    """For `status`: where the destination's refresh token comes from and where its newest
    rotation is kept, and the refusal recorded when its refresh token stopped working."""
    from shared.tokens.store import MICROSOFT, TokenStoreUnavailable

    settings = app.settings
    info: dict = {"user": settings.outlook_user, "refresh_token": None, "token_problem": None}
    if settings.ms_refresh_token is not None:
        source = settings.source_of("ms_refresh_token")
        if source.kind == "secret":
            kept = {"configured_in": str(source), "newest_kept_in": str(source)}
        else:
            token_file = app.microsoft_token_file()
            kept = {"configured_in": str(source), "newest_kept_in": token_file.where}
            try:
                stored = token_file.stored()  # rotations of the configured token only
            except TokenStoreUnavailable as exc:
                kept["error"] = str(exc)
            else:
                if stored is not None:
                    kept |= {"rotations_stored": stored.version, "last_stored": iso_time(stored.updated_at)}
        info["refresh_token"] = kept
    problem = app.state.read_token_problem(MICROSOFT)
    if problem is not None:
        info["token_problem"] = {"error": problem.error, "since": iso_time(problem.first_at), "last": iso_time(problem.last_at)}
    return info


def _print_destination(info: dict) -> None:
    line = f"destination {info['user']}"
    kept = info["refresh_token"]
    if kept is not None:
        line += f": refresh token from {kept['configured_in']}"
        if "rotations_stored" in kept:
            line += f"; its newest rotation ({kept['rotations_stored']} stored, last {kept['last_stored']}) in {kept['newest_kept_in']}"
        else:
            line += f"; rotations are kept in {kept['newest_kept_in']}"
    print(line)
    if kept is not None and "error" in kept:
        print(f"  the kept token cannot be read: {kept['error']}")
    problem = info["token_problem"]
    if problem is not None:
        print(f"  token REFUSED since {problem['since']} (last {problem['last']}): {problem['error']}")


