"""Fuzz: the settings that reach the wire (issue 13, item 11, after item 8). Random users, hosts,
folders, tenants, token URIs and numbers, from the environment and inside SYNC_ROUTES_JSON: each
run of `load_settings` either gives settings a connection can be made with (no control
character in anything written onto a line, numbers in their ranges, a token endpoint over TLS or
on this machine), or SettingsInvalid whose every line starts with the place that is wrong (one of
the settings changed) and quotes no value. Never another exception.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from unittest import mock
from urllib.parse import urlsplit

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from shared.errors import SettingsInvalid
from shared.settings import CONTROL_CHARS, FOLDER_SEPARATOR, Settings, is_loopback_host, load_settings
from tests.harness.fuzz import counted

# A marker inside values: no problem line may quote it. Accepted secrets are registered for
# scrubbing for the whole process, so secrets are only ever this fixed value or it made invalid.
SECRET = "fuzz-SECRET-5e1d"
DESTINATION = {
    "OUTLOOK_USER": "me@outlook.test",
    "MS_CLIENT_ID": "ms-client",
    "MS_REFRESH_TOKEN": SECRET,
    "GMAIL_CLIENT_ID": "g-client",
    "GMAIL_CLIENT_SECRET": SECRET,
}
ROUTE = {"name": "work", "gmail_user": "alice@gmail.test", "gmail_refresh_token": SECRET, "outlook_folder": "Work"}
INJECTED = "\r\nX1 DELETE INBOX"  # the red team's second line

# What a process environment can hold: no NUL, no lone surrogate (os.environ cannot encode them).
env_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
# JSON can carry anything, NUL and lone surrogates included (as \u escapes).
json_text = st.text(max_size=30)


# Control characters (and two line ends that are not C0 controls); NUL only where JSON carries it.
ENV_CONTROLS = [INJECTED, "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\u2028"]
JSON_CONTROLS = [*ENV_CONTROLS, "\x00", "\ud800"]


def near(good: str, text, controls: list[str]) -> st.SearchStrategy[str]:
    """`good`, `good` with a control character or the injection in it, or any text."""
    controls = st.sampled_from(controls)
    return st.one_of(
        st.just(good),
        st.tuples(controls, st.integers(0, len(good))).map(lambda cut: good[: cut[1]] + cut[0] + good[cut[1] :]),
        text.map(lambda t: t + SECRET),
        text,
    )


def numbers(text) -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.floats().map(str),  # inf, nan, 1e+300 ...
        st.sampled_from(["0", "1", "65535", "65536", "43200", "43201", "1e3", " 993", "0x3e1", "1_000", "+5", "-0"]),
        text,
    )


WIRE_ENV = {
    name: near(good, env_text, ENV_CONTROLS)
    for name, good in {
        "OUTLOOK_USER": "me@outlook.test",
        "GMAIL_IMAP_HOST": "imap.gmail.com",
        "OUTLOOK_IMAP_HOST": "outlook.office365.com",
        "MS_CLIENT_ID": "ms-client",
        "GMAIL_CLIENT_ID": "g-client",
        "MS_TENANT": "consumers",
        "MS_AUTHORITY": "https://login.microsoftonline.com/consumers",
        "GOOGLE_TOKEN_URI": "https://oauth2.googleapis.com/token",
        "GOOGLE_AUTH_URI": "https://accounts.google.com/o/oauth2/auth",
        "OUTLOOK_FOLDER": "Gmail/Work",
        "GMAIL_FOLDER": "INBOX",
    }.items()
}
WIRE_ENV["GOOGLE_TOKEN_URI"] = st.one_of(
    WIRE_ENV["GOOGLE_TOKEN_URI"],
    st.builds(
        "{}://{}{}/token".format,
        st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
        st.sampled_from(["127.0.0.1", "localhost", "[::1]", "oauth.example.test", "localhost@evil.test", "evil\\@127.0.0.1"]),
        st.sampled_from(["", ":8080", ":x"]),
    ),
)
NUMBER_ENV = {
    name: numbers(env_text)
    for name in (
        "GMAIL_IMAP_PORT",
        "OUTLOOK_IMAP_PORT",
        "IMAP_TIMEOUT",
        "LEASE_SECONDS",
        "MAX_ATTEMPTS",
        "MAX_RECEIVE_COUNT",
        "GMAIL_MAX_CONNECTIONS",
        "GMAIL_DAILY_DOWNLOAD_MB",
        "MAX_MESSAGE_BYTES",
        "FALLBACK_SINCE_DAYS",
        "MAX_ENQUEUE_PER_RUN",
    )
}
SECRET_ENV = {name: st.sampled_from([SECRET, SECRET + INJECTED, SECRET + "\x1b"]) for name in ("MS_REFRESH_TOKEN", "GMAIL_CLIENT_SECRET")}
ROUTE_FIELDS = {
    "name": near("work", json_text, JSON_CONTROLS),
    "gmail_user": near("alice@gmail.test", json_text, JSON_CONTROLS),
    "gmail_folder": near("[Gmail]/Starred", json_text, JSON_CONTROLS),
    "outlook_folder": near("Work/Starred", json_text, JSON_CONTROLS),
    "gmail_imap_host": near("imap.gmail.com", json_text, JSON_CONTROLS),
    "gmail_imap_port": st.one_of(st.integers(min_value=-(2**40), max_value=2**40), numbers(json_text)),
    "gmail_refresh_token": st.sampled_from([SECRET, SECRET + INJECTED, 12345, None]),
    "auth": st.sampled_from(["xoauth2", "password", "XOAUTH2", None, SECRET]),
}

# The ranges the settings document (Settings' fields, .env.example): what an accepted value is in.
RANGES = {
    "gmail_imap_port": (1, 65535),
    "outlook_imap_port": (1, 65535),
    "lease_seconds": (1, 43200),
    "max_attempts": (1, 100),
    "max_receive_count": (1, 1000),
    "gmail_max_connections": (1, 15),
    "outlook_max_connections": (1, 20),
    "gmail_daily_download_mb": (1, 2500),
    "max_message_bytes": (1024, 2**40),
    "fallback_since_days": (0, math.inf),
    "max_enqueue_per_run": (1, math.inf),
}
# Where a problem line says the problem is: an env name, or a place inside SYNC_ROUTES_JSON.
PLACE = re.compile(r"(?P<name>[A-Z][A-Z0-9_]*)(\[\d+\](\.[a-z_]+)?)?: \S")
WIRE_TEXT = [name for name, field in Settings.model_fields.items() if "str" in str(field.annotation)]


@pytest.fixture(scope="module", autouse=True)
def clean_environment(tmp_path_factory):
    """Only what an example sets: no setting of the machine's, no .env (run from an empty folder)."""
    names = {name.upper() for name in Settings.model_fields} | {"AWS_SECRETS_MANAGER_SECRET_IDS"}
    kept = {name: value for name, value in os.environ.items() if name.upper() not in names}
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("fuzz-settings"))
    try:
        with mock.patch.dict(os.environ, kept, clear=True):
            yield
    finally:
        os.chdir(cwd)


def accepted_or_refused(env: dict[str, str]) -> Settings | SettingsInvalid:
    with mock.patch.dict(os.environ, env):
        try:
            return load_settings(env_file=None)
        except SettingsInvalid as refused:
            return refused


def assert_fit_for_the_wire(loaded: Settings) -> None:
    for name in WIRE_TEXT:
        value = getattr(loaded, name)
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        if isinstance(text, str) and name != "sync_routes_json":
            assert not CONTROL_CHARS.search(text), name
            text.encode("utf-8")  # written onto a line as UTF-8 at the most
    for name, (low, high) in RANGES.items():
        assert low <= getattr(loaded, name) <= high, name
    # Every IMAP connection and token request waits this long at the most.
    assert math.isfinite(loaded.imap_timeout) and loaded.imap_timeout > 0
    with socket.socket() as sock:
        sock.settimeout(loaded.imap_timeout)
    uri = urlsplit(loaded.google_token_uri)
    assert (uri.scheme.lower(), bool(uri.hostname)) == ("https", True) or (
        uri.scheme.lower() == "http" and is_loopback_host(uri.hostname) and "@" not in uri.netloc
    )
    assert loaded.ms_refresh_token is None or loaded.ms_authority_url.startswith("https://")
    for route in loaded.routes:
        for text in (route.name, route.gmail_user, route.gmail_folder, route.outlook_folder, route.gmail_imap_host or ""):
            assert not CONTROL_CHARS.search(text)
            text.encode("utf-8")
        assert not any(ch.isspace() for ch in route.gmail_user)
        for folder in (route.gmail_folder, route.outlook_folder):
            assert folder == folder.strip() and "*" not in folder and "%" not in folder
            assert all(folder.split(FOLDER_SEPARATOR)) and len(folder.encode("utf-8")) <= 255
        assert route.gmail_imap_port is None or 1 <= route.gmail_imap_port <= 65535


def assert_names_a_changed_place(refused: SettingsInvalid, changed: set[str]) -> None:
    assert refused.problems
    places = set()
    for problem in refused.problems:
        place = PLACE.match(problem)
        assert place, problem
        places.add(place.group("name"))
        assert SECRET not in problem and "DELETE" not in problem
    assert places & changed, (refused.problems, changed)


@settings(max_examples=300)
@given(
    env=st.fixed_dictionaries({}, optional={**WIRE_ENV, **NUMBER_ENV, **SECRET_ENV}),
    route=st.fixed_dictionaries({}, optional=ROUTE_FIELDS),
)
@example(env={"IMAP_TIMEOUT": "inf"}, route={})
@example(env={"IMAP_TIMEOUT": "1e10"}, route={})
@example(env={}, route={"gmail_user": "alice\ud800@gmail.test"})
@counted
def test_a_setting_is_fit_for_the_wire_or_refused_naming_its_place(env, route):
    routes_json = json.dumps([{**ROUTE, **route}])
    loaded = accepted_or_refused({**DESTINATION, **env, "SYNC_ROUTES_JSON": routes_json})

    event("accepted" if isinstance(loaded, Settings) else "refused")
    if isinstance(loaded, Settings):
        assert_fit_for_the_wire(loaded)
    else:
        changed = set(env) | ({"SYNC_ROUTES_JSON"} if route else set())
        assert_names_a_changed_place(loaded, changed)
