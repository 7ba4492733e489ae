"""The state store on one DynamoDB table (the AWS adapter).

Layout (DESIGN.md "State"): pk `ROUTE#<route>` with sk `WATERMARK`, `SCAN` (the last scan's
outcome), `UID#<uidvalidity>#<uid>` (the claim), `FAIL#<uidvalidity>#<uid>` and `FP#<fingerprint>`;
the gate's probe item under pk and sk `HEALTH`. Each change that guards exactly-once is one conditional write, or for finalize
one transaction; every read is strongly consistent, so a write just made is never missed.

Expiry (TTL on `expires_at`): the HEALTH probe and the download counts (pk `DOWNLOADS#<account>`,
sk `HOUR#<hour>`, kept DOWNLOADS_KEPT_HOURS) carry it, nothing else. Watermarks, claims and
fingerprints are the exactly-once guards, and one that expired would let a message be copied
twice. Failure records go when their claim is finalized; those left are what `status` shows
and `redrive` acts on, so they must stay until then too. The SCAN item is one per route,
overwritten by each scan, so it needs no expiry either.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from shared.errors import ClaimLost, StateStoreUnavailable
from shared.state.port import (
    Claim,
    ClaimOutcome,
    ClaimResult,
    ClaimStatus,
    CopiedMessage,
    FailureRecord,
    HolderProbe,
    Pause,
    RouteCounts,
    ScanRecord,
    StateStore,
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
    require_final,
    status_after_taking,
)

EXPIRES_AT = "expires_at"
HEALTH_TTL_SECONDS = 7 * 24 * 3600
WATERMARK_SK = "WATERMARK"
# Its own item: the watermark's conditional put replaces the whole WATERMARK item.
SCAN_SK = "SCAN"
# Up to where a route's messages may be in the destination with no record (set_lookup_bound).
LOOKUP_SK = "LOOKUP"
_HEALTH_KEY = {"pk": {"S": "HEALTH"}, "sk": {"S": "HEALTH"}}

# A claim write can fail because the claim changed between two attempts (another owner took it
# and released it); past this many tries the claim is busy enough to answer HELD.
_CLAIM_TRIES = 4

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
        try:
            self._call(
                "put_item",
                TableName=self._table,
                Item=_item_key(route_pk(route), LOOKUP_SK)
                | {"uidvalidity": _n(uidvalidity), "last_uid": _n(last_uid), "updated_at": _n(self._clock())},
                ConditionExpression="attribute_not_exists(pk)",  # the first bound stays
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

    # -- claims ----------------------------------------------------------------------------
    def claim_uid(
        self, key: UidKey, owner: str, lease_until: float, holder_state: HolderProbe | None = None
    ) -> ClaimResult:
        now = self._clock()
        found: Claim | None = None  # as far as we know: no claim yet, so a plain claim
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

    def get_claim(self, key: UidKey) -> Claim | None:
        return _claim_or_none(key, self._get(route_pk(key.route), uid_sk(key)))

    def extend_lease(self, key: UidKey, owner: str, lease_until: float) -> None:
        self._update_owned(
            key,
            owner,
            "SET lease_until = :lease_until, updated_at = :now",
            {":lease_until": _n(lease_until), ":now": _n(self._clock())},
        )

    def mark_appending(
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
        now = self._clock()
        actions = [
            {"Update": self._finalize_claim(key, owner, status, now, dest_uid, fingerprint, reason)},
            {"Delete": {"TableName": self._table, "Key": _item_key(route_pk(key.route), fail_sk(key))}},
        ]
        if status is ClaimStatus.DONE and fingerprint:
            copied = _copied_item(key, fingerprint, dest_uid, now)
            actions.append({"Put": {"TableName": self._table, "Item": copied}})
        elif status is ClaimStatus.SKIPPED and fingerprint and append_unresolved:
            unresolved = self._unresolved_item(key, owner, fingerprint, now)
            if unresolved is not None:
                actions.append({"Put": {"TableName": self._table, "Item": unresolved}})
        try:
            self._call("transact_write_items", TransactItems=actions)
        except _TransactionCancelled as cancelled:
            first = cancelled.reasons[0] if cancelled.reasons else {}
            if first.get("Code") == "ConditionalCheckFailed":
                raise claim_lost(key, owner, _claim_or_none(key, first.get("Item"))) from None
            codes = ", ".join(reason.get("Code", "?") for reason in cancelled.reasons)
            raise self._unavailable("TransactionCanceledException", f"{cancelled.message} ({codes})") from None

    def _unresolved_item(self, key: UidKey, owner: str, fingerprint: str, now: float) -> dict | None:
        """The unresolved FP# item, with the floor the claim recorded; None when a copy of the
        fingerprint is recorded already (that record answers for the message). The claim is read
        first: only its owner changes its floor, and the finalize's condition checks the owner."""
        found = self._get(route_pk(key.route), fp_sk(fingerprint))
        if found is not None and not _bool(found, "unresolved"):
            return None
        claim = self.get_claim(key)
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

    def release(self, key: UidKey, owner: str, *, append_outcome_unknown: bool = False) -> None:
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
        # By sort-key prefix: the WATERMARK and SCAN items of the partition are not counted.
        by_status: Counter[str] = Counter()
        skipped_reasons: Counter[str] = Counter()
        for item in self._query_prefix(route, "UID#", "#status, reason", {"#status": "status"}):
            status = _str(item, "status")
            by_status[status] += 1
            if status == ClaimStatus.SKIPPED:
                skipped_reasons[_optional_str(item, "reason") or NO_REASON] += 1
        failures = Counter(_str(item, "error_class") for item in self._query_prefix(route, "FAIL#", "error_class"))
        return RouteCounts(dict(by_status), dict(skipped_reasons), dict(failures))

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
    def _get(self, pk: str, sk: str) -> dict | None:
        response = self._call("get_item", TableName=self._table, Key=_item_key(pk, sk), ConsistentRead=True)
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


def downloads_pk(account: str) -> str:
    return f"DOWNLOADS#{account}"


def download_sk(hour: int) -> str:
    return f"HOUR#{hour:012d}"  # zero-padded: sorted as text, as sk is, is sorted by hour


def pause_sk(name: str) -> str:
    return f"PAUSE#{name}"


def _pause_from_item(item: dict) -> Pause:
    return Pause(_str(item, "name"), _float(item, "until"), _str(item, "reason"))


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
