"""The one place that turns settings into adapters: state store, queue, IMAP accounts.

Handlers and the CLI call `build(settings)` once per process (once per warm Lambda container)
and pass what it returns into the use cases, which never read the environment themselves.
Nothing here opens a connection: the fail-safe gate decides first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from shared.aws import make_client
from shared.imap import ImapAccount, ImapEndpoint
from shared.queue import MessageQueue
from shared.settings import Route, Settings
from shared.state import StateStore
from shared.tokens import GoogleTokenSource, MicrosoftTokenSource, TokenSource


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

        return SqliteQueue(settings.state_db_path, max_receive_count=settings.max_receive_count)

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
        tokens = MicrosoftTokenSource(
            account=settings.outlook_user,
            refresh_token=settings.ms_refresh_token.get_secret_value(),
            client_id=settings.ms_client_id,
            client_secret=_reveal(settings.ms_client_secret),
            authority=settings.ms_authority_url,
        )
        return ImapAccount(label, settings.outlook_user, endpoint, token_source=tokens)

    def close(self) -> None:
        for name in ("state", "queue"):
            adapter = self.__dict__.get(name)  # only those that were built
            if adapter is not None:
                adapter.close()

    def _google_tokens(self, route: Route) -> TokenSource:
        # One source per route, kept for the life of the process so tokens are reused.
        if route.name not in self._token_sources:
            settings = self.settings
            assert route.gmail_refresh_token is not None and settings.gmail_client_id is not None
            self._token_sources[route.name] = GoogleTokenSource(
                account=route.gmail_user,
                refresh_token=route.gmail_refresh_token.get_secret_value(),
                client_id=settings.gmail_client_id,
                client_secret=_reveal(settings.gmail_client_secret) or "",
                token_uri=settings.google_token_uri,
            )
        return self._token_sources[route.name]


def build(settings: Settings) -> App:
    return App(settings)


def _reveal(secret) -> str | None:
    return None if secret is None else secret.get_secret_value()
