"""Prints the fault matrix (tests/e2e/test_fault_matrix.py) after the run: a row per point and
path, with what was lost, duplicated or changed there."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter) -> None:
    module = sys.modules.get("tests.e2e.test_fault_matrix")
    rows = getattr(module, "MATRIX", None)
    if not rows:
        return
    terminalreporter.write_sep("=", "fault matrix: killed or broken at a point, then run again")
    terminalreporter.write_line(f"{'path':<7} {'server':<8} {'point':<58} {'lost':>4} {'duplicated':>10} {'foreign':>7}")
    for row in rows:
        mark = "" if row.clean else "   <-- FAILED"
        terminalreporter.write_line(
            f"{row.path:<7} {row.server:<8} {row.point:<58} {row.lost:>4} {row.duplicated:>10} {row.foreign:>7}{mark}"
        )
