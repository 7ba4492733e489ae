"""The fault matrix's rows (tests/e2e/test_fault_matrix.py records them) and its table, printed
after the run by tests/conftest.py: a row per point, path and servers, with what was lost,
duplicated or changed there."""

from __future__ import annotations

from dataclasses import dataclass

from tests.harness.gather import gathered_rows


@dataclass(frozen=True)
class Row:
    path: str  # "drain" or "lambda"
    point: str
    server: str  # the destination: "dovecot", or "outlook" (the Outlook.com front before Dovecot)
    lost: int  # source messages not in the destination
    duplicated: int  # extra copies of source messages
    foreign: int  # destination messages matching no source message (bytes, flags or date changed)

    @property
    def clean(self) -> bool:
        return self.lost == self.duplicated == self.foreign == 0


MATRIX: list[Row] = gathered_rows("fault matrix", Row)


def write_table(terminalreporter) -> None:
    if not MATRIX:
        return
    terminalreporter.write_sep("=", "fault matrix: killed or broken at a point, then run again")
    terminalreporter.write_line(f"{'path':<7} {'server':<8} {'point':<58} {'lost':>4} {'duplicated':>10} {'foreign':>7}")
    for row in MATRIX:
        mark = "" if row.clean else "   <-- FAILED"
        terminalreporter.write_line(
            f"{row.path:<7} {row.server:<8} {row.point:<58} {row.lost:>4} {row.duplicated:>10} {row.foreign:>7}{mark}"
        )
