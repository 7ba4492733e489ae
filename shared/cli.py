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
import shlex
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
from shared.redrive import DeadLetterCounts, redrive_dead_letters, report_dead_letters
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
    if args.json:
        print(json.dumps({"routes": routes, "queue": queue, "destination": destination}, indent=2))
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
        _print_dead_letters("  dead letters (`redrive` puts them back on the queue)", item.get("dead_letters"))
        scanned = item["last_scan"]
        if scanned is None:
            print("  never scanned")
        elif scanned["error"]:
            print(f"  last scan {scanned['at']} FAILED (failing since {scanned['failing_since']}): {scanned['error']}")
        else:
            print(f"  last scan {scanned['at']} ok")
    _print_destination(destination)
    if "error" in queue:
        print(f"queue: {queue['error']}")
    else:
        print(f"queue: {queue['where']}: {queue['queued']} queued, {queue['in_flight']} in flight, {queue['dead']} dead")
        _print_dead_letters("  dead letters of no configured route (left by `redrive`)", queue["dead_letters_not_routed"])
        if not queue["dead_letters_complete"]:
            print("  (dead letters per route: only the first of each route could be looked at)")
    return ExitCode.OK


def _dead_letter_counts(counts: DeadLetterCounts) -> dict:
    return {"count": counts.count, "reasons": dict(counts.reasons.most_common())}


def _print_dead_letters(title: str, dead: dict | None) -> None:
    if not dead or not dead["count"]:
        return
    print(f"{title}: {dead['count']}")
    for reason, count in dead["reasons"].items():
        print(f"    {count} x {scrub(reason)}")


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


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


def _reasons(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) + ")"


# -- auth --------------------------------------------------------------------------------


def auth(args: argparse.Namespace) -> ExitCode:
    """`auth gmail` / `auth microsoft`: consent in a browser (or with a device code), then the
    refresh token as JSON on stdout, or merged into a Secrets Manager secret. Needs no routes
    yet: it reads only the OAuth clients and endpoints (flags first, then env and .env)."""
    from shared.auth_flows import AuthFailed, Browser, google_consent, microsoft_authority, microsoft_consent, microsoft_device_consent
    from shared.settings import load_auth_settings
    from shared.token_store import SecretWriteFailed

    configure_logging("WARNING")  # the libraries' info lines are not for this screen
    report = Report(out=sys.stderr)
    try:
        settings = load_auth_settings(args.env_file)
    except SettingsInvalid as exc:
        for problem in exc.problems:
            report.fail("settings", problem)
        return ExitCode.SETTINGS
    browser = Browser(open=not args.no_browser, out=sys.stderr, timeout=args.timeout, port=args.port)
    try:
        if args.provider == "gmail":
            client_id = args.client_id or settings.gmail_client_id
            client_secret = args.client_secret or _reveal(settings.gmail_client_secret)
            missing = [name for name, value in (("--client-id (or GMAIL_CLIENT_ID)", client_id),
                                                ("--client-secret (or GMAIL_CLIENT_SECRET)", client_secret)) if not value]
            if missing:
                print(f"auth gmail: needs {' and '.join(missing)}: the Desktop app OAuth client (see README)", file=sys.stderr)
                return ExitCode.USAGE
            consent = google_consent(
                client_id=client_id,
                client_secret=client_secret,
                auth_uri=settings.google_auth_uri,
                token_uri=settings.google_token_uri,
                browser=browser,
                login_hint=args.login_hint,
            )
        else:
            client_id = args.client_id or settings.ms_client_id
            if not client_id:
                print("auth microsoft: needs --client-id (or MS_CLIENT_ID): the app registration's "
                      "Application (client) ID (see README)", file=sys.stderr)
                return ExitCode.USAGE
            client_secret = args.client_secret or _reveal(settings.ms_client_secret)
            authority = microsoft_authority(args.tenant or settings.ms_tenant, settings.ms_authority)
            if args.device_code:
                if client_secret:
                    print("auth microsoft: --device-code needs a public client: leave out --client-secret "
                          "(and MS_CLIENT_SECRET)", file=sys.stderr)
                    return ExitCode.USAGE
                consent = microsoft_device_consent(client_id=client_id, authority=authority, browser=browser)
            else:
                consent = microsoft_consent(
                    client_id=client_id,
                    client_secret=client_secret,
                    authority=authority,
                    browser=browser,
                    login_hint=args.login_hint,
                )
        if args.write_secret_id:
            write = _write_secret(args, settings, consent)
            output = {"provider": consent.provider, "account": consent.account, "written_to": write.secret_id,
                      "key": write.key, "created": write.created}
            print(f"{consent.provider}: the refresh token is in secret {write.secret_id}, key {write.key}", file=sys.stderr)
        else:
            output = {
                "provider": consent.provider,
                "refresh_token": consent.refresh_token,
                "account": consent.account,
                "env_export": f"export {consent.setting}={shlex.quote(consent.refresh_token)}",
            }
    except (AuthFailed, SecretWriteFailed) as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    print(json.dumps(output, indent=2))
    return ExitCode.OK


def _destination_status(app: bootstrap.App) -> dict:
    """For `status`: where the destination's refresh token comes from and where its newest
    rotation is kept, and the refusal recorded when its refresh token stopped working."""
    from shared.token_store import MICROSOFT, TokenStoreUnavailable

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
                    kept |= {"rotations_stored": stored.version, "last_stored": _iso(stored.updated_at)}
        info["refresh_token"] = kept
    problem = app.state.read_token_problem(MICROSOFT)
    if problem is not None:
        info["token_problem"] = {"error": problem.error, "since": _iso(problem.first_at), "last": _iso(problem.last_at)}
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


def _write_secret(args: argparse.Namespace, settings, consent):
    from shared.aws import make_client
    from shared.token_store import merge_secret_key

    key = args.write_secret_key or consent.setting
    client = make_client("secretsmanager", settings.aws_endpoint_url, settings.aws_region)
    return merge_secret_key(client, args.write_secret_id, key, consent.refresh_token)


def _reveal(secret) -> str | None:
    return None if secret is None else secret.get_secret_value()


def _add_auth_parser(commands) -> None:
    parser = commands.add_parser(
        "auth", help="get a refresh token: consent once in a browser (auth gmail, auth microsoft)",
        description="Run the provider's OAuth consent and print the refresh token as JSON (refresh_token, "
        "account, env_export), or store it in a Secrets Manager secret. The URL to open is printed on stderr.",
    )
    providers = parser.add_subparsers(dest="provider", metavar="PROVIDER", required=True)
    gmail = providers.add_parser(
        "gmail", help="Google: installed-app flow (loopback redirect, PKCE), scope https://mail.google.com/",
        description="Google's installed-app flow with a loopback redirect and PKCE, scope https://mail.google.com/ "
        "with offline access, so Google returns a refresh token (for GMAIL_REFRESH_TOKEN or a route's "
        "gmail_refresh_token). Uses the Desktop app OAuth client; GOOGLE_AUTH_URI and GOOGLE_TOKEN_URI "
        "override the endpoints.",
    )
    gmail.add_argument("--client-id", help="the OAuth client ID (default: GMAIL_CLIENT_ID)")
    gmail.add_argument("--client-secret", help="the OAuth client secret (default: GMAIL_CLIENT_SECRET)")
    microsoft = providers.add_parser(
        "microsoft", help="Microsoft: authorization code (loopback redirect) or --device-code; IMAP scope",
        description="msal's authorization-code flow with a loopback redirect (http://localhost), or the "
        "device-code flow with --device-code, for the scopes https://outlook.office.com/IMAP.AccessAsUser.All "
        "and offline_access: the refresh token for MS_REFRESH_TOKEN. MS_AUTHORITY overrides the authority.",
    )
    microsoft.add_argument("--client-id", help="the app registration's Application (client) ID (default: MS_CLIENT_ID)")
    microsoft.add_argument("--client-secret", help="only for a confidential client (default: MS_CLIENT_SECRET)")
    microsoft.add_argument("--tenant", help="consumers for Outlook.com (default: MS_TENANT, else consumers)")
    microsoft.add_argument("--device-code", action="store_true", help="sign in on another device with a short code")
    for sub in (gmail, microsoft):
        sub.add_argument("--login-hint", metavar="EMAIL", help="the account to preselect on the sign-in page")
        sub.add_argument("--no-browser", action="store_true", help="only print the URL; do not open a browser")
        sub.add_argument("--port", type=int, default=0, help="loopback port for the redirect (default: any free one)")
        sub.add_argument("--timeout", type=_positive_int, default=300, help="seconds to wait for the consent (default 300)")
        sub.add_argument("--write-secret-id", metavar="ID",
                         help="merge the token into this Secrets Manager secret (created if missing) instead of printing it")
        sub.add_argument("--write-secret-key", metavar="KEY",
                         help="the key in that secret (default: GMAIL_REFRESH_TOKEN or MS_REFRESH_TOKEN)")


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
        "status", status, "per route: watermark, copied/skipped/failed counts with reasons, dead letters, queue depths",
        "Per route: the watermark, claims by status with skip reasons, open failure records, dead letters "
        "with the reason recorded for each; the queue's depths.",
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    redrive_parser = command(
        "redrive", redrive, "put dead-lettered messages back on the queue",
        "Move messages from the dead letters (the SQS DLQ, or the local queue's dead-letter table) back "
        "to the main queue, oldest first, so the next consume or drain tries them again; a message "
        "copied meanwhile is only acknowledged. Bodies that are not message references of a configured "
        "route stay in the dead letters and are listed. Prints a line per route and the total.",
    )
    redrive_parser.add_argument("--route", metavar="R", help="only this route's messages")
    redrive_parser.add_argument("--max", metavar="N", type=_positive_int, help="at most N messages")
    redrive_parser.add_argument("--dry-run", action="store_true", help="say what would be moved; move nothing")
    redrive_parser.add_argument(
        "--include-malformed", action="store_true",
        help="also move bodies that are not references of a configured route (the consumer quarantines them again)",
    )
    command(
        "check", check, "validate settings, check the state store and queue, log in to every mailbox; copies nothing",
        "Validate settings, check the state store (the fail-safe gate) and the queue, then "
        "log in to every route's source and to the destination. One line per check.",
    )
    _add_auth_parser(commands)
    return parser, handlers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = _parser()
    args = parser.parse_args(argv)
    if args.command == "auth":
        return auth(args)  # before the settings: it runs before the routes and tokens exist
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
            # It may fail mid-run too: what was copied before is recorded, so say only what stops.
            print("stopped: no mailbox is opened while the state store fails; run again once it works", file=sys.stderr)
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
