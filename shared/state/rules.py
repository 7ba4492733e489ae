"""The claim and watermark rules, in one place for both state store adapters.

SQLite applies these functions inside one `BEGIN IMMEDIATE` transaction. DynamoDB states the same
rules as condition expressions (its writes cannot run Python), and uses these functions to read
the item a failed condition hands back, so both adapters answer alike.
"""

from __future__ import annotations

from shared.errors import ClaimLost
from shared.state.port import (
    MAX_ERROR_TEXT,
    Claim,
    ClaimOutcome,
    ClaimResult,
    ClaimStatus,
    HolderProbe,
    HolderState,
    UidKey,
    Watermark,
)

# The statuses of a claim that has an owner; only the owner may change it.
OWNED_STATUSES = (ClaimStatus.IN_PROGRESS, ClaimStatus.APPENDING)

# How route_counts reports a claim skipped without a reason.
NO_REASON = "no reason given"

# Hours of downloads kept (count_download): a day's budget window and a day to spare.
DOWNLOADS_KEPT_HOURS = 48


def watermark_moves(found: Watermark | None, uidvalidity: int, last_uid: int) -> bool:
    """A watermark only goes up, unless the mailbox was renumbered (a new UIDVALIDITY)."""
    return found is None or found.uidvalidity != uidvalidity or last_uid > found.last_uid


def answer_without_taking(
    found: Claim | None, owner: str, now: float, holder_state: HolderProbe | None = None
) -> ClaimResult | None:
    """What claim_uid answers when the claim found must not be taken; None when it may be: no
    claim yet, a released one (no owner), one whose holder is gone, or one whose lease ran out
    and whose holder is not known to be alive (`holder_state`; see shared.claim_owners)."""
    if found is None:
        return None
    if found.status.is_final:
        return ClaimResult(ClaimOutcome.FINAL, found)
    if found.owner is None:
        return None  # released
    if found.owner == owner:
        # Already ours and live: a retried request whose first answer was lost on the way.
        return None if found.lease_until <= now else ClaimResult(ClaimOutcome.CLAIMED, found)
    holder = holder_state(found.owner) if holder_state is not None else HolderState.UNKNOWN
    if holder is HolderState.GONE:
        return None
    if holder is HolderState.UNKNOWN and found.lease_until <= now:
        return None
    # Live, or alive past its lease: a frozen holder may still finish the APPEND it sent.
    return ClaimResult(ClaimOutcome.HELD, found)


def status_after_taking(found: Claim | None) -> ClaimStatus:
    """A claim taken over mid-APPEND stays APPENDING: the new owner must look in the
    destination before appending again (DESIGN.md, guarantee 2)."""
    if found is not None and found.status is ClaimStatus.APPENDING:
        return ClaimStatus.APPENDING
    return ClaimStatus.IN_PROGRESS


def status_after_release(current: ClaimStatus, append_outcome_unknown: bool) -> ClaimStatus:
    if append_outcome_unknown and current is ClaimStatus.APPENDING:
        return ClaimStatus.APPENDING
    return ClaimStatus.FAILED


def is_owned_by(found: Claim | None, owner: str) -> bool:
    return found is not None and found.owner == owner and found.status in OWNED_STATUSES


def require_final(status: ClaimStatus | str) -> ClaimStatus:
    status = ClaimStatus(status)
    if not status.is_final:
        raise ValueError(f"finalize needs a final status (done or skipped), not {status.value!r}")
    return status


def cut_error_text(text: str) -> str:
    return text[:MAX_ERROR_TEXT]


def describe_key(key: UidKey) -> str:
    return f"route {key.route} UID {key.uid} (UIDVALIDITY {key.uidvalidity})"


def claim_lost(key: UidKey, owner: str, found: Claim | None) -> ClaimLost:
    if found is None:
        now = "there is no claim"
    else:
        now = f"it is {found.status.value}, owner {found.owner or 'none'}"
    return ClaimLost(f"claim on {describe_key(key)} is not held by {owner}: {now}")
