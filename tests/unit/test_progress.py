"""What a person watching `drain` reads while it waits: which message, until when, and why; said
again when that changes, and now and then while it does not."""

from __future__ import annotations

import io
import time

from shared.cli.progress import WAIT_REMINDER_SECONDS, Progress, describe_wait
from shared.pipeline.consume import Wait

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
