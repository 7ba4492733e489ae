"""`python -m shared.cli`: the commands a person runs.

Every command loads the settings first (one line per problem, exit 3), then runs its use case.
Exit codes tell one failure from another (see ExitCode); no command prints a traceback for an
expected failure, and nothing printed carries a secret.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum

from shared import bootstrap
from shared.errors import ImapFailure, MailSyncerError, QueueUnavailable, SettingsInvalid, StateStoreUnavailable
from shared.imap import open_session
from shared.logs import configure_logging
from shared.redaction import scrub
from shared.settings import Settings, load_settings

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


def check(settings: Settings, app: bootstrap.App, report: Report) -> ExitCode:
    """Settings are valid by now; the gate, the queue, then every login. Copies nothing."""
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


# -- wiring ------------------------------------------------------------------------------

Command = Callable[[Settings, bootstrap.App, Report], ExitCode]


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
    commands.add_parser(
        "check",
        help="validate settings, check the state store and queue, log in to every mailbox; copies nothing",
        description="Validate settings, check the state store (the fail-safe gate) and the queue, then "
        "log in to every route's source and to the destination. One line per check.",
    )
    handlers["check"] = check
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
        return handlers[args.command](settings, app, report)
    except StateStoreUnavailable as exc:
        report.fail("state store", str(exc))
        return ExitCode.GATE
    except MailSyncerError as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except Exception:  # noqa: BLE001 - a bug: log it scrubbed rather than crash with raw text
        log.exception("internal error in %s", args.command)
        return ExitCode.INTERNAL
    finally:
        app.close()


if __name__ == "__main__":
    sys.exit(main())
