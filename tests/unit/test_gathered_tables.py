"""tests/harness/gather.py: under pytest-xdist, a table printed after the run holds every row the
workers recorded, in the order a run in one process prints them, and counts are summed.

Runs pytest on a small suite of its own, once in one process and once in three workers. Tests
that record later in the collection finish first (they sleep less), so rows reach the
controller out of order, and each worker holds rows of tests far apart in the collection.
"""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

CONFTEST = """
from dataclasses import dataclass

from tests.harness.gather import gathered_counts, gathered_rows


@dataclass(frozen=True)
class Row:
    test: int
    part: str
    note: str | None


ROWS = gathered_rows("rows", Row)
COUNTS = gathered_counts("counts")


def pytest_terminal_summary(terminalreporter):
    for row in ROWS:
        terminalreporter.write_line(f"row {row.test} {row.part} {row.note}")
    for name, count in sorted(COUNTS.items()):
        terminalreporter.write_line(f"count {name} {count}")
"""

TESTS = """
import time

import pytest

from conftest import COUNTS, ROWS, Row

TESTS = 12


@pytest.mark.parametrize("test", range(TESTS))
def test_records(test):
    time.sleep((TESTS - test) * 0.02)
    ROWS.append(Row(test, "first", None))
    ROWS.append(Row(test, "second", "even" if test % 2 == 0 else None))
    COUNTS["tried"] += test
    COUNTS[f"by {test % 3}"] += 1
"""


def summary(pytester, *args: str) -> list[str]:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "tests.harness.gather", *args)
    result.assert_outcomes(passed=12)
    return [line for line in result.outlines if line.startswith(("row ", "count "))]


def test_a_table_under_xdist_holds_every_row_in_the_order_of_a_run_in_one_process(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # tests.harness, from this checkout
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_records=TESTS)

    in_one_process = summary(pytester, "-n", "0")
    in_workers = summary(pytester, "-n", "3")

    rows = []
    for test in range(12):
        rows += [f"row {test} first None", f"row {test} second {'even' if test % 2 == 0 else None}"]
    counts = ["count by 0 4", "count by 1 4", "count by 2 4", f"count tried {sum(range(12))}"]
    assert in_one_process == rows + counts
    assert in_workers == in_one_process
