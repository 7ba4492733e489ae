"""The end-to-end suite against each server dialect, and the fault matrix printed after the run.

Every test of the modules in ON_EVERY_DIALECT that uses the `servers` fixture (sync_env and
lambda_env do) runs once per dialect: plain Dovecot, and the Gmail and Outlook.com fronts before
the two Dovecot servers (tests/harness/gmail_front.py, outlook_front.py). Tests that bring servers
of their own are left on Dovecot.

The fault matrix (tests/e2e/test_fault_matrix.py) is printed after the run by tests/conftest.py.
"""

from __future__ import annotations

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
