"""A consumer batch's metrics in CloudWatch's embedded metric format (EMF).

Each document is one JSON line on stdout; CloudWatch Logs turns it into metrics as it stores the
function's log, with no PutMetricData call, permission or library (aws-lambda-powertools'
Metrics writes the same lines; for six metrics its dependency buys nothing).

Namespace: the stack's name (`mail-syncer-<stage>`), so two stages in one account keep their
metrics apart; serverless.yml's dashboard reads them there. Per route (dimension Route) and in
all (no dimension):
  Copied, Skipped, Failed (Count): what became of each message; Failed counts a failed attempt,
    the one that sent the message to the dead letters too;
  BytesCopied (Bytes): the bytes appended;
  CopyLag (Seconds): from each copied message's INTERNALDATE (its arrival at Gmail) to its copy.
Per route and provider (Route, Provider) and per provider (Provider):
  Throttled (Count): messages put back because Gmail (the source account) or Outlook (the
    destination) asked to be left alone: a throttle, or Gmail's spent download allowance.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from shared.pipeline.copier import CopyResult, Outcome
from shared.pipeline.pauses import DESTINATION

FALLBACK_NAMESPACE = "mail-syncer"
ROUTE, PROVIDER = "Route", "Provider"
GMAIL, OUTLOOK = "gmail", "outlook"
COUNT, BYTES, SECONDS = "Count", "Bytes", "Seconds"
# EMF's limit of values in one metric's array.
MAX_VALUES = 100

_FAILED = (Outcome.FAILED, Outcome.DEAD_LETTERED)


def namespace_for(function_name: str | None) -> str:
    """The stack's name from one of its functions' (`mail-syncer-prod-consumer`: serverless
    names a function `<service>-<stage>-<function>`)."""
    stack, _, function = (function_name or "").rpartition("-")
    return stack if stack and function else FALLBACK_NAMESPACE


def batch_documents(results: Iterable[CopyResult], *, namespace: str, now: float) -> list[dict[str, Any]]:
    """The EMF documents of one batch's results, as of `now` (epoch seconds): one per route of the
    batch (all its counts, zeros included, so graphs show a quiet route as 0), and one per route
    and provider that paused messages. A result of no route (a quarantined body) has none."""
    routes: dict[str, list[CopyResult]] = {}
    for result in results:
        if result.key is not None:
            routes.setdefault(result.key.route, []).append(result)
    documents = []
    for route, of_route in routes.items():
        copied = [r for r in of_route if r.outcome is Outcome.COPIED]
        lags = [max(0.0, round(now - r.internaldate.timestamp(), 3)) for r in copied if r.internaldate is not None]
        values: dict[str, tuple[str, float | list[float]]] = {
            "Copied": (COUNT, len(copied)),
            "Skipped": (COUNT, sum(r.outcome is Outcome.SKIPPED for r in of_route)),
            "Failed": (COUNT, sum(r.outcome in _FAILED for r in of_route)),
            "BytesCopied": (BYTES, sum(r.size or 0 for r in copied)),
        }
        for first in range(0, max(len(lags), 1), MAX_VALUES):
            if lags:
                values["CopyLag"] = (SECONDS, lags[first : first + MAX_VALUES])
            documents.append(_document(namespace, now, {ROUTE: route}, [[ROUTE], []], values))
            values = {}  # the counts once; only the lags that did not fit go on
        throttled: dict[str, int] = {}
        for result in of_route:
            if result.outcome is Outcome.PAUSED:
                provider = paused_provider(result)
                throttled[provider] = throttled.get(provider, 0) + 1
        for provider, count in throttled.items():
            dimensions = {ROUTE: route, PROVIDER: provider}
            documents.append(
                _document(namespace, now, dimensions, [[ROUTE, PROVIDER], [PROVIDER]], {"Throttled": (COUNT, count)})
            )
    return documents


def paused_provider(result: CopyResult) -> str:
    """Whose pause held a PAUSED message back: the destination's is Outlook's, a source
    account's Gmail's."""
    return OUTLOOK if result.paused_by == DESTINATION else GMAIL


def write(documents: Sequence[dict[str, Any]], out: TextIO | None = None) -> None:
    """One line per document, on stdout: the Lambda runtime sends it to CloudWatch Logs as it is
    (the log format JSON formats log records, not what is printed)."""
    out = out or sys.stdout
    for document in documents:
        out.write(json.dumps(document, separators=(",", ":")) + "\n")
    out.flush()


def _document(
    namespace: str,
    now: float,
    dimensions: dict[str, str],
    dimension_sets: list[list[str]],
    values: dict[str, tuple[str, float | list[float]]],
) -> dict[str, Any]:
    return {
        "_aws": {
            "Timestamp": int(now * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": namespace,
                    "Dimensions": dimension_sets,
                    "Metrics": [{"Name": name, "Unit": unit} for name, (unit, _) in values.items()],
                }
            ],
        },
        **dimensions,
        **{name: value for name, (_, value) in values.items()},
    }
