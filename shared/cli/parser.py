"""The command line: every command with its options and help text, and which function runs it."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable

from shared import bootstrap
from shared.cli import commands, status
from shared.cli.report import ExitCode, Report

Command = Callable[[argparse.Namespace, bootstrap.App, Report], ExitCode]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="python -m shared.cli",
        description="mail_syncer: copy new mail from Gmail folders into an Outlook.com mailbox, exactly once.",
        epilog="Settings come from the environment, then the --env-file, then AWS Secrets Manager "
        "(see .env.example). Exit codes: 0 ok, 1 messages failed, 2 usage, 3 settings, "
        "4 state store unavailable, 5 a mailbox or the queue failed, 6 messages wait for a paused mailbox, "
        "70 internal error (a bug; see the log), "
        "130 interrupted.",
    )
    parser.add_argument(
        "--env-file", metavar="PATH",
        help="settings file read after the environment (default: .env, if there; a file named here must exist)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"),
        help="log lines on stderr as text, or one JSON object a line (default: LOG_FORMAT, else text); "
        "with json no progress line is drawn there",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    handlers: dict[str, Command] = {}

    def command(name: str, handler: Command, summary: str, description: str) -> argparse.ArgumentParser:
        handlers[name] = handler
        return subparsers.add_parser(name, help=summary, description=description)

    drain = command(
        "drain", commands.drain, "scan every route, then copy until the queue is empty; again while a backlog remains",
        "Scan every route for new messages and copy them until the queue is empty, repeating while a "
        "route has more than MAX_ENQUEUE_PER_RUN waiting. Shows progress (stderr), then a summary per "
        "route (stdout).",
    )
    drain.add_argument("--dry-run", action="store_true", help="list what would be copied (date, from, subject, size) and a total; write and copy nothing")
    _add_route_option(drain)
    _add_since_option(drain)
    _add_verbose_option(drain)
    drain.add_argument(
        "--watch", action="store_true",
        help="then stay connected: IDLE on each route's source folder (a session of its own, one of the "
        "account's GMAIL_MAX_CONNECTIONS) and copy each new message within seconds of its arrival; a line per "
        "copy round. IDLE is issued again every WATCH_REIDLE_SECONDS (default 240), every route is rescanned "
        "every WATCH_RESCAN_SECONDS (default 300), a lost session is reopened. Runs until Ctrl-C or SIGTERM "
        "(exit 130, after a summary)",
    )
    once = command(
        "run-once", commands.run_once, "one scheduled cycle: scan every route once, then copy what was queued",
        "One cycle as the schedule runs it: scan every route (at most MAX_ENQUEUE_PER_RUN each), then copy.",
    )
    once.add_argument("--dry-run", action="store_true", help="list what would be enqueued; write and copy nothing")
    _add_route_option(once)
    _add_since_option(once)
    _add_verbose_option(once)
    scan_parser = command(
        "scan", commands.scan, "enqueue references to new messages (the producer)",
        "The producer: find each route's new UIDs and enqueue references to them; copies nothing.",
    )
    scan_parser.add_argument("--dry-run", action="store_true", help="list what would be enqueued; write nothing")
    _add_route_option(scan_parser)
    _add_since_option(scan_parser)
    consume_parser = command(
        "consume", commands.consume, "copy what is queued until the queue is empty (the consumer)",
        "The consumer: copy queued messages until the queue is empty.",
    )
    _add_route_option(consume_parser)
    _add_verbose_option(consume_parser)
    status_parser = command(
        "status", status.status, "per route: watermark, copied/skipped/failed counts with reasons, dead letters, queue depths",
        "Per route: where its first scan started and the older messages left, the watermark, claims by "
        "status with skip reasons, open failure records, dead letters with the reason recorded for each; "
        "the queue's depths; when each refresh token last worked, with a warning before it expires.",
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    status_parser.add_argument("--route", metavar="R", action="append", help="only this route (repeatable)")
    redrive_parser = command(
        "redrive", commands.redrive, "put dead-lettered messages back on the queue",
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
    reconcile_parser = command(
        "reconcile", commands.reconcile, "record as copied what the destination folders hold already; copies nothing",
        "For each route, match the source messages of its window with the destination folder's messages "
        "by INTERNALDATE and Message-ID, Date, From and Subject (never bytes or size, which Outlook.com "
        "re-renders), and record each match as copied, so that no second copy is made. For a first run "
        "into a folder another copier filled, a lost state file, or a move from a laptop to AWS. The "
        "first scan of a route without a watermark looks for each message before copying it anyway; "
        "this does it for the whole window at once and says what it found. Appends nothing.",
    )
    reconcile_parser.add_argument("--route", metavar="R", action="append", help="only this route (repeatable)")
    reconcile_parser.add_argument(
        "--since", metavar="DATE", type=_date,
        help="look at source messages from DATE (YYYY-MM-DD) on (default: the route's since, or FALLBACK_SINCE_DAYS ago)",
    )
    reconcile_parser.add_argument("--dry-run", action="store_true", help="say what would be recorded; record nothing")
    command(
        "check", commands.check, "validate settings, check the state store and queue, log in to every mailbox; copies nothing",
        "Validate settings, check the state store (the fail-safe gate) and the queue, then "
        "log in to every route's source and to the destination. One line per check.",
    )
    _add_auth_parser(subparsers)
    return parser, handlers


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


def _add_route_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--route", metavar="NAME", action="append",
        help="only this route (repeatable; default: every route); its messages alone are copied from the local queue",
    )


def _add_since_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", metavar="DATE", type=_date,
        help="also copy the older messages from DATE (YYYY-MM-DD) on that were never copied: below the watermark, "
        "before a route's start; what was copied stays copied, and the watermark does not move back",
    )


def _add_verbose_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="a line per message on stdout: route, UID, outcome, destination UID, bytes, ms",
    )


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date YYYY-MM-DD: {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


