"""What `drain` did in each drain-level test of a server behaviour (the Gmail and Outlook.com
fronts): one row per test, kept in BEHAVIOURS and printed after the run (`write_table`, which
tests/conftest.py calls). Every figure comes from the run: the messages the test seeded,
what Dovecot behind the destination holds (its bytes are exactly what was APPENDed), drain's
summary lines, and the APPENDs the Outlook front received.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tests.harness.gather import gathered_rows
from tests.harness.mail import DovecotServer, uidnext

# drain's line per route (shared/cli/progress.py): "route NAME: C copied, S skipped (REASON: n,
# ...), F failed[, D dead-lettered ...]".
_ROUTE_LINE = re.compile(
    r"^route \S+: \d+ copied, (\d+) skipped(?: \((.*)\))?, (\d+) failed(?:, (\d+) dead-lettered)?", re.MULTILINE
)


@dataclass(frozen=True)
class Row:
    behaviour: str
    front: str  # the front the behaviour is met through: "Outlook.com" (destination) or "Gmail" (source)
    messages: int  # route messages: each source message once for every route that reads it
    copied: int  # of those, the ones in their destination folder (routes into one folder share one copy)
    skipped: int  # as drain reported them, with `reasons`
    reasons: str
    lost: int  # neither in their destination folder nor reported skipped (dead-lettered or waiting too)
    duplicated: int  # copies beyond one per message and destination folder
    failed: int
    dead: int  # dead-lettered
    appends: int  # APPEND commands the Outlook front received; without it, APPENDs Dovecot stored
    most: int | None  # most APPEND commands carrying one message (None: not known without the front)

    @property
    def clean(self) -> bool:
        return self.lost == self.duplicated == 0


BEHAVIOURS: list[Row] = gathered_rows("server behaviours", Row)


def record(
    behaviour: str,
    front: str,
    *,
    wanted: Mapping[str, Sequence[bytes]],
    landed: Mapping[str, Sequence[bytes]],
    drained: str,
    appends: Sequence[bytes | None] | int,
) -> Row:
    """Add the row of one run to BEHAVIOURS and return it.

    `wanted`: per destination folder, the messages of the routes into it (a message read by two
    routes into one folder is there twice: one copy is due, the other a skip as a duplicate);
    `landed`: per destination folder, the bytes of every message in it after the run (messages
    that are no source message's are not counted); `drained`: drain's stdout; `appends`: the
    Outlook front's `append_attempts`, or the number of APPENDs Dovecot stored (UIDs used)."""
    due = {(folder, body) for folder, bodies in wanted.items() for body in bodies}
    got = Counter((folder, body) for folder, bodies in landed.items() for body in bodies)
    messages = sum(len(bodies) for bodies in wanted.values())
    copied = sum(1 for key in due if got[key])
    lines = _ROUTE_LINE.findall(drained)
    skipped = sum(int(line[0]) for line in lines)
    # Skips beyond the duplicates of messages read by two routes into one folder account for
    # the missing ones; any missing beyond them are lost.
    lost = max(len(due) - copied - max(skipped - (messages - len(due)), 0), 0)
    if isinstance(appends, int):
        count, most = appends, None
    else:
        count, most = len(appends), max(Counter(a for a in appends if a is not None).values(), default=0)
    row = Row(
        behaviour=behaviour,
        front=front,
        messages=messages,
        copied=copied,
        skipped=skipped,
        reasons="; ".join(line[1] for line in lines if line[1]) if lines else "(no summary line from drain)",
        lost=lost,
        duplicated=sum(got[key] - 1 for key in due if got[key] > 1),
        failed=sum(int(line[2]) for line in lines),
        dead=sum(int(line[3] or 0) for line in lines),
        appends=count,
        most=most,
    )
    BEHAVIOURS.append(row)
    return row


def stored_appends(server: DovecotServer, user: str, folders: Sequence[str]) -> int:
    """APPENDs Dovecot stored into `folders`, new ones: the UIDs used (one per message saved)."""
    return sum(uidnext(server, user, folder) - 1 for folder in folders)


def write_table(terminalreporter) -> None:
    if not BEHAVIOURS:
        return
    terminalreporter.write_sep("=", "server behaviours: what drain did through the Gmail and Outlook.com fronts")
    terminalreporter.write_line(
        f"{'behaviour':<48} {'front':<11} {'msgs':>4} {'copied':>6} {'skipped':>7} {'lost':>4} {'duplicated':>10}"
        f" {'failed':>6} {'dead':>4} {'APPENDs':>7} {'per msg':>7} {'most':>4}  skipped because"
    )
    for row in BEHAVIOURS:
        appends = f"{row.appends}{'' if row.most is not None else '*'}"
        per_message = f"{row.appends / row.messages:.2f}" if row.messages else "-"
        most = "-" if row.most is None else str(row.most)
        mark = "" if row.clean else "   <-- LOST OR DUPLICATED"
        terminalreporter.write_line(
            f"{row.behaviour:<48} {row.front:<11} {row.messages:>4} {row.copied:>6} {row.skipped:>7} {row.lost:>4}"
            f" {row.duplicated:>10} {row.failed:>6} {row.dead:>4} {appends:>7} {per_message:>7} {most:>4}"
            f"  {row.reasons or '-'}{mark}"
        )
    if any(row.most is None for row in BEHAVIOURS):
        terminalreporter.write_line(
            "* no Outlook front: the APPENDs Dovecot stored (UIDs used); a refused one is not seen"
        )
