"""What a person watching a run sees: a progress line while copying, a summary per route after."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import TextIO

from shared.claim_owners import readable
from shared.logs import live_line
from shared.message_ref import UidKey
from shared.pipeline.consume import Wait
from shared.pipeline.copier import FOUND_IN_DESTINATION, CopyResult, Outcome
from shared.pipeline.pauses import describe
from shared.pipeline.scan import RouteScan
from shared.settings import Route
from shared.state import Claim, Pause

log = logging.getLogger("mail_syncer.progress")

# Not on a terminal (cron, CI, a log file): one line this often instead of a redrawn one.
LOG_EVERY_SECONDS = 10.0
# While a run waits for the same thing, it says so again this often.
WAIT_REMINDER_SECONDS = 60.0


class Progress:
    """The progress line, on stderr: redrawn in place on a terminal, else a line every
    LOG_EVERY_SECONDS. It counts messages, each by its latest outcome (a message failed once and
    copied on its retry is one copied message), as the summary does. While it is drawn, log lines
    (shared.logs.live_line) and `note`s clear it first and draw it again after, so no two share a
    line. `quiet`: nothing drawn (a watch's round prints its own line), waits still said.
    `json_logs`: nothing drawn, and waits said as log records: JSON log lines own stderr."""

    def __init__(
        self, total: int, stream: TextIO | None = None, clock=time.monotonic, *, quiet: bool = False, json_logs: bool = False
    ) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.clock = clock
        self.started = clock()
        self.quiet = quiet or json_logs
        self.json_logs = json_logs
        self.latest: dict[object, Outcome] = {}  # message (its key, else the result) -> latest outcome
        self._last_shown = self.started  # the first line after LOG_EVERY_SECONDS (0.2 s on a terminal)
        self._shown_line: str | None = None  # what was last drawn or written
        self._tty = self.stream.isatty() and not self.quiet
        self._drawn = False  # a line is on the terminal now, without its newline
        self._wait_shown: tuple | None = None
        self._wait_shown_at = 0.0
        if self._tty:
            live_line.clear, live_line.redraw = self._clear, self._redraw

    def advance(self, result: CopyResult) -> None:
        self.latest[result.key if result.key is not None else object()] = result.outcome
        now = self.clock()
        if now - self._last_shown >= (0.2 if self._tty else LOG_EVERY_SECONDS):
            self._show(now)

    def note(self, line: str, stream: TextIO | None = None) -> None:
        """A line of its own (`-v`: one a message, on stdout), never glued to the progress line."""
        with live_line.lock:
            self._clear()
            print(line, file=stream or sys.stdout, flush=True)
            self._redraw()

    def waiting(self, wait: Wait) -> None:
        """Say what the run waits for: when it starts to wait for something else, and every
        WAIT_REMINDER_SECONDS while it waits for the same."""
        now = self.clock()
        what = (wait.reason, wait.waiting, wait.elsewhere)
        if what == self._wait_shown and now - self._wait_shown_at < WAIT_REMINDER_SECONDS:
            return
        self._wait_shown, self._wait_shown_at = what, now
        if self.json_logs:
            log.info("%s", describe_wait(wait))
        else:
            self.note(describe_wait(wait), self.stream)

    def finish(self) -> None:
        """The last count, unless it is on screen already; the terminal's line ended."""
        with live_line.lock:
            if live_line.clear == self._clear:
                live_line.clear = live_line.redraw = None
            if self.latest and not self.quiet and self._line() != self._shown_line:
                self._show(self.clock())
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False

    def _line(self) -> str:
        counts = Counter(self.latest.values())
        done = counts[Outcome.COPIED] + counts[Outcome.SKIPPED] + counts[Outcome.ALREADY_DONE]
        line = f"{done}/{max(self.total, done)} done: {counts[Outcome.COPIED]} copied, {counts[Outcome.SKIPPED]} skipped"
        if counts[Outcome.FAILED]:
            line += f", {counts[Outcome.FAILED]} failed (tried again)"
        return line

    def _show(self, now: float) -> None:
        if self.quiet:
            return
        self._last_shown = now
        line = self._line()
        copied = sum(1 for outcome in self.latest.values() if outcome is Outcome.COPIED)
        self._shown_line = line
        shown = f"{line}; {copied / max(now - self.started, 1e-6):.1f} messages/s"
        with live_line.lock:
            if self._tty:
                self.stream.write(f"\r{shown}\033[K")
                self._drawn = True
            else:
                self.stream.write(f"{shown}\n")
            self.stream.flush()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _redraw(self) -> None:
        if self._drawn and self._shown_line is not None:
            self._show(self.clock())


def describe_wait(wait: Wait, now: float | None = None) -> str:
    """`waiting until 14:05:09 (in 4 min 50 s) for route work UID 7: <why>; 2 more wait, 1 in
    flight with another run`."""
    now = time.time() if now is None else now
    if wait.until is None:
        line = "waiting"
    else:
        clock = time.strftime("%H:%M:%S", time.localtime(wait.until))
        line = f"waiting until {clock} (in {_duration(wait.until - now)})"
    if wait.waiting:
        line += f" for {readable(wait.reason)}"
        if wait.waiting > 1:
            line += f"; {wait.waiting - 1} more wait"
        if wait.elsewhere:
            line += f"; {wait.elsewhere} in flight with another run"
    else:
        line += f": {wait.elsewhere} message(s) in flight with another run (a drain still going, or one that stopped)"
    return line


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class RunTally:
    """What happened to each message and route in this run, for the summary and the exit code."""

    def __init__(self) -> None:
        self.last: dict[UidKey, CopyResult] = {}
        self.scan_errors: dict[str, str] = {}
        self.scans_paused: dict[str, str] = {}  # route -> the pause its source account is under
        self.quarantined = 0
        self.left_waiting = 0  # messages left queued for a long pause (see consume_queue)
        self.dead_letters = 0  # in the dead letters after the run, of this run or earlier ones

    def add_scans(self, scans: Sequence[RouteScan]) -> None:
        for scan in scans:
            if scan.error:
                self.scan_errors[scan.route] = scan.error
            else:
                self.scan_errors.pop(scan.route, None)
            if scan.paused:
                self.scans_paused[scan.route] = scan.paused
            else:
                self.scans_paused.pop(scan.route, None)

    def add(self, result: CopyResult) -> None:
        if result.key is None:
            self.quarantined += 1
        else:
            self.last[result.key] = result

    def settle(self, claim_of: Callable[[UidKey], Claim | None]) -> None:
        """A message whose last attempt here failed may have been finished since by another run
        on the same queue (a second drain): then it is not a failure of this run."""
        for key, result in list(self.last.items()):
            if result.outcome is Outcome.FAILED:
                claim = claim_of(key)
                if claim is not None and claim.status.is_final:
                    self.last[key] = CopyResult(Outcome.ALREADY_DONE, key, f"{claim.status} by another run")

    @property
    def copy_failed(self) -> bool:
        """Something could not be copied: in this run, or waiting in the dead letters since."""
        return self.quarantined > 0 or self.dead_letters > 0 or any(
            r.outcome in (Outcome.FAILED, Outcome.DEAD_LETTERED) for r in self.last.values()
        )

    @property
    def waits(self) -> bool:
        """Messages (or a scan) wait for a mailbox's pause beyond this run."""
        return self.left_waiting > 0 or bool(self.scans_paused)

    def print_summary(
        self, routes: Sequence[Route], pauses: Sequence[Pause] = (), stream: TextIO | None = None
    ) -> None:
        """A line per route (and its failures), then, when messages wait beyond this run, the
        pauses in force (`pauses`) and when each ends."""
        stream = stream or sys.stdout
        by_route: dict[str, list[CopyResult]] = defaultdict(list)
        for key, result in self.last.items():
            by_route[key.route].append(result)
        for route in routes:
            results = by_route.get(route.name, [])
            outcomes = Counter(r.outcome for r in results)
            reasons = Counter(r.detail for r in results if r.outcome is Outcome.SKIPPED)
            skipped = outcomes[Outcome.SKIPPED]
            why = " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items())) + ")" if reasons else ""
            line = (
                f"route {route.name}: {outcomes[Outcome.COPIED]} copied, {skipped} skipped{why}, "
                f"{outcomes[Outcome.FAILED]} failed"
            )
            if outcomes[Outcome.DEAD_LETTERED]:
                line += f", {outcomes[Outcome.DEAD_LETTERED]} dead-lettered (`status` says why, `redrive` retries)"
            if outcomes[Outcome.PAUSED]:
                line += f", {outcomes[Outcome.PAUSED]} waiting for a paused mailbox"
            if outcomes[Outcome.ALREADY_DONE]:
                line += f", {outcomes[Outcome.ALREADY_DONE]} already done"
            found = sum(1 for r in results if r.outcome is Outcome.COPIED and r.detail.startswith(FOUND_IN_DESTINATION))
            if found:
                line += f" ({found} of them found in the destination already, not appended again)"
            if route.name in self.scan_errors:
                line += f"; scan failed: {self.scan_errors[route.name]}"
            if route.name in self.scans_paused:
                line += "; not scanned: its source account is paused"
            print(line, file=stream)
            for result in results:
                if result.outcome in (Outcome.FAILED, Outcome.DEAD_LETTERED):
                    print(f"  UID {result.key.uid}: {result.detail}", file=stream)
        if self.quarantined:
            print(f"{self.quarantined} queue message(s) quarantined (not valid references; see the log)", file=stream)
        if self.dead_letters:
            print(
                f"{self.dead_letters} message(s) in the dead letters: `status` says why; once the cause is"
                " fixed, `redrive` puts them back",
                file=stream,
            )
        if self.waits:
            print(f"{self.left_waiting} message(s) wait in the queue for a later run:", file=stream)
            reasons = [describe(pause) for pause in pauses]
            reasons += [
                f"route {result.key.route} UID {result.key.uid}: {readable(result.detail)}"
                for result in self.last.values()
                if result.outcome is Outcome.BUSY
            ]
            # Put off by an earlier run, which knew why: this one saw them only in flight.
            reasons = reasons or ["put off by an earlier run (a claim held by another drain, perhaps a stopped one); `status` shows the claims"]
            for reason in reasons:
                print(f"  {reason}", file=stream)
