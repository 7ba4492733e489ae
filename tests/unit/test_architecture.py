"""The use cases depend on ports only: importing them loads no adapter, no IMAP library and no
cloud SDK, so their unit tests run on fakes and a new backend needs no change to them."""

from __future__ import annotations

import json
import subprocess
import sys

USE_CASES = (
    "shared.pipeline.copier",
    "shared.pipeline.scan",
    "shared.pipeline.consume",
    "shared.pipeline.redrive",
    "shared.pipeline.reconcile",
    "shared.pipeline.watch",
)
ADAPTERS = (
    "imaplib",
    "imapclient",
    "shared.mailbox.session",
    "shared.mailbox.imap",
    "shared.mailbox.connections",
    "shared.mailbox.retry",
    "shared.state.sqlite",
    "shared.state.dynamodb",
    "shared.queue.sqlite",
    "shared.queue.sqs",
    "shared.tokens.sources",
    "boto3",
    "botocore",
    "msal",
    "google.auth",
)


def test_importing_the_use_cases_loads_no_adapter() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {USE_CASES!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    # A fresh interpreter: this one has the adapters loaded by other tests already.
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout))
    assert set(USE_CASES) <= loaded
    assert sorted(name for name in ADAPTERS if name in loaded) == []


# Loaded only when an OAuth route refreshes a token: together longer to import than copying a few
# hundred messages, and a run of password routes (local Dovecot) never needs them.
TOKEN_LIBRARIES = ("google.auth", "google.oauth2", "msal", "requests", "urllib3")


def test_the_cli_loads_no_token_library_until_a_token_is_refreshed() -> None:
    code = (
        "import json, sys\n"
        "import shared.cli.main, shared.bootstrap, shared.tokens.sources, shared.tokens.store\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout))
    assert "shared.tokens.sources" in loaded
    assert sorted(name for name in TOKEN_LIBRARIES if name in loaded) == []
