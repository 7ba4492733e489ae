"""The end-to-end suite against each server dialect, and the fault matrix printed after the run.

Every test of the modules in ON_EVERY_DIALECT that uses the `servers` fixture (sync_env and
lambda_env do) runs once per dialect: plain Dovecot, and the Gmail and Outlook.com fronts before
the two Dovecot servers (tests/harness/gmail_front.py, outlook_front.py). Tests that bring servers
of their own are left on Dovecot.

The fault matrix (tests/e2e/test_fault_matrix.py) is printed after the run: a row per point,
path and servers, with what was lost, duplicated or changed there.
"""

from __future__ import annotations

import sys

# Plain Dovecot, and the Gmail and Outlook.com fronts before the two Dovecot servers.
DIALECTS = ["dovecot", "fronts"]
ON_EVERY_DIALECT = {"test_drain", "test_lambda", "test_fault_matrix", "test_token_rotation", "test_uidvalidity", "test_state_lost"}
# Fixtures that start servers of a test's own: such a test stays on plain Dovecot.
OWN_SERVERS = {"own_outlook", "own_moto"}


def pytest_generate_tests(metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    fixtures = set(metafunc.fixturenames)
    if module in ON_EVERY_DIALECT and "servers" in fixtures and not fixtures & OWN_SERVERS:
        metafunc.parametrize("servers", DIALECTS, indirect=True)


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
