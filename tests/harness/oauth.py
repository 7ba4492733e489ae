"""Local stand-ins for Google's and Microsoft's token endpoints, and Dovecot's introspection.

One state (issued refresh and access tokens, behind a lock) served by two threaded
HTTP servers on 127.0.0.1:
- https (the test certificate): Google's token URI and a Microsoft authority
  (``{ms_authority}/v2.0/.well-known/openid-configuration`` and its token endpoint),
  so google-auth and msal run their real refresh code against it;
- http: the introspection endpoint that Dovecot's oauth2 passdb posts ``token=...`` to.

Clients trust the https side through ``ca_bundle_path`` (see ``test_ca``).
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

from tests.harness.tls import LocalCA, make_local_ca

GOOGLE_SCOPE = "https://mail.google.com/"
MS_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
PROVIDERS = ("google", "microsoft")


@dataclass
class _RefreshToken:
    username: str
    provider: str
    client_id: str
    client_secret: str | None
    live: bool = True


@dataclass
class _AccessToken:
    username: str
    provider: str
    expires_at: float


class _OAuthError(Exception):
    def __init__(self, error: str, description: str):
        super().__init__(description)
        self.body = {"error": error, "error_description": description}


class OAuthServer:
    google_client_id = "mail-syncer-test.apps.googleusercontent.com"
    google_client_secret = "google-test-secret"
    ms_client_id = "0b1e55ed-0000-4000-8000-00000000c11e"

    def __init__(self, ca: LocalCA, expires_in: int = 3600):
        self.ca_bundle_path = ca.ca_bundle_path
        self.expires_in = expires_in  # seconds; read at each grant, so tests may change it
        self._lock = threading.Lock()
        self._refresh: dict[str, _RefreshToken] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refreshes = {p: 0 for p in PROVIDERS}
        self._https = _Server(self, ca.server_context)
        self._http = _Server(self, None)
        base = f"https://127.0.0.1:{self._https.server_port}"
        self.google_token_uri = f"{base}/google/token"
        self.ms_authority = f"{base}/consumers"
        self.introspection_url = f"http://127.0.0.1:{self._http.server_port}/introspect"
        self._threads = [
            threading.Thread(target=s.serve_forever, name=f"oauth-{n}", daemon=True)
            for n, s in (("https", self._https), ("http", self._http))
        ]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        for s in (self._https, self._http):
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(timeout=10)

    # ---- what tests call -------------------------------------------------------------
    def issue_refresh_token(
        self, username: str, provider: str, client_id: str | None = None, client_secret: str | None = None
    ) -> str:
        """A refresh token for ``username``, as the user's consent would give the app."""
        if provider == "google":
            client_id = client_id or self.google_client_id
            client_secret = client_secret or self.google_client_secret
        elif provider == "microsoft":
            client_id = client_id or self.ms_client_id  # public client: no secret
        else:
            raise ValueError(f"unknown provider {provider!r}")
        token = _new_token("rt")
        with self._lock:
            self._refresh[token] = _RefreshToken(username, provider, client_id, client_secret)
        return token

    def revoke(self, refresh_token: str) -> None:
        with self._lock:
            self._refresh[refresh_token].live = False

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops being active (introspection says so)."""
        with self._lock:
            for access in self._access.values():
                access.expires_at = 0.0

    def refresh_count(self, provider: str) -> int:
        """Successful refresh grants answered for ``provider`` so far."""
        with self._lock:
            return self._refreshes[provider]

    # ---- the endpoints ---------------------------------------------------------------
    def _google_token(self, form: dict[str, str]) -> dict:
        grant = self._redeem(form, "google", check_secret=True)
        return self._grant_access(grant, GOOGLE_SCOPE)

    def _ms_token(self, form: dict[str, str]) -> dict:
        grant = self._redeem(form, "microsoft", check_secret=False)
        body = self._grant_access(grant, form.get("scope") or MS_SCOPE)
        # Microsoft rotates: a new refresh token with every refresh (the old one keeps
        # working until it expires or is revoked, as on the real service).
        body["refresh_token"] = self.issue_refresh_token(grant.username, "microsoft", grant.client_id)
        return body

    def _redeem(self, form: dict[str, str], provider: str, check_secret: bool) -> _RefreshToken:
        if form.get("grant_type") != "refresh_token":
            raise _OAuthError("unsupported_grant_type", f"grant_type {form.get('grant_type')!r} is not supported here")
        with self._lock:
            grant = self._refresh.get(form.get("refresh_token", ""))
            if grant is None or grant.provider != provider:
                raise _OAuthError("invalid_grant", "Unknown refresh token.")
            if not grant.live:
                raise _OAuthError("invalid_grant", "Token has been expired or revoked.")
            if form.get("client_id") != grant.client_id or (
                check_secret and form.get("client_secret") != grant.client_secret
            ):
                raise _OAuthError("invalid_grant", "The refresh token was issued to another client.")
            self._refreshes[provider] += 1
            return grant

    def _grant_access(self, grant: _RefreshToken, scope: str) -> dict:
        token, expires_in = _new_token("at"), self.expires_in
        with self._lock:
            self._access[token] = _AccessToken(grant.username, grant.provider, time.time() + expires_in)
        return {"access_token": token, "expires_in": expires_in, "token_type": "Bearer", "scope": scope}

    def _introspect(self, form: dict[str, str]) -> dict:
        with self._lock:
            access = self._access.get(form.get("token", ""))
            if access is None or access.expires_at <= time.time():
                return {"active": False}
            return {"active": True, "username": access.username}

    def _openid_configuration(self) -> dict:
        v2 = f"{self.ms_authority}/oauth2/v2.0"
        return {
            "issuer": f"{self.ms_authority}/v2.0",
            "authorization_endpoint": f"{v2}/authorize",
            "token_endpoint": f"{v2}/token",
            "device_authorization_endpoint": f"{v2}/devicecode",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
        }


def _new_token(kind: str) -> str:
    return f"{kind}-{secrets.token_urlsafe(24)}"


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        state = self.server.state
        if self.path.split("?")[0] == "/consumers/v2.0/.well-known/openid-configuration":
            return self._reply(200, state._openid_configuration())
        self._reply(404, {"error": "not_found"})

    def do_POST(self):  # noqa: N802
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode()
        form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        routes = {
            "/google/token": state._google_token,
            "/consumers/oauth2/v2.0/token": state._ms_token,
            "/introspect": state._introspect,
        }
        route = routes.get(self.path.split("?")[0])
        if route is None:
            return self._reply(404, {"error": "not_found"})
        try:
            self._reply(200, route(form))
        except _OAuthError as e:
            self._reply(400, e.body)

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # keep pytest's output clean
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: OAuthServer, context: ssl.SSLContext | None):
        self.state, self.context = state, context
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request, client_address):
        if self.context is None:
            return super().finish_request(request, client_address)
        # The TLS handshake runs here, in the request's thread, not in the accept loop.
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # e.g. a client that does not trust the test CA
        with tls:
            super().finish_request(tls, client_address)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory) -> LocalCA:
    """The test CA: ``ca_bundle_path``, ``cert_path``/``key_path`` (server), ``server_context``,
    ``client_context()``."""
    return make_local_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def oauth_server(test_ca):
    server = OAuthServer(test_ca)
    yield server
    server.close()


@pytest.fixture
def trust_test_ca(test_ca, monkeypatch) -> str:
    """For code that builds its own requests sessions (msal, google-auth): trust the test CA
    through ``REQUESTS_CA_BUNDLE`` for one test. Returns the bundle's path."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", test_ca.ca_bundle_path)
    return test_ca.ca_bundle_path
