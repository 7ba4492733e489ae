"""`python -m shared.cli`: the commands a person runs.

Every command loads the settings first (one line per problem, exit 3), then runs its use case.
Exit codes tell one failure from another (see ExitCode); no command prints a traceback for an
expected failure, and nothing printed carries a secret.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum

from shared import bootstrap
from shared.consume import consume_queue
from shared.copy import CopyResult, lease_for
from shared.errors import ImapFailure, MailSyncerError, QueueUnavailable, SettingsInvalid, StateStoreUnavailable
from shared.imap import open_session
from shared.logs import configure_logging
from shared.progress import Progress, RunTally
from shared.redaction import scrub
from shared.scan import RouteScan, scan_routes
from shared.settings import load_settings

log = logging.getLogger("mail_syncer.cli")


class ExitCode(IntEnum):
    OK = 0
    COPY_FAILURES = 1  # some messages could not be copied (and are recorded)
    USAGE = 2  # argparse's own code for a bad command line
    SETTINGS = 3  # settings missing or invalid
    GATE = 4  # the state store cannot be read and written: nothing was attempted
    UNREACHABLE = 5  # a mailbox, a token endpoint or the queue failed
    INTERNAL = 70  # a bug: the scrubbed traceback is in the log


class Report:
    """One line per check: `ok    what  detail` or `FAIL  what  detail`."""

    def __init__(self, out=None) -> None:
        self.out = out or sys.stdout
        self.failed = False

    def ok(self, what: str, detail: str) -> None:
        self._line("ok", what, detail)

    def fail(self, what: str, detail: str) -> None:
        self.failed = True
        self._line("FAIL", what, detail)

    def skip(self, what: str, detail: str) -> None:
        self._line("skip", what, detail)

    def _line(self, mark: str, what: str, detail: str) -> None:
        print(f"{mark:<5} {what:<18} {scrub(detail)}", file=self.out, flush=True)


# -- check -------------------------------------------------------------------------------


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
    return ExitCode.UNREACHABLE if report.failed else ExitCode.OK


def _check_source(app: bootstrap.App, route, report: Report) -> None:
    account = app.source_account(route)
    what = f"route {route.name}"
    try:
        with open_session(account) as client:
            info = client.select_folder(route.gmail_folder, readonly=True)
            report.ok(
                what,
                f"{account.user} at {account.endpoint}, folder {route.gmail_folder!r}: "
                f"{info.get(b'EXISTS', 0)} messages, UIDVALIDITY {info.get(b'UIDVALIDITY')}",
            )
    except ImapFailure as exc:
        report.fail(what, str(exc))
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


def scan(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    scans = _scan(args, app)
    _print_scans(scans, dry_run=args.dry_run)
    return ExitCode.UNREACHABLE if any(s.error for s in scans) else ExitCode.OK


def consume(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    tally = RunTally()
    _consume(app, tally)
    tally.print_summary(app.settings.routes)
    return _exit_code(tally)


def run_once(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    scans = _scan(args, app)
    if args.dry_run:
        _print_scans(scans, dry_run=True)
        return ExitCode.UNREACHABLE if any(s.error for s in scans) else ExitCode.OK
    tally = RunTally()
    tally.add_scans(scans)
    _consume(app, tally)
    tally.print_summary(app.settings.routes)
    return _exit_code(tally)


def drain(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    """Scan and copy, again and again, until no route has anything left to enqueue."""
    tally = RunTally()
    while True:
        scans = _scan(args, app)
        tally.add_scans(scans)
        _consume(app, tally)
        if not any(s.left_for_next_run for s in scans if not s.error):
            break
    tally.print_summary(app.settings.routes)
    return _exit_code(tally)


def _exit_code(tally: RunTally) -> ExitCode:
    if tally.scan_errors:
        return ExitCode.UNREACHABLE
    return ExitCode.COPY_FAILURES if tally.copy_failed else ExitCode.OK


def _scan(args: argparse.Namespace, app: bootstrap.App) -> list[RouteScan]:
    return scan_routes(
        app.settings.routes,
        state=app.state,
        queue=app.queue,
        open_source=app.connections.borrowed_source,
        limits=app.scan_limits(),
        dry_run=getattr(args, "dry_run", False),
    )


def _consume(app: bootstrap.App, tally: RunTally) -> None:
    app.state.check_health()  # the gate, also when consuming alone
    lease = app.settings.lease_seconds
    progress = Progress(total=app.queue.depths().visible)

    def on_result(result: CopyResult) -> None:
        tally.add(result)
        progress.advance(result)

    try:
        consume_queue(app.queue, app.copier(lease_for(lease)), visibility_timeout=lease, on_result=on_result)
    finally:
        progress.finish()


def _print_scans(scans: list[RouteScan], *, dry_run: bool) -> None:
    for scan in scans:
        if scan.error:
            print(f"route {scan.route}: scan failed: {scan.error}")
            continue
        verb = "would enqueue" if dry_run else "enqueued"
        mark = f"UIDVALIDITY {scan.watermark.uidvalidity}, UID {scan.watermark.last_uid}" if scan.watermark else "none"
        print(f"route {scan.route}: {scan.found} new, {verb} {scan.enqueued}, {scan.left_for_next_run} left for the next run; watermark {mark}")
        if dry_run:
            for ref in scan.refs:
                print(f"  UID {ref.uid} (UIDVALIDITY {ref.uidvalidity}, {ref.size} bytes, fingerprint {ref.fingerprint or 'none'})")


# -- status ------------------------------------------------------------------------------


def status(args: argparse.Namespace, app: bootstrap.App, report: Report) -> ExitCode:
    app.state.check_health()
    routes = []
    for route in app.settings.routes:
        mark = app.state.read_watermark(route.name)
        counts = app.state.route_counts(route.name)
        last_scan = app.state.read_scan(route.name)
        routes.append(
            {
                "route": route.name,
                "source": f"{route.gmail_user} {route.gmail_folder}",
                "destination_folder": route.outlook_folder,
                "watermark": None if mark is None else {"uidvalidity": mark.uidvalidity, "last_uid": mark.last_uid},
                "claims": counts.by_status,
                "skipped_reasons": counts.skipped_reasons,
                "failures": counts.failures,
                "last_scan": None if last_scan is None else {
                    "at": _iso(last_scan.at),
                    "error": last_scan.error,
                    "failing_since": None if last_scan.failing_since is None else _iso(last_scan.failing_since),
                },
            }
        )
    try:
        depths = app.queue.depths()
        queue = {"where": app.queue.describe(), "queued": depths.visible, "in_flight": depths.in_flight, "dead": depths.dead}
    except QueueUnavailable as exc:
        queue = {"where": app.queue.describe(), "error": str(exc)}
    if args.json:
        print(json.dumps({"routes": routes, "queue": queue}, indent=2))
        return ExitCode.OK
    for item in routes:
        mark = item["watermark"]
        where = f"UIDVALIDITY {mark['uidvalidity']}, UID {mark['last_uid']}" if mark else "none yet"
        claims = item["claims"]
        print(f"route {item['route']}: {item['source']} -> {item['destination_folder']}; watermark {where}")
        print(
            f"  done {claims.get('done', 0)}, skipped {claims.get('skipped', 0)}{_reasons(item['skipped_reasons'])}, "
            f"failed {claims.get('failed', 0)}, in progress {claims.get('in_progress', 0) + claims.get('appending', 0)}"
        )
        if item["failures"]:
            print(f"  open failure records{_reasons(item['failures'])}")
        scanned = item["last_scan"]
        if scanned is None:
            print("  never scanned")
        elif scanned["error"]:
            print(f"  last scan {scanned['at']} FAILED (failing since {scanned['failing_since']}): {scanned['error']}")
        else:
            print(f"  last scan {scanned['at']} ok")
    if "error" in queue:
        print(f"queue: {queue['error']}")
    else:
        print(f"queue: {queue['where']}: {queue['queued']} queued, {queue['in_flight']} in flight, {queue['dead']} dead")
    return ExitCode.OK


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


def _reasons(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) + ")"


# -- wiring ------------------------------------------------------------------------------

Command = Callable[[argparse.Namespace, bootstrap.App, Report], ExitCode]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="python -m shared.cli",
        description="mail_syncer: copy new mail from Gmail folders into an Outlook.com mailbox, exactly once.",
        epilog="Settings come from the environment, then the --env-file, then AWS Secrets Manager "
        "(see .env.example). Exit codes: 0 ok, 1 messages failed, 2 usage, 3 settings, "
        "4 state store unavailable, 5 a mailbox or the queue failed.",
    )
    parser.add_argument("--env-file", default=".env", help="settings file read after the environment (default: .env)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    handlers: dict[str, Command] = {}

    def command(name: str, handler: Command, summary: str, description: str) -> argparse.ArgumentParser:
        handlers[name] = handler
        return commands.add_parser(name, help=summary, description=description)

    command(
        "drain", drain, "scan every route, then copy until the queue is empty; again while a backlog remains",
        "Scan every route for new messages and copy them until the queue is empty, repeating while a "
        "route has more than MAX_ENQUEUE_PER_RUN waiting. Shows progress, then a summary per route.",
    )
    once = command(
        "run-once", run_once, "one scheduled cycle: scan every route once, then copy what was queued",
        "One cycle as the schedule runs it: scan every route (at most MAX_ENQUEUE_PER_RUN each), then copy.",
    )
    once.add_argument("--dry-run", action="store_true", help="list what would be enqueued; write and copy nothing")
    scan_parser = command(
        "scan", scan, "enqueue references to new messages (the producer)",
        "The producer: find each route's new UIDs and enqueue references to them; copies nothing.",
    )
    scan_parser.add_argument("--dry-run", action="store_true", help="list what would be enqueued; write nothing")
    command("consume", consume, "copy what is queued until the queue is empty (the consumer)", "The consumer: copy queued messages until the queue is empty.")
    status_parser = command(
        "status", status, "per route: watermark, copied/skipped/failed counts with reasons, queue depths",
        "Per route: the watermark, claims by status with skip reasons, open failure records; the queue's depths.",
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    command(
        "check", check, "validate settings, check the state store and queue, log in to every mailbox; copies nothing",
        "Validate settings, check the state store (the fail-safe gate) and the queue, then "
        "log in to every route's source and to the destination. One line per check.",
    )
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = _parser()
    args = parser.parse_args(argv)
    report = Report()
    try:
        settings = load_settings(args.env_file)
    except SettingsInvalid as exc:
        for problem in exc.problems:
            report.fail("settings", problem)
        return ExitCode.SETTINGS
    configure_logging(settings.log_level)
    app = bootstrap.build(settings)
    try:
        return handlers[args.command](args, app, report)
    except StateStoreUnavailable as exc:
        report.fail("state store", str(exc))
        if args.command != "check":
            print("nothing was copied: the state store must work before any IMAP connection", file=sys.stderr)
        return ExitCode.GATE
    except MailSyncerError as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except KeyboardInterrupt:
        print("interrupted: claims left behind expire after LEASE_SECONDS; run again to finish", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: log it scrubbed rather than crash with raw text
        log.exception("internal error in %s", args.command)
        return ExitCode.INTERNAL
    finally:
        app.close()


if __name__ == "__main__":
    sys.exit(main())
