"""All settings, from the environment, then `.env`, then AWS Secrets Manager (DESIGN.md).

`load_settings()` is the one entry point. It returns a validated `Settings` whose `routes` are
resolved (from `SYNC_ROUTES_JSON`, or the single-route fallback), or raises `SettingsInvalid`
with one line per problem, each naming its place (`SYNC_ROUTES_JSON[1].outlook_folder`,
`GMAIL_IMAP_PORT`, `secret mail-syncer/routes`) and never a value.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import platformdirs
from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from shared.aws import SecretMissing, SecretUnreadable, make_client, read_json_secret
from shared.errors import SettingsInvalid
from shared.message_ref import ROUTE_NAME_PATTERN
from shared.redaction import register_secret

# C0 controls and DEL. Settings are written onto IMAP and HTTP lines: a CR LF in a user, host or
# folder ends the line and starts a command of the setting's choosing (issue 13).
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# IMAP list wildcards can never be part of a folder we create or select.
FOLDER_WILDCARDS = re.compile(r"[*%]")
# Settings that are not written onto a wire as they are: JSON text, which may span lines (its
# routes' fields are checked one by one).
NOT_ON_THE_WIRE = frozenset({"sync_routes_json"})
# How a folder name in the settings names its levels ("Gmail/Work"); the destination's too.
FOLDER_SEPARATOR = "/"
MICROSOFT_AUTHORITY_HOST = "https://login.microsoftonline.com"
# Folder names Outlook.com keeps for itself, compared ignoring case as it compares them: CREATE
# answers "NO Folder name is reserved" (imapsync FAQ.d/FAQ.Office365.txt: "Files", a hidden
# folder of the mailbox's attachments). The only one documented.
RESERVED_OUTLOOK_FOLDERS = frozenset({"files"})
# Outlook.com's largest message: 25 MB (Outlook Live's "Message size limit ... 25 MB",
# http://help.outlook.com/en-au/140/dd630704.aspx; Exchange Online's default for a mailbox,
# https://learn.microsoft.com/office365/servicedescriptions/exchange-online-service-description/exchange-online-limits),
# in Exchange's binary megabytes. Microsoft 365 mailboxes may be set up to 150 MB.
OUTLOOK_MAX_MESSAGE_BYTES = 25 * 1024 * 1024
# IMAP_TIMEOUT's largest value, in seconds: a day.
MAX_IMAP_TIMEOUT_SECONDS = 24 * 60 * 60

Auth = Literal["xoauth2", "password"]


def no_control_characters(value: Any) -> Any:
    """The one check of every setting written onto a wire (text or a secret); never shows it."""
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if isinstance(text, str) and CONTROL_CHARS.search(text):
        raise ValueError("must not contain control characters")
    if isinstance(text, str) and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate ("\ud800" in JSON) passes as text, then raises a raw
            # UnicodeEncodeError when it is written onto a line (found by tests/unit/test_fuzz_settings.py).
            raise ValueError("must be valid Unicode text (it has a lone surrogate)") from None
    return value


def _wire_text(value: Any, info: ValidationInfo) -> Any:
    return value if info.field_name in NOT_ON_THE_WIRE else no_control_characters(value)


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_token_uri(value: str) -> str:
    """A token endpoint gets the refresh token and the client secret: https, or plain http to a
    loopback host (a local stand-in)."""
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if parts.hostname and scheme == "https":
        return value
    # No userinfo or backslash: urllib and requests (urllib3) disagree on the host of
    # "http://evil\\@127.0.0.1/", and requests would send to evil.
    plain_host = "@" not in parts.netloc and "\\" not in parts.netloc
    if parts.hostname and scheme == "http" and plain_host and is_loopback_host(parts.hostname):
        return value
    raise ValueError(
        "must be an https:// URL (plain http only to a loopback host: 127.0.0.1, ::1, localhost);"
        " it carries the refresh token and the client secret"
    )


def validate_folder(value: str) -> str:
    no_control_characters(value)
    if not value or not value.strip():
        raise ValueError("folder name is empty")
    if value != value.strip():
        raise ValueError("folder name has leading or trailing spaces")
    if FOLDER_WILDCARDS.search(value):
        raise ValueError("folder name has '*' or '%' (IMAP list wildcards)")
    parts = value.split(FOLDER_SEPARATOR)
    if any(not part for part in parts):
        raise ValueError(f"folder name has an empty level (separator is {FOLDER_SEPARATOR!r})")
    if len(value.encode("utf-8")) > 255:
        raise ValueError("folder name is longer than 255 bytes")
    return value


class Route(BaseModel):
    """One Gmail folder copied into one folder of the Outlook mailbox."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="unique slug: lower-case letters, digits, '-'")
    gmail_user: str
    gmail_refresh_token: SecretStr | None = None
    gmail_password: SecretStr | None = None
    gmail_folder: str = "INBOX"
    outlook_folder: str
    since: dt.date | None = None
    auth: Auth | None = None
    gmail_imap_host: str | None = None
    gmail_imap_port: int | None = Field(default=None, ge=1, le=65535)
    gmail_imap_ssl: bool | None = None

    # First, so a control character is named as such whatever else the field's check says.
    _wire = field_validator("*")(_wire_text)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not ROUTE_NAME_PATTERN.fullmatch(value):  # fullmatch: "$" would let "work\n" through
            raise ValueError("must be a slug: 1-63 lower-case letters, digits or '-', starting with a letter or digit")
        return value

    @field_validator("gmail_user")
    @classmethod
    def _account(cls, value: str) -> str:
        no_control_characters(value)
        if not value.strip() or any(ch.isspace() for ch in value):
            raise ValueError("must be an account name without spaces")
        return value

    @field_validator("gmail_folder", "outlook_folder")
    @classmethod
    def _folder(cls, value: str) -> str:
        return validate_folder(value)

    @model_validator(mode="after")
    def _credentials(self) -> Route:
        if self.auth is None and self.gmail_refresh_token is None and self.gmail_password is None:
            raise ValueError("needs gmail_refresh_token or gmail_password")
        if self.auth == "xoauth2" and self.gmail_refresh_token is None:
            raise ValueError("auth is xoauth2 but gmail_refresh_token is missing")
        if self.auth == "password" and self.gmail_password is None:
            raise ValueError("auth is password but gmail_password is missing")
        return self

    @property
    def source_auth(self) -> Auth:
        if self.auth:
            return self.auth
        return "xoauth2" if self.gmail_refresh_token is not None or self.gmail_password is None else "password"


@dataclass(frozen=True)
class SettingSource:
    """Where a setting was read, so a value that changes at run time (Microsoft's rotated
    refresh token) can be written back where it came from."""

    kind: Literal["env", "dotenv", "secret", "unset"]
    secret_id: str | None = None  # kind "secret"
    path: Path | None = None  # kind "dotenv"

    def __str__(self) -> str:
        if self.kind == "secret":
            return f"secret {self.secret_id}"
        if self.kind == "dotenv":
            return f"the settings file {self.path}"
        return "the environment" if self.kind == "env" else "nowhere (unset)"


_secret_values: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("secret_values", default={})


class _WireSettings(BaseSettings):
    """Settings read from the environment, .env or secrets: none carries a control character."""

    _wire = field_validator("*")(_wire_text)


class Settings(_WireSettings):
    """Every setting of DESIGN.md's Configuration. Names are the upper-case env var names."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        case_sensitive=False,
        # `GMAIL_CLIENT_SECRET=` (as .env.example has it) means unset, not an empty secret.
        env_ignore_empty=True,
        validate_default=True,
    )

    # Routes: SYNC_ROUTES_JSON, or the single-route fallback below it.
    sync_routes_json: str | None = None
    route_name: str = "default"
    gmail_user: str | None = None
    gmail_refresh_token: SecretStr | None = None
    gmail_password: SecretStr | None = None
    gmail_folder: str = "INBOX"
    outlook_folder: str | None = None
    since: dt.date | None = None

    # The destination mailbox.
    outlook_user: str | None = None
    ms_client_id: str | None = None
    ms_client_secret: SecretStr | None = None
    ms_refresh_token: SecretStr | None = None
    ms_tenant: str = "consumers"
    outlook_password: SecretStr | None = None

    # The Gmail OAuth client.
    gmail_client_id: str | None = None
    gmail_client_secret: SecretStr | None = None

    # Endpoints: real services by default, local servers in tests.
    gmail_imap_host: str = "imap.gmail.com"
    gmail_imap_port: int = Field(default=993, ge=1, le=65535)
    gmail_imap_ssl: bool = True
    outlook_imap_host: str = "outlook.office365.com"
    outlook_imap_port: int = Field(default=993, ge=1, le=65535)
    outlook_imap_ssl: bool = True
    imap_ca_bundle: Path | None = None
    # Extra trusted CAs (PEM) for the token endpoints, as requests reads it from the environment;
    # accepted in .env too (a proxy that re-signs TLS needs it for every call).
    requests_ca_bundle: Path | None = None
    # At most a day: a socket's timeout must fit the platform's time_t, and "inf" or 1e10 raised
    # a raw OverflowError at every connect (found by tests/unit/test_fuzz_settings.py).
    imap_timeout: float = Field(default=60.0, gt=0, le=MAX_IMAP_TIMEOUT_SECONDS)
    google_token_uri: str = "https://oauth2.googleapis.com/token"
    # Where `auth gmail` sends the browser for consent.
    google_auth_uri: str = "https://accounts.google.com/o/oauth2/auth"
    ms_authority: str | None = None

    # Where a route starts when it has no watermark.
    fallback_since_days: int = Field(default=7, ge=0)
    # References one scan sends per route, so a backlog of 100k spreads over several runs.
    max_enqueue_per_run: int = Field(default=1000, ge=1)
    # How long a local process's claim on a UID lasts (a Lambda's follows its remaining time); it
    # must outlast copying one message. Tests of killed runs use a few seconds.
    lease_seconds: int = Field(default=300, ge=1, le=43200)

    # Secrets Manager: comma-separated secret ids, each a JSON object merged in below env and .env.
    aws_secrets_manager_secret_ids: str | None = None

    # Backends: DynamoDB and SQS when named, else SQLite files.
    state_table: str | None = None
    state_db: Path | None = None
    queue_url: str | None = None
    dlq_url: str | None = None
    aws_endpoint_url: str | None = None
    aws_region: str | None = None
    # IMAP sessions one process keeps open to one Gmail account, shared by all its routes. Gmail
    # allows 15 per account (support.google.com/mail/answer/97150), the user's own mail apps
    # included: the default leaves them five.
    gmail_max_connections: int = Field(default=10, ge=1, le=15)
    # IMAP sessions one process opens to the Outlook mailbox at once: `drain` copies the routes
    # of that many Gmail accounts in parallel, one destination session each. Exchange Online
    # allows 20 concurrent IMAP connections a mailbox (learn.microsoft.com, "Exchange Online
    # limits"), the user's own apps and the Lambda consumers included; Outlook.com throttles
    # a mailbox's sessions together: the default is small.
    outlook_max_connections: int = Field(default=4, ge=1, le=20)
    # `drain --watch`: each IDLE is ended and issued again this often. RFC 2177 advises at least
    # every 29 minutes (the limit here); servers and NAT boxes drop quiet sessions sooner (Gmail
    # within about 10 to 29 minutes, some NAT boxes in under 5), so the default is 4 minutes.
    watch_reidle_seconds: float = Field(default=240.0, gt=0, le=29 * 60)
    # `drain --watch`: every route is scanned this often even without news from IDLE, which can
    # miss a change (a notification lost with its connection).
    watch_rescan_seconds: float = Field(default=300.0, gt=0, le=24 * 60 * 60)
    # Megabytes (10^6 bytes) downloaded from one Gmail account in any 24 hours, by every process
    # and route. Gmail allows 2,500 MB a day over IMAP (support.google.com/a/answer/1071518), the
    # user's own mail apps included: the default leaves them 500.
    gmail_daily_download_mb: int = Field(default=2000, ge=1, le=2500)
    # A message's own failed attempts before it is moved to the dead letters (throttles and waits
    # behind another message do not count).
    max_attempts: int = Field(default=5, ge=1, le=100)
    # The local queue's safety net: deliveries of one message before it is dead-lettered whatever
    # happened (as SQS's maxReceiveCount). Well above MAX_ATTEMPTS: a throttle or a wait behind
    # another message costs a delivery, never an attempt.
    max_receive_count: int = Field(default=100, ge=1, le=1000)
    # The destination's largest message, in bytes: a larger one (by the source's RFC822.SIZE)
    # is skipped as too large before it is downloaded.
    max_message_bytes: int = Field(default=OUTLOOK_MAX_MESSAGE_BYTES, ge=1024, le=2**40)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The CLI's log lines on stderr: "text" for a person, "json" (one object a line) for a log
    # collector; `--log-format` overrides it.
    log_format: Literal["text", "json"] = "text"

    _routes: list[Route] = PrivateAttr(default_factory=list)
    # Provenance (see source_of): the .env file read, and the secret each secret-borne setting came from.
    _dotenv_path: Path | None = PrivateAttr(default=None)
    _secret_sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: explicit env vars beat .env, which beats Secrets Manager.
        secrets = InitSettingsSource(settings_cls, init_kwargs=dict(_secret_values.get()))
        return init_settings, env_settings, dotenv_settings, secrets

    @field_validator("gmail_folder", "outlook_folder")
    @classmethod
    def _folder(cls, value: str | None) -> str | None:
        return None if value is None else validate_folder(value)

    @field_validator("google_token_uri")
    @classmethod
    def _token_uri(cls, value: str) -> str:
        return validate_token_uri(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @property
    def routes(self) -> list[Route]:
        return self._routes

    @property
    def state_db_path(self) -> Path:
        if self.state_db is not None:
            return self.state_db.expanduser()
        return Path(platformdirs.user_state_dir("mail_syncer")) / "state.db"

    @property
    def token_dir(self) -> Path:
        """Where a rotated refresh token configured in the environment or .env is kept: beside
        the state database, in a directory of its own (never in the state store itself)."""
        db = self.state_db_path
        return db.with_name(f"{db.stem}-tokens")

    @property
    def ms_authority_url(self) -> str:
        return microsoft_authority(self.ms_tenant, self.ms_authority)

    def source_of(self, name: str) -> SettingSource:
        """Where the value of setting `name` (e.g. "ms_refresh_token") was read, in the order
        the sources are read: the environment, then the .env file, then Secrets Manager."""
        name = name.lower()
        if any(key.lower() == name and value for key, value in os.environ.items()):
            return SettingSource("env")
        if self._dotenv_path is not None and self._dotenv_path.is_file():
            values = dotenv_values(self._dotenv_path)
            if any(key.lower() == name and value for key, value in values.items()):
                return SettingSource("dotenv", path=self._dotenv_path)
        if name in self._secret_sources:
            return SettingSource("secret", secret_id=self._secret_sources[name])
        return SettingSource("unset")


def microsoft_authority(tenant: str, override: str | None) -> str:
    """The authority msal signs in at: MS_AUTHORITY when set (a local stand-in), else the tenant's."""
    return (override or f"{MICROSOFT_AUTHORITY_HOST}/{tenant}").rstrip("/")


def reveal(secret: SecretStr | None) -> str | None:
    """A secret's value for the one call that needs it (a client library), never for a message."""
    return None if secret is None else secret.get_secret_value()


def load_settings(env_file: str | Path | None = ".env", *, secrets_client: Any = None) -> Settings:
    """Read and validate every setting. Raises SettingsInvalid with one line per problem."""
    try:
        location = _SecretsLocation(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise SettingsInvalid(_problems(exc, place_of=_env_name)) from None
    secret_sources: dict[str, str] = {}
    secret_values = _read_secrets(location, secrets_client, secret_sources)
    token = _secret_values.set(secret_values)
    try:
        settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise SettingsInvalid(_problems(exc, place_of=_env_name, unknown="unknown setting in .env")) from None
    finally:
        _secret_values.reset(token)
    settings._dotenv_path = None if env_file is None else Path(env_file).absolute()
    settings._secret_sources = secret_sources
    # Every problem at once: a newcomer with an empty .env learns all that is missing in one run.
    problems: list[str] = []
    for check in (_set_routes, _check_credentials, _check_limits):
        try:
            check(settings)
        except SettingsInvalid as exc:
            problems += exc.problems
    if problems:
        raise SettingsInvalid(problems)
    _register_secrets(settings)
    return settings


def _set_routes(settings: Settings) -> None:
    settings._routes = _routes_of(settings)


class AuthSettings(_WireSettings):
    """What `auth gmail` and `auth microsoft` read (env, then .env): the OAuth clients, the
    endpoints, and AWS for --write-secret-id. Nothing else is needed yet when a person runs
    them, before the routes and tokens exist."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True)

    gmail_client_id: str | None = None
    gmail_client_secret: SecretStr | None = None
    google_auth_uri: str = Settings.model_fields["google_auth_uri"].default
    google_token_uri: str = Settings.model_fields["google_token_uri"].default
    ms_client_id: str | None = None
    ms_client_secret: SecretStr | None = None
    ms_tenant: str = "consumers"
    ms_authority: str | None = None
    aws_endpoint_url: str | None = None
    aws_region: str | None = None
    requests_ca_bundle: Path | None = None

    @field_validator("google_token_uri")
    @classmethod
    def _token_uri(cls, value: str) -> str:
        return validate_token_uri(value)


def load_auth_settings(env_file: str | Path | None = ".env") -> AuthSettings:
    try:
        settings = AuthSettings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise SettingsInvalid(_problems(exc, place_of=_env_name)) from None
    if problems := _missing_bundles(settings, "requests_ca_bundle"):
        raise SettingsInvalid(problems)
    return settings


def _missing_bundles(settings: BaseSettings, *names: str) -> list[str]:
    """A problem for each CA-bundle setting of `names` that names no file."""
    bundles = ((name, getattr(settings, name)) for name in names)
    return [f"{name.upper()}: no file at {bundle}" for name, bundle in bundles if bundle is not None and not bundle.is_file()]


def trust_ca_bundle(bundle: Path | None) -> None:
    """REQUESTS_CA_BUNDLE from .env as if it were in the environment, where requests reads it
    (google-auth and msal both call through requests): for this process only."""
    if bundle is not None and not os.environ.get("REQUESTS_CA_BUNDLE"):
        os.environ["REQUESTS_CA_BUNDLE"] = str(bundle)


def missing_env_file(env_file: str | None) -> list[str]:
    """The problem with an --env-file named on the command line that is not there (a typo under
    cron would otherwise run on the environment alone); none for the default .env."""
    if env_file is None or Path(env_file).is_file():
        return []
    return [f"--env-file {env_file}: no such file"]


# -- Secrets Manager ---------------------------------------------------------------------


class _SecretsLocation(_WireSettings):
    """The few settings needed to find the secrets, read before everything else."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    aws_secrets_manager_secret_ids: str | None = None
    aws_endpoint_url: str | None = None
    aws_region: str | None = None


def _read_secrets(location: _SecretsLocation, client: Any, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The merged settings of every secret; `sources` gets the secret id each one came from."""
    ids = [part.strip() for part in (location.aws_secrets_manager_secret_ids or "").split(",") if part.strip()]
    if not ids:
        return {}
    if client is None:
        client = make_client("secretsmanager", location.aws_endpoint_url, location.aws_region)
    merged: dict[str, Any] = {}
    problems: list[str] = []
    for secret_id in ids:
        try:
            values = _read_secret(client, secret_id)
            merged.update(values)
            if sources is not None:
                sources.update(dict.fromkeys(values, secret_id))  # a later secret wins, as in merged
        except SettingsInvalid as exc:
            problems.extend(exc.problems)
    if problems:
        raise SettingsInvalid(problems)
    return merged


def _read_secret(client: Any, secret_id: str) -> dict[str, Any]:
    try:
        _, data = read_json_secret(client, secret_id)
    except SecretMissing:
        raise SettingsInvalid([f"secret {secret_id} (AWS_SECRETS_MANAGER_SECRET_IDS): not found"]) from None
    except SecretUnreadable as exc:
        raise SettingsInvalid([str(exc)]) from None
    place = f"secret {secret_id}"
    fields = Settings.model_fields
    values: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        name = str(key).lower()
        if name not in fields:
            unknown.append(str(key))
            continue
        # Settings are env-style text; a nested list (SYNC_ROUTES_JSON) is kept as its JSON.
        values[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    if unknown:
        raise SettingsInvalid([f"{place}: unknown setting {_shown_key(key)}" for key in sorted(unknown)])
    return values


# -- routes ------------------------------------------------------------------------------


def _routes_of(settings: Settings) -> list[Route]:
    if settings.sync_routes_json is not None:
        routes = _routes_from_json(settings.sync_routes_json)
        places = [f"SYNC_ROUTES_JSON[{index}].outlook_folder" for index in range(len(routes))]
    else:
        routes = [_fallback_route(settings)]
        places = ["OUTLOOK_FOLDER"]
    problems = [
        f"{place}: route {route.name}: {problem}"
        for place, route in zip(places, routes, strict=True)
        if (problem := reserved_folder_problem(route.outlook_folder)) is not None
    ]
    if problems:
        raise SettingsInvalid(problems)
    return routes


def routes_by_account(routes: Iterable[Route]) -> dict[str, list[Route]]:
    """The routes of each Gmail account, in their order: an account's routes share its sessions
    and limits, so they are scanned, watched and copied one after the other."""
    by_account: dict[str, list[Route]] = {}
    for route in routes:
        by_account.setdefault(route.gmail_user, []).append(route)
    return by_account


def reserved_folder_problem(folder: str) -> str | None:
    """Why Outlook.com refuses to create `folder`, or None: a name it reserves, in any case, as
    the folder or as its top level (created first)."""
    if folder.split(FOLDER_SEPARATOR, 1)[0].casefold() in RESERVED_OUTLOOK_FOLDERS:
        reserved = ", ".join(sorted(name.capitalize() for name in RESERVED_OUTLOOK_FOLDERS))
        return f"a folder name Outlook.com reserves ({reserved}); choose another"
    return None


def _routes_from_json(raw: str) -> list[Route]:
    place = "SYNC_ROUTES_JSON"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise SettingsInvalid([f"{place}: not valid JSON ({exc})"]) from None
    if not isinstance(data, list) or not data:
        raise SettingsInvalid([f"{place}: must be a non-empty JSON list of routes"])
    try:
        routes = TypeAdapter(list[Route]).validate_python(data)
    except ValidationError as exc:
        raise SettingsInvalid(_problems(exc, place_of=lambda loc: _json_place(place, loc))) from None
    problems = []
    seen: set[str] = set()
    for index, route in enumerate(routes):
        if route.name in seen:
            problems.append(f"{place}[{index}].name: duplicate route name {route.name!r}")
        seen.add(route.name)
    if problems:
        raise SettingsInvalid(problems)
    return routes


def _fallback_route(settings: Settings) -> Route:
    missing = [
        f"{name}: required when SYNC_ROUTES_JSON is unset{what}"
        for name, value, what in (
            ("GMAIL_USER", settings.gmail_user, " (the Gmail address to copy from)"),
            ("OUTLOOK_FOLDER", settings.outlook_folder, " (the Outlook folder to copy into)"),
        )
        if not value
    ]
    if missing and settings.gmail_refresh_token is None and settings.gmail_password is None:
        missing.append("GMAIL_REFRESH_TOKEN: required (or GMAIL_PASSWORD for a password login)")
    if missing:
        raise SettingsInvalid(missing)
    fields = {
        "name": settings.route_name,
        "gmail_user": settings.gmail_user,
        "gmail_refresh_token": settings.gmail_refresh_token,
        "gmail_password": settings.gmail_password,
        "gmail_folder": settings.gmail_folder,
        "outlook_folder": settings.outlook_folder,
        "since": settings.since,
    }
    try:
        return Route(**fields)
    except ValidationError as exc:
        names = {"name": "ROUTE_NAME"}

        def place(loc: tuple) -> str:
            if loc:
                return names.get(str(loc[0]), str(loc[0]).upper())
            return "GMAIL_REFRESH_TOKEN / GMAIL_PASSWORD"

        raise SettingsInvalid(_problems(exc, place_of=place)) from None


def _check_limits(settings: Settings) -> None:
    # A message larger than a day's budget could never be downloaded: it would wait forever.
    if settings.gmail_daily_download_mb * 1_000_000 < settings.max_message_bytes:
        raise SettingsInvalid(
            [
                f"GMAIL_DAILY_DOWNLOAD_MB: {settings.gmail_daily_download_mb} MB a day is less than one message of"
                f" MAX_MESSAGE_BYTES ({settings.max_message_bytes} bytes)"
            ]
        )


def _check_credentials(settings: Settings) -> None:
    problems = []
    if any(route.source_auth == "xoauth2" for route in settings.routes):
        users = ", ".join(r.name for r in settings.routes if r.source_auth == "xoauth2")
        for name in ("gmail_client_id", "gmail_client_secret"):
            if getattr(settings, name) is None:
                problems.append(f"{name.upper()}: required for XOAUTH2 on route {users}")
    if not settings.outlook_user:
        problems.append("OUTLOOK_USER: required (the destination mailbox)")
    if settings.ms_refresh_token is None and settings.outlook_password is None:
        problems.append("MS_REFRESH_TOKEN: required (or OUTLOOK_PASSWORD for a password login)")
    if settings.ms_refresh_token is not None and not settings.ms_client_id:
        problems.append("MS_CLIENT_ID: required with MS_REFRESH_TOKEN")
    if settings.ms_refresh_token is not None and not settings.ms_authority_url.startswith("https://"):
        problems.append("MS_AUTHORITY: must be an https:// URL (msal refuses plain http)")
    problems += _missing_bundles(settings, "imap_ca_bundle", "requests_ca_bundle")
    if problems:
        raise SettingsInvalid(problems)


def _register_secrets(settings: Settings) -> None:
    values: Iterable[SecretStr | None] = [
        settings.gmail_refresh_token,
        settings.gmail_password,
        settings.ms_client_secret,
        settings.ms_refresh_token,
        settings.outlook_password,
        settings.gmail_client_secret,
    ]
    for route in settings.routes:
        values = [*values, route.gmail_refresh_token, route.gmail_password]
    for secret in values:
        if secret is not None:
            register_secret(secret.get_secret_value())


# -- error text --------------------------------------------------------------------------


def _problems(exc: ValidationError, *, place_of, unknown: str = "unknown key") -> list[str]:
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"{place_of(loc)}: {unknown}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{place_of(loc)}: {message}")
    return problems


def _env_name(loc: tuple) -> str:
    return _shown_key(str(loc[0]).upper()) if loc else "settings"


def _json_place(root: str, loc: tuple) -> str:
    place = root
    for part in loc:
        place += f"[{part}]" if isinstance(part, int) else f".{_shown_key(part)}"
    return place


# A key is shown only when it looks like a name: a token pasted where a key belongs is a value,
# and none of the input's secrets are registered for scrubbing until it is valid.
_SHOWABLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _shown_key(key: object) -> str:
    text = str(key)
    return text if _SHOWABLE_KEY.fullmatch(text) else "(a key that is not a name, not shown)"
