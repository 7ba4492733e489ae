import os
import signal
import sys

# SIGTERM ends a run as Ctrl-C does (shared.cli.main says so again), from the first instant: the
# modules take about half a second to load, and a signal in that time must not end in a traceback.
signal.signal(signal.SIGTERM, signal.default_int_handler)


def _end_interrupted() -> None:
    # CPython 3.11 marks a KeyboardInterrupt raised inside exec() of a string (dataclasses and
    # namedtuple build their methods so) as unhandled even once caught, and then ends the process
    # by SIGINT (-2) instead of with its exit code: 15% of Ctrl-Cs while loading did. The run has
    # already let go of everything, so end it here, with the code that tells what happened.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


try:
    from shared.cli.main import main
    from shared.cli.report import ExitCode
except KeyboardInterrupt:  # Ctrl-C or SIGTERM while loading: nothing was started, nothing to undo
    print("interrupted before the run started: nothing was done", file=sys.stderr)
    _end_interrupted()

try:
    code = main()
except KeyboardInterrupt:  # a second Ctrl-C while the first is being handled: no traceback
    code = ExitCode.INTERRUPTED
if code == ExitCode.INTERRUPTED:
    import logging

    logging.shutdown()
    _end_interrupted()
sys.exit(code)
