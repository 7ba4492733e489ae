"""Where a setting was read (Settings.source_of), so a rotated refresh token goes back there."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from shared.settings import Settings, SettingSource, load_settings

ROUTE = {"name": "work", "gmail_user": "alice@gmail.test", "gmail_refresh_token": "g-refresh-SECRET-3", "outlook_folder": "Work"}
BASE = {
    "OUTLOOK_USER": "me@outlook.test",
    "MS_CLIENT_ID": "ms-client",
    "GMAIL_CLIENT_ID": "g-client",
    "GMAIL_CLIENT_SECRET": "g-client-SECRET-2",
    "SYNC_ROUTES_JSON": json.dumps([ROUTE]),
}


@pytest.fixture
def clean(monkeypatch, tmp_path):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    for key, value in BASE.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_from_the_environment(clean, monkeypatch):
    monkeypatch.setenv("ms_refresh_token", "ms-refresh-SECRET-1")  # names are case-insensitive

    settings = load_settings()

    assert settings.source_of("MS_REFRESH_TOKEN") == SettingSource("env")
    assert str(settings.source_of("ms_refresh_token")) == "the environment"


def test_from_the_env_file_when_the_environment_lacks_it(clean, monkeypatch):
    (clean / ".env").write_text("MS_REFRESH_TOKEN=ms-refresh-SECRET-1\nLOG_LEVEL=\n")
    monkeypatch.setenv("MS_REFRESH_TOKEN", "")  # empty counts as unset, as for the settings

    settings = load_settings()

    assert settings.source_of("ms_refresh_token") == SettingSource("dotenv", path=clean / ".env")
    assert settings.source_of("log_level") == SettingSource("unset")


def test_from_the_last_secret_that_has_it(clean, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("secretsmanager", region_name="us-east-1")
        client.create_secret(Name="first", SecretString=json.dumps({"MS_REFRESH_TOKEN": "ms-refresh-old-1"}))
        client.create_secret(Name="second", SecretString=json.dumps({"ms_refresh_token": "ms-refresh-new-2"}))
        monkeypatch.setenv("AWS_SECRETS_MANAGER_SECRET_IDS", "first,second")

        settings = load_settings(secrets_client=client)

    assert settings.ms_refresh_token.get_secret_value() == "ms-refresh-new-2"
    assert settings.source_of("ms_refresh_token") == SettingSource("secret", secret_id="second")
    assert settings.source_of("outlook_user") == SettingSource("env")
