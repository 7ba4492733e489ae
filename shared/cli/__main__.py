import signal
import sys

# SIGTERM ends a run as Ctrl-C does (shared.cli.main says so again), from the first instant: the
# modules take about half a second to load, and a signal in that time must not end in a traceback.
signal.signal(signal.SIGTERM, signal.default_int_handler)
try:
    from shared.cli.main import main
    from shared.cli.report import ExitCode
except KeyboardInterrupt:  # Ctrl-C or SIGTERM while loading: nothing was started, nothing to undo
    print("interrupted before the run started: nothing was done", file=sys.stderr)
    sys.exit(130)

try:
    sys.exit(main())
except KeyboardInterrupt:  # a second Ctrl-C while the first is being handled: no traceback
    sys.exit(ExitCode.INTERRUPTED)
