"""boto3 clients as every adapter wants them: endpoint override, short timeouts, bounded retries."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

CONFIG = Config(
    # Give up in seconds when nothing answers, so the fail-safe gate fails fast instead of
    # hanging a Lambda until its timeout.
    connect_timeout=3,
    # Above SQS's longest long poll (20 s), or every idle poll would fail.
    read_timeout=30,
    # Three attempts in all (botocore's `max_attempts` would count retries only).
    retries={"mode": "standard", "total_max_attempts": 3},
    # A local process may share one client across threads.
    max_pool_connections=32,
)


def make_client(service: str, endpoint_url: str | None = None, region: str | None = None) -> Any:
    return boto3.client(service, endpoint_url=endpoint_url or None, region_name=region or None, config=CONFIG)
