"""Opening an authenticated IMAP session to a named account.

TLS is always verified (system CAs plus `IMAP_CA_BUNDLE`). XOAUTH2 uses the account's token
source; LOGIN is used when the account has a password instead. Every failure is an
`ImapFailure` that says which account, which server and which step, and never the token; one
that may pass is a `TransientImapFailure` (tried again here under `retry.SESSION`, and by
`shared.mailbox.connections` for commands), one where the server asked for a pause an `ImapThrottled`.

A timeout (`ImapTimedOut`: an IMAP server or a token endpoint that accepted the connection and
did not answer) is counted against its endpoint (`ENDPOINTS`), for the whole process: it is tried
again on a new connection until the endpoint has timed out `retry.ENDPOINT_DOWN_AFTER` times in a
row, and then raises `ImapEndpointDown`, which pauses the mailbox instead of failing the message.
"""

from __future__ import annotations

import functools
import imaplib
import ipaddress
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import imapclient
import imapclient.exceptions
from pydantic import SecretStr

from shared.errors import ImapFailure, TokenRefreshFailed, shorten
from shared.mailbox import retry
from shared.mailbox.port import DownloadQuotaSpent, EndpointDown, MailboxThrottled
from shared.redaction import scrub
from shared.tokens.sources import TokenEndpointTimedOut, TokenEndpointUntrusted, TokenSource


class TransientImapFailure(ImapFailure):
    """The step failed in a way that may pass: the connection was refused, reset or closed, it
    timed out, or the server answered [UNAVAILABLE]. Worth another try on a new session."""


class ImapTimedOut(TransientImapFailure):
    """No answer in time from `endpoint` ("host:port", or a token endpoint's URL; None when the
    adapter raising it does not know, and the caller fills it in) within `timeout` seconds."""

    def __init__(self, message: str, *, step: str, endpoint: str | None = None, timeout: float | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        super().__init__(message, step=step)


class ImapEndpointDown(EndpointDown, ImapFailure):
    """An endpoint a mailbox needs timed out retry.ENDPOINT_DOWN_AFTER times in a row."""

    def __init__(self, message: str, *, step: str, endpoint: str):
        super().__init__(message, endpoint=endpoint, retry_after=retry.ENDPOINT_DOWN_PAUSE_SECONDS, step=step)


class EndpointWatch:
    """Each endpoint's timeouts in a row, shared by every session and route of the process (a warm
    Lambda's too): one endpoint's outage is noticed once, not once per message."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_a_row: dict[str, int] = {}

    def answered(self, endpoint: str) -> None:
        with self._lock:
            self._in_a_row.pop(endpoint, None)

    def timed_out(self, label: str, failure: ImapTimedOut, *, endpoint: str, timeout: float) -> ImapFailure:
        """Count `failure` against `endpoint`: `failure` itself, or, from the
        ENDPOINT_DOWN_AFTER-th timeout in a row on, an ImapEndpointDown naming the endpoint."""
        endpoint, timeout = failure.endpoint or endpoint, failure.timeout or timeout
        with self._lock:
            count = self._in_a_row[endpoint] = self._in_a_row.get(endpoint, 0) + 1
        if count < retry.ENDPOINT_DOWN_AFTER:
            return failure
        kind = "token endpoint" if "://" in endpoint else "IMAP server"
        return ImapEndpointDown(
            scrub(f"{label}: {kind} {endpoint} not answering: {count} tries in a row got no answer within {timeout:g} s"),
            step=failure.step,
            endpoint=endpoint,
        )


ENDPOINTS = EndpointWatch()


class ImapThrottled(MailboxThrottled, ImapFailure):
    """A throttle met at an IMAP step: the port's MailboxThrottled, with the step it was met at."""

    def __init__(self, message: str, *, step: str, retry_after: float):
        super().__init__(message, retry_after=retry_after, step=step)


class ImapQuotaSpent(DownloadQuotaSpent, ImapThrottled):
    """Gmail's [OVERQUOTA], met at an IMAP step."""


def classified_failure(message: str, *, step: str, cause: BaseException | None) -> ImapFailure:
    """An ImapFailure, or the subclass that says how soon trying again makes sense."""
    if isinstance(cause, imaplib.IMAP4.error):
        wait = retry.throttle_wait(str(cause))
        if wait is not None:
            spent = retry.says_quota_spent(str(cause))
            return (ImapQuotaSpent if spent else ImapThrottled)(message, step=step, retry_after=wait)
    if cause is not None and retry.is_timeout(cause):
        return ImapTimedOut(message, step=step)
    if cause is not None and retry.is_transient(cause):
        return TransientImapFailure(message, step=step)
    return ImapFailure(message, step=step)


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


@functools.lru_cache(maxsize=8)
def tls_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """One context per CA bundle, shared by every session (an SSLContext may wrap sockets from
    several threads): loading the system's CAs took 25 ms of CPU a session."""
    context = ssl.create_default_context()
    if ca_bundle is not None:
        # Added to the system CAs, not instead of them; verification stays on.
        context.load_verify_locations(cafile=str(ca_bundle))
    return context


def open_session(account: ImapAccount) -> imapclient.IMAPClient:
    """Connect, secure and log in, on a new connection again (retry.SESSION) while the failure
    is transient; after a timeout, until its endpoint is found down (ImapEndpointDown). The
    caller logs out (or uses it as a context manager)."""
    try:
        return retry.call(
            retry.SESSION,
            lambda: _open_once(account),
            retry_on=lambda error: isinstance(error, TransientImapFailure),
            what=f"{account.label} at {account.endpoint}: opening a session",
            # However long IMAP_TIMEOUT is: the endpoint's watch ends a run of timeouts.
            bounded_elsewhere=lambda error: isinstance(error, ImapTimedOut),
        )
    except TransientImapFailure as exc:
        # Tried enough: a caller that retries whole commands must not start this over again.
        raise ImapFailure(str(exc), step=exc.step) from None


def timeout_counted(account: ImapAccount, failure: ImapTimedOut) -> ImapFailure:
    """`failure`, counted against its endpoint (the account's IMAP server unless it names
    another): itself, or ImapEndpointDown once the endpoint is taken to be down."""
    endpoint = account.endpoint
    return ENDPOINTS.timed_out(account.label, failure, endpoint=str(endpoint), timeout=endpoint.timeout)


def _open_once(account: ImapAccount) -> imapclient.IMAPClient:
    try:
        client = _connect(account)
        try:
            _login(client, account)
            _keep_capabilities(client, account)
        except BaseException:
            close_quietly(client)
            raise
    except ImapTimedOut as exc:
        raise timeout_counted(account, exc) from None
    ENDPOINTS.answered(str(account.endpoint))
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
        raise _failure(account, "connect", _describe(exc), cause=exc) from None
    _read_literals_in_chunks(client)
    if endpoint.ssl:
        return client
    try:
        if b"STARTTLS" in client.capabilities():
            client.starttls(context)
        elif not _is_loopback(endpoint.host):
            raise _failure(account, "STARTTLS", "the server does not offer STARTTLS; refusing to log in without TLS")
    except ssl.SSLCertVerificationError as exc:
        close_quietly(client)
        raise _failure(account, "TLS verification", exc.verify_message or str(exc)) from None
    except (OSError, imapclient.exceptions.IMAPClientError) as exc:
        close_quietly(client)
        raise _failure(account, "STARTTLS", _describe(exc), cause=exc) from None
    except ImapFailure:
        close_quietly(client)
        raise
    return client


# How much of a literal is asked of the socket at a time.
LITERAL_READ_CHUNK = 1 << 20


def _read_literals_in_chunks(client: imapclient.IMAPClient) -> None:
    """imaplib before CPython's fix (gh-119511; this venv's 3.11 lacks it) reads a literal with
    one file.read(size), which allocates `size` up front: a server announcing {10**20} made every
    FETCH raise a raw OverflowError, {2**62} a MemoryError, before a byte had come (found by
    tests/integration/test_fuzz_imap_replies.py). Read in chunks, as the fix does, memory follows
    what arrives, and a literal cut short ends in imaplib's own error at the next line. The
    greeting and the first CAPABILITY are read before this is in place."""
    imap = client._imap

    def read(size: int) -> bytes:
        chunks, left = [], size
        while left > 0:
            chunk = imap.file.read(min(left, LITERAL_READ_CHUNK))  # the file STARTTLS puts in place too
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    imap.read = read


def _login(client: imapclient.IMAPClient, account: ImapAccount) -> None:
    if account.token_source is None:
        if account.password is None:
            raise _failure(account, "login", "no refresh token and no password configured")
        try:
            client.login(account.user, account.password.get_secret_value())
        except (OSError, imapclient.exceptions.IMAPClientError) as exc:
            raise _failure(account, "login", _describe(exc), cause=exc) from None
        return
    try:
        _xoauth2(client, account)
    except imapclient.exceptions.LoginError as refused:
        if retry.is_timeout(refused):
            # The server stopped answering, not a refusal: no fresh token, no second try here.
            raise _failure(account, "XOAUTH2 login", _describe(refused), cause=refused) from None
        if retry.throttle_wait(str(refused)) is not None:
            # Gmail's "[ALERT] Too many simultaneous connections": the token is fine; the account
            # has no session to spare. Waited out as a throttle, never answered with a refresh.
            raise _failure(account, "XOAUTH2 login", _describe(refused), cause=refused) from None
        # A cached token may have been revoked early: one more try with a freshly refreshed one.
        account.token_source.invalidate()
        try:
            _xoauth2(client, account)
        except (OSError, imapclient.exceptions.IMAPClientError) as exc:
            raise _failure(account, "XOAUTH2 login", _describe(exc), cause=exc) from None
    except (OSError, imapclient.exceptions.IMAPClientError) as exc:
        raise _failure(account, "XOAUTH2 login", _describe(exc), cause=exc) from None


def _keep_capabilities(client: imapclient.IMAPClient, account: ImapAccount) -> None:
    """Keep the capabilities the login's answer carried (Gmail sends them with it). imaplib
    forgets that answer at the first SELECT or EXAMINE, and asking after it costs a round trip
    before the first FETCH or APPEND. A server that sent none (Dovecot here, Exchange) is asked
    now: the question was coming anyway."""
    try:
        client.capabilities()
    except (OSError, imapclient.exceptions.IMAPClientError) as exc:
        raise _failure(account, "capability", _describe(exc), cause=exc) from None


def _xoauth2(client: imapclient.IMAPClient, account: ImapAccount) -> None:
    assert account.token_source is not None
    try:
        token = account.token_source.access_token()
    except TokenEndpointTimedOut as exc:
        message = f"{account.label}: token refresh failed: {exc}"
        raise ImapTimedOut(message, step="token", endpoint=exc.endpoint, timeout=exc.timeout) from None
    except TokenRefreshFailed as exc:
        message = f"{account.label}: token refresh failed: {exc}"
        if exc.refused or isinstance(exc, TokenEndpointUntrusted):
            raise ImapFailure(message, step="token") from None
        raise TransientImapFailure(message, step="token") from None  # the endpoint may be back soon
    token_endpoint = getattr(account.token_source, "endpoint", None)
    if token_endpoint:
        ENDPOINTS.answered(token_endpoint)
    client.oauth2_login(account.user, token)


def _failure(account: ImapAccount, step: str, detail: str, *, cause: BaseException | None = None) -> ImapFailure:
    message = scrub(f"{account.label} at {account.endpoint}: {step} failed: {detail}")
    return classified_failure(message, step=step, cause=cause)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror})"
    text = str(exc).strip() or type(exc).__name__
    # imaplib puts the server's bytes into its errors: show the text, not b'...'.
    if len(exc.args) == 1 and isinstance(exc.args[0], bytes):
        text = exc.args[0].decode("utf-8", "replace").strip() or text
    elif (quoted := re.fullmatch(r"b(['\"])(.*)\1", text)) is not None:
        text = quoted.group(2)
    return shorten(text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def close_quietly(client: imapclient.IMAPClient) -> None:
    """Shut a session's socket without a LOGOUT: for a session being abandoned after a failure."""
    try:
        client.shutdown()
    except Exception:  # noqa: BLE001 - the session is being abandoned anyway
        pass
