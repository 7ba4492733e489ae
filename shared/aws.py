"""boto3 clients as every adapter wants them: endpoint override, short timeouts, bounded retries."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

# Fail fast when nothing answers (the gate must not hang a Lambda), but give a slow answer time.
_CONFIG = Config(connect_timeout=3, read_timeout=30, retries={"mode": "standard", "max_attempts": 3})


def make_client(service: str, endpoint_url: str | None = None, region: str | None = None) -> Any:
    return boto3.client(service, endpoint_url=endpoint_url or None, region_name=region or None, config=_CONFIG)
