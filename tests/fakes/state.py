"""A state store that fails on demand, around a real one (usually a SqliteStateStore on tmp_path).

    state = FailingStateStore(SqliteStateStore(tmp_path / "state.db", clock=clock))
    state.fail("finalize")                    # every finalize raises StateStoreUnavailable
    state.fail("advance_watermark", after=1)  # the first call works, the later ones fail
    state.fail(after=3, times=1)              # the 4th call of any method fails, once
    state.heal()                              # back to normal

Every call is delegated unchanged (it passes the state contract suite with no fault set) and its
method name recorded in `calls`, so a test can also check what was, or was not, asked.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from shared.errors import StateStoreUnavailable
from shared.state.port import (
    TOKEN_WORKED_FRESH_SECONDS,
    Claim,
    ClaimResult,
    ClaimStatus,
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


@dataclass
class _Outage:
    method: str | None  # None: any method
    after: int  # calls still let through before failing
    times: int | None  # failures still to raise; None: until healed
    error: BaseException | None


class FailingStateStore(StateStore):
    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self._outages: list[_Outage] = []
        self._lock = threading.Lock()  # the copier renews leases from a thread of its own

    def fail(
        self,
        method: str | None = None,
        *,
        after: int = 0,
        times: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Make `method` (None: any method) raise `error` (default StateStoreUnavailable naming
        the method) after `after` more calls have worked, `times` times (None: until `heal`)."""
        if method is not None and not callable(getattr(StateStore, method, None)):
            raise ValueError(f"StateStore has no method {method!r}")
        with self._lock:
            self._outages.append(_Outage(method, after, times, error))

    def heal(self) -> None:
        with self._lock:
            self._outages.clear()

    def calls_to(self, method: str) -> int:
        return sum(1 for name in self.calls if name == method)

    def _enter(self, method: str) -> None:
        with self._lock:
            self.calls.append(method)
            for outage in self._outages:
                if outage.method not in (None, method):
                    continue
                if outage.after > 0:
                    outage.after -= 1
                    continue
                if outage.times is not None:
                    if outage.times == 0:
                        continue
                    outage.times -= 1
                raise outage.error or StateStoreUnavailable(f"{self.inner.describe()}: {method}: backend unreachable (fake outage)")

    # -- StateStore, delegated --------------------------------------------------------------------
    def batched(self):
        return self.inner.batched()

    def read_watermark(self, route: str) -> Watermark | None:
        self._enter("read_watermark")
        return self.inner.read_watermark(route)

    def advance_watermark(self, route: str, uidvalidity: int, last_uid: int) -> bool:
        self._enter("advance_watermark")
        return self.inner.advance_watermark(route, uidvalidity, last_uid)

    def record_scan(self, route: str, error: str | None) -> None:
        self._enter("record_scan")
        self.inner.record_scan(route, error)

    def read_scan(self, route: str) -> ScanRecord | None:
        self._enter("read_scan")
        return self.inner.read_scan(route)

    def record_route_start(
        self, route: str, since: dt.date, older: int, fallback_days: int | None, *, replace: bool = False
    ) -> None:
        self._enter("record_route_start")
        self.inner.record_route_start(route, since, older, fallback_days, replace=replace)

    def read_route_start(self, route: str) -> RouteStart | None:
        self._enter("read_route_start")
        return self.inner.read_route_start(route)

    def claim_uid(
        self,
        key: UidKey,
        owner: str,
        lease_until: float,
        holder_state: HolderProbe | None = None,
        *,
        fingerprint: str | None = None,
    ) -> ClaimResult:
        self._enter("claim_uid")
        return self.inner.claim_uid(key, owner, lease_until, holder_state, fingerprint=fingerprint)

    def get_claim(self, key: UidKey, *, fingerprint: str | None = None) -> Claim | None:
        self._enter("get_claim")
        return self.inner.get_claim(key, fingerprint=fingerprint)

    def extend_lease(self, key: UidKey, owner: str, lease_until: float) -> None:
        self._enter("extend_lease")
        self.inner.extend_lease(key, owner, lease_until)

    def mark_appending(
        self, key: UidKey, owner: str, *, dest_uidvalidity: int | None = None, dest_uid_floor: int | None = None
    ) -> None:
        self._enter("mark_appending")
        self.inner.mark_appending(key, owner, dest_uidvalidity=dest_uidvalidity, dest_uid_floor=dest_uid_floor)

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
        self._enter("finalize")
        self.inner.finalize(
            key,
            owner,
            status,
            dest_uid=dest_uid,
            fingerprint=fingerprint,
            reason=reason,
            append_unresolved=append_unresolved,
        )

    def release(self, key: UidKey, owner: str, *, append_outcome_unknown: bool = False) -> None:
        self._enter("release")
        self.inner.release(key, owner, append_outcome_unknown=append_outcome_unknown)

    def record_failure(self, key: UidKey, error_class: str, error_text: str) -> int:
        self._enter("record_failure")
        return self.inner.record_failure(key, error_class, error_text)

    def get_failure(self, key: UidKey) -> FailureRecord | None:
        self._enter("get_failure")
        return self.inner.get_failure(key)

    def find_copied(self, fingerprint: str, routes: Sequence[str]) -> CopiedMessage | None:
        self._enter("find_copied")
        return self.inner.find_copied(fingerprint, routes)

    def route_counts(self, route: str) -> RouteCounts:
        self._enter("route_counts")
        return self.inner.route_counts(route)

    def set_lookup_bound(self, route: str, uidvalidity: int, last_uid: int) -> None:
        self._enter("set_lookup_bound")
        self.inner.set_lookup_bound(route, uidvalidity, last_uid)

    def widen_lookup_bound(self, route: str, uidvalidity: int, last_uid: int) -> None:
        self._enter("widen_lookup_bound")
        self.inner.widen_lookup_bound(route, uidvalidity, last_uid)

    def read_lookup_bound(self, route: str) -> Watermark | None:
        self._enter("read_lookup_bound")
        return self.inner.read_lookup_bound(route)

    def count_download(self, account: str, hour: int, size: int) -> None:
        self._enter("count_download")
        self.inner.count_download(account, hour, size)

    def downloads(self, account: str, since_hour: int) -> dict[int, int]:
        self._enter("downloads")
        return self.inner.downloads(account, since_hour)

    def check_health(self) -> None:
        self._enter("check_health")
        self.inner.check_health()

    def describe(self) -> str:
        return self.inner.describe()  # for messages: never fails

    def close(self) -> None:
        self.inner.close()

    def record_token_problem(self, name: str, error: str | None) -> None:
        self._enter("record_token_problem")
        self.inner.record_token_problem(name, error)

    def read_token_problem(self, name: str) -> TokenProblem | None:
        self._enter("read_token_problem")
        return self.inner.read_token_problem(name)

    def record_token_worked(
        self, provider: str, account: str, tag: str, *, fresh_for: float = TOKEN_WORKED_FRESH_SECONDS
    ) -> bool:
        self._enter("record_token_worked")
        return self.inner.record_token_worked(provider, account, tag, fresh_for=fresh_for)

    def read_token_health(self, provider: str, account: str) -> TokenHealth | None:
        self._enter("read_token_health")
        return self.inner.read_token_health(provider, account)

    def pause(self, name: str, until: float, reason: str) -> Pause:
        self._enter("pause")
        return self.inner.pause(name, until, reason)

    def read_pause(self, name: str) -> Pause | None:
        self._enter("read_pause")
        return self.inner.read_pause(name)

    def pauses(self) -> list[Pause]:
        self._enter("pauses")
        return self.inner.pauses()
