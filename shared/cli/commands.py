"""The commands that run the pipeline: check, scan, consume, run-once, drain and redrive.

Each takes the parsed arguments, the wired App and a Report, runs its use case and prints what
a person needs; `shared.cli.main` turns what they raise into exit codes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from shared import bootstrap, claim_owners
from shared.cli import run_lock
from shared.cli.progress import Progress, RunTally
from shared.cli.report import ExitCode, Report, UsageProblem
from shared.cli.route_option import selected_routes
from shared.cli.status import report_token_health
from shared.errors import ImapFailure, QueueUnavailable, StateStoreUnavailable
from shared.mailbox.imap import ImapSource, open_folder_watch
from shared.mailbox.port import ListedMessage
from shared.mailbox.session import open_session
from shared.outcome_lines import outcome_text
from shared.pipeline.consume import consume_queue
from shared.pipeline.copier import CopyResult, Outcome, lease_for
from shared.pipeline.reconcile import RouteReconcile, reconcile_routes
from shared.pipeline.redrive import redrive_dead_letters
from shared.pipeline.scan import RouteScan, scan_routes
from shared.pipeline.watch import RouteWatch, WatchTimes, idle_budget
from shared.queue import MessageQueue
from shared.queue.port import GroupsNotSelectable
from shared.redaction import scrub
from shared.settings import Route, Settings, routes_by_account

# -- check -------------------------------------------------------------------------------

# Gmail's "Folder size limits" (Settings, Forwarding and POP/IMAP): IMAP shows a folder's newest
# N messages only (the Gmail API's ImapSettings.maxFolderSize: 0, 1000, 2000, 5000 or 10000).
GMAIL_FOLDER_SIZE_LIMITS = (1000, 2000, 5000, 10000)


def check(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    """Settings are valid by now; the gate, the queue, then every login. Copies nothing."""
    settings = app.settings
    routes = settings.routes
    report.ok("settings", f"{len(routes)} route(s) ({', '.join(r.name for r in routes)}), destination {settings.outlook_user}")
    try:
        app.state.check_health()
        report.ok("state store", app.state.describe())
    except StateStoreUnavailable as exc:
        report.fail("state store", str(exc))
        report.skip("mailboxes", "not contacted: the state store must work before any IMAP connection")
        return ExitCode.GATE
    try:
        depths = app.queue.depths()
        report.ok("queue", f"{app.queue.describe()} ({depths.visible} queued, {depths.in_flight} in flight, {depths.dead} dead)")
    except QueueUnavailable as exc:
        report.fail("queue", str(exc))
    for route in routes:
        _check_source(app, route, report)
    _check_destination(app, report)
    report_token_health(app, report)  # status's token lines; the logins above recorded how each did
    return ExitCode.UNREACHABLE if report.failed else ExitCode.OK


def _check_source(app: bootstrap.App, route, report: Report) -> None:
    account = app.source_account(route)
    what = f"route {route.name}"
    try:
        with open_session(account) as client:
            info = client.select_folder(ImapSource(client, account).folder_named(route.gmail_folder), readonly=True)
            where = f"{account.user} at {account.endpoint}, folder {route.gmail_folder!r}"
            exists = info.get(b"EXISTS", 0)
            report.ok(what, f"{where}: {exists} messages, UIDVALIDITY {info.get(b'UIDVALIDITY')}")
            if exists in GMAIL_FOLDER_SIZE_LIMITS:
                report.warn(
                    what,
                    f"{where} shows exactly {exists} messages, a value of Gmail's \"Folder size "
                    "limits\": IMAP may show only the newest ones. Gmail settings, Forwarding and "
                    "POP/IMAP, Folder size limits: \"Do not limit\"",
                )
    except ImapFailure as exc:
        # Its text starts with the account's label, "route NAME source USER": not "route NAME" twice.
        report.fail(what, str(exc).removeprefix(f"{what} "))
    except Exception as exc:  # noqa: BLE001 - a server reply we did not expect, e.g. no such folder
        report.fail(what, f"{account.user} at {account.endpoint}, folder {route.gmail_folder!r}: {exc}")


def _check_destination(app: bootstrap.App, report: Report) -> None:
    account = app.destination_account
    try:
        with open_session(account) as client:
            folders = []
            for folder in sorted({r.outlook_folder for r in app.settings.routes}):
                state = "exists" if client.folder_exists(folder) else "will be created"
                folders.append(f"{folder!r} {state}")
            report.ok("destination", f"{account.user} at {account.endpoint}: {', '.join(folders)}")
    except ImapFailure as exc:
        report.fail("destination", str(exc))
    except Exception as exc:  # noqa: BLE001
        report.fail("destination", f"{account.user} at {account.endpoint}: {exc}")


# -- scanning and copying ----------------------------------------------------------------

# A run waits out a mailbox's pause up to this long (Outlook.com's throttle: about 5 minutes);
# a longer one (Gmail's daily download limit: hours) leaves its messages queued for a later run.
DRAIN_MAX_PAUSE_WAIT_SECONDS = 15 * 60
# Source accounts scanned at the same time, a thread each: a scan is mostly round trips (login,
# EXAMINE, SEARCH, FETCH), so with the servers 100 ms away eight accounts take as long as one.
SCAN_ACCOUNTS_AT_ONCE = 8


def scan(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    scans = _scan(args, app, selected_routes(args, app.settings), copying_next=False)
    _print_scans(scans, dry_run=args.dry_run)
    return ExitCode.UNREACHABLE if any(s.error for s in scans) else ExitCode.OK


def consume(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    routes = selected_routes(args, app.settings)
    tally = RunTally()
    _consume(app, tally, routes, verbose=args.verbose)
    _print_summary(app, tally, routes)
    return _exit_code(tally)


def run_once(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    routes = selected_routes(args, app.settings)
    if not args.dry_run:
        _queue_of(app, routes)  # --route where the queue cannot do it: refused before any scan
    scans = _scan(args, app, routes, copying_next=not args.dry_run)
    if args.dry_run:
        _print_scans(scans, dry_run=True)
        return ExitCode.UNREACHABLE if any(s.error for s in scans) else ExitCode.OK
    tally = RunTally()
    tally.add_scans(scans)
    _consume(app, tally, routes, verbose=args.verbose)
    _print_summary(app, tally, routes)
    return _exit_code(tally)


def drain(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    """One drain at a time on a state file: a second leaves the work to the first (run_lock).
    A dry run writes nothing, so it lists beside a running drain."""
    if args.dry_run:
        return _drain(args, app, report)
    command = "drain --watch" if args.watch else "drain"
    names = [route.name for route in selected_routes(args, app.settings)] if args.route else None
    with run_lock.first_drain(app.settings, command, names) as first:
        return _drain(args, app, report) if first else ExitCode.OK


def _drain(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    """Scan and copy, again and again, until no route has anything left to enqueue."""
    routes = selected_routes(args, app.settings)
    if args.dry_run:
        if args.watch:
            raise UsageProblem("--dry-run and --watch: a dry run lists what would be copied now, then ends")
        scans = _scan(args, app, routes, copying_next=False)
        _print_scans(scans, dry_run=True)
        return ExitCode.UNREACHABLE if any(s.error for s in scans) else ExitCode.OK
    _queue_of(app, routes)  # --route where the queue cannot do it: refused before any scan
    tally = RunTally()
    while True:
        scans = _scan(args, app, routes)
        tally.add_scans(scans)
        _consume(app, tally, routes, verbose=args.verbose)
        if not any(s.left_for_next_run for s in scans if not s.error):
            break
    _print_summary(app, tally, routes)
    if args.watch:
        return _watch(args, app, tally, routes)
    return _exit_code(tally)


def _watch(args: argparse.Namespace, app: bootstrap.App, tally: RunTally, routes: Sequence[Route]) -> ExitCode:
    """After the drain: IDLE on each route's source, and copy what arrives, until Ctrl-C or
    SIGTERM (main turns the KeyboardInterrupt into exit 130 after the summary here)."""
    settings = app.settings
    idle_on, rescanned = idle_budget(routes, app.connections.set_aside)
    times = WatchTimes(reidle_seconds=settings.watch_reidle_seconds, rescan_seconds=settings.watch_rescan_seconds)
    print(
        f"watching {len(idle_on)} route(s) with IDLE (re-IDLE every {times.reidle_seconds:g} s, every route "
        f"rescanned every {times.rescan_seconds:g} s); Ctrl-C or SIGTERM to stop",
        flush=True,
    )
    for route in rescanned:
        print(f"route {route.name}: no IDLE session ({route.gmail_user} has no session to spare under "
              f"GMAIL_MAX_CONNECTIONS={settings.gmail_max_connections}); rescanned only", flush=True)
    started, rounds = time.monotonic(), 0

    def copy_round(due: Sequence[Route]) -> None:
        nonlocal rounds
        rounds += 1
        this_round = RunTally()
        scans = _scan(args, app, due)
        this_round.add_scans(scans)
        tally.add_scans(scans)
        _consume(app, this_round, routes, verbose=args.verbose, show_progress=False)
        for result in this_round.last.values():
            tally.add(result)
        tally.quarantined += this_round.quarantined
        tally.dead_letters = this_round.dead_letters
        for line in _round_lines(due, this_round):
            print(line, flush=True)

    watch = RouteWatch(
        routes,
        idle_on=idle_on,
        open_watch=lambda route: open_folder_watch(app.source_account(route), route.gmail_folder),
        copy_round=copy_round,
        times=times,  # a lost session is logged (a WARNING line on stderr)
    )
    try:
        watch.run()
    finally:
        # Interrupted (or failed): say what the watch did, then main says how it ended.
        minutes = (time.monotonic() - started) / 60
        print(f"watch ended after {minutes:.1f} min, {rounds} copy round(s); in all, drain and watch:")
        _print_summary(app, tally, routes)
    return _exit_code(tally)


def _round_lines(routes: Sequence[Route], tally: RunTally) -> list[str]:
    """One line per route of a watch's copy round: `14:05:09 route work: 1 copied`."""
    now = time.strftime("%H:%M:%S")
    outcomes = Counter((result.key.route, result.outcome) for result in tally.last.values() if result.key)
    lines = []
    for route in routes:
        line = f"{now} route {route.name}: {outcomes[route.name, Outcome.COPIED]} copied"
        for outcome, word in ((Outcome.SKIPPED, "skipped"), (Outcome.FAILED, "failed"), (Outcome.PAUSED, "waiting")):
            if outcomes[route.name, outcome]:
                line += f", {outcomes[route.name, outcome]} {word}"
        if route.name in tally.scan_errors:
            line += f"; scan failed: {tally.scan_errors[route.name]}"
        if route.name in tally.scans_paused:
            line += f"; not scanned: {tally.scans_paused[route.name]}"
        lines.append(line)
    return lines


def reconcile(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    """Record as copied what each route's destination folder holds already; copies nothing."""
    routes = selected_routes(args, app.settings)
    app.state.check_health()  # the gate: what is recorded must be kept
    limits = app.scan_limits()
    results = reconcile_routes(
        routes,
        state=app.state,
        open_source=app.connections.borrowed_source,
        destination=app.connections.destination,
        since_of=lambda route: args.since or route.since or limits.today - dt.timedelta(days=limits.fallback_since_days),
        owner=claim_owners.this_process(),
        lease_until=lease_for(app.settings.lease_seconds),
        holder_state=claim_owners.holder_state,
        dry_run=args.dry_run,
    )
    for result in results:
        print(_reconcile_line(result, dry_run=args.dry_run))
    return ExitCode.UNREACHABLE if any(result.error for result in results) else ExitCode.OK


def _reconcile_line(result: RouteReconcile, *, dry_run: bool) -> str:
    where = f"route {result.route}"
    if result.error:
        return f"{where}: reconcile failed: {result.error}"
    parts = [f"{where}: {result.in_source} message(s) in the source since {result.since.isoformat()}"]
    found = f"{result.found} found in {result.folder!r}, {'would be ' if dry_run else ''}recorded as copied"
    if result.by_identity_only:
        found += f" ({result.by_identity_only} by headers alone: their INTERNALDATE differs)"
    parts.append(found)
    if result.recorded_before:
        parts.append(f"{result.recorded_before} recorded before")
    if result.busy:
        parts.append(f"{result.busy} being copied by a running copier")
    parts.append(f"{result.not_found} not found: the next drain copies {'it' if result.not_found == 1 else 'them'}")
    return "; ".join(parts)


def _exit_code(tally: RunTally) -> ExitCode:
    if tally.scan_errors:
        return ExitCode.UNREACHABLE
    if tally.copy_failed:
        return ExitCode.COPY_FAILURES
    return ExitCode.PAUSED if tally.waits else ExitCode.OK


def _print_summary(app: bootstrap.App, tally: RunTally, routes: Sequence[Route]) -> None:
    now = time.time()
    tally.print_summary(routes, [pause for pause in app.state.pauses() if pause.until > now])


def _scan(
    args: argparse.Namespace, app: bootstrap.App, routes: Sequence[Route], *, copying_next: bool = True
) -> list[RouteScan]:
    # Logged in to the destination while the scan goes on: a session for each account found
    # with new mail, up to one a lane (copy_batch hands an account's routes to a lane).
    sessions = iter([app.connections, *app.connections.lanes(_lanes_wanted(app))] if copying_next else [])
    accounts_seen: set[str] = set()
    seen_lock = threading.Lock()

    def prepare_destination(route: Route) -> None:
        with seen_lock:
            if route.gmail_user in accounts_seen:
                return
            accounts_seen.add(route.gmail_user)
            connections = next(sessions, None)
        if connections is not None:
            connections.prepare_destination(route.outlook_folder)

    scans = scan_routes(
        routes,
        state=app.state,
        queue=app.queue,
        open_source=app.connections.borrowed_source,
        limits=app.scan_limits(),
        dry_run=getattr(args, "dry_run", False),
        download_budget=app.download_budget(),
        on_new_mail=prepare_destination,
        accounts_at_once=SCAN_ACCOUNTS_AT_ONCE,
        backfill_since=getattr(args, "since", None),
    )
    _print_start_points(app.settings, scans, getattr(args, "since", None))
    return scans


def _print_start_points(settings: Settings, scans: Sequence[RouteScan], backfill_since: dt.date | None) -> None:
    """A route's first scan says where it started and what it leaves behind: mail older than
    the start is never copied, and a user who expected the whole folder must learn it now. A
    backfill (`--since`) says what it found below the watermark."""
    routes = {route.name: route for route in settings.routes}
    for scan in scans:
        route = routes.get(scan.route)
        if scan.backfilled is not None:
            print(
                f"route {scan.route}: from {scan.since} (--since): {scan.backfilled} older message(s) never copied"
                f" before, to copy; {scan.known} copied or tried before, left as they are",
                flush=True,
            )
        if scan.older is None or scan.since is None or route is None or scan.backfilled is not None:
            continue
        why = "--since" if backfill_since == scan.since else "its since" if route.since else (
            f"FALLBACK_SINCE_DAYS={settings.fallback_since_days}"
        )
        line = f"route {scan.route}: first scan, from {scan.since} ({why}): {scan.found} new"
        if scan.older:
            line += (
                f"; {scan.older} older message(s) in {route.gmail_folder} are not copied"
                " (to copy them too: `drain --since YYYY-MM-DD` once, or the route's since:"
                " \"since\" in SYNC_ROUTES_JSON, or SINCE)"
            )
        print(line, flush=True)


def _lanes_wanted(app: bootstrap.App) -> int:
    """Copying threads beside the main one: one an account, OUTLOOK_MAX_CONNECTIONS in all."""
    return min(app.settings.outlook_max_connections, len(routes_by_account(app.settings.routes))) - 1


def _consume(
    app: bootstrap.App, tally: RunTally, routes: Sequence[Route], *, verbose: bool = False, show_progress: bool = True
) -> None:
    """`show_progress=False`: no progress line (a watch's round prints its own), waits still said.
    `verbose`: a line per message on stdout. Only `routes`' messages are taken from the queue."""
    app.state.check_health()  # the gate, also when consuming alone
    lease = app.settings.lease_seconds
    queue = _queue_of(app, routes)
    progress = Progress(
        total=queue.depths().visible, quiet=not show_progress, json_logs=app.settings.log_format == "json"
    )

    def on_result(result: CopyResult) -> None:
        tally.add(result)
        if verbose:
            progress.note(outcome_text(result))
        progress.advance(result)

    copier = app.copier(lease_for(lease))
    # The routes of other Gmail accounts copied at the same time, one Outlook session each.
    lanes = [replace(copier, mailboxes=lane) for lane in app.connections.lanes(_lanes_wanted(app))]
    try:
        tally.left_waiting = consume_queue(
            queue,
            copier,
            lanes=lanes,
            visibility_timeout=lease,
            on_result=on_result,
            max_pause_wait=DRAIN_MAX_PAUSE_WAIT_SECONDS,
            on_wait=progress.waiting,
        )
    finally:
        progress.finish()
    # A run never ends as if all were well while messages wait in the dead letters.
    tally.dead_letters = queue.depths().dead
    tally.settle(app.state.get_claim)


def _queue_of(app: bootstrap.App, routes: Sequence[Route]) -> MessageQueue:
    """The queue, or with `--route` a view of it that hands out those routes' messages alone."""
    if len(routes) == len(app.settings.routes):
        return app.queue
    try:
        return app.queue.of_groups([route.name for route in routes])
    except GroupsNotSelectable as exc:
        raise UsageProblem(f"--route: {exc}; without --route every route's messages are copied") from None


def _print_scans(scans: list[RouteScan], *, dry_run: bool) -> None:
    """A line per route; a dry run lists each message that would be copied, then the total."""
    total, total_bytes = 0, 0
    for scan in scans:
        if scan.error:
            print(f"route {scan.route}: scan failed: {scan.error}")
            continue
        if scan.paused:
            print(f"route {scan.route}: not scanned: {scan.paused}")
            continue
        verb = "would enqueue" if dry_run else "enqueued"
        mark = f"UIDVALIDITY {scan.watermark.uidvalidity}, UID {scan.watermark.last_uid}" if scan.watermark else "none"
        print(f"route {scan.route}: {scan.found} new, {verb} {scan.enqueued}, {scan.left_for_next_run} left for the next run; watermark {mark}")
        if dry_run:
            listed = {message.uid: message for message in scan.listed}
            for ref in scan.refs:
                print(_listing_line(ref.uid, ref.size, listed.get(ref.uid)))
                total, total_bytes = total + 1, total_bytes + (ref.size or 0)
    if dry_run:
        print(f"total: {total} message(s), {_megabytes(total_bytes)} would be copied (dry run: nothing was queued or copied)")


def _listing_line(uid: int, size: int | None, listed: ListedMessage | None) -> str:
    """`  UID 12  2026-11-28 09:14  4.2 kB  Alice <alice@example.com>  Quarterly report`."""
    if listed is None:
        return f"  UID {uid}  (gone from the source, or not readable)"
    when = listed.internaldate.astimezone().strftime("%Y-%m-%d %H:%M")
    headline = listed.headline
    sender = _clipped(headline.sender if headline else "", 40) or "(no From)"
    subject = _clipped(headline.subject if headline else "", 60) or "(no Subject)"
    return f"  UID {uid}  {when}  {_kilobytes(size)}  {sender}  {subject}"


def _clipped(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _kilobytes(size: int | None) -> str:
    return "size ?" if size is None else f"{size / 1000:.1f} kB"


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB" if size >= 100_000 else f"{size / 1000:.1f} kB"


# -- redrive -----------------------------------------------------------------------------


def redrive(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    """Dead letters back onto the main queue; a line per route, then the total."""
    routes = {route.name: route for route in app.settings.routes}
    if args.route is not None and args.route not in routes:
        print(f"redrive --route: unknown route {args.route!r} (routes: {', '.join(routes)})", file=sys.stderr)
        return ExitCode.USAGE
    result = redrive_dead_letters(
        app.queue,
        routes,
        route=args.route,
        max_messages=args.max,
        include_malformed=args.include_malformed,
        dry_run=args.dry_run,
    )
    verb = "would move" if result.dry_run else "moved"
    for name, count in sorted(result.moved_by_route.items()):
        print(f"route {name}: {verb} {count} back to the queue")
    if result.moved_by_service:
        print(f"all routes: {result.moved_by_service} moved back by SQS (its message move task)")
    for dead, why in result.skipped:
        print(f"left in the dead letters: message {dead.message_id} (group {dead.group_id or '-'}): {scrub(why)}")
    if result.skipped:
        print("  (not references of a configured route: put back, they would be quarantined again at once; "
              "--include-malformed moves them anyway)")
    total = f"total: {verb} {result.total}"
    if result.dry_run:
        total += " (dry run: nothing was moved)"
        if not result.complete:
            total += "; SQS showed only the first dead letters of each route, there are more"
    elif result.total:
        total += "; `consume` or `drain` copies them (in AWS the consumer function picks them up)"
    print(total)
    return ExitCode.OK


