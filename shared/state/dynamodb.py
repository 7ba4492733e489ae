"""The state store on one DynamoDB table (the AWS adapter).

Layout (DESIGN.md "State", with one departure: README "State layout in DynamoDB"): pk
`ROUTE#<route>` with sk `WATERMARK`, `SCAN` (the last scan's outcome), `OPEN#<uidvalidity>` (the
route's open claims, one item), `UID#<uidvalidity>#<uid>` (a claim released, skipped or failed),
`FAIL#<uidvalidity>#<uid>` and `FP#<fingerprint>` (a copy made: also its claim's record once
done), `START` (where its first scan started, put once); under pk `TOKENS`, sk
`TOKEN_PROBLEM#<name>` (why a token was refused) and `TOKEN_HEALTH#<provider>#<account>` (when it
last worked: read at each refresh, rewritten once it is an hour old); the gate's probe item under
pk and sk `HEALTH`. Each change that guards exactly-once is one conditional write (on OPEN#, on
its version), or one transaction; a batch's finalize is its FP# records, then one conditional
write on OPEN#. Every read is strongly consistent, so a write just made is never missed (but
TOKEN_HEALTH's before its rewrite, which guards nothing).

Expiry (TTL on `expires_at`): the HEALTH probe and the download counts (pk `DOWNLOADS#<account>`,
sk `HOUR#<hour>`, kept DOWNLOADS_KEPT_HOURS) carry it, nothing else. Watermarks, claims and
fingerprints are the exactly-once guards, and one that expired would let a message be copied
twice. Failure records go when their claim is finalized; those left are what `status` shows
and `redrive` acts on, so they must stay until then too. The SCAN item is one per route,
overwritten by each scan, so it needs no expiry either.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from shared.errors import ClaimLost, StateStoreUnavailable
from shared.state.port import (
    TOKEN_WORKED_FRESH_SECONDS,
    Claim,
    ClaimOutcome,
    ClaimResult,
    ClaimStatus,
    Copied,
    CopiedMessage,
    FailureRecord,
    HolderProbe,
    Pause,
    RouteCounts,
    RouteStart,
    ScanRecord,
    StateStore,
    TokenHealth,
    TokenProblem,
    UidKey,
    Watermark,
)
from shared.state.rules import (
    DOWNLOADS_KEPT_HOURS,
    NO_REASON,
    OWNED_STATUSES,
    answer_without_taking,
    claim_lost,
    cut_error_text,
    is_owned_by,
    require_final,
    status_after_release,
    status_after_taking,
)

EXPIRES_AT = "expires_at"
HEALTH_TTL_SECONDS = 7 * 24 * 3600
WATERMARK_SK = "WATERMARK"
# Its own item: the watermark's conditional put replaces the whole WATERMARK item.
SCAN_SK = "SCAN"
# Up to where a route's messages may be in the destination with no record (set_lookup_bound).
LOOKUP_SK = "LOOKUP"
# Where a route's first scan started (record_route_start).
START_SK = "START"
_HEALTH_KEY = {"pk": {"S": "HEALTH"}, "sk": {"S": "HEALTH"}}

T = TypeVar("T")

# A claim write can fail because the claim changed between two attempts (another owner took it
# and released it); past this many tries the claim is busy enough to answer HELD.
_CLAIM_TRIES = 4

# A write on a route's OPEN# item that finds it changed since it was read (another process
# claimed, marked or finalized meanwhile) reads it again and retries: each such failure is another
# writer's success, so this many in a row means the store is unusable, not busy.
_OPEN_TRIES = 100

# `status` and `owner` are DynamoDB reserved words, so expressions name them through these.
_NAMES = {"#status": "status", "#owner": "owner"}


def create_state_table(client: Any, table_name: str) -> None:
    """Create the state table (on-demand billing) and wait until it is ACTIVE. For tests and
    local development; in AWS the stack creates it."""
    client.create_table(
        TableName=table_name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    client.get_waiter("table_exists").wait(TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    client.update_time_to_live(
        TableName=table_name, TimeToLiveSpecification={"Enabled": True, "AttributeName": EXPIRES_AT}
    )


# -- keys ------------------------------------------------------------------------------------
def route_pk(route: str) -> str:
    return f"ROUTE#{route}"


def uid_sk(key: UidKey) -> str:
    return f"UID#{key.uidvalidity}#{key.uid}"


def open_sk(uidvalidity: int) -> str:
    return f"OPEN#{uidvalidity}"


def fail_sk(key: UidKey) -> str:
    return f"FAIL#{key.uidvalidity}#{key.uid}"


def fp_sk(fingerprint: str) -> str:
    return f"FP#{fingerprint}"


def _item_key(pk: str, sk: str) -> dict[str, dict[str, str]]:
    return {"pk": {"S": pk}, "sk": {"S": sk}}


class _ConditionFailed(Exception):
    """A condition expression was false; `item` is the item as DynamoDB found it (ALL_OLD)."""

    def __init__(self, item: dict | None):
        self.item = item


class _TransactionCancelled(Exception):
    def __init__(self, reasons: list[dict], message: str):
        self.reasons = reasons
        self.message = message


class DynamoStateStore(StateStore):
    def __init__(self, table_name: str, *, client: Any, clock: Callable[[], float] = time.time):
        self._table = table_name
        self._client = client
        self._clock = clock

    def describe(self) -> str:
        return f"DynamoDB table {self._table}"

    # -- watermark -------------------------------------------------------------------------
    def read_watermark(self, route: str) -> Watermark | None:
        item = self._get(route_pk(route), WATERMARK_SK)
        if item is None:
            return None
        return Watermark(
            uidvalidity=_int(item, "uidvalidity"), last_uid=_int(item, "last_uid"), updated_at=_float(item, "updated_at")
        )

    def set_lookup_bound(self, route: str, uidvalidity: int, last_uid: int) -> None:
        self._put_lookup_bound(route, uidvalidity, last_uid, "attribute_not_exists(pk)")  # the first bound stays

    def widen_lookup_bound(self, route: str, uidvalidity: int, last_uid: int) -> None:
        # Unless it covers this UID already.
        self._put_lookup_bound(
            route, uidvalidity, last_uid, "attribute_not_exists(pk) OR uidvalidity <> :v OR last_uid < :u",
            {":v": _n(uidvalidity), ":u": _n(last_uid)},
        )

    def _put_lookup_bound(
        self, route: str, uidvalidity: int, last_uid: int, condition: str, values: dict | None = None
    ) -> None:
        try:
            self._call(
                "put_item",
                TableName=self._table,
                Item=_item_key(route_pk(route), LOOKUP_SK)
                | {"uidvalidity": _n(uidvalidity), "last_uid": _n(last_uid), "updated_at": _n(self._clock())},
                ConditionExpression=condition,
                **({"ExpressionAttributeValues": values} if values else {}),
            )
        except _ConditionFailed:
            pass

    def read_lookup_bound(self, route: str) -> Watermark | None:
        item = self._get(route_pk(route), LOOKUP_SK)
        if item is None:
            return None
        return Watermark(_int(item, "uidvalidity"), _int(item, "last_uid"), _float(item, "updated_at"))

    def advance_watermark(self, route: str, uidvalidity: int, last_uid: int) -> bool:
        # The rule of shared.state.rules.watermark_moves, as a condition.
        try:
            self._call(
                "put_item",
                TableName=self._table,
                Item=_item_key(route_pk(route), WATERMARK_SK)
                | {"uidvalidity": _n(uidvalidity), "last_uid": _n(last_uid), "updated_at": _n(self._clock())},
                ConditionExpression=(
                    "attribute_not_exists(pk) OR uidvalidity <> :uidvalidity OR last_uid < :last_uid"
                ),
                ExpressionAttributeValues={":uidvalidity": _n(uidvalidity), ":last_uid": _n(last_uid)},
            )
        except _ConditionFailed:
            return False
        return True

    # -- scans -----------------------------------------------------------------------------
    def record_scan(self, route: str, error: str | None) -> None:
        # One update, no read: if_not_exists keeps the first failure's time while failures go
        # on; a scan that worked removes the error and failing_since.
        values: dict[str, Any] = {":now": _n(self._clock())}
        if error is None:
            update = "SET #at = :now REMOVE #error, failing_since"
        else:
            update = "SET #at = :now, #error = :error, failing_since = if_not_exists(failing_since, :now)"
            values[":error"] = _s(cut_error_text(error))
        self._call(
            "update_item",
            TableName=self._table,
            Key=_item_key(route_pk(route), SCAN_SK),
            UpdateExpression=update,
            # `at` and `error` may be reserved words: named through placeholders.
            ExpressionAttributeNames={"#at": "at", "#error": "error"},
            ExpressionAttributeValues=values,
        )

    def read_scan(self, route: str) -> ScanRecord | None:
        item = self._get(route_pk(route), SCAN_SK)
        if item is None:
            return None
        return ScanRecord(
            at=_float(item, "at"),
            error=_optional_str(item, "error"),
            failing_since=_optional_float(item, "failing_since"),
        )

    def record_route_start(
        self, route: str, since: dt.date, older: int, fallback_days: int | None, *, replace: bool = False
    ) -> None:
        item = _item_key(route_pk(route), START_SK) | {
            "since": _s(since.isoformat()),
            "older": _n(older),
            "at": _n(self._clock()),
        }
        if fallback_days is not None:
            item["fallback_days"] = _n(fallback_days)
        # Put once (a route's first scans are few): the first start stays unless replaced.
        condition = {} if replace else {"ConditionExpression": "attribute_not_exists(pk)"}
        try:
            self._call("put_item", TableName=self._table, Item=item, **condition)
        except _ConditionFailed:
            pass

    def read_route_start(self, route: str) -> RouteStart | None:
        item = self._get(route_pk(route), START_SK)
        if item is None:
            return None
        return RouteStart(
            route, dt.date.fromisoformat(_str(item, "since")), _int(item, "older"),
            _optional_int(item, "fallback_days"), _float(item, "at"),
        )

    # -- claims ----------------------------------------------------------------------------
    # A claim lives in one of two places (README "State layout in DynamoDB"): while it is open
    # (in progress or appending, with an owner), as an entry of the route's OPEN#<uidvalidity>
    # item, which holds only the open claims and is changed by one conditional write on its
    # version; once released, failed or final other than as a plain copy, as its own UID# item,
    # for good. A copy made (DONE with a fingerprint) is recorded by its FP# item alone. Reads go
    # OPEN# first, then UID#, then FP#: an entry leaves OPEN# only after (or, in a transaction,
    # with) the record that answers for it, so a claim is never missed between two reads.
    def claim_uid(
        self,
        key: UidKey,
        owner: str,
        lease_until: float,
        holder_state: HolderProbe | None = None,
        *,
        fingerprint: str | None = None,
    ) -> ClaimResult:
        return self.claim_many([key], owner, lease_until, holder_state, fingerprints=[fingerprint])[0]

    def claim_many(
        self,
        keys: Sequence[UidKey],
        owner: str,
        lease_until: float,
        holder_state: HolderProbe | None = None,
        *,
        fingerprints: Sequence[str | None] | None = None,
    ) -> list[ClaimResult]:
        prints = list(fingerprints) if fingerprints is not None else [None] * len(keys)
        results: list[ClaimResult] = []
        for (route, uidvalidity), group in _by_open_item(list(zip(keys, prints, strict=True))):
            taken = self._claim_open(route, uidvalidity, group, owner, lease_until, holder_state)
            results += taken
            if taken and taken[-1].outcome is ClaimOutcome.HELD:
                break
        return results

    def _claim_open(
        self,
        route: str,
        uidvalidity: int,
        group: list[tuple[UidKey, str | None]],
        owner: str,
        lease_until: float,
        holder_state: HolderProbe | None,
    ) -> list[ClaimResult]:
        uids = [key.uid for key, _ in group]

        def attempt(opened: _Open) -> list[ClaimResult] | _Changed:
            now = self._clock()
            items = self._uid_items(route, uidvalidity, uids)
            copies = self._copies_of(route, group)
            failures: set[int] | None = None
            entries, flagged = dict(opened.entries), set(opened.flagged)
            results: list[ClaimResult] = []
            for key, _fingerprint in group:
                final = _final_of(items.get(key.uid), copies.get(key.uid))
                if final is not None:
                    result = ClaimResult(ClaimOutcome.FINAL, final)
                    left = entries.get(key.uid)
                    if left is not None and answer_without_taking(left, owner, now, holder_state) is None:
                        # Left by a finalize cut off after the copy's record (its holder gone or
                        # its lease out): nothing is open any more.
                        del entries[key.uid]
                elif key.uid in items:
                    result = self._claim_item(key, owner, lease_until, now, holder_state, items[key.uid])
                else:
                    found = entries.get(key.uid)
                    result = answer_without_taking(found, owner, now, holder_state)
                    if result is None:
                        entries[key.uid] = taken = _taken(key, found, owner, lease_until, now)
                        if failures is None:
                            failures = self._failure_uids(route, uidvalidity, uids)
                        if key.uid in failures:
                            flagged.add(key.uid)
                        result = ClaimResult(ClaimOutcome.CLAIMED, taken)
                results.append(result)
                if result.outcome is ClaimOutcome.HELD:
                    break
            return results if self._written(opened, entries, flagged) else _CHANGED

        return self._on_open(route, uidvalidity, attempt)

    def get_claim(self, key: UidKey, *, fingerprint: str | None = None) -> Claim | None:
        entry = self._read_open(key.route, key.uidvalidity).entries.get(key.uid)
        item = self._item_claim(key)
        if item is not None and item.status.is_final:
            return item
        copy = self._copies_of(key.route, [(key, fingerprint)]).get(key.uid)
        return copy or item or entry

    def extend_lease(self, key: UidKey, owner: str, lease_until: float) -> None:
        lost = self._extend_open(key.route, key.uidvalidity, [key], owner, lease_until)
        if lost:
            raise lost[0]

    def extend_leases(self, keys: Sequence[UidKey], owner: str, lease_until: float) -> None:
        for (route, uidvalidity), group in _by_open_item([(key, None) for key in keys]):
            self._extend_open(route, uidvalidity, [key for key, _ in group], owner, lease_until)

    def _extend_open(
        self, route: str, uidvalidity: int, keys: list[UidKey], owner: str, lease_until: float
    ) -> list[ClaimLost]:
        """The leases of `keys` that `owner` holds extended; the ClaimLost of each other."""

        def attempt(opened: _Open) -> list[ClaimLost] | _Changed:
            now = self._clock()
            entries = dict(opened.entries)
            lost: list[ClaimLost] = []
            for key in keys:
                found = entries.get(key.uid)
                if found is None:
                    try:
                        self._extend_item(key, owner, lease_until)
                    except ClaimLost as exc:
                        lost.append(exc)
                elif is_owned_by(found, owner):
                    entries[key.uid] = replace(found, lease_until=lease_until, updated_at=now)
                else:
                    lost.append(claim_lost(key, owner, found))
            return lost if self._written(opened, entries, opened.flagged) else _CHANGED

        return self._on_open(route, uidvalidity, attempt)

    def mark_appending(
        self, key: UidKey, owner: str, *, dest_uidvalidity: int | None = None, dest_uid_floor: int | None = None
    ) -> None:
        if not self.mark_appending_many([key], owner, dest_uidvalidity=dest_uidvalidity, dest_uid_floor=dest_uid_floor):
            raise claim_lost(key, owner, self.get_claim(key))

    def mark_appending_many(
        self,
        keys: Sequence[UidKey],
        owner: str,
        *,
        dest_uidvalidity: int | None = None,
        dest_uid_floor: int | None = None,
    ) -> int:
        marked = 0
        for (route, uidvalidity), group in _by_open_item([(key, None) for key in keys]):
            count = self._mark_open(route, uidvalidity, [key for key, _ in group], owner, dest_uidvalidity, dest_uid_floor)
            marked += count
            if count < len(group):
                break
        return marked

    def _mark_open(
        self,
        route: str,
        uidvalidity: int,
        keys: list[UidKey],
        owner: str,
        dest_uidvalidity: int | None,
        dest_uid_floor: int | None,
    ) -> int:
        """How many of `keys`, from the first, are marked APPENDING: up to the first not held."""

        def attempt(opened: _Open) -> int | _Changed:
            now = self._clock()
            entries = dict(opened.entries)
            marked = 0
            for key in keys:
                found = entries.get(key.uid)
                if found is None:
                    try:
                        self._mark_item(key, owner, dest_uidvalidity=dest_uidvalidity, dest_uid_floor=dest_uid_floor)
                    except ClaimLost:
                        break
                elif is_owned_by(found, owner):
                    entries[key.uid] = replace(
                        found,
                        status=ClaimStatus.APPENDING,
                        updated_at=now,
                        dest_uidvalidity=dest_uidvalidity,
                        dest_uid_floor=dest_uid_floor,
                    )
                else:
                    break
                marked += 1
            return marked if self._written(opened, entries, opened.flagged) else _CHANGED

        return self._on_open(route, uidvalidity, attempt)

    def finalize(
        self,
        key: UidKey,
        owner: str,
        status: ClaimStatus,
        *,
        dest_uid: int | None = None,
        fingerprint: str | None = None,
        reason: str | None = None,
        append_unresolved: bool = False,
    ) -> None:
        status = require_final(status)
        if status is ClaimStatus.DONE and fingerprint:
            (lost,) = self._finalize_copies([Copied(key, dest_uid, fingerprint)], owner, reason)
            if lost is not None:
                raise lost
            return
        self._finalize_one(key, owner, status, dest_uid, fingerprint, reason, append_unresolved)

    def finalize_many(self, copies: Sequence[Copied], owner: str) -> list[ClaimLost | None]:
        return self._finalize_copies(copies, owner, None)

    def _finalize_one(
        self,
        key: UidKey,
        owner: str,
        status: ClaimStatus,
        dest_uid: int | None,
        fingerprint: str | None,
        reason: str | None,
        append_unresolved: bool,
    ) -> None:
        """A claim made final as its own UID# item (skipped, or done without a copy record of its
        own): one transaction puts the item, takes the entry out of OPEN# and deletes the failure
        record (and puts an unresolved FP# record, see finalize)."""

        def attempt(opened: _Open) -> None | _Changed:
            now = self._clock()
            found = opened.entries.get(key.uid)
            if found is None:
                self._finalize_item(
                    key,
                    owner,
                    status,
                    dest_uid=dest_uid,
                    fingerprint=fingerprint,
                    reason=reason,
                    append_unresolved=append_unresolved,
                )
                return None
            if not is_owned_by(found, owner):
                raise claim_lost(key, owner, found)
            final = replace(
                found, status=status, lease_until=0.0, dest_uid=dest_uid, fingerprint=fingerprint, reason=reason, updated_at=now
            )
            actions = self._moved_out(opened, final)
            actions.append({"Delete": {"TableName": self._table, "Key": _item_key(route_pk(key.route), fail_sk(key))}})
            if status is ClaimStatus.SKIPPED and fingerprint and append_unresolved:
                unresolved = self._unresolved_item(key, fingerprint, now, found)
                if unresolved is not None:
                    actions.append({"Put": {"TableName": self._table, "Item": unresolved}})
            return None if self._transact_open(actions) else _CHANGED

        self._on_open(key.route, key.uidvalidity, attempt)

    def _finalize_copies(self, copies: Sequence[Copied], owner: str, reason: str | None) -> list[ClaimLost | None]:
        """Copies made DONE. For each whose claim is an OPEN# entry of `owner`: its FP# record is
        put first, then (for the batch) one conditional write takes the entries out of OPEN#. A
        crash between the two leaves entries whose FP# record says copied: read as done, never
        appended again. Claims with a UID# item are finalized there, one transaction each."""
        lost: list[ClaimLost | None] = [None] * len(copies)
        groups: dict[tuple[str, int], list[int]] = {}
        for index, copy in enumerate(copies):
            groups.setdefault((copy.key.route, copy.key.uidvalidity), []).append(index)
        for (route, uidvalidity), indexes in groups.items():
            opened = self._read_open(route, uidvalidity)
            recorded: list[int] = []
            for index in indexes:
                copy = copies[index]
                found = opened.entries.get(copy.key.uid)
                try:
                    if found is None:
                        self._finalize_item(
                            copy.key, owner, ClaimStatus.DONE, dest_uid=copy.dest_uid, fingerprint=copy.fingerprint, reason=reason
                        )
                    elif not is_owned_by(found, owner):
                        raise claim_lost(copy.key, owner, found)
                    elif copy.fingerprint and self._put_copy(copy, found, reason, copy.key.uid in opened.flagged):
                        recorded.append(index)
                    else:
                        # No fingerprint, or its FP# record is another message's (that one keeps it):
                        # the claim is its own record.
                        self._finalize_one(copy.key, owner, ClaimStatus.DONE, copy.dest_uid, copy.fingerprint, reason, False)
                        opened = self._read_open(route, uidvalidity)
                except ClaimLost as exc:
                    lost[index] = exc
            if recorded:
                self._take_out(opened, [copies[index].key for index in recorded], owner, lost, recorded)
        return lost

    def _put_copy(self, copy: Copied, claim: Claim, reason: str | None, failure_flagged: bool) -> bool:
        """The FP# record of a copy made, unless the fingerprint's record is another message's
        copy (then False, and nothing is written)."""
        assert copy.fingerprint
        item = _copied_item(copy.key, copy.fingerprint, copy.dest_uid, self._clock()) | {
            "owner": _s(claim.owner or ""),
            "attempts": _n(claim.attempts),
        }
        if reason is not None:
            item["reason"] = _s(reason)
        try:
            self._call(
                "put_item",
                TableName=self._table,
                Item=item,
                ConditionExpression="attribute_not_exists(pk) OR unresolved = :yes OR (uidvalidity = :uidvalidity AND #uid = :uid)",
                ExpressionAttributeNames={"#uid": "uid"},
                ExpressionAttributeValues={":yes": {"BOOL": True}, ":uidvalidity": _n(copy.key.uidvalidity), ":uid": _n(copy.key.uid)},
            )
        except _ConditionFailed:
            return False
        if failure_flagged:
            # A failure recorded while it was claimed: gone with the claim, as in one transaction.
            self._call("delete_item", TableName=self._table, Key=_item_key(route_pk(copy.key.route), fail_sk(copy.key)))
        return True

    def _take_out(
        self, opened: _Open, keys: list[UidKey], owner: str, lost: list[ClaimLost | None], indexes: list[int]
    ) -> None:
        """The entries of `keys` (recorded as copied) out of OPEN#, in one conditional write; a
        key whose entry `owner` no longer holds gets its ClaimLost in `lost`."""

        def attempt(opened: _Open) -> None | _Changed:
            entries, flagged = dict(opened.entries), set(opened.flagged)
            for key, index in zip(keys, indexes, strict=True):
                found = entries.get(key.uid)
                if found is not None and is_owned_by(found, owner):
                    del entries[key.uid]
                    flagged.discard(key.uid)
                    lost[index] = None
                else:
                    lost[index] = claim_lost(key, owner, found)
            return None if self._written(opened, entries, flagged) else _CHANGED

        self._on_open(opened.route, opened.uidvalidity, attempt, first=opened)

    def release(self, key: UidKey, owner: str, *, append_outcome_unknown: bool = False) -> None:
        def attempt(opened: _Open) -> None | _Changed:
            found = opened.entries.get(key.uid)
            if found is None:
                self._release_item(key, owner, append_outcome_unknown=append_outcome_unknown)
                return None
            if not is_owned_by(found, owner):
                raise claim_lost(key, owner, found)
            released = replace(
                found,
                status=status_after_release(found.status, append_outcome_unknown),
                owner=None,
                lease_until=0.0,
                updated_at=self._clock(),
            )
            return None if self._transact_open(self._moved_out(opened, released)) else _CHANGED

        self._on_open(key.route, key.uidvalidity, attempt)

    def _flag_failure(self, key: UidKey) -> None:
        """A failure recorded for a claim open in OPEN#: flagged there first, so that the claim's
        finalize deletes the record (a flag with no record deletes nothing)."""

        def attempt(opened: _Open) -> None | _Changed:
            if key.uid not in opened.entries or key.uid in opened.flagged:
                return None
            return None if self._write_open(opened, opened.entries, opened.flagged | {key.uid}) else _CHANGED

        self._on_open(key.route, key.uidvalidity, attempt)

    # -- the OPEN# item ----------------------------------------------------------------------
    def _on_open(
        self, route: str, uidvalidity: int, attempt: Callable[[_Open], T | _Changed], *, first: _Open | None = None
    ) -> T:
        """`attempt` on the route's OPEN# item as read (`first`, else read now); read again and
        retried while it answers _CHANGED, its conditional write having found the item changed
        since (another writer's success: optimistic concurrency on the version)."""
        opened = first
        for _ in range(_OPEN_TRIES):
            outcome = attempt(opened if opened is not None else self._read_open(route, uidvalidity))
            if not isinstance(outcome, _Changed):
                return outcome
            opened = None
            _back_off()
        raise self._too_busy(route)

    def _written(self, opened: _Open, entries: dict[int, Claim], flagged: frozenset[int] | set[int]) -> bool:
        """OPEN# with `entries` and `flagged` in place: nothing to write when they are as read, else
        the conditional write (False when the item changed since `opened` was read)."""
        return entries == opened.entries or self._write_open(opened, entries, flagged)

    def _read_open(self, route: str, uidvalidity: int) -> _Open:
        return _open_from_item(route, uidvalidity, self._get(route_pk(route), open_sk(uidvalidity)))

    def _open_put(self, opened: _Open, entries: dict[int, Claim], flagged: frozenset[int] | set[int]) -> dict:
        """The conditional Put of OPEN# with `entries`: only over the version `opened` read."""
        put: dict[str, Any] = {
            "TableName": self._table,
            "Item": _open_item(opened, entries, flagged),
        }
        if opened.version is None:
            put["ConditionExpression"] = "attribute_not_exists(pk)"
        else:
            put["ConditionExpression"] = "v = :seen"
            put["ExpressionAttributeValues"] = {":seen": _n(opened.version)}
        return put

    def _write_open(self, opened: _Open, entries: dict[int, Claim], flagged: frozenset[int] | set[int]) -> bool:
        """False when OPEN# changed since `opened` was read (nothing is written then)."""
        try:
            self._call("put_item", **self._open_put(opened, entries, flagged))
        except _ConditionFailed:
            return False
        return True

    def _moved_out(self, opened: _Open, claim: Claim) -> list[dict]:
        """The transaction that makes `claim` a UID# item and takes its entry out of OPEN#."""
        entries = {uid: entry for uid, entry in opened.entries.items() if uid != claim.key.uid}
        return [
            {"Put": self._open_put(opened, entries, opened.flagged - {claim.key.uid})},
            {
                "Put": {
                    "TableName": self._table,
                    "Item": _uid_item_of(claim),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
        ]

    def _transact_open(self, actions: list[dict]) -> bool:
        """Run a transaction whose first action is a conditional Put of OPEN#: False when OPEN#
        changed since it was read."""
        try:
            self._call("transact_write_items", TransactItems=actions)
        except _TransactionCancelled as cancelled:
            codes = [reason.get("Code") or "None" for reason in cancelled.reasons]
            # OPEN# changed, or another transaction was on it: read again and retry. A refused
            # condition on another item (a UID# item where an OPEN# entry was) is a fault.
            if "ConditionalCheckFailed" not in codes[1:] and (
                codes[:1] == ["ConditionalCheckFailed"] or "TransactionConflict" in codes
            ):
                return False
            raise self._unavailable("TransactionCanceledException", f"{cancelled.message} ({', '.join(codes)})") from None
        return True

    def _uid_items(self, route: str, uidvalidity: int, uids: Sequence[int]) -> dict[int, Claim]:
        """The UID# items of `uids`, by UID: one query per run of UIDs of one length (sort keys
        are text), which reads nothing when there are none."""
        found: dict[int, Claim] = {}
        wanted = set(uids)
        for item in self._sk_ranges(route, "UID", uidvalidity, wanted):
            uid = int(_str(item, "sk").rsplit("#", 1)[1])
            if uid in wanted:
                found[uid] = _claim_from_item(UidKey(route, uidvalidity, uid), item)
        return found

    def _failure_uids(self, route: str, uidvalidity: int, uids: Sequence[int]) -> set[int]:
        wanted = set(uids)
        return {
            uid
            for item in self._sk_ranges(route, "FAIL", uidvalidity, wanted)
            if (uid := int(_str(item, "sk").rsplit("#", 1)[1])) in wanted
        }

    def _sk_ranges(self, route: str, kind: str, uidvalidity: int, uids: set[int]) -> Iterator[dict]:
        by_length: dict[int, list[int]] = {}
        for uid in uids:
            by_length.setdefault(len(str(uid)), []).append(uid)
        for same_length in by_length.values():
            params: dict[str, Any] = {
                "TableName": self._table,
                "KeyConditionExpression": "pk = :pk AND sk BETWEEN :low AND :high",
                "ExpressionAttributeValues": {
                    ":pk": _s(route_pk(route)),
                    ":low": _s(f"{kind}#{uidvalidity}#{min(same_length)}"),
                    ":high": _s(f"{kind}#{uidvalidity}#{max(same_length)}"),
                },
                "ConsistentRead": True,
            }
            while True:
                page = self._call("query", **params)
                yield from page.get("Items", [])
                if "LastEvaluatedKey" not in page:
                    break
                params["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _copies_of(self, route: str, group: Sequence[tuple[UidKey, str | None]]) -> dict[int, Claim]:
        """The copies made of the keys, as done claims, by UID: found by fingerprint (one read
        each), or for a key queued without one by a search of the route's FP# records."""
        found: dict[int, Claim] = {}
        by_print: dict[str, list[UidKey]] = {}
        for key, fingerprint in group:
            if fingerprint:
                by_print.setdefault(fingerprint, []).append(key)
            else:
                item = self._copy_by_uid(key)
                if item is not None:
                    found[key.uid] = _done_from_copy(key, item)
        for item in self._batch_get(route_pk(route), [fp_sk(fingerprint) for fingerprint in by_print]):
            for key in by_print[_str(item, "sk")[len("FP#") :]]:
                if _copies(item, key):
                    found[key.uid] = _done_from_copy(key, item)
        return found

    def _copy_by_uid(self, key: UidKey) -> dict | None:
        params: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "FilterExpression": "uidvalidity = :uidvalidity AND #uid = :uid",
            "ExpressionAttributeNames": {"#uid": "uid"},
            "ExpressionAttributeValues": {
                ":pk": _s(route_pk(key.route)),
                ":prefix": _s("FP#"),
                ":uidvalidity": _n(key.uidvalidity),
                ":uid": _n(key.uid),
            },
            "ConsistentRead": True,
        }
        while True:
            page = self._call("query", **params)
            for item in page.get("Items", []):
                if _copies(item, key):
                    return item
            if "LastEvaluatedKey" not in page:
                return None
            params["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _batch_get(self, pk: str, sks: Sequence[str]) -> list[dict]:
        """Strongly consistent reads of the items (pk, sk) that exist, 100 keys a request."""
        items: list[dict] = []
        for start in range(0, len(sks), 100):
            request = {self._table: {"Keys": [_item_key(pk, sk) for sk in sks[start : start + 100]], "ConsistentRead": True}}
            while request:
                response = self._call("batch_get_item", RequestItems=request)
                items += response.get("Responses", {}).get(self._table, [])
                request = response.get("UnprocessedKeys") or {}
                if request:
                    _back_off()
        return items

    def _too_busy(self, route: str) -> StateStoreUnavailable:
        return self._unavailable(
            "ConditionalCheckFailed", f"the open claims of route {route} changed under {_OPEN_TRIES} writes in a row"
        )

    def _claim_item(
        self, key: UidKey, owner: str, lease_until: float, now: float, holder_state: HolderProbe | None, found: Claim
    ) -> ClaimResult:
        """claim_uid on a claim that has a `UID#` item (`found`, as read): one conditional write."""
        answer = answer_without_taking(found, owner, now, holder_state)
        if answer is not None:
            return answer
        for _ in range(_CLAIM_TRIES):
            try:
                claim = self._take_claim(key, owner, lease_until, now, found)
                return ClaimResult(ClaimOutcome.CLAIMED, claim)
            except _ConditionFailed as failed:
                found = _claim_or_none(key, failed.item)
            answer = answer_without_taking(found, owner, now, holder_state)
            if answer is not None:
                return answer
            # Claimable as found (the rules, in Python, decided): take it if it is still so.
        return ClaimResult(ClaimOutcome.HELD, found)

    def _take_claim(self, key: UidKey, owner: str, lease_until: float, now: float, found: Claim | None) -> Claim:
        """One conditional write taking the claim: a new one when `found` is None, else the
        claim exactly as found (unchanged since it was read: the same updated_at), which the
        rules found claimable. Its status ends as status_after_taking(found)."""
        status = status_after_taking(found)
        update = (
            "SET #owner = :owner, lease_until = :lease_until, updated_at = :now,"
            " attempts = if_not_exists(attempts, :zero) + :one"
        )
        values = {
            ":owner": _s(owner),
            ":lease_until": _n(lease_until),
            ":now": _n(now),
            ":zero": _n(0),
            ":one": _n(1),
        }
        if found is None:
            condition = "attribute_not_exists(pk)"
        else:
            # Whether it may be taken was decided on the claim as read (its holder may have been
            # asked after: shared.claim_owners); any write since changes updated_at.
            condition = "updated_at = :seen AND #status = :seen_status"
            values |= {":seen": _n(found.updated_at), ":seen_status": _s(found.status)}
        if status is not ClaimStatus.APPENDING:
            # A fresh claim has no APPEND behind it: an old one's floor goes (as in SQLite).
            update += ", #status = :in_progress REMOVE dest_uidvalidity, dest_uid_floor"
            values[":in_progress"] = _s(ClaimStatus.IN_PROGRESS)
        response = self._call(
            "update_item",
            TableName=self._table,
            Key=_item_key(route_pk(key.route), uid_sk(key)),
            UpdateExpression=update,
            ConditionExpression=condition,
            ExpressionAttributeNames=_NAMES,
            ExpressionAttributeValues=values,
            ReturnValues="ALL_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
        return _claim_from_item(key, response["Attributes"])

    def _item_claim(self, key: UidKey) -> Claim | None:
        return _claim_or_none(key, self._get(route_pk(key.route), uid_sk(key)))

    def _extend_item(self, key: UidKey, owner: str, lease_until: float) -> None:
        self._update_owned(
            key,
            owner,
            "SET lease_until = :lease_until, updated_at = :now",
            {":lease_until": _n(lease_until), ":now": _n(self._clock())},
        )

    def _mark_item(
        self, key: UidKey, owner: str, *, dest_uidvalidity: int | None = None, dest_uid_floor: int | None = None
    ) -> None:
        update = "SET #status = :appending, updated_at = :now"
        values = {":appending": _s(ClaimStatus.APPENDING), ":now": _n(self._clock())}
        floor = {"dest_uidvalidity": dest_uidvalidity, "dest_uid_floor": dest_uid_floor}
        for name, value in floor.items():
            if value is not None:
                update += f", {name} = :{name}"
                values[f":{name}"] = _n(value)
        # A floor not known now must not leave an earlier APPEND's behind.
        removed = [name for name, value in floor.items() if value is None]
        if removed:
            update += " REMOVE " + ", ".join(removed)
        self._update_owned(key, owner, update, values)

    def _finalize_item(
        self,
        key: UidKey,
        owner: str,
        status: ClaimStatus,
        *,
        dest_uid: int | None = None,
        fingerprint: str | None = None,
        reason: str | None = None,
        append_unresolved: bool = False,
    ) -> None:
        """finalize on a claim that has a `UID#` item: one transaction."""
        now = self._clock()
        actions = [
            {"Update": self._finalize_claim(key, owner, status, now, dest_uid, fingerprint, reason)},
            {"Delete": {"TableName": self._table, "Key": _item_key(route_pk(key.route), fail_sk(key))}},
        ]
        if status is ClaimStatus.DONE and fingerprint:
            copied = _copied_item(key, fingerprint, dest_uid, now)
            actions.append({"Put": {"TableName": self._table, "Item": copied}})
        elif status is ClaimStatus.SKIPPED and fingerprint and append_unresolved:
            unresolved = self._unresolved_item(key, fingerprint, now, self._item_claim(key))
            if unresolved is not None:
                actions.append({"Put": {"TableName": self._table, "Item": unresolved}})
        try:
            self._call("transact_write_items", TransactItems=actions)
        except _TransactionCancelled as cancelled:
            first = cancelled.reasons[0] if cancelled.reasons else {}
            if first.get("Code") == "ConditionalCheckFailed":
                found = _claim_or_none(key, first.get("Item"))
                if found is None:
                    found = self.get_claim(key, fingerprint=fingerprint)
                raise claim_lost(key, owner, found) from None
            codes = ", ".join(reason.get("Code", "?") for reason in cancelled.reasons)
            raise self._unavailable("TransactionCanceledException", f"{cancelled.message} ({codes})") from None

    def _unresolved_item(self, key: UidKey, fingerprint: str, now: float, claim: Claim | None) -> dict | None:
        """The unresolved FP# item, with the floor the claim recorded; None when a copy of the
        fingerprint is recorded already (that record answers for the message). The claim is read
        before: only its owner changes its floor, and the finalize's condition checks the owner."""
        found = self._get(route_pk(key.route), fp_sk(fingerprint))
        if found is not None and not _bool(found, "unresolved"):
            return None
        item = _copied_item(key, fingerprint, None, now) | {"unresolved": {"BOOL": True}}
        for name in ("dest_uidvalidity", "dest_uid_floor"):
            value = getattr(claim, name) if claim is not None else None
            if value is not None:
                item[name] = _n(value)
        return item

    def _finalize_claim(
        self,
        key: UidKey,
        owner: str,
        status: ClaimStatus,
        now: float,
        dest_uid: int | None,
        fingerprint: str | None,
        reason: str | None,
    ) -> dict:
        update = "SET #status = :status, lease_until = :zero, updated_at = :now"
        condition, values = _owned_by(owner)
        values |= {":status": _s(status), ":zero": _n(0), ":now": _n(now)}
        # Only the values given: a claim has none of these before it is final.
        for name, value in (("dest_uid", dest_uid), ("fingerprint", fingerprint), ("reason", reason)):
            if value is not None:
                update += f", {name} = :{name}"
                values[f":{name}"] = _n(value) if isinstance(value, int) else _s(value)
        return {
            "TableName": self._table,
            "Key": _item_key(route_pk(key.route), uid_sk(key)),
            "UpdateExpression": update,
            "ConditionExpression": condition,
            "ExpressionAttributeNames": _NAMES,
            "ExpressionAttributeValues": values,
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }

    def _release_item(self, key: UidKey, owner: str, *, append_outcome_unknown: bool = False) -> None:
        # The rule of shared.state.rules.status_after_release, in two conditional writes: an
        # update cannot pick the new status from the old one.
        released = {":zero": _n(0), ":now": _n(self._clock())}
        if append_outcome_unknown:
            try:
                self._update_owned(
                    key,
                    owner,
                    "SET lease_until = :zero, updated_at = :now REMOVE #owner",
                    released,
                    statuses=(ClaimStatus.APPENDING,),
                )
                return
            except ClaimLost:
                pass  # not APPENDING, or not ours: the plain release below tells which
        self._update_owned(
            key,
            owner,
            "SET #status = :failed, lease_until = :zero, updated_at = :now REMOVE #owner",
            released | {":failed": _s(ClaimStatus.FAILED)},
        )

    def _update_owned(
        self,
        key: UidKey,
        owner: str,
        update: str,
        values: dict,
        *,
        statuses: Sequence[ClaimStatus] = OWNED_STATUSES,
    ) -> None:
        """One update that passes only while `owner` holds the claim (in one of `statuses`);
        else ClaimLost."""
        condition, owned_values = _owned_by(owner, statuses)
        try:
            self._call(
                "update_item",
                TableName=self._table,
                Key=_item_key(route_pk(key.route), uid_sk(key)),
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=_NAMES,
                ExpressionAttributeValues=values | owned_values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except _ConditionFailed as failed:
            raise claim_lost(key, owner, _claim_or_none(key, failed.item)) from None

    # -- failures --------------------------------------------------------------------------
    def record_failure(self, key: UidKey, error_class: str, error_text: str) -> int:
        self._flag_failure(key)
        now = _n(self._clock())
        response = self._call(
            "update_item",
            TableName=self._table,
            Key=_item_key(route_pk(key.route), fail_sk(key)),
            UpdateExpression=(
                "SET attempts = if_not_exists(attempts, :zero) + :one, error_class = :class,"
                " error_text = :text, first_failure_at = if_not_exists(first_failure_at, :now),"
                " last_failure_at = :now"
            ),
            ExpressionAttributeValues={
                ":zero": _n(0),
                ":one": _n(1),
                ":class": _s(error_class),
                ":text": _s(cut_error_text(error_text)),
                ":now": now,
            },
            ReturnValues="UPDATED_NEW",
        )
        return _int(response["Attributes"], "attempts")

    def get_failure(self, key: UidKey) -> FailureRecord | None:
        item = self._get(route_pk(key.route), fail_sk(key))
        if item is None:
            return None
        return FailureRecord(
            key=key,
            attempts=_int(item, "attempts"),
            error_class=_str(item, "error_class"),
            error_text=_str(item, "error_text"),
            first_failure_at=_float(item, "first_failure_at"),
            last_failure_at=_float(item, "last_failure_at"),
        )

    # -- fingerprints ----------------------------------------------------------------------
    def find_copied(self, fingerprint: str, routes: Sequence[str]) -> CopiedMessage | None:
        # One strongly consistent read per route: the routes sharing a folder are few.
        for route in dict.fromkeys(routes):
            item = self._get(route_pk(route), fp_sk(fingerprint))
            if item is not None:
                return CopiedMessage(
                    route=route,
                    fingerprint=fingerprint,
                    uidvalidity=_int(item, "uidvalidity"),
                    uid=_int(item, "uid"),
                    dest_uid=_optional_int(item, "dest_uid"),
                    copied_at=_float(item, "copied_at"),
                    unresolved=_bool(item, "unresolved"),
                    dest_uidvalidity=_optional_int(item, "dest_uidvalidity"),
                    dest_uid_floor=_optional_int(item, "dest_uid_floor"),
                )
        return None

    # -- reporting and the gate ------------------------------------------------------------
    def route_counts(self, route: str) -> RouteCounts:
        # By sort-key prefix: the WATERMARK and SCAN items of the partition are not counted. A
        # claim is counted once, as get_claim reads it: a final UID# item, else a copy's FP#
        # record, else a UID# item, else an OPEN# entry.
        by_status: Counter[str] = Counter()
        skipped_reasons: Counter[str] = Counter()
        copied = {
            (_int(item, "uidvalidity"), _int(item, "uid"))
            for item in self._query_prefix(route, "FP#", "uidvalidity, #uid, unresolved", {"#uid": "uid"})
            if not _bool(item, "unresolved")
        }
        recorded: set[tuple[int, int]] = set()
        for item in self._query_prefix(route, "UID#", "sk, #status, reason", {"#status": "status"}):
            _, uidvalidity, uid = _str(item, "sk").split("#")
            recorded.add((int(uidvalidity), int(uid)))
            status = ClaimStatus(_str(item, "status"))
            if not status.is_final and (int(uidvalidity), int(uid)) in copied:
                status = ClaimStatus.DONE
            by_status[status] += 1
            if status == ClaimStatus.SKIPPED:
                skipped_reasons[_optional_str(item, "reason") or NO_REASON] += 1
        by_status[ClaimStatus.DONE] += len(copied - recorded)
        for item in self._query_prefix(route, "OPEN#", "sk, e, w"):
            opened = _open_from_item(route, int(_str(item, "sk").split("#")[1]), item)
            for uid, entry in opened.entries.items():
                if (opened.uidvalidity, uid) not in copied | recorded:
                    by_status[entry.status] += 1
        failures = Counter(_str(item, "error_class") for item in self._query_prefix(route, "FAIL#", "error_class"))
        return RouteCounts({str(k): v for k, v in by_status.items() if v}, dict(skipped_reasons), dict(failures))

    def check_health(self) -> None:
        now = self._clock()
        self._call(
            "put_item",
            TableName=self._table,
            Item=_HEALTH_KEY | {"checked_at": _n(now), EXPIRES_AT: _n(int(now) + HEALTH_TTL_SECONDS)},
        )
        if self._call("get_item", TableName=self._table, Key=_HEALTH_KEY, ConsistentRead=True).get("Item") is None:
            raise self._unavailable("HealthCheck", "the health item written was not read back")

    # -- requests --------------------------------------------------------------------------
    def _get(self, pk: str, sk: str, *, consistent: bool = True) -> dict | None:
        response = self._call("get_item", TableName=self._table, Key=_item_key(pk, sk), ConsistentRead=consistent)
        return response.get("Item")

    def _query_prefix(
        self, route: str, sk_prefix: str, projection: str, names: dict[str, str] | None = None
    ) -> Iterator[dict]:
        """Every item of the route's partition whose sort key starts with `sk_prefix`."""
        params: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": {":pk": _s(route_pk(route)), ":prefix": _s(sk_prefix)},
            "ProjectionExpression": projection,
            "ConsistentRead": True,
        }
        if names:
            params["ExpressionAttributeNames"] = names
        while True:
            page = self._call("query", **params)
            yield from page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return
            params["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _call(self, operation: str, **params: Any) -> dict:
        """One DynamoDB request. A false condition raises _ConditionFailed (a cancelled
        transaction _TransactionCancelled) for the caller to judge; every other failure means
        the store cannot be used: StateStoreUnavailable."""
        try:
            return getattr(self._client, operation)(**params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code") or type(exc).__name__
            message = error.get("Message") or str(exc)
            if code == "ConditionalCheckFailedException":
                raise _ConditionFailed(exc.response.get("Item")) from None
            if code == "TransactionCanceledException":
                raise _TransactionCancelled(exc.response.get("CancellationReasons", []), message) from None
            raise self._unavailable(code, message) from exc
        except BotoCoreError as exc:
            raise self._unavailable(type(exc).__name__, str(exc)) from exc

    def _unavailable(self, code: str, message: str) -> StateStoreUnavailable:
        return StateStoreUnavailable(f"DynamoDB table {self._table}: {code}: {message}")

    # -- token problems (pk TOKENS) ------------------------------------------------------
    def record_token_problem(self, name: str, error: str | None) -> None:
        key = _item_key(TOKENS_PK, token_problem_sk(name))
        if error is None:
            self._call("delete_item", TableName=self._table, Key=key)
            return
        self._call(
            "update_item",
            TableName=self._table,
            Key=key,
            UpdateExpression="SET #error = :error, last_at = :now, first_at = if_not_exists(first_at, :now)",
            ExpressionAttributeNames={"#error": "error"},
            ExpressionAttributeValues={":error": _s(cut_error_text(error)), ":now": _n(self._clock())},
        )

    def read_token_problem(self, name: str) -> TokenProblem | None:
        item = self._get(TOKENS_PK, token_problem_sk(name))
        if item is None:
            return None
        return TokenProblem(name, _str(item, "error"), _float(item, "first_at"), _float(item, "last_at"))

    # -- token health (pk TOKENS) ------------------------------------------------------------
    def record_token_worked(
        self, provider: str, account: str, tag: str, *, fresh_for: float = TOKEN_WORKED_FRESH_SECONDS
    ) -> bool:
        # Read first, eventually consistent (a tenth of a write's price), since most refreshes
        # find the record fresh; one a moment stale only writes again. Two processes writing at
        # once both write about now: no condition is needed.
        now = self._clock()
        item = self._get(TOKENS_PK, token_health_sk(provider, account), consistent=False)
        found = None if item is None else _token_health_from_item(provider, account, item)
        same_token = found is not None and found.tag == tag
        if same_token and now - found.last_worked_at < fresh_for:
            return False
        self._call(
            "put_item",
            TableName=self._table,
            Item=_item_key(TOKENS_PK, token_health_sk(provider, account))
            | {
                "provider": _s(provider),
                "account": _s(account),
                "tag": _s(tag),
                "first_worked_at": _n(found.first_worked_at if same_token else now),
                "last_worked_at": _n(now),
            },
        )
        return True

    def read_token_health(self, provider: str, account: str) -> TokenHealth | None:
        item = self._get(TOKENS_PK, token_health_sk(provider, account))
        return None if item is None else _token_health_from_item(provider, account, item)

    # -- pauses ----------------------------------------------------------------------------
    def pause(self, name: str, until: float, reason: str) -> Pause:
        try:
            self._call(
                "update_item",
                TableName=self._table,
                Key=_item_key(PAUSES_PK, pause_sk(name)),
                UpdateExpression="SET #until = :until, reason = :reason, #name = :name",
                # Only ever lengthened: a shorter pause leaves the longer in force.
                ConditionExpression="attribute_not_exists(#until) OR #until < :until",
                ExpressionAttributeNames={"#until": "until", "#name": "name"},
                ExpressionAttributeValues={":until": _n(until), ":reason": _s(cut_error_text(reason)), ":name": _s(name)},
            )
        except _ConditionFailed:
            pass
        found = self.read_pause(name)
        assert found is not None
        return found

    def read_pause(self, name: str) -> Pause | None:
        item = self._get(PAUSES_PK, pause_sk(name))
        return None if item is None else _pause_from_item(item)

    def pauses(self) -> list[Pause]:
        response = self._call(
            "query",
            TableName=self._table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": _s(PAUSES_PK)},
            ConsistentRead=True,
        )
        return sorted((_pause_from_item(item) for item in response.get("Items", [])), key=lambda pause: pause.name)


    # -- downloads -------------------------------------------------------------------------
    def count_download(self, account: str, hour: int, size: int) -> None:
        self._call(
            "update_item",
            TableName=self._table,
            Key=_item_key(downloads_pk(account), download_sk(hour)),
            # ADD is atomic: two consumers counting at once both count.
            UpdateExpression="ADD #bytes :size SET #hour = :hour, #expires = :expires",
            ExpressionAttributeNames={"#bytes": "bytes", "#hour": "hour", "#expires": EXPIRES_AT},
            ExpressionAttributeValues={
                ":size": _n(size),
                ":hour": _n(hour),
                ":expires": _n((hour + DOWNLOADS_KEPT_HOURS) * 3600),
            },
        )

    def downloads(self, account: str, since_hour: int) -> dict[int, int]:
        response = self._call(
            "query",
            TableName=self._table,
            KeyConditionExpression="pk = :pk AND sk >= :since",
            ExpressionAttributeValues={":pk": _s(downloads_pk(account)), ":since": _s(download_sk(since_hour))},
            ConsistentRead=True,
        )
        # TTL deletes late (up to days): an hour past the window is read, and left out here.
        counts = {_int(item, "hour"): _int(item, "bytes") for item in response.get("Items", [])}
        return {hour: size for hour, size in sorted(counts.items()) if hour >= since_hour and size != 0}


TOKENS_PK = "TOKENS"
PAUSES_PK = "PAUSES"


def token_problem_sk(name: str) -> str:
    return f"TOKEN_PROBLEM#{name}"


def token_health_sk(provider: str, account: str) -> str:
    return f"TOKEN_HEALTH#{provider}#{account}"


def _token_health_from_item(provider: str, account: str, item: dict) -> TokenHealth:
    return TokenHealth(provider, account, _str(item, "tag"), _float(item, "first_worked_at"), _float(item, "last_worked_at"))


def downloads_pk(account: str) -> str:
    return f"DOWNLOADS#{account}"


def download_sk(hour: int) -> str:
    return f"HOUR#{hour:012d}"  # zero-padded: sorted as text, as sk is, is sorted by hour


def pause_sk(name: str) -> str:
    return f"PAUSE#{name}"


def _pause_from_item(item: dict) -> Pause:
    return Pause(_str(item, "name"), _float(item, "until"), _str(item, "reason"))


# -- the OPEN# item: a route's open claims under one UIDVALIDITY ------------------------------
# Attributes: `v` (version, +1 a write), `w` (the owners named, a list), `e` (uid -> the entry as
# text: status letter | owner index | lease_until | attempts | updated_at | dest_uidvalidity |
# dest_uid_floor | failure flag), kept short so that a batch's entries stay under 1 KB.
_STATUS_LETTERS = {ClaimStatus.IN_PROGRESS: "p", ClaimStatus.APPENDING: "a"}
_LETTER_STATUSES = {letter: status for status, letter in _STATUS_LETTERS.items()}


@dataclass(frozen=True)
class _Open:
    route: str
    uidvalidity: int
    version: int | None  # None: no OPEN# item yet
    entries: dict[int, Claim]
    flagged: frozenset[int]  # UIDs with a failure record to delete when finalized


def _open_from_item(route: str, uidvalidity: int, item: dict | None) -> _Open:
    if item is None:
        return _Open(route, uidvalidity, None, {}, frozenset())
    owners = [value["S"] for value in item.get("w", {}).get("L", [])]
    entries: dict[int, Claim] = {}
    flagged = set()
    for uid_text, value in item.get("e", {}).get("M", {}).items():
        status, owner, lease, attempts, updated, dest_uidvalidity, dest_uid_floor, flag = value["S"].split("|")
        uid = int(uid_text)
        entries[uid] = Claim(
            key=UidKey(route, uidvalidity, uid),
            status=_LETTER_STATUSES[status],
            owner=owners[int(owner)],
            lease_until=float(lease),
            attempts=int(attempts),
            updated_at=float(updated),
            dest_uidvalidity=int(dest_uidvalidity) if dest_uidvalidity else None,
            dest_uid_floor=int(dest_uid_floor) if dest_uid_floor else None,
        )
        if flag:
            flagged.add(uid)
    version = _int(item, "v") if "v" in item else None
    return _Open(route, uidvalidity, version, entries, frozenset(flagged))


def _open_item(opened: _Open, entries: dict[int, Claim], flagged: frozenset[int] | set[int]) -> dict:
    owners: list[str] = []
    encoded: dict[str, dict] = {}
    for uid, claim in sorted(entries.items()):
        assert claim.owner is not None and claim.status in _STATUS_LETTERS
        if claim.owner not in owners:
            owners.append(claim.owner)
        fields = (
            _STATUS_LETTERS[claim.status],
            str(owners.index(claim.owner)),
            repr(claim.lease_until),
            str(claim.attempts),
            repr(claim.updated_at),
            "" if claim.dest_uidvalidity is None else str(claim.dest_uidvalidity),
            "" if claim.dest_uid_floor is None else str(claim.dest_uid_floor),
            "f" if uid in flagged else "",
        )
        encoded[str(uid)] = {"S": "|".join(fields)}
    return _item_key(route_pk(opened.route), open_sk(opened.uidvalidity)) | {
        "v": _n((opened.version or 0) + 1),
        "w": {"L": [_s(owner) for owner in owners]},
        "e": {"M": encoded},
    }


def _by_open_item(keyed: list[tuple[UidKey, str | None]]) -> Iterator[tuple[tuple[str, int], list[tuple[UidKey, str | None]]]]:
    """Runs of consecutive keys of one route and UIDVALIDITY (one OPEN# item), in order."""
    run: list[tuple[UidKey, str | None]] = []
    for entry in keyed:
        if run and (run[0][0].route, run[0][0].uidvalidity) != (entry[0].route, entry[0].uidvalidity):
            yield (run[0][0].route, run[0][0].uidvalidity), run
            run = []
        run.append(entry)
    if run:
        yield (run[0][0].route, run[0][0].uidvalidity), run


def _taken(key: UidKey, found: Claim | None, owner: str, lease_until: float, now: float) -> Claim:
    """The claim as `owner` takes it (the rules of SqliteStateStore.claim_uid)."""
    status = status_after_taking(found)
    keeps_floor = found is not None and status is ClaimStatus.APPENDING
    return Claim(
        key=key,
        status=status,
        owner=owner,
        lease_until=lease_until,
        attempts=(found.attempts if found else 0) + 1,
        updated_at=now,
        dest_uidvalidity=found.dest_uidvalidity if keeps_floor and found else None,
        dest_uid_floor=found.dest_uid_floor if keeps_floor and found else None,
    )


def _final_of(item: Claim | None, copy: Claim | None) -> Claim | None:
    """What makes a claim final: its UID# item when that is final, else a copy's FP# record."""
    if item is not None and item.status.is_final:
        return item
    return copy


def _copies(item: dict, key: UidKey) -> bool:
    """Whether an FP# item records a copy made of `key`."""
    return not _bool(item, "unresolved") and _int(item, "uidvalidity") == key.uidvalidity and _int(item, "uid") == key.uid


def _done_from_copy(key: UidKey, item: dict) -> Claim:
    return Claim(
        key=key,
        status=ClaimStatus.DONE,
        owner=_optional_str(item, "owner") or None,
        lease_until=0.0,
        attempts=_optional_int(item, "attempts") or 1,
        dest_uid=_optional_int(item, "dest_uid"),
        fingerprint=_str(item, "sk")[len("FP#") :],
        reason=_optional_str(item, "reason"),
        updated_at=_float(item, "copied_at"),
    )


def _uid_item_of(claim: Claim) -> dict:
    """A claim as its own UID# item (an OPEN# entry released or made final)."""
    item = _item_key(route_pk(claim.key.route), uid_sk(claim.key)) | {
        "status": _s(claim.status),
        "lease_until": _n(claim.lease_until),
        "updated_at": _n(claim.updated_at),
        "attempts": _n(claim.attempts),
    }
    for name in ("owner", "fingerprint", "reason"):
        if getattr(claim, name) is not None:
            item[name] = _s(getattr(claim, name))
    for name in ("dest_uid", "dest_uidvalidity", "dest_uid_floor"):
        if getattr(claim, name) is not None:
            item[name] = _n(getattr(claim, name))
    return item


class _Changed:
    """What an attempt on OPEN# answers when its write found the item changed: read and retry."""


_CHANGED = _Changed()


def _back_off() -> None:
    """A moment before reading a changed OPEN# item again, so that racing writers spread out."""
    time.sleep(random.uniform(0.001, 0.02))


# -- items -----------------------------------------------------------------------------------
def _owned_by(owner: str, statuses: Sequence[ClaimStatus] = OWNED_STATUSES) -> tuple[str, dict]:
    """The condition `owner` holds the claim (in one of `statuses`), and the values it names."""
    values = {f":owned_{i}": _s(status) for i, status in enumerate(statuses)}
    condition = f"#owner = :owner AND #status IN ({', '.join(values)})"
    return condition, values | {":owner": _s(owner)}


def _claim_or_none(key: UidKey, item: dict | None) -> Claim | None:
    return None if not item else _claim_from_item(key, item)


def _claim_from_item(key: UidKey, item: dict) -> Claim:
    return Claim(
        key=key,
        status=ClaimStatus(_str(item, "status")),
        owner=_optional_str(item, "owner"),
        lease_until=_float(item, "lease_until"),
        attempts=_int(item, "attempts"),
        dest_uid=_optional_int(item, "dest_uid"),
        fingerprint=_optional_str(item, "fingerprint"),
        reason=_optional_str(item, "reason"),
        updated_at=_float(item, "updated_at"),
        dest_uidvalidity=_optional_int(item, "dest_uidvalidity"),
        dest_uid_floor=_optional_int(item, "dest_uid_floor"),
    )


def _copied_item(key: UidKey, fingerprint: str, dest_uid: int | None, now: float) -> dict:
    item = _item_key(route_pk(key.route), fp_sk(fingerprint)) | {
        "uidvalidity": _n(key.uidvalidity),
        "uid": _n(key.uid),
        "copied_at": _n(now),
    }
    if dest_uid is not None:
        item["dest_uid"] = _n(dest_uid)
    return item


def _s(value: str) -> dict[str, str]:
    return {"S": str(value)}


def _n(value: float) -> dict[str, str]:
    return {"N": str(value)}


def _str(item: dict, name: str) -> str:
    return item[name]["S"]


def _optional_str(item: dict, name: str) -> str | None:
    return item[name]["S"] if name in item else None


def _int(item: dict, name: str) -> int:
    return int(item[name]["N"])


def _optional_int(item: dict, name: str) -> int | None:
    return int(item[name]["N"]) if name in item else None


def _bool(item: dict, name: str) -> bool:
    return bool(item.get(name, {}).get("BOOL", False))


def _float(item: dict, name: str) -> float:
    return float(item[name]["N"])


def _optional_float(item: dict, name: str) -> float | None:
    return float(item[name]["N"]) if name in item else None
