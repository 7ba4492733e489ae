"""What the Lambda path costs in AWS, counted (issue 14, deliverable 5): every AWS API call the
handlers make while metered, DynamoDB's request units worked out by its documented rules, and
the cost per 1,000 messages at list prices, printed after the run by tests/conftest.py.

DynamoDB on-demand (aws.amazon.com/dynamodb/pricing/on-demand): a write takes 1 write request
unit per KB of the item (2 in a transaction); a read 1 read request unit per 4 KB strongly
consistent, half that eventually consistent, 2 in a transaction; a failed conditional write is
charged as a write. The handlers' items are small (a claim is a few hundred bytes), so an
UpdateItem or DeleteItem, whose item is not in the request, is counted as 1 KB. moto reports
no faithful ConsumedCapacity (a 3 KB PutItem: 1.0; a strongly consistent GetItem: 0.5), hence
the count here.

Lambda's own part of an SQS trigger (its pollers' ReceiveMessage, and the DeleteMessageBatch
of what a batch acknowledged) is not made by the handler: it is added as two requests per
consumer invocation. Lambda's GB-seconds are the handler's time here (loopback servers: a real
run waits longer on its IMAP round trips) times the function's memorySize in serverless.yml.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

from botocore.client import BaseClient

from tests.harness.gather import gathered_rows

# List prices, US East (N. Virginia), on-demand, as of 2026 (USD).
USD_PER_WRITE_UNIT = 0.625 / 1e6
USD_PER_READ_UNIT = 0.125 / 1e6
USD_PER_SQS_FIFO_REQUEST = 0.50 / 1e6
USD_PER_SECRETS_MANAGER_CALL = 0.05 / 1e4
USD_PER_LAMBDA_GB_SECOND = 0.0000166667
USD_PER_LAMBDA_REQUEST = 0.20 / 1e6
# Lambda's pollers per consumer invocation: the ReceiveMessage that got the batch, and the
# DeleteMessageBatch of what it acknowledged.
TRIGGER_SQS_REQUESTS_PER_INVOCATION = 2

WRITES = {"PutItem", "UpdateItem", "DeleteItem"}


@dataclass(frozen=True)
class Row:
    what: str
    messages: int
    invocations: int
    write_units: float
    read_units: float
    sqs_requests: int
    secrets_calls: int
    gb_seconds: float

    def per_1000(self, value: float) -> float:
        return value * 1000 / self.messages

    @property
    def usd_per_1000(self) -> float:
        return self.per_1000(
            self.write_units * USD_PER_WRITE_UNIT
            + self.read_units * USD_PER_READ_UNIT
            + self.sqs_requests * USD_PER_SQS_FIFO_REQUEST
            + self.secrets_calls * USD_PER_SECRETS_MANAGER_CALL
            + self.gb_seconds * USD_PER_LAMBDA_GB_SECOND
            + self.invocations * USD_PER_LAMBDA_REQUEST
        )


COSTS: list[Row] = gathered_rows("aws cost", Row)


class Meter:
    """The AWS API calls made in this process while `metered()` is on, and their units."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()  # "service Operation" -> calls
        self.write_units = 0.0
        self.read_units = 0.0
        self.invocations = 0
        self.gb_seconds = 0.0

    @contextmanager
    def metered(self, memory_mb: int) -> Iterator[None]:
        """Count the calls made inside, and the time inside as one invocation of a function of
        `memory_mb`."""
        original = BaseClient._make_api_call
        meter = self

        def counted(client: BaseClient, operation: str, params: dict):
            service = client.meta.service_model.service_name
            try:
                response = original(client, operation, params)
            except Exception:
                meter._count(service, operation, params, {})  # a refused conditional write is charged
                raise
            meter._count(service, operation, params, response)
            return response

        started = time.perf_counter()
        with mock.patch.object(BaseClient, "_make_api_call", counted):
            try:
                yield
            finally:
                self.invocations += 1
                # Lambda bills by the millisecond.
                self.gb_seconds += math.ceil((time.perf_counter() - started) * 1000) / 1000 * memory_mb / 1024

    def row(self, what: str, messages: int, *, consumer_invocations: int) -> Row:
        sqs = sum(n for call, n in self.calls.items() if call.startswith("sqs "))
        return Row(
            what=what,
            messages=messages,
            invocations=self.invocations,
            write_units=self.write_units,
            read_units=self.read_units,
            sqs_requests=sqs + TRIGGER_SQS_REQUESTS_PER_INVOCATION * consumer_invocations,
            secrets_calls=sum(n for call, n in self.calls.items() if call.startswith("secretsmanager ")),
            gb_seconds=self.gb_seconds,
        )

    def _count(self, service: str, operation: str, params: dict, response: dict) -> None:
        self.calls[f"{service} {operation}"] += 1
        if service != "dynamodb":
            return
        if operation == "PutItem":
            self.write_units += _kilobytes(params["Item"])
        elif operation in WRITES:
            self.write_units += 1
        elif operation == "TransactWriteItems":
            self.write_units += 2 * sum(_kilobytes(next(iter(item.values())).get("Item", {})) for item in params["TransactItems"])
        elif operation == "BatchWriteItem":
            self.write_units += sum(len(requests) for requests in params["RequestItems"].values())
        elif operation == "GetItem":
            self.read_units += 1 if params.get("ConsistentRead") else 0.5
        elif operation in ("Query", "Scan"):
            blocks = max(1, math.ceil(sum(_size(item) for item in response.get("Items", [])) / 4096))
            self.read_units += blocks * (1 if params.get("ConsistentRead") else 0.5)
        elif operation == "TransactGetItems":
            self.read_units += 2 * len(params["TransactItems"])
        elif operation == "BatchGetItem":
            self.read_units += sum(
                len(keys["Keys"]) * (1 if keys.get("ConsistentRead") else 0.5) for keys in params["RequestItems"].values()
            )


def _size(item: dict) -> int:
    """An upper bound of DynamoDB's item size: its attribute names and values as JSON."""
    return len(json.dumps(item, separators=(",", ":")).encode())


def _kilobytes(item: dict) -> int:
    return max(1, math.ceil(_size(item) / 1024))


def write_table(terminalreporter) -> None:
    if not COSTS:
        return
    terminalreporter.write_sep("=", "AWS cost of the Lambda path, per 1,000 messages, at list prices")
    terminalreporter.write_line(
        f"{'run':<40} {'msgs':>5} {'WRU':>7} {'RRU':>7} {'SQS req':>8} {'Lambda GB-s':>12} {'invocations':>11} {'USD':>9}"
    )
    for row in COSTS:
        terminalreporter.write_line(
            f"{row.what:<40} {row.messages:>5} {row.per_1000(row.write_units):>7.0f} {row.per_1000(row.read_units):>7.0f}"
            f" {row.per_1000(row.sqs_requests):>8.0f} {row.per_1000(row.gb_seconds):>12.1f}"
            f" {row.per_1000(row.invocations):>11.0f} {row.usd_per_1000:>9.5f}"
        )
    terminalreporter.write_line("(WRU/RRU: DynamoDB write/read request units; SQS requests include Lambda's trigger's)")
