"""The server behaviours' figures, printed after the run: a row per drain-level test of a Gmail
or Outlook.com behaviour (tests/integration/test_gmail_source.py, test_outlook_destination.py),
recorded by the test itself (tests/harness/figures.py).
"""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter) -> None:
    module = sys.modules.get("tests.harness.figures")
    rows = getattr(module, "BEHAVIOURS", None)
    if not rows:
        return
    terminalreporter.write_sep("=", "server behaviours: what drain did through the Gmail and Outlook.com fronts")
    terminalreporter.write_line(
        f"{'behaviour':<48} {'front':<11} {'msgs':>4} {'copied':>6} {'skipped':>7} {'lost':>4} {'duplicated':>10}"
        f" {'failed':>6} {'dead':>4} {'APPENDs':>7} {'per msg':>7} {'most':>4}  skipped because"
    )
    for row in rows:
        appends = f"{row.appends}{'' if row.most is not None else '*'}"
        per_message = f"{row.appends / row.messages:.2f}" if row.messages else "-"
        most = "-" if row.most is None else str(row.most)
        mark = "" if row.clean else "   <-- LOST OR DUPLICATED"
        terminalreporter.write_line(
            f"{row.behaviour:<48} {row.front:<11} {row.messages:>4} {row.copied:>6} {row.skipped:>7} {row.lost:>4}"
            f" {row.duplicated:>10} {row.failed:>6} {row.dead:>4} {appends:>7} {per_message:>7} {most:>4}"
            f"  {row.reasons or '-'}{mark}"
        )
    if any(row.most is None for row in rows):
        terminalreporter.write_line(
            "* no Outlook front: the APPENDs Dovecot stored (UIDs used); a refused one is not seen"
        )
