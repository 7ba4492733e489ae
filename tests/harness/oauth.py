"""Local stand-ins for Google's and Microsoft's OAuth endpoints, and Dovecot's introspection.

One state (issued refresh and access tokens, behind a lock) served by two threaded
HTTP servers on 127.0.0.1:
- https (the test certificate): Google's token URI and a Microsoft authority
  (``{ms_authority}/v2.0/.well-known/openid-configuration`` and its token endpoint),
  so google-auth and msal run their real refresh code against it;
- http: the introspection endpoint that Dovecot's oauth2 passdb posts ``token=...`` to.

Clients trust the https side through ``ca_bundle_path`` (see ``test_ca``).

The consent flows of ``auth gmail`` / ``auth microsoft`` run against the same state: an
authorize endpoint per provider (``google_auth_uri``, ``{ms_authority}/oauth2/v2.0/authorize``)
that redirects to the client's loopback ``redirect_uri`` with a code (Microsoft's
``response_mode=form_post``: a page whose form posts it there, as the real one does), the
token endpoints' ``authorization_code`` grant (client, redirect URI and PKCE S256 checked), and
Microsoft's device-code endpoint with its polling grant. The test plays the browser: it opens
the authorize URL with ``login=<user>`` added, as the person signing in (``browser_consent``),
or approves a device code (``approve_device_code``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote_plus, urlencode, urlparse

import pytest
import requests

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
        self._device_polls = 0
        # Microsoft's rotations: new refresh token -> the one redeemed for it.
        self._rotated_from: dict[str, str] = {}
        self._codes: dict[str, _AuthCode] = {}
        self._devices: dict[str, _DeviceCode] = {}
        # Every authorize request's parameters, as received: what tests check the client asked for.
        self.authorize_requests: list[dict[str, str]] = []
        self._https = _Server(self, ca.server_context)
        self._http = _Server(self, None)
        base = f"https://127.0.0.1:{self._https.server_port}"
        self.google_token_uri = f"{base}/google/token"
        self.google_auth_uri = f"{base}/google/authorize"
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

    def issued_tokens(self) -> list[str]:
        """Every refresh token (rotated ones too) and access token issued so far: what a
        test that looks for leaked secrets must not find anywhere."""
        with self._lock:
            return [*self._refresh, *self._access]

    def refresh_tokens_of(self, username: str) -> list[str]:
        """Every refresh token issued for ``username``, Microsoft's rotated ones included."""
        with self._lock:
            return [token for token, grant in self._refresh.items() if grant.username == username]

    def revoke_all(self, username: str) -> None:
        """Revoke every refresh token of ``username``: the rotated ones a client may have kept
        (see ``revoke`` for one)."""
        with self._lock:
            for grant in self._refresh.values():
                if grant.username == username:
                    grant.live = False

    def refresh_count(self, provider: str) -> int:
        """Successful refresh grants answered for ``provider`` so far."""
        with self._lock:
            return self._refreshes[provider]

    # ---- the endpoints ---------------------------------------------------------------
    def _google_token(self, form: dict[str, str]) -> dict:
        if form.get("grant_type") == "authorization_code":
            return self._redeem_code(form, "google")
        grant = self._redeem(form, "google", check_secret=True)
        return self._grant_access(grant, GOOGLE_SCOPE)

    def _ms_token(self, form: dict[str, str]) -> dict:
        if form.get("grant_type") == "authorization_code":
            return self._redeem_code(form, "microsoft")
        if form.get("grant_type") == DEVICE_CODE_GRANT:
            return self._redeem_device_code(form)
        grant = self._redeem(form, "microsoft", check_secret=False)
        body = self._grant_access(grant, form.get("scope") or MS_SCOPE)
        # Microsoft rotates: a new refresh token with every refresh (the old one keeps
        # working until it expires or is revoked, as on the real service).
        body["refresh_token"] = self.issue_refresh_token(grant.username, "microsoft", grant.client_id)
        with self._lock:
            self._rotated_from[body["refresh_token"]] = form["refresh_token"]
        return body

    def rotation_depth(self, refresh_token: str) -> int:
        """How many rotations lead from a consented (or test-issued) token to this one: 0 for
        such a token, 1 for what refreshing it returned, and so on."""
        depth = 0
        with self._lock:
            while refresh_token in self._rotated_from:
                refresh_token = self._rotated_from[refresh_token]
                depth += 1
        return depth

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
            "grant_types_supported": ["authorization_code", "refresh_token", DEVICE_CODE_GRANT],
        }

    # ---- consent: authorize, authorization_code, device code ---------------------------
    def approve_device_code(self, user_code: str, username: str) -> None:
        """The person entered ``user_code`` on the verification page and signed in as ``username``."""
        with self._lock:
            device = next(d for d in self._devices.values() if d.user_code == user_code)
            device.username = username

    def device_polls(self) -> int:
        """Device-code token requests answered so far (pending ones included)."""
        with self._lock:
            return self._device_polls

    def _authorize(self, provider: str, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        """(status, headers, body): a redirect (or form_post page) to redirect_uri with a code,
        or 400 with the reason when the request is not one the real service would accept."""
        with self._lock:
            self.authorize_requests.append(dict(query, provider=provider))
        expected_client = self.google_client_id if provider == "google" else self.ms_client_id
        scope = query.get("scope", "").split()
        redirect = urlparse(query.get("redirect_uri", ""))
        problems = [
            problem
            for problem, bad in (
                (f"unknown client_id {query.get('client_id')!r}", query.get("client_id") != expected_client),
                ("response_type must be code", query.get("response_type") != "code"),
                ("redirect_uri must be http://localhost:PORT or http://127.0.0.1:PORT",
                 redirect.scheme != "http" or redirect.hostname not in ("localhost", "127.0.0.1") or not redirect.port),
                ("PKCE: code_challenge with code_challenge_method S256 required",
                 not query.get("code_challenge") or query.get("code_challenge_method") != "S256"),
                ("scope lacks the IMAP scope", (GOOGLE_SCOPE if provider == "google" else MS_SCOPE) not in scope),
                ("nobody signed in (the test's browser adds login=USER)", not query.get("login")),
            )
            if bad
        ]
        if problems:
            return 400, {"Content-Type": "text/plain"}, "; ".join(problems)
        code = _new_token("code")
        # Google gives a refresh token for access_type=offline; Microsoft for offline_access.
        offline = query.get("access_type") == "offline" if provider == "google" else "offline_access" in scope
        with self._lock:
            self._codes[code] = _AuthCode(
                provider=provider,
                client_id=query["client_id"],
                redirect_uri=query["redirect_uri"],
                code_challenge=query["code_challenge"],
                scope=" ".join(scope),
                username=query["login"],
                nonce=query.get("nonce"),
                offline=offline,
            )
        answer = {"code": code, "state": query.get("state", "")}
        if query.get("response_mode") == "form_post":
            fields = "".join(
                f'<input type="hidden" name="{name}" value="{html.escape(value)}">' for name, value in answer.items()
            )
            page = (
                '<html><body onload="document.forms[0].submit()">'
                f'<form method="POST" action="{html.escape(query["redirect_uri"])}">{fields}</form></body></html>'
            )
            return 200, {"Content-Type": "text/html"}, page
        separator = "&" if "?" in query["redirect_uri"] else "?"
        return 302, {"Location": query["redirect_uri"] + separator + urlencode(answer)}, ""

    def _redeem_code(self, form: dict[str, str], provider: str) -> dict:
        with self._lock:
            code = self._codes.pop(form.get("code", ""), None)  # one use only
        if code is None or code.provider != provider:
            raise _OAuthError("invalid_grant", "Unknown or used authorization code.")
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if not verifier or challenge != code.code_challenge:
            raise _OAuthError("invalid_grant", "PKCE: code_verifier does not match the code_challenge.")
        if form.get("redirect_uri") != code.redirect_uri:
            raise _OAuthError("invalid_grant", "redirect_uri differs from the authorize request's.")
        if form.get("client_id") != code.client_id or (
            provider == "google" and form.get("client_secret") != self.google_client_secret
        ):
            raise _OAuthError("invalid_client", "Wrong client credentials.")
        return self._consented(provider, code.username, code.client_id, code.scope, code.offline, code.nonce)

    def _device_code(self, form: dict[str, str]) -> dict:
        if form.get("client_id") != self.ms_client_id:
            raise _OAuthError("invalid_client", f"unknown client_id {form.get('client_id')!r}")
        scope = form.get("scope", "")
        if MS_SCOPE not in scope.split():
            raise _OAuthError("invalid_scope", "scope lacks the IMAP scope")
        device = _DeviceCode(user_code=secrets.token_hex(4).upper(), scope=scope)
        device_code = _new_token("dc")
        with self._lock:
            self._devices[device_code] = device
        uri = f"{self.ms_authority}/devicelogin"
        return {
            "device_code": device_code,
            "user_code": device.user_code,
            "verification_uri": uri,
            "expires_in": 900,
            "interval": 1,
            "message": f"To sign in, use a web browser to open the page {uri} and enter the code {device.user_code} to authenticate.",
        }

    def _redeem_device_code(self, form: dict[str, str]) -> dict:
        with self._lock:
            device = self._devices.get(form.get("device_code", ""))
            if device is None or form.get("client_id") != self.ms_client_id:
                raise _OAuthError("invalid_grant", "Unknown device code.")
            self._device_polls += 1
            if device.username is None:
                raise _OAuthError("authorization_pending", "The user has not yet finished signing in.")
            del self._devices[form["device_code"]]
        return self._consented("microsoft", device.username, self.ms_client_id, device.scope, "offline_access" in device.scope.split(), None)

    def _consented(self, provider: str, username: str, client_id: str, scope: str, offline: bool, nonce: str | None) -> dict:
        body = self._grant_access(_RefreshToken(username, provider, client_id, None), scope)
        if offline:
            body["refresh_token"] = self.issue_refresh_token(username, provider, client_id)
        if "openid" in scope.split():
            claims = {
                "iss": f"{self.ms_authority}/v2.0" if provider == "microsoft" else "https://accounts.google.com",
                "aud": client_id,
                "sub": hashlib.sha256(username.encode()).hexdigest()[:20],
                "iat": int(time.time()),
                "exp": int(time.time()) + 3600,
                "email": username,
                "preferred_username": username,
            }
            if nonce:
                claims["nonce"] = nonce
            body["id_token"] = _unsigned_jwt(claims)
        return body


def _new_token(kind: str) -> str:
    return f"{kind}-{secrets.token_urlsafe(24)}"


DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class _AuthCode:
    provider: str
    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: str
    username: str
    nonce: str | None
    offline: bool


@dataclass
class _DeviceCode:
    user_code: str
    scope: str
    username: str | None = None  # set when the test approves it


def _unsigned_jwt(claims: dict) -> str:
    """An id_token as the clients read it: they decode it, taking TLS to the token endpoint as
    its proof of origin (OpenID Connect Core 3.1.3.7), so it needs no signature here."""

    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def _basic_client_auth(header: str | None) -> dict[str, str]:
    """Client credentials sent as HTTP Basic (RFC 6749 2.3.1), as requests-oauthlib does."""
    if not header or not header.startswith("Basic "):
        return {}
    client_id, _, client_secret = base64.b64decode(header[6:]).decode().partition(":")
    return {"client_id": unquote_plus(client_id), "client_secret": unquote_plus(client_secret)}


def browser_consent(url: str, login: str, ca_bundle: str, timeout: float = 30) -> requests.Response:
    """What the person's browser does with the URL a consent command printed: open it, sign in
    as ``login``, and follow the answer to the command's loopback listener (a redirect, or
    Microsoft's form_post page, whose form it submits). Returns the listener's page."""
    separator = "&" if "?" in url else "?"
    with requests.Session() as browser:
        # The CA verifies the https authorize endpoint; the loopback listener is plain http.
        page = browser.get(f"{url}{separator}{urlencode({'login': login})}", verify=ca_bundle, timeout=timeout)
        page.raise_for_status()
        form = re.search(r'<form method="POST" action="([^"]+)">(.*)</form>', page.text)
        if form is None:
            return page  # followed the redirect already
        fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', form.group(2)))
        return browser.post(html.unescape(form.group(1)), data={k: html.unescape(v) for k, v in fields.items()}, timeout=timeout)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        state = self.server.state
        path, _, query = self.path.partition("?")
        if path == "/consumers/v2.0/.well-known/openid-configuration":
            return self._reply(200, state._openid_configuration())
        authorize = {"/google/authorize": "google", "/consumers/oauth2/v2.0/authorize": "microsoft"}
        if path in authorize:
            params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
            return self._send(*state._authorize(authorize[path], params))
        self._reply(404, {"error": "not_found"})

    def do_POST(self):  # noqa: N802
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode()
        form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        form.update(_basic_client_auth(self.headers.get("Authorization")))
        routes = {
            "/google/token": state._google_token,
            "/consumers/oauth2/v2.0/token": state._ms_token,
            "/consumers/oauth2/v2.0/devicecode": state._device_code,
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

    def _send(self, status: int, headers: dict[str, str], body: str) -> None:
        data = body.encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
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
