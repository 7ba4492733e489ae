"""The consumer's embedded metric format (EMF) lines: what CloudWatch turns into the dashboard's
metrics, checked on the JSON it reads."""

from __future__ import annotations

import datetime as dt
import io
import json

from shared import metrics
from shared.message_ref import UidKey
from shared.pipeline.copier import CopyResult, Outcome
from shared.pipeline.pauses import describe, source_pause_name
from shared.state import Pause

NOW = 1_800_000_000.0
NAMESPACE = "mail-syncer-prod"


def _copied(route: str, uid: int, *, size: int, age_seconds: float) -> CopyResult:
    arrived = dt.datetime.fromtimestamp(NOW - age_seconds, dt.timezone.utc)
    return CopyResult(
        Outcome.COPIED, UidKey(route, 1, uid), dest_uid=uid + 100, size=size, internaldate=arrived, elapsed_ms=40
    )


def _paused(route: str, uid: int, pause_name: str) -> CopyResult:
    return CopyResult(
        Outcome.PAUSED, UidKey(route, 1, uid), describe(Pause(pause_name, NOW + 60, "THROTTLED")), retry_after=60,
        paused_by=pause_name,
    )


def _emitted(results: list[CopyResult]) -> list[dict]:
    """As CloudWatch Logs reads them: each a JSON object on a line of its own."""
    out = io.StringIO()
    metrics.write(metrics.batch_documents(results, namespace=NAMESPACE, now=NOW), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _directive(document: dict) -> dict:
    (directive,) = document["_aws"]["CloudWatchMetrics"]
    return directive


def test_each_route_gets_its_counts_bytes_and_lags_per_route_and_in_all() -> None:
    results = [
        _copied("alice", 1, size=1000, age_seconds=300),
        _copied("alice", 2, size=2500, age_seconds=90.5),
        CopyResult(Outcome.SKIPPED, UidKey("alice", 1, 3), "duplicate"),
        CopyResult(Outcome.FAILED, UidKey("alice", 1, 4), "BYE", attempts=1),
        CopyResult(Outcome.UNPROCESSED),
        CopyResult(Outcome.DEAD_LETTERED, UidKey("bob", 1, 9), "failed 5 times"),
        CopyResult(Outcome.ALREADY_DONE, UidKey("bob", 1, 10)),
    ]

    alice, bob = _emitted(results)

    assert alice["_aws"]["Timestamp"] == NOW * 1000
    assert _directive(alice) == {
        "Namespace": NAMESPACE,
        "Dimensions": [["Route"], []],
        "Metrics": [
            {"Name": "Copied", "Unit": "Count"},
            {"Name": "Skipped", "Unit": "Count"},
            {"Name": "Failed", "Unit": "Count"},
            {"Name": "BytesCopied", "Unit": "Bytes"},
            {"Name": "CopyLag", "Unit": "Seconds"},
        ],
    }
    assert {k: v for k, v in alice.items() if k != "_aws"} == {
        "Route": "alice", "Copied": 2, "Skipped": 1, "Failed": 1, "BytesCopied": 3500, "CopyLag": [300.0, 90.5],
    }  # fmt: skip
    # A route that copied nothing still says 0 (no CopyLag: EMF takes no empty array).
    assert [m["Name"] for m in _directive(bob)["Metrics"]] == ["Copied", "Skipped", "Failed", "BytesCopied"]
    assert {k: v for k, v in bob.items() if k != "_aws"} == {
        "Route": "bob",
        "Copied": 0,
        "Skipped": 0,
        "Failed": 1,
        "BytesCopied": 0,
    }


def test_paused_messages_are_throttled_by_the_provider_that_asked() -> None:
    results = [
        _paused("alice", 1, "destination"),
        _paused("alice", 2, "destination"),
        _paused("bob", 5, source_pause_name("bob@gmail.com")),
    ]

    documents = _emitted(results)

    throttled = [d for d in documents if "Throttled" in d]
    assert [{k: v for k, v in d.items() if k != "_aws"} for d in throttled] == [
        {"Route": "alice", "Provider": "outlook", "Throttled": 2},
        {"Route": "bob", "Provider": "gmail", "Throttled": 1},
    ]
    for document in throttled:
        assert _directive(document) == {
            "Namespace": NAMESPACE,
            "Dimensions": [["Route", "Provider"], ["Provider"]],
            "Metrics": [{"Name": "Throttled", "Unit": "Count"}],
        }


def test_more_lags_than_one_document_holds_go_on_in_the_next_counted_once() -> None:
    results = [_copied("alice", uid, size=10, age_seconds=uid) for uid in range(1, 151)]

    first, second = _emitted(results)

    assert first["Copied"] == 150 and len(first["CopyLag"]) == metrics.MAX_VALUES
    assert {k: v for k, v in second.items() if k != "_aws"} == {
        "Route": "alice",
        "CopyLag": [float(s) for s in range(101, 151)],
    }
    assert _directive(second)["Metrics"] == [{"Name": "CopyLag", "Unit": "Seconds"}]


def test_a_body_of_no_route_and_an_empty_batch_give_no_document() -> None:
    assert _emitted([CopyResult(Outcome.QUARANTINED, None, "not JSON")]) == []
    assert _emitted([]) == []


def test_the_namespace_is_the_stack_of_the_function() -> None:
    assert metrics.namespace_for("mail-syncer-prod-consumer") == "mail-syncer-prod"
    assert metrics.namespace_for(None) == metrics.namespace_for("consumer") == "mail-syncer"
