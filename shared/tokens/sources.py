"""OAuth access tokens for XOAUTH2, renewed from refresh tokens by the providers' own libraries.

A `TokenSource` hands out an access token, cached until shortly before it expires, and can be
told to forget it (after a login refused it). Google's refresh runs through google-auth,
Microsoft's through msal; both POST a refresh grant to the configured endpoint, so tests point
them at local stand-ins and the real refresh code runs. Every HTTP call goes through a session of
ours (`http_session`) that waits at most `timeout` seconds for the server, whatever the library
asks for; an endpoint that does not answer in time raises `TokenEndpointTimedOut`.
"""

from __future__ import annotations

import functools
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

from shared.errors import TokenRefreshFailed, brief
from shared.redaction import register_secret, scrub

# google-auth, msal and requests are imported where first used: together they take about as long
# to import as copying a few hundred messages, and a run whose routes all log in with passwords
# never needs them.
if TYPE_CHECKING:
    import msal
    import requests

GOOGLE_SCOPE = "https://mail.google.com/"
# msal adds offline_access, openid and profile itself and refuses them in this list.
MICROSOFT_SCOPES = ["https://outlook.office.com/IMAP.AccessAsUser.All"]
# Renew this long before expiry, so a token never expires between fetch and use.
EXPIRY_MARGIN_SECONDS = 300
# The wait for an answer from a token endpoint unless the wiring sets one (bootstrap: IMAP_TIMEOUT).
HTTP_TIMEOUT_SECONDS = 30


# What a refused token's error says to do, unless the wiring knows better (see bootstrap).
GOOGLE_FIX = "get a new refresh token with `python -m shared.cli auth gmail` (see README)"
MICROSOFT_FIX = "get a new refresh token with `python -m shared.cli auth microsoft` (see README)"


class TokenEndpointUntrusted(TokenRefreshFailed):
    """The token endpoint's TLS certificate was refused: trying again cannot help until the CA
    that signs it is trusted (REQUESTS_CA_BUNDLE)."""


class TokenEndpointTimedOut(TokenRefreshFailed):
    """The token endpoint (`endpoint`, a URL) accepted the connection, or not even that, and gave
    no answer within `timeout` seconds: the endpoint may be down, the token is not in question."""

    def __init__(self, message: str, *, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        super().__init__(message)


@functools.cache
def _timeout_adapter_class() -> type:
    import requests.adapters

    class TimeoutAdapter(requests.adapters.HTTPAdapter):
        """Sends with our timeout, whatever the caller passed (google-auth's own default is 120 s),
        and no hidden retries (msal mounts one by default): a timeout is counted by the caller."""

        def __init__(self, timeout: float) -> None:
            self._timeout = timeout
            super().__init__(max_retries=0)

        def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:
            kwargs["timeout"] = self._timeout
            return super().send(request, **kwargs)

    return TimeoutAdapter


def http_session(timeout: float, session: requests.Session | None = None) -> requests.Session:
    """`session` (a new one by default) with every call waiting at most `timeout` seconds to
    connect and for each read. It trusts REQUESTS_CA_BUNDLE as any requests session does."""
    import requests

    session = session if session is not None else requests.Session()
    adapter = _timeout_adapter_class()(timeout)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def timed_out(error: BaseException) -> bool:
    """Whether an HTTP failure (requests', urllib3's, or google-auth's wrapping them) is a timeout."""
    import requests
    import urllib3.exceptions

    # NewConnectionError derives from ConnectTimeoutError, refused or not (requests checks so too).
    timeouts = (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
    for current in _causes(error, passing_over=urllib3.exceptions.NewConnectionError):
        if isinstance(current, timeouts):
            return True
    return False


def untrusted_certificate(error: BaseException) -> str | None:
    """Why the server's TLS certificate was refused, when that is what an HTTP failure was."""
    for current in _causes(error):
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or str(current)
    return None


def _causes(error: BaseException, passing_over: type[BaseException] | tuple = ()) -> Iterator[BaseException]:
    """`error` and what it wraps: causes, contexts, urllib3's reasons, exceptions in its args;
    neither a `passing_over` one nor what it wraps."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen or isinstance(current, passing_over):
            continue
        seen.add(id(current))
        yield current
        # urllib3's `reason` is an exception or a string (an SSLError's is its text).
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending += [inner for inner in wrapped if isinstance(inner, BaseException)]


def _untrusted(provider: str, account: str, endpoint: str, why: str) -> TokenEndpointUntrusted:
    return TokenEndpointUntrusted(
        scrub(
            f"{provider} token refresh for {account}: the TLS certificate of {endpoint} is not trusted ({why}); "
            "behind a proxy that re-signs TLS, set REQUESTS_CA_BUNDLE (environment or .env) to a PEM file "
            "with its CA"
        )
    )


class TokenSource(Protocol):
    def access_token(self) -> str:
        """A live access token, refreshed when the cached one is near expiry."""

    def invalidate(self) -> None:
        """Forget the cached access token; the next call refreshes."""

    # The sources here also have `endpoint`: the URL a refresh goes to (read with getattr).


class RefreshTokenKeeper(Protocol):
    """Holds the refresh token to redeem next; Microsoft's changes with every refresh."""

    def current(self) -> str: ...

    def rotated(self, used: str, issued: str) -> None:
        """The endpoint answered the refresh of `used` with the new `issued`."""


class InMemoryRefreshToken:
    """The newest refresh token, kept for the life of the process only."""

    def __init__(self, token: str) -> None:
        self._token = token

    def current(self) -> str:
        return self._token

    def rotated(self, used: str, issued: str) -> None:
        self._token = issued


class GoogleTokenSource:
    def __init__(
        self,
        *,
        account: str,
        refresh_token: str,
        client_id: str,
        client_secret: str,
        token_uri: str,
        session: requests.Session | None = None,
        timeout: float = HTTP_TIMEOUT_SECONDS,
        fix: str = GOOGLE_FIX,
    ) -> None:
        self._account = account
        import google.auth.transport.requests
        import google.oauth2.credentials

        self._fix = fix
        self._timeout = timeout
        self._credentials = google.oauth2.credentials.Credentials(
            None,
            refresh_token=refresh_token,
            token_uri=token_uri,
            client_id=client_id,
            client_secret=client_secret,
            scopes=[GOOGLE_SCOPE],
        )
        self._request = google.auth.transport.requests.Request(http_session(timeout, session))
        self._token_uri = self.endpoint = token_uri
        self._lock = threading.Lock()
        for secret in (refresh_token, client_secret):
            register_secret(secret)

    def access_token(self) -> str:
        with self._lock:
            # google-auth's `valid` already allows a margin (REFRESH_THRESHOLD) before expiry.
            if not self._credentials.valid:
                self._refresh()
            return self._credentials.token

    def invalidate(self) -> None:
        with self._lock:
            self._credentials.token = None

    def _refresh(self) -> None:
        import google.auth.exceptions

        try:
            self._credentials.refresh(self._request)
        except google.auth.exceptions.RefreshError as exc:
            data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
            error = data.get("error", "")
            detail = data.get("error_description") or (str(exc.args[0]) if exc.args else "")
            refused = error == "invalid_grant"
            text = f"Google token refresh for {self._account} refused by {self._token_uri}: {error} {detail}".strip()
            raise TokenRefreshFailed(scrub(_with_fix(text, self._fix if refused else None)), refused=refused) from None
        except google.auth.exceptions.TransportError as exc:
            if (why := untrusted_certificate(exc)) is not None:
                raise _untrusted("Google", self._account, self._token_uri, why) from None
            if timed_out(exc):
                raise TokenEndpointTimedOut(
                    scrub(f"Google token refresh for {self._account}: no answer from {self._token_uri} within {self._timeout:g} s"),
                    endpoint=self._token_uri,
                    timeout=self._timeout,
                ) from None
            raise TokenRefreshFailed(
                scrub(f"Google token refresh for {self._account}: cannot reach {self._token_uri}: {brief(exc)}")
            ) from None
        register_secret(self._credentials.token)


class MicrosoftTokenSource:
    def __init__(
        self,
        *,
        account: str,
        refresh_token: str | RefreshTokenKeeper,
        client_id: str,
        authority: str,
        client_secret: str | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = HTTP_TIMEOUT_SECONDS,
        fix: str = MICROSOFT_FIX,
    ) -> None:
        self._account = account
        self._timeout = timeout
        if isinstance(refresh_token, str):
            register_secret(refresh_token)
            refresh_token = InMemoryRefreshToken(refresh_token)
        # Where the newest refresh token is kept (and, wired so, stored for the next process).
        self._keeper = refresh_token
        self._fix = fix
        self._client_id = client_id
        self._client_secret = client_secret
        self._authority = self.endpoint = authority
        self._clock = clock
        self._app: msal.ClientApplication | None = None
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        register_secret(client_secret)

    def access_token(self) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at - EXPIRY_MARGIN_SECONDS:
                self._refresh()
            assert self._token is not None
            return self._token

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def _refresh(self) -> None:
        import requests

        app = self._application()
        used = self._keeper.current()
        try:
            result = app.acquire_token_by_refresh_token(used, scopes=MICROSOFT_SCOPES)
        except (requests.RequestException, ValueError) as exc:
            self._raise_if_timed_out(exc)
            raise TokenRefreshFailed(
                scrub(f"Microsoft token refresh for {self._account}: cannot reach {self._authority}: {brief(exc)}")
            ) from None
        if "error" in result:
            error = result.get("error", "")
            detail = (result.get("error_description") or "").splitlines()[0:1]
            refused = error == "invalid_grant"
            text = f"Microsoft token refresh for {self._account} refused by {self._authority}: {error} {' '.join(detail)}"
            raise TokenRefreshFailed(scrub(_with_fix(text.strip(), self._fix if refused else None)), refused=refused)
        token = result.get("access_token")
        if not token:
            raise TokenRefreshFailed(f"Microsoft token refresh for {self._account}: the answer has no access_token")
        register_secret(token)
        self._token = token
        self._expires_at = self._clock() + float(result.get("expires_in") or 3600)
        rotated = result.get("refresh_token")
        if rotated and rotated != used:
            register_secret(rotated)
            self._keeper.rotated(used, rotated)

    def _application(self) -> msal.ClientApplication:
        # Built on first use: msal reads the authority's OpenID configuration when constructed,
        # which is network I/O that must not happen before the fail-safe gate.
        if self._app is None:
            import msal
            import msal.authority
            import requests

            host = urlparse(self._authority).hostname or ""
            # Instance discovery asks Microsoft about the authority; only its own hosts know it.
            discovery = None if host in msal.authority.WELL_KNOWN_AUTHORITY_HOSTS else False
            # Our session, not msal's: msal's own retries each timeout once, doubling the wait.
            kwargs = {"authority": self._authority, "instance_discovery": discovery, "http_client": http_session(self._timeout)}
            try:
                if self._client_secret:
                    self._app = msal.ConfidentialClientApplication(
                        self._client_id, client_credential=self._client_secret, **kwargs
                    )
                else:
                    self._app = msal.PublicClientApplication(self._client_id, **kwargs)
            except (requests.RequestException, ValueError) as exc:
                self._raise_if_timed_out(exc)
                raise TokenRefreshFailed(
                    scrub(f"Microsoft token refresh for {self._account}: cannot use authority {self._authority}: {brief(exc)}")
                ) from None
        return self._app

    def _raise_if_timed_out(self, exc: BaseException) -> None:
        if (why := untrusted_certificate(exc)) is not None:
            raise _untrusted("Microsoft", self._account, self._authority, why) from None
        if timed_out(exc):
            raise TokenEndpointTimedOut(
                scrub(f"Microsoft token refresh for {self._account}: no answer from {self._authority} within {self._timeout:g} s"),
                endpoint=self._authority,
                timeout=self._timeout,
            ) from None


def _with_fix(text: str, fix: str | None) -> str:
    return text if fix is None else f"{text.rstrip('.')}; {fix}"

