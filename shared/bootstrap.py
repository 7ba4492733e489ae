"""The one place that turns settings into adapters: state store, queue, IMAP accounts.

Handlers and the CLI call `build(settings)` once per process (once per warm Lambda container)
and pass what it returns into the use cases, which never read the environment themselves.
Nothing here opens a connection: the fail-safe gate decides first.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from shared import claim_owners
from shared.aws import make_client
from shared.mailbox.connections import MailboxConnections
from shared.mailbox.session import ImapAccount, ImapEndpoint
from shared.pipeline.budget import DownloadBudget
from shared.pipeline.copier import Copier
from shared.pipeline.scan import ScanLimits
from shared.queue import MessageQueue
from shared.settings import Route, Settings, SettingSource, reveal
from shared.state import StateStore
from shared.tokens.health import GOOGLE, MICROSOFT
from shared.tokens.sources import GoogleTokenSource, MicrosoftTokenSource, TokenSource
from shared.tokens.store import (
    PersistedRefreshToken,
    RecordingTokens,
    SecretTokenStore,
    TokenFile,
    TokenStore,
)


@dataclass
class App:
    settings: Settings
    _token_sources: dict[str, TokenSource] = field(default_factory=dict)

    @cached_property
    def state(self) -> StateStore:
        settings = self.settings
        if settings.state_table:
            from shared.state.dynamodb import DynamoStateStore

            client = make_client("dynamodb", settings.aws_endpoint_url, settings.aws_region)
            return DynamoStateStore(settings.state_table, client=client)
        from shared.state.sqlite import SqliteStateStore

        return SqliteStateStore(settings.state_db_path)

    @cached_property
    def queue(self) -> MessageQueue:
        settings = self.settings
        if settings.queue_url:
            from shared.queue.sqs import SqsQueue

            client = make_client("sqs", settings.aws_endpoint_url, settings.aws_region)
            return SqsQueue(settings.queue_url, client=client, dlq_url=settings.dlq_url)
        from shared.queue.sqlite import SqliteQueue

        return SqliteQueue(
            settings.state_db_path,
            max_receive_count=settings.max_receive_count,
            receiver=claim_owners.this_process(),
            receiver_state=claim_owners.holder_state,
        )

    def source_account(self, route: Route) -> ImapAccount:
        settings = self.settings
        endpoint = ImapEndpoint(
            host=route.gmail_imap_host or settings.gmail_imap_host,
            port=route.gmail_imap_port or settings.gmail_imap_port,
            ssl=settings.gmail_imap_ssl if route.gmail_imap_ssl is None else route.gmail_imap_ssl,
            ca_bundle=settings.imap_ca_bundle,
            timeout=settings.imap_timeout,
        )
        label = f"route {route.name} source {route.gmail_user}"
        if route.source_auth == "password":
            return ImapAccount(label, route.gmail_user, endpoint, password=route.gmail_password)
        return ImapAccount(label, route.gmail_user, endpoint, token_source=self._google_tokens(route))

    @cached_property
    def destination_account(self) -> ImapAccount:
        settings = self.settings
        assert settings.outlook_user is not None  # load_settings requires it
        endpoint = ImapEndpoint(
            host=settings.outlook_imap_host,
            port=settings.outlook_imap_port,
            ssl=settings.outlook_imap_ssl,
            ca_bundle=settings.imap_ca_bundle,
            timeout=settings.imap_timeout,
        )
        label = f"destination {settings.outlook_user}"
        if settings.ms_refresh_token is None:
            return ImapAccount(label, settings.outlook_user, endpoint, password=settings.outlook_password)
        assert settings.ms_client_id is not None  # load_settings requires it with a refresh token
        configured = settings.ms_refresh_token.get_secret_value()
        source = settings.source_of("ms_refresh_token")
        tokens = MicrosoftTokenSource(
            account=settings.outlook_user,
            # Microsoft rotates it on every refresh: the newest goes back where it came from.
            refresh_token=PersistedRefreshToken(configured, self._microsoft_token_store(source, configured)),
            client_id=settings.ms_client_id,
            client_secret=reveal(settings.ms_client_secret),
            authority=settings.ms_authority_url,
            timeout=settings.imap_timeout,  # every wait for a server, token endpoints included
            fix=_microsoft_fix(source),
        )
        recording = RecordingTokens(tokens, self.state, provider=MICROSOFT, account=settings.outlook_user, configured=configured)
        return ImapAccount(label, settings.outlook_user, endpoint, token_source=recording)

    def _microsoft_token_store(self, source: SettingSource, configured: str) -> TokenStore:
        settings = self.settings
        if source.kind == "secret":
            assert source.secret_id is not None
            client = make_client("secretsmanager", settings.aws_endpoint_url, settings.aws_region)
            return SecretTokenStore(client, source.secret_id)
        # From the environment or .env, which are not written back: a file of its own keeps it.
        return self.microsoft_token_file()

    def microsoft_token_file(self) -> TokenFile:
        assert self.settings.ms_refresh_token is not None
        return TokenFile(self.settings.token_dir / f"{MICROSOFT}.db", self.settings.ms_refresh_token.get_secret_value())

    @cached_property
    def connections(self) -> MailboxConnections:
        return MailboxConnections(
            self.source_account,
            lambda: self.destination_account,
            sessions_per_source_account=self.settings.gmail_max_connections,
        )

    def copier(self, lease_until: Callable[[], float], owner: str | None = None) -> Copier:
        return Copier(
            state=self.state,
            mailboxes=self.connections,
            routes={route.name: route for route in self.settings.routes},
            owner=owner or claim_owners.this_process(),
            holder_state=claim_owners.holder_state,
            lease_until=lease_until,
            max_message_bytes=self.settings.max_message_bytes,
            max_attempts=self.settings.max_attempts,
            download_budget=self.download_budget(),
        )

    def download_budget(self) -> DownloadBudget:
        return DownloadBudget(self.state, self.settings.gmail_daily_download_mb * 1_000_000)

    def scan_limits(self, today: dt.date | None = None) -> ScanLimits:
        return ScanLimits(
            max_enqueue_per_run=self.settings.max_enqueue_per_run,
            fallback_since_days=self.settings.fallback_since_days,
            today=today or dt.date.today(),
        )

    def close(self, *, abruptly: bool = False) -> None:
        """`abruptly`: sockets closed without a word to the servers (the run was interrupted)."""
        if "connections" in self.__dict__:
            self.connections.close(abruptly=abruptly)
        for name in ("state", "queue"):
            adapter = self.__dict__.get(name)  # only those that were built
            if adapter is not None:
                adapter.close()

    def _google_tokens(self, route: Route) -> TokenSource:
        # One source per route, kept for the life of the process so tokens are reused.
        if route.name not in self._token_sources:
            settings = self.settings
            assert route.gmail_refresh_token is not None and settings.gmail_client_id is not None
            configured = route.gmail_refresh_token.get_secret_value()
            tokens = GoogleTokenSource(
                account=route.gmail_user,
                refresh_token=configured,
                client_id=settings.gmail_client_id,
                client_secret=reveal(settings.gmail_client_secret) or "",
                token_uri=settings.google_token_uri,
                timeout=settings.imap_timeout,
                fix=_google_fix(settings, route),
            )
            self._token_sources[route.name] = RecordingTokens(
                tokens, self.state, provider=GOOGLE, account=route.gmail_user, configured=configured
            )
        return self._token_sources[route.name]


def build(settings: Settings) -> App:
    return App(settings)


@functools.cache
def lambda_app() -> App:
    """The App of this Lambda container: built on the first invocation, reused while warm, so
    IMAP sessions, access tokens and AWS clients outlive one invocation. Settings come from the
    environment and Secrets Manager (no .env in Lambda). Tests start a new container with
    `lambda_app.cache_clear()`."""
    from shared.logs import configure_logging
    from shared.settings import load_settings

    # First without a level: the runtime's handler may be at DEBUG, and botocore's debug
    # lines of the Secrets Manager read would carry every secret in clear.
    configure_logging()
    settings = load_settings(env_file=None)
    configure_logging(settings.log_level)
    return build(settings)


def _microsoft_fix(source: SettingSource) -> str:
    """What a refused Microsoft refresh token's error tells the user to run."""
    if source.kind == "secret":
        return (
            "get a new refresh token with `python -m shared.cli auth microsoft "
            f"--write-secret-id {source.secret_id} --write-secret-key MS_REFRESH_TOKEN` (see README)"
        )
    return f"get a new refresh token with `python -m shared.cli auth microsoft` and set MS_REFRESH_TOKEN in {source}"


def _google_fix(settings: Settings, route: Route) -> str:
    if settings.sync_routes_json is not None:
        where = f"route {route.name}'s gmail_refresh_token in SYNC_ROUTES_JSON ({settings.source_of('sync_routes_json')})"
    else:
        where = f"GMAIL_REFRESH_TOKEN in {settings.source_of('gmail_refresh_token')}"
    return f"get a new refresh token with `python -m shared.cli auth gmail` and put it in {where}"
