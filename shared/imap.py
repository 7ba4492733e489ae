"""Opening an authenticated IMAP session to a named account.

TLS is always verified (system CAs plus `IMAP_CA_BUNDLE`). XOAUTH2 uses the account's token
source; LOGIN is used when the account has a password instead. Every failure is an
`ImapFailure` that says which account, which server and which step, and never the token.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import imapclient
import imapclient.exceptions
from pydantic import SecretStr

from shared.errors import ImapFailure, TokenRefreshFailed
from shared.redaction import scrub
from shared.tokens import TokenSource


@dataclass(frozen=True)
class ImapEndpoint:
    host: str
    port: int
    ssl: bool = True  # implicit TLS; False means STARTTLS (plain text only on loopback)
    ca_bundle: Path | None = None
    timeout: float = 60.0

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ImapAccount:
    label: str  # how messages name it: "route work source alice@gmail.com"
    user: str
    endpoint: ImapEndpoint
    token_source: TokenSource | None = None
    password: SecretStr | None = None


def tls_context(ca_bundle: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_bundle is not None:
        # Added to the system CAs, not instead of them; verification stays on.
        context.load_verify_locations(cafile=str(ca_bundle))
    return context


def open_session(account: ImapAccount) -> imapclient.IMAPClient:
    """Connect, secure and log in. The caller logs out (or uses it as a context manager)."""
    client = _connect(account)
    try:
        _login(client, account)
    except BaseException:
        _close_quietly(client)
        raise
    return client


def _connect(account: ImapAccount) -> imapclient.IMAPClient:
    endpoint = account.endpoint
    context = tls_context(endpoint.ca_bundle)
    try:
        client = imapclient.IMAPClient(
            endpoint.host, port=endpoint.port, ssl=endpoint.ssl, ssl_context=context, timeout=endpoint.timeout
        )
    except ssl.SSLCertVerificationError as exc:
        raise _failure(account, "TLS verification", exc.verify_message or str(exc)) from None
    except (OSError, imapclient.exceptions.IMAPClientError) as exc:
        raise _failure(account, "connect", _describe(exc)) from None
    if endpoint.ssl:
        return client
    try:
        if b"STARTTLS" in client.capabilities():
            client.starttls(context)
        elif not _is_loopback(endpoint.host):
            raise _failure(account, "STARTTLS", "the server does not offer STARTTLS; refusing to log in without TLS")
    except ssl.SSLCertVerificationError as exc:
        _close_quietly(client)
        raise _failure(account, "TLS verification", exc.verify_message or str(exc)) from None
    except (OSError, imapclient.exceptions.IMAPClientError) as exc:
        _close_quietly(client)
        raise _failure(account, "STARTTLS", _describe(exc)) from None
    except ImapFailure:
        _close_quietly(client)
        raise
    return client


def _login(client: imapclient.IMAPClient, account: ImapAccount) -> None:
    if account.token_source is None:
        if account.password is None:
            raise _failure(account, "login", "no refresh token and no password configured")
        try:
            client.login(account.user, account.password.get_secret_value())
        except (OSError, imapclient.exceptions.IMAPClientError) as exc:
            raise _failure(account, "login", _describe(exc)) from None
        return
    try:
        _xoauth2(client, account)
    except imapclient.exceptions.LoginError:
        # A cached token may have been revoked early: one more try with a freshly refreshed one.
        account.token_source.invalidate()
        try:
            _xoauth2(client, account)
        except (OSError, imapclient.exceptions.IMAPClientError) as exc:
            raise _failure(account, "XOAUTH2 login", _describe(exc)) from None
    except (OSError, imapclient.exceptions.IMAPClientError) as exc:
        raise _failure(account, "XOAUTH2 login", _describe(exc)) from None


def _xoauth2(client: imapclient.IMAPClient, account: ImapAccount) -> None:
    assert account.token_source is not None
    try:
        token = account.token_source.access_token()
    except TokenRefreshFailed as exc:
        raise ImapFailure(f"{account.label}: token refresh failed: {exc}", step="token") from None
    client.oauth2_login(account.user, token)


def _failure(account: ImapAccount, step: str, detail: str) -> ImapFailure:
    return ImapFailure(scrub(f"{account.label} at {account.endpoint}: {step} failed: {detail}"), step=step)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror})"
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _close_quietly(client: imapclient.IMAPClient) -> None:
    try:
        client.shutdown()
    except Exception:  # noqa: BLE001 - the session is being abandoned anyway
        pass
