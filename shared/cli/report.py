"""What every command prints its checks with, and the exit codes that tell one failure from another."""

from __future__ import annotations

import sys
from enum import IntEnum

from shared.redaction import scrub


# Where a newcomer goes from a settings error: every setting is described in .env.example.
SETTINGS_HINT = (
    "      every setting is described in .env.example: `cp .env.example .env`, fill it in, then `make check`"
    " (it validates the settings and logs in to every mailbox)"
)


class ExitCode(IntEnum):
    OK = 0
    COPY_FAILURES = 1  # some messages could not be copied (and are recorded)
    USAGE = 2  # argparse's own code for a bad command line
    SETTINGS = 3  # settings missing or invalid
    GATE = 4  # the state store cannot be read and written: nothing was attempted
    UNREACHABLE = 5  # a mailbox, a token endpoint or the queue failed
    # Messages stay queued for a mailbox that asked to be left alone for long (Gmail's daily
    # download limit): nothing failed, and the run after the pause copies them.
    PAUSED = 6
    INTERNAL = 70  # a bug: the scrubbed traceback is in the log
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


class UsageProblem(Exception):
    """A command line that cannot be run as given (an unknown --route): exit 2, one line."""


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

    def settings_invalid(self, problems: list[str]) -> ExitCode:
        """One line per settings problem; the exit code that says the settings are at fault."""
        for problem in problems:
            self.fail("settings", problem)
        print(SETTINGS_HINT, file=self.out, flush=True)
        return ExitCode.SETTINGS

    def warn(self, what: str, detail: str) -> None:
        """Works, but likely not as the user expects: said, and the exit code stays 0."""
        self._line("warn", what, detail)

    def skip(self, what: str, detail: str) -> None:
        self._line("skip", what, detail)

    def _line(self, mark: str, what: str, detail: str) -> None:
        print(f"{mark:<5} {what:<18} {scrub(detail)}", file=self.out, flush=True)

