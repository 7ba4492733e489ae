"""The fuzz suite's Hypothesis settings, and how many inputs each of its properties tried.

tests/conftest.py loads it for every run. The profile makes every run try the same inputs
(derandomize: CI cannot fail on a draw a rerun would not make) and keeps no example database in
the work tree. Each property counts the inputs it was run on (`counted`), shrinking included,
and the run ends with a line per property (`write_table`; under pytest-xdist the counts are
summed over the workers, tests/harness/gather.py): the closing note of issue 13 quotes these
numbers.
"""

from __future__ import annotations

import functools
from collections import Counter

from hypothesis import HealthCheck, settings

from tests.harness.gather import gathered_counts

# Derandomized and without a database: the same inputs on every machine and every run. No
# deadline and no too-slow check: make test's workers share the CPU, so an input's time says
# how busy the machine is, not what the code does (one failed at 1.5 s for one draw under -n 4).
settings.register_profile(
    "mail_syncer",
    derandomize=True,
    database=None,
    print_blob=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("mail_syncer")

INPUTS_TRIED: Counter[str] = gathered_counts("fuzz inputs")


def counted(test):
    """Counts each input the property is run on, under the test's name. Goes under @given."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        INPUTS_TRIED[test.__name__] += 1
        return test(*args, **kwargs)

    return run


def write_table(terminalreporter) -> None:
    if not INPUTS_TRIED:
        return
    terminalreporter.write_sep("=", "fuzz: inputs tried per property")
    for name, count in sorted(INPUTS_TRIED.items()):
        terminalreporter.write_line(f"{count:>6}  {name}")
    terminalreporter.write_line(f"{sum(INPUTS_TRIED.values()):>6}  in all")
