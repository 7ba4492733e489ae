"""Pauses: a mailbox that asked to be left alone (a throttle, a spent download allowance) takes
no command from any route or process until its pause ends. Kept in the state store by name:
"destination" for the Outlook mailbox, "source <account>" for a Gmail account, whose limits are
the account's, shared by all its routes."""

from __future__ import annotations

import datetime as dt

from shared.mailbox.port import DownloadQuotaSpent, MailboxThrottled
from shared.pipeline.budget import DownloadBudget
from shared.redaction import scrub
from shared.state import Pause

DESTINATION = "destination"


def source_pause_name(account: str) -> str:
    return f"source {account}"


def throttle_pause(
    throttled: MailboxThrottled, *, account: str, size: int, budget: DownloadBudget | None, now: float
) -> tuple[float, str]:
    """Until when a throttle met on a source account (or the destination) keeps it paused, and
    why: the server's wait; or, for a spent daily allowance (Gmail's [OVERQUOTA]) with a budget
    kept, until the account's 24 hours have room for a download of `size` again."""
    until, text = now + throttled.retry_after, scrub(str(throttled)) or type(throttled).__name__
    if isinstance(throttled, DownloadQuotaSpent) and budget is not None:
        room = budget.spent(account, size)
        until, text = room.resumes_at or until, f"{text}; waits for the daily download window"
    return until, text


def describe(pause: Pause) -> str:
    return f"{pause.name} paused until {iso_time(pause.until)}: {pause.reason}"


def iso_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")
