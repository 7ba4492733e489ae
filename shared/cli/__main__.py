import sys

from shared.cli.main import main
from shared.cli.report import ExitCode

try:
    sys.exit(main())
except KeyboardInterrupt:  # a second Ctrl-C while the first is being handled: no traceback
    sys.exit(ExitCode.INTERRUPTED)
