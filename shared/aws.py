"""boto3 clients as every adapter wants them (endpoint override, short timeouts, bounded retries),
and reading a secret that holds a JSON object (settings and the rotated-token store both do).

boto3 is imported on first use: settings import this module, and a command that needs no AWS
should not pay for loading it.
"""

from __future__ import annotations

import json
from typing import Any

from shared.errors import MailSyncerError


class SecretMissing(MailSyncerError):
    """No secret by that id."""


class SecretUnreadable(MailSyncerError):
    """A secret that cannot be read, or holds no JSON object; the text names it, never its value."""


def client_config() -> Any:
    from botocore.config import Config

    return Config(
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
    import boto3

    return boto3.client(service, endpoint_url=endpoint_url or None, region_name=region or None, config=client_config())


def read_json_secret(client: Any, secret_id: str) -> tuple[str, dict[str, Any]]:
    """The current version of a secret that holds a JSON object: its version id and the object."""
    from botocore.exceptions import BotoCoreError, ClientError

    place = f"secret {secret_id}"
    try:
        # AWSCURRENT named, not implied: moto's server otherwise misses a version made current
        # by UpdateSecretVersionStage (how shared.tokens.store writes, compare-and-set).
        response = client.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")
    except ClientError as exc:
        code = error_code(exc)
        if code == "ResourceNotFoundException":
            raise SecretMissing(f"{place}: not found") from None
        raise SecretUnreadable(f"{place}: cannot be read: {code}") from None
    except BotoCoreError as exc:
        raise SecretUnreadable(f"{place}: cannot be read: {type(exc).__name__}: {exc}") from None
    text = response.get("SecretString")
    if text is None:
        raise SecretUnreadable(f"{place} is binary, not a JSON object")
    try:
        data = json.loads(text)
    except ValueError:
        # The error position would point into the secret; say only that it is not JSON.
        raise SecretUnreadable(f"{place} is not valid JSON") from None
    if not isinstance(data, dict):
        raise SecretUnreadable(f"{place} is not a JSON object")
    return response["VersionId"], data


def error_code(exc: Any) -> str:
    """A botocore ClientError's code ("ResourceNotFoundException"), or its class name."""
    return exc.response.get("Error", {}).get("Code") or type(exc).__name__
