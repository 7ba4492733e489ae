"""Settings: every bad input gets one line naming its place, never a value."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from pydantic import SecretStr

from shared.errors import SettingsInvalid
from shared.redaction import scrub
from shared.settings import Route, Settings, load_auth_settings, load_settings

DESTINATION = {
    "OUTLOOK_USER": "me@outlook.test",
    "MS_CLIENT_ID": "ms-client",
    "MS_REFRESH_TOKEN": "ms-refresh-SECRET-1",
    "GMAIL_CLIENT_ID": "g-client",
    "GMAIL_CLIENT_SECRET": "g-client-SECRET-2",
}
ROUTE = {"name": "work", "gmail_user": "alice@gmail.test", "gmail_refresh_token": "g-refresh-SECRET-3", "outlook_folder": "Work"}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment holding only what a test sets, run from an empty folder (no .env)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for name in ("AWS_SECRETS_MANAGER_SECRET_IDS", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)

    def set_env(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def problems(**_) -> list[str]:
    with pytest.raises(SettingsInvalid) as caught:
        load_settings()
    return caught.value.problems


def test_routes_from_json(env):
    second = {**ROUTE, "name": "home", "gmail_folder": "[Gmail]/Starred", "outlook_folder": "Home/Starred", "since": "2024-05-01"}
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE, second]))
    settings = load_settings()
    assert [r.name for r in settings.routes] == ["work", "home"]
    assert settings.routes[1].gmail_folder == "[Gmail]/Starred"
    assert str(settings.routes[1].since) == "2024-05-01"
    assert settings.routes[0].gmail_folder == "INBOX"
    assert settings.routes[0].source_auth == "xoauth2"


def test_single_route_fallback(env):
    env(**DESTINATION, GMAIL_USER="bob@gmail.test", GMAIL_REFRESH_TOKEN="tok-123456", OUTLOOK_FOLDER="Bob", ROUTE_NAME="bob")
    (route,) = load_settings().routes
    assert (route.name, route.gmail_user, route.outlook_folder, route.gmail_folder) == ("bob", "bob@gmail.test", "Bob", "INBOX")


@pytest.mark.parametrize(
    ("routes_json", "expected"),
    [
        ("[{", "SYNC_ROUTES_JSON: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 3 (char 2))"),
        ("{}", "SYNC_ROUTES_JSON: must be a non-empty JSON list of routes"),
        (json.dumps([ROUTE, {**ROUTE, "gmail_user": "x@gmail.test"}]), "SYNC_ROUTES_JSON[1].name: duplicate route name 'work'"),
        (json.dumps([{k: v for k, v in ROUTE.items() if k != "gmail_refresh_token"}]), "SYNC_ROUTES_JSON[0]: needs gmail_refresh_token or gmail_password"),
        (json.dumps([{**ROUTE, "colour": "red"}]), "SYNC_ROUTES_JSON[0].colour: unknown key"),
        (json.dumps([ROUTE, {k: v for k, v in ROUTE.items() if k != "outlook_folder"} | {"name": "b"}]), "SYNC_ROUTES_JSON[1].outlook_folder: Field required"),
        (json.dumps([{**ROUTE, "name": "Work Mail"}]), "SYNC_ROUTES_JSON[0].name: must be a slug: 1-63 lower-case letters, digits or '-', starting with a letter or digit"),
        (json.dumps([{**ROUTE, "name": "work\n"}]), "SYNC_ROUTES_JSON[0].name: must not contain control characters"),
        (json.dumps([{**ROUTE, "outlook_folder": "A//B"}]), "SYNC_ROUTES_JSON[0].outlook_folder: folder name has an empty level (separator is '/')"),
        (json.dumps([{**ROUTE, "outlook_folder": "Inbox/*"}]), "SYNC_ROUTES_JSON[0].outlook_folder: folder name has '*' or '%' (IMAP list wildcards)"),
        (json.dumps([{**ROUTE, "gmail_imap_port": 70000}]), "SYNC_ROUTES_JSON[0].gmail_imap_port: Input should be less than or equal to 65535"),
        (json.dumps([{**ROUTE, "auth": "password"}]), "SYNC_ROUTES_JSON[0]: auth is password but gmail_password is missing"),
    ],
)
def test_bad_routes_name_their_place(env, routes_json, expected):
    env(**DESTINATION, SYNC_ROUTES_JSON=routes_json)
    assert problems() == [expected]


def test_fallback_needs_user_and_folder(env):
    env(**DESTINATION, GMAIL_REFRESH_TOKEN="tok-123456")
    assert problems() == [
        "GMAIL_USER: required when SYNC_ROUTES_JSON is unset (the Gmail address to copy from)",
        "OUTLOOK_FOLDER: required when SYNC_ROUTES_JSON is unset (the Outlook folder to copy into)",
    ]


def test_with_no_settings_at_all_every_missing_one_is_named_at_once(env):
    """A fresh clone with no .env: the source's and the destination's settings, in one run
    (the destination's were named only once the route's were fixed)."""
    assert problems() == [
        "GMAIL_USER: required when SYNC_ROUTES_JSON is unset (the Gmail address to copy from)",
        "OUTLOOK_FOLDER: required when SYNC_ROUTES_JSON is unset (the Outlook folder to copy into)",
        "GMAIL_REFRESH_TOKEN: required (or GMAIL_PASSWORD for a password login)",
        "OUTLOOK_USER: required (the destination mailbox)",
        "MS_REFRESH_TOKEN: required (or OUTLOOK_PASSWORD for a password login)",
    ]


def test_a_ca_bundle_for_the_token_endpoints_is_a_setting_of_env_and_its_file_must_exist(env, tmp_path):
    """README says token calls trust REQUESTS_CA_BUNDLE; in .env it was refused as unknown."""
    bundle = tmp_path / "proxy-ca.pem"
    Path(".env").write_text(f"REQUESTS_CA_BUNDLE={bundle}\n")
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]))
    assert problems() == [f"REQUESTS_CA_BUNDLE: no file at {bundle}"]
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert load_settings().requests_ca_bundle == bundle
    assert load_auth_settings().requests_ca_bundle == bundle


def test_fallback_without_credentials(env):
    env(**DESTINATION, GMAIL_USER="bob@gmail.test", OUTLOOK_FOLDER="Bob")
    assert problems() == ["GMAIL_REFRESH_TOKEN / GMAIL_PASSWORD: needs gmail_refresh_token or gmail_password"]


def test_destination_and_client_requirements(env):
    env(SYNC_ROUTES_JSON=json.dumps([ROUTE]))
    assert problems() == [
        "GMAIL_CLIENT_ID: required for XOAUTH2 on route work",
        "GMAIL_CLIENT_SECRET: required for XOAUTH2 on route work",
        "OUTLOOK_USER: required (the destination mailbox)",
        "MS_REFRESH_TOKEN: required (or OUTLOOK_PASSWORD for a password login)",
    ]


def test_password_routes_need_no_oauth_client(env):
    route = {"name": "plain", "gmail_user": "u", "gmail_password": "pw-123456", "outlook_folder": "X"}
    env(SYNC_ROUTES_JSON=json.dumps([route]), OUTLOOK_USER="dest", OUTLOOK_PASSWORD="pw-654321")
    settings = load_settings()
    assert settings.routes[0].source_auth == "password"


RESERVED = "a folder name Outlook.com reserves (Files); choose another"


@pytest.mark.parametrize("folder", ["Files", "files", "FILES", "Files/Old"])
def test_a_reserved_outlook_folder_names_the_route_and_field(env, folder):
    home = {**ROUTE, "name": "home", "outlook_folder": folder}
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE, home]))
    assert problems() == [f"SYNC_ROUTES_JSON[1].outlook_folder: route home: {RESERVED}"]


def test_a_reserved_outlook_folder_in_the_single_route_fallback(env):
    env(**DESTINATION, GMAIL_USER="bob@gmail.test", GMAIL_REFRESH_TOKEN="tok-123456", OUTLOOK_FOLDER="Files")
    assert problems() == [f"OUTLOOK_FOLDER: route default: {RESERVED}"]


def test_reserved_only_as_a_top_level_name(env):
    routes = [{**ROUTE, "name": f"r{i}", "outlook_folder": folder} for i, folder in enumerate(["Archive/Files", "My Files"])]
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps(routes))
    assert [route.outlook_folder for route in load_settings().routes] == ["Archive/Files", "My Files"]


def test_watch_intervals_default_under_gmails_idle_timeout_and_are_validated(env):
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]))
    settings = load_settings()
    assert (settings.watch_reidle_seconds, settings.watch_rescan_seconds) == (240, 300)
    env(WATCH_REIDLE_SECONDS="1800")  # past RFC 2177's 29 minutes
    assert problems() == ["WATCH_REIDLE_SECONDS: Input should be less than or equal to 1740"]
    env(WATCH_REIDLE_SECONDS="60", WATCH_RESCAN_SECONDS="0")
    assert problems() == ["WATCH_RESCAN_SECONDS: Input should be greater than 0"]


def test_max_message_bytes_defaults_to_outlooks_limit_and_is_validated(env):
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]))
    assert load_settings().max_message_bytes == 25 * 1024 * 1024
    env(MAX_MESSAGE_BYTES="157286400")  # a Microsoft 365 mailbox set up for 150 MB
    assert load_settings().max_message_bytes == 150 * 1024 * 1024
    env(MAX_MESSAGE_BYTES="0")
    assert problems() == ["MAX_MESSAGE_BYTES: Input should be greater than or equal to 1024"]
    env(MAX_MESSAGE_BYTES="25MB")
    assert problems() == ["MAX_MESSAGE_BYTES: Input should be a valid integer, unable to parse string as an integer"]


def test_bad_scalar_names_the_variable(env):
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]), GMAIL_IMAP_PORT="imap", FALLBACK_SINCE_DAYS="-1")
    assert problems() == [
        "GMAIL_IMAP_PORT: Input should be a valid integer, unable to parse string as an integer",
        "FALLBACK_SINCE_DAYS: Input should be greater than or equal to 0",
    ]


def test_unknown_setting_in_dotenv(env, tmp_path):
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]))
    (tmp_path / ".env").write_text("GMAIL_USR=typo@gmail.test\n")
    assert problems() == ["GMAIL_USR: unknown setting in .env"]


def test_env_beats_dotenv(env, tmp_path):
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]), GMAIL_IMAP_HOST="from-env")
    (tmp_path / ".env").write_text("GMAIL_IMAP_HOST=from-dotenv\nOUTLOOK_IMAP_HOST=dotenv-only\n")
    settings = load_settings()
    assert (settings.gmail_imap_host, settings.outlook_imap_host) == ("from-env", "dotenv-only")


def test_no_value_in_any_problem(env):
    secret = "very-SECRET-refresh-token"
    env(
        **DESTINATION,
        SYNC_ROUTES_JSON=json.dumps([{**ROUTE, "gmail_refresh_token": secret, "gmail_imap_port": secret}]),
    )
    text = "\n".join(problems())
    assert "gmail_imap_port" in text
    assert secret not in text


def test_secrets_are_registered_for_scrubbing(env):
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]))
    load_settings()
    assert scrub("token g-refresh-SECRET-3 and ms-refresh-SECRET-1") == "token [REDACTED] and [REDACTED]"


# -- Secrets Manager ---------------------------------------------------------------------


@pytest.fixture
def secrets(env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("secretsmanager", region_name="us-east-1")

        def put(secret_id: str, value):
            text = value if isinstance(value, str) else json.dumps(value)
            client.create_secret(Name=secret_id, SecretString=text)

        yield put


def test_secrets_merged_env_wins(env, secrets):
    secrets("mail-syncer/routes", {"SYNC_ROUTES_JSON": [ROUTE], "GMAIL_IMAP_HOST": "from-secret"})
    secrets("mail-syncer/destination", DESTINATION | {"OUTLOOK_IMAP_HOST": "from-secret"})
    env(AWS_SECRETS_MANAGER_SECRET_IDS="mail-syncer/routes, mail-syncer/destination", OUTLOOK_IMAP_HOST="from-env")
    settings = load_settings()
    assert settings.routes[0].name == "work"
    assert settings.gmail_imap_host == "from-secret"
    assert settings.outlook_imap_host == "from-env"
    assert settings.ms_refresh_token.get_secret_value() == "ms-refresh-SECRET-1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[1, 2]", "secret mail-syncer/routes is not a JSON object"),
        ("not json SECRET-4", "secret mail-syncer/routes is not valid JSON"),
        ({"GMAIL_USR": "x"}, "secret mail-syncer/routes: unknown setting GMAIL_USR"),
    ],
)
def test_bad_secret_names_it(env, secrets, value, expected):
    secrets("mail-syncer/routes", value)
    env(AWS_SECRETS_MANAGER_SECRET_IDS="mail-syncer/routes")
    assert problems() == [expected]


def test_missing_secret_id(env, secrets):
    env(AWS_SECRETS_MANAGER_SECRET_IDS="mail-syncer/nowhere")
    assert problems() == ["secret mail-syncer/nowhere (AWS_SECRETS_MANAGER_SECRET_IDS): not found"]


def test_env_example_lists_every_setting_and_loads(env, tmp_path):
    """A newcomer copies .env.example to .env: every setting is there, and the copy loads."""
    example = (Path(__file__).parents[2] / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", example, flags=re.MULTILINE))
    assert listed == {name.upper() for name in Settings.model_fields}
    (tmp_path / ".env").write_text(example)
    # Left empty, the secrets are unset, and named as missing.
    assert problems() == [
        "GMAIL_CLIENT_SECRET: required for XOAUTH2 on route work",
        "MS_REFRESH_TOKEN: required (or OUTLOOK_PASSWORD for a password login)",
    ]
    filled = example.replace("MS_REFRESH_TOKEN=", "MS_REFRESH_TOKEN=x-123456")
    (tmp_path / ".env").write_text(filled.replace("GMAIL_CLIENT_SECRET=", "GMAIL_CLIENT_SECRET=y-123456"))
    settings = load_settings()
    assert settings.routes[0].outlook_folder == "Gmail/Work"
    assert settings.outlook_user == "me@outlook.com"
    assert settings.ms_tenant == "consumers"


# -- settings that reach the wire: no control characters; token endpoints over TLS --------

CONTROL = "must not contain control characters"
INJECTED = "\r\nX1 DELETE INBOX"  # the red team's OUTLOOK_USER: its second line reached the server


def _text_fields(model) -> list[str]:
    """The model's settings held as text (str or SecretStr): each may be written onto a wire."""
    return [
        name
        for name, field in model.model_fields.items()
        if {str, SecretStr} & set(typing.get_args(field.annotation) or (field.annotation,))
    ]


# SYNC_ROUTES_JSON is JSON text (it may span lines): its routes' fields are checked one by one
# below. The secret ids are read before everything else; tested with Secrets Manager below.
WIRE_SETTINGS = [name.upper() for name in _text_fields(Settings) if name not in ("sync_routes_json", "aws_secrets_manager_secret_ids")]
WIRE_ROUTE_FIELDS = _text_fields(Route)


def test_wire_settings_cover_the_endpoints_and_credentials():
    named = {"OUTLOOK_USER", "GMAIL_USER", "GMAIL_IMAP_HOST", "OUTLOOK_IMAP_HOST", "GMAIL_FOLDER", "OUTLOOK_FOLDER",
             "MS_CLIENT_ID", "GMAIL_CLIENT_ID", "MS_TENANT", "MS_AUTHORITY", "GOOGLE_TOKEN_URI", "OUTLOOK_PASSWORD"}
    assert named <= set(WIRE_SETTINGS)
    assert {"gmail_user", "gmail_folder", "outlook_folder", "gmail_imap_host", "gmail_password"} <= set(WIRE_ROUTE_FIELDS)


@pytest.mark.parametrize("name", WIRE_SETTINGS)
def test_a_wire_setting_with_cr_lf_is_refused_naming_it_not_its_value(env, name):
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]))
    env(**{name: "value-SECRET-5" + INJECTED})
    found = problems()
    assert found == [f"{name}: {CONTROL}"]
    assert not any("SECRET-5" in p or "DELETE" in p for p in found)


@pytest.mark.parametrize("char", ["\r\n", "\r", "\n", "\x00", "\x01", "\t", "\x1b", "\x1f", "\x7f"])
def test_every_control_character_is_refused_from_any_source(env, secrets, char):
    secrets("mail-syncer/destination", DESTINATION | {"OUTLOOK_USER": f"me@outlook.test{char}X1 DELETE INBOX"})
    routes = [ROUTE, {**ROUTE, "name": "home", "outlook_folder": f"Home{char}X1 DELETE INBOX"}]
    env(AWS_SECRETS_MANAGER_SECRET_IDS="mail-syncer/destination", SYNC_ROUTES_JSON=json.dumps(routes))
    assert problems() == [f"OUTLOOK_USER: {CONTROL}"]
    secrets("mail-syncer/fixed", {"OUTLOOK_USER": "me@outlook.test"})
    env(AWS_SECRETS_MANAGER_SECRET_IDS="mail-syncer/destination,mail-syncer/fixed")
    assert problems() == [f"SYNC_ROUTES_JSON[1].outlook_folder: {CONTROL}"]


@pytest.mark.parametrize("field", WIRE_ROUTE_FIELDS)
def test_a_route_field_with_a_control_character_names_the_route_and_field(env, field):
    routes = [ROUTE, {**ROUTE, "name": "home", field: "value-SECRET-6" + INJECTED}]
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps(routes))
    found = problems()
    assert found == [f"SYNC_ROUTES_JSON[1].{field}: {CONTROL}"]
    assert not any("SECRET-6" in p or "DELETE" in p for p in found)


def test_a_secret_id_with_a_control_character_is_refused_before_any_request(env, secrets):
    secrets("mail-syncer/destination", DESTINATION)
    env(SYNC_ROUTES_JSON=json.dumps([ROUTE]), AWS_SECRETS_MANAGER_SECRET_IDS="mail-syncer/destination" + INJECTED)
    assert problems() == [f"AWS_SECRETS_MANAGER_SECRET_IDS: {CONTROL}"]


def test_auth_commands_settings_refuse_control_characters(env):
    env(MS_CLIENT_ID="ms-client" + INJECTED, MS_TENANT="consumers\x1b")
    with pytest.raises(SettingsInvalid) as caught:
        load_auth_settings()
    assert caught.value.problems == [f"MS_CLIENT_ID: {CONTROL}", f"MS_TENANT: {CONTROL}"]


TOKEN_URI_PROBLEM = (
    "GOOGLE_TOKEN_URI: must be an https:// URL (plain http only to a loopback host: 127.0.0.1, ::1, localhost);"
    " it carries the refresh token and the client secret"
)


@pytest.mark.parametrize(
    "uri",
    [
        "http://oauth2.googleapis.com/token",
        "HTTP://oauth.example.test/token",
        "http://localhost.example.test/token",
        "http://127.0.0.1.example.test/token",
        "http://localhost@oauth.example.test/token",
        "http://127.0.0.1:80@oauth.example.test/token",
        "http://oauth.example.test\\@127.0.0.1/token",  # urllib sees 127.0.0.1, requests oauth.example.test
        "ftp://oauth.example.test/token",
        "oauth2.googleapis.com/token",
        "https:///token",
    ],
)
def test_google_token_uri_over_plain_http_to_another_host_is_refused(env, uri):
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]), GOOGLE_TOKEN_URI=uri)
    assert problems() == [TOKEN_URI_PROBLEM]
    with pytest.raises(SettingsInvalid) as caught:
        load_auth_settings()  # `auth gmail` sends the client secret there too
    assert caught.value.problems == [TOKEN_URI_PROBLEM]


@pytest.mark.parametrize(
    "uri",
    [
        "https://oauth2.googleapis.com/token",
        "https://127.0.0.1:8443/google/token",
        "http://127.0.0.1:8080/google/token",
        "http://[::1]:8080/token",
        "http://localhost/token",
        "http://LOCALHOST:9000/token",
    ],
)
def test_google_token_uri_https_or_loopback_http_is_taken(env, uri):
    env(**DESTINATION, SYNC_ROUTES_JSON=json.dumps([ROUTE]), GOOGLE_TOKEN_URI=uri)
    assert load_settings().google_token_uri == uri
    assert load_auth_settings().google_token_uri == uri
