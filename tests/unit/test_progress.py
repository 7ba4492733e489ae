"""What a person watching `drain` reads while it waits: which message, until when, and why; said
again when that changes, and now and then while it does not. And what the summary says of the
messages a run leaves waiting."""

from __future__ import annotations

import io
import time

from shared.cli.progress import WAIT_REMINDER_SECONDS, Progress, RunTally, describe_wait
from shared.message_ref import UidKey
from shared.pipeline.consume import Wait
from shared.pipeline.copier import CopyResult, Outcome
from shared.state import Claim, ClaimStatus
from tests.fakes import make_route

OWNER = "local:laptop:4242:1700000000.12:0a1b2c3d"


def test_a_wait_names_the_time_the_message_and_the_reason():
    now = time.time()
    wait = Wait(now + 290, "route work UID 7: destination paused until later: Request is throttled", 3, 1)

    line = describe_wait(wait, now=now)

    clock = time.strftime("%H:%M:%S", time.localtime(now + 290))
    assert line == (
        f"waiting until {clock} (in 4 min 50 s) for route work UID 7: destination paused until later: "
        "Request is throttled; 2 more wait; 1 in flight with another run"
    )


def test_a_holder_is_named_by_pid_and_host_not_by_its_internal_name():
    line = describe_wait(Wait(time.time() + 5, f"route work UID 7 claimed by {OWNER}", 1, 0))

    assert line.endswith("for route work UID 7 claimed by pid 4242 on host laptop")


def test_messages_only_another_run_holds():
    assert describe_wait(Wait(None, "messages in flight with another run", 0, 2)) == (
        "waiting: 2 message(s) in flight with another run (a drain still going, or one that stopped)"
    )


def test_the_same_wait_is_said_once_then_again_after_a_while_and_a_new_one_at_once():
    stream, now = io.StringIO(), [1000.0]
    progress = Progress(total=3, stream=stream, clock=lambda: now[0])
    throttled = Wait(time.time() + 60, "route work UID 7: destination paused", 1, 0)

    progress.waiting(throttled)
    now[0] += 2
    progress.waiting(throttled)
    now[0] += WAIT_REMINDER_SECONDS
    progress.waiting(throttled)
    progress.waiting(Wait(time.time() + 60, "route work UID 8 failed, tried again: timeout", 1, 0))

    lines = stream.getvalue().splitlines()
    assert [line.split(" for ", 1)[1] for line in lines] == [
        "route work UID 7: destination paused",
        "route work UID 7: destination paused",
        "route work UID 8 failed, tried again: timeout",
    ]


def test_messages_left_waiting_are_explained_even_when_this_run_only_saw_them_in_flight():
    tally, out = RunTally(), io.StringIO()
    tally.left_waiting = 9  # behind their route's first message, put off by another run

    tally.print_summary([make_route("work")], [], stream=out)

    assert out.getvalue().splitlines()[-2:] == [
        "9 message(s) wait in the queue for a later run:",
        "  put off by an earlier run (a claim held by another drain, perhaps a stopped one); `status` shows the claims",
    ]


def test_a_busy_message_left_waiting_names_its_holder_by_pid():
    tally, out = RunTally(), io.StringIO()
    tally.left_waiting = 1
    why = f"held by {OWNER}, alive past its lease (stopped?): copied once it goes on or ends"
    tally.add(CopyResult(Outcome.BUSY, UidKey("work", 7, 2), why))

    tally.print_summary([make_route("work")], [], stream=out)

    assert out.getvalue().splitlines()[-1] == (
        "  route work UID 2: held by pid 4242 on host laptop, alive past its lease (stopped?): copied once it goes on or ends"
    )


def test_a_failure_another_run_finished_since_is_not_a_failure_of_this_run():
    # Two drains on one queue: this one's APPEND was refused once (Command Error. 10), the other
    # took the message next and skipped it for good. This run must not exit 1 for it.
    failed, still = UidKey("work", 7, 803), UidKey("work", 7, 804)
    tally, out = RunTally(), io.StringIO()
    tally.add(CopyResult(Outcome.FAILED, failed, "APPEND answered BAD Command Error. 10"))
    tally.add(CopyResult(Outcome.FAILED, still, "connection reset"))
    claims = {failed: Claim(failed, ClaimStatus.SKIPPED, None, 0, 2, reason="rejected by the destination")}

    tally.settle(claims.get)
    tally.print_summary([make_route("work")], [], stream=out)

    assert out.getvalue().splitlines()[:2] == [
        "route work: 0 copied, 0 skipped, 1 failed, 1 already done",
        "  UID 804: connection reset",
    ]
    assert tally.copy_failed  # 804 still failed


# -- the progress line: messages counted once, never glued to a log line --------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def result(uid: int, outcome: Outcome) -> CopyResult:
    return CopyResult(outcome, UidKey("work", 7, uid), "" if outcome is not Outcome.FAILED else "timeout")


def test_the_progress_counts_messages_by_their_latest_outcome_as_the_summary_does():
    """It said `5 failures` for one message tried five times, where the summary said `1 failed`."""
    stream = io.StringIO()
    progress = Progress(total=2, stream=stream)
    for _ in range(5):
        progress.advance(result(1, Outcome.FAILED))
    progress.advance(result(2, Outcome.COPIED))
    progress.finish()

    assert stream.getvalue().splitlines()[-1].startswith("1/2 done: 1 copied, 0 skipped, 1 failed (tried again);")
    progress = Progress(total=1, stream=io.StringIO())
    progress.advance(result(1, Outcome.FAILED))
    progress.advance(result(1, Outcome.COPIED))
    assert progress._line() == "1/1 done: 1 copied, 0 skipped"


def test_without_a_terminal_the_last_count_is_written_once():
    """`1/1 done` was written twice: by the message's advance, then again by finish."""
    stream = io.StringIO()
    progress = Progress(total=1, stream=stream)
    progress.advance(result(1, Outcome.COPIED))
    progress.finish()

    assert [line.split(";")[0] for line in stream.getvalue().splitlines()] == ["1/1 done: 1 copied, 0 skipped"]


def test_on_a_terminal_a_log_line_clears_the_progress_line_and_it_is_drawn_again_after(capsys):
    """`...0.0 messages/s2026-11-30 13:12:54,803 WARNING ...`: a log line was glued to the progress."""
    import logging

    from shared.logs import _LineKeepingHandler

    terminal = Terminal()
    handler = _LineKeepingHandler(terminal)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("mail_syncer.test_progress")
    log.addHandler(handler)
    log.propagate = False
    try:
        ticks = iter(range(100))  # a second between looks: every advance draws
        progress = Progress(total=2, stream=terminal, clock=lambda: next(ticks))
        progress.advance(result(1, Outcome.COPIED))
        assert terminal.getvalue().startswith("\r1/2 done")  # drawn, without its newline
        log.warning("route work: something to say")
        progress.note("route work UID 2: copied")
        progress.advance(result(2, Outcome.COPIED))
        progress.finish()
    finally:
        log.removeHandler(handler)

    # What the terminal shows: each \r starts the line over, \033[K wipes the rest of it.
    shown = []
    for line in terminal.getvalue().split("\n"):
        shown.append(line.split("\r")[-1].replace("\033[K", ""))
    assert shown[0] == "WARNING route work: something to say"
    assert shown[1].startswith("2/2 done: 2 copied, 0 skipped;") and shown[2] == ""
    assert capsys.readouterr().out == "route work UID 2: copied\n"
    assert "messages/sWARNING" not in terminal.getvalue()
