import signal

import pytest

# A suite started in the background (`make test &` in a script, cron) ignores SIGINT, and an
# ignored signal is inherited through exec: the drains the Ctrl-C tests start would shrug it off
# (seen: both failed in such a run). A handler, unlike SIG_IGN, is reset to default in a child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The harness's asserts rewritten, as pytest_plugins' would be: these imports come before it.
pytest.register_assert_rewrite("tests.harness")

from tests.harness import aws_cost, fault_matrix, figures, fuzz

pytest_plugins = [
    "tests.harness.aws",
    "tests.harness.fuzz",
    "tests.harness.gather",
    "tests.harness.gmail_front",
    "tests.harness.imap_proxy",
    "tests.harness.mail",
    "tests.harness.oauth",
    "tests.harness.outlook_front",
    "tests.harness.sync_env",
]

# Tests are marked by the folder they live in, so no module can forget its mark.
FOLDER_MARKS = {"integration": pytest.mark.integration, "e2e": pytest.mark.e2e}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        parts = item.path.relative_to(config.rootpath).parts
        if len(parts) > 1 and parts[0] == "tests" and parts[1] in FOLDER_MARKS:
            item.add_marker(FOLDER_MARKS[parts[1]])


def pytest_terminal_summary(terminalreporter) -> None:
    # Here, not beside the tests that fill them: under pytest-xdist the process that prints runs
    # no test and loads no conftest.py below this one (tests/harness/gather.py brings the rows).
    figures.write_table(terminalreporter)
    fault_matrix.write_table(terminalreporter)
    fuzz.write_table(terminalreporter)
    aws_cost.write_table(terminalreporter)
