"""`--help` names every exit code the commands return, so a script or cron job can tell them apart."""

from __future__ import annotations

import re

from shared.cli.parser import build_parser
from shared.cli.report import ExitCode


def test_help_lists_every_exit_code() -> None:
    parser, _ = build_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps the epilog
    listed = {int(code) for code in re.findall(r"\b(\d+) [a-z]", text.split("Exit codes:", 1)[1])}
    assert listed == {int(code) for code in ExitCode}


def test_every_command_has_a_handler_and_help() -> None:
    parser, handlers = build_parser()
    text = parser.format_help()
    for name in ("drain", "run-once", "scan", "consume", "status", "redrive", "reconcile", "check", "auth"):
        assert name in text
    assert set(handlers) == {"drain", "run-once", "scan", "consume", "status", "redrive", "reconcile", "check"}
