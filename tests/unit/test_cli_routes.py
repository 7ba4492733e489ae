"""`--route` where the queue cannot hand out one route's messages (SQS): a usage error before
anything is scanned or copied, naming why; and an unknown route name, for every command."""

from __future__ import annotations

import json

import pytest

from shared.cli import main as cli_main
from shared.cli import commands


@pytest.fixture
def two_routes_on_sqs(bare, monkeypatch):
    tmp_path = bare
    routes = [
        {"name": name, "gmail_user": f"{name}@gmail.test", "gmail_password": "source-password", "auth": "password",
         "outlook_folder": name.title()}
        for name in ("alpha", "beta")
    ]  # fmt: skip
    env = {
        "SYNC_ROUTES_JSON": json.dumps(routes), "OUTLOOK_USER": "me@outlook.test", "OUTLOOK_PASSWORD": "dest-password",
        "STATE_DB": str(tmp_path / "state.db"),
        "QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/123456789012/mail-syncer.fifo", "AWS_REGION": "eu-west-1",
    }  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Nothing may be scanned: a scan here would be an IMAP connection to nowhere.
    monkeypatch.setattr(commands, "scan_routes", lambda *args, **kwargs: pytest.fail("scanned"))


@pytest.mark.parametrize("command", [["drain"], ["run-once"], ["consume"]])
def test_route_with_an_sqs_queue_is_refused_before_any_scan(two_routes_on_sqs, capsys, command):
    code = cli_main.main([*command, "--route", "alpha"])

    err = capsys.readouterr().err
    assert code == 2
    assert f"{command[0]}: error: --route: SQS https://sqs.eu-west-1" in err and "cannot hand out one route's messages alone" in err


@pytest.mark.parametrize("command", [["drain"], ["run-once"], ["scan"], ["consume"], ["reconcile"]])
def test_an_unknown_route_is_a_usage_error_naming_the_routes(two_routes_on_sqs, capsys, command):
    code = cli_main.main([*command, "--route", "alpha", "--route", "gamma"])

    assert code == 2
    assert "--route: unknown route 'gamma' (routes: alpha, beta)" in capsys.readouterr().err
