"""`python -m shared.cli`: parse the command line, load the settings, run the command, and turn
what it raised into an exit code.

Every command but `auth` loads the settings first (one line per problem, exit 3), then runs its
use case. Exit codes tell one failure from another (see `shared.cli.report.ExitCode`); no command
prints a traceback for an expected failure, and nothing printed carries a secret.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from shared import bootstrap
from shared.cli.auth import auth
from shared.cli.parser import build_parser
from shared.cli.report import ExitCode, Report, UsageProblem
from shared.errors import MailSyncerError, QueueUnavailable, SettingsInvalid, StateStoreUnavailable
from shared.logs import configure_logging
from shared.redaction import scrub
from shared.settings import Settings, load_settings, missing_env_file, trust_ca_bundle

log = logging.getLogger("mail_syncer.cli")


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM (kill, systemd, a container stopping) ends a run as Ctrl-C does: cleanly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.command == "auth":
        return auth(args)  # before the settings: it runs before the routes and tokens exist
    report = Report()
    if problems := missing_env_file(args.env_file):
        return report.settings_invalid(problems)
    try:
        settings = load_settings(args.env_file or ".env")
    except SettingsInvalid as exc:
        return report.settings_invalid(exc.problems)
    if args.log_format:
        settings = settings.model_copy(update={"log_format": args.log_format})
    trust_ca_bundle(settings.requests_ca_bundle)
    configure_logging(settings.log_level, settings.log_format)
    app = bootstrap.build(settings)
    interrupted = False
    try:
        return handlers[args.command](args, app, report)
    except UsageProblem as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except StateStoreUnavailable as exc:
        return _state_store_failed(args, report, exc)
    except QueueUnavailable as exc:
        if exc.path is None or exc.path != _state_file(settings):
            print(f"error: {scrub(str(exc))}", file=sys.stderr)
            return ExitCode.UNREACHABLE
        # The local queue lives in the state file: that file failing is the state store failing.
        return _state_store_failed(args, report, exc)
    except MailSyncerError as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: claims let go, messages in flight due again; run again to finish", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception:  # noqa: BLE001 - a bug: log it scrubbed rather than crash with raw text
        log.exception("internal error in %s", args.command)
        return ExitCode.INTERNAL
    finally:
        # Interrupted: sockets are closed without LOGOUT, which could be written into an APPEND's
        # unfinished literal and wait for a timeout.
        app.close(abruptly=interrupted)


def _state_store_failed(args: argparse.Namespace, report: Report, exc: MailSyncerError) -> ExitCode:
    report.fail("state store", str(exc))
    if args.command != "check":
        # It may fail mid-run too: what was copied before is recorded, so say only what stops.
        print("stopped: no mailbox is opened while the state store fails; run again once it works", file=sys.stderr)
    return ExitCode.GATE


def _state_file(settings: Settings) -> Path | None:
    """The SQLite file the state store is in, if it is in one."""
    return None if settings.state_table else settings.state_db_path
