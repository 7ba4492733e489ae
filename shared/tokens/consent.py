"""The use cases of `auth gmail` and `auth microsoft`: a person consents once, we get a refresh token.

Both run the providers' own client libraries, not hand-written OAuth:
- Google: google-auth-oauthlib's `InstalledAppFlow` (the installed-app flow with a loopback
  redirect, PKCE with S256, `access_type=offline` and `prompt=consent` so a refresh token
  comes back every time).
- Microsoft: msal's authorization-code flow (`initiate_auth_code_flow`, PKCE, state and nonce)
  with msal's own loopback listener, or msal's device-code flow for a machine without a
  browser.

The URL to open goes to `out` (stderr in the CLI), so the token printed on stdout can be piped
alone; a browser is opened only when asked and when one can be. Endpoints come from the
caller, so tests run the same code against local authorization servers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import webbrowser
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlparse

import google.auth.exceptions
import google.auth.jwt
import msal
import msal.authority
import oauthlib.oauth2
import requests
from google_auth_oauthlib.flow import InstalledAppFlow, WSGITimeoutError
from msal.oauth2cli.authcode import AuthCodeReceiver

from shared.errors import MailSyncerError, brief
from shared.redaction import register_secret, scrub
from shared.tokens.sources import GOOGLE_SCOPE, HTTP_TIMEOUT_SECONDS, MICROSOFT_SCOPES, http_session

# openid and the e-mail scope only to learn which account consented (from the id_token);
# IMAP needs only GOOGLE_SCOPE. Full URIs: Google answers with these spellings, and oauthlib
# compares the granted scopes with the requested ones as written.
GOOGLE_USERINFO_EMAIL = "https://www.googleapis.com/auth/userinfo.email"
GOOGLE_SCOPES = ["openid", GOOGLE_USERINFO_EMAIL, GOOGLE_SCOPE]

BROWSER_DONE_PAGE = "mail_syncer has its refresh token. You can close this tab and go back to the terminal."


class AuthFailed(MailSyncerError):
    """The consent flow did not end with a refresh token; says why and at which provider."""


@dataclass(frozen=True)
class Consent:
    """What a finished flow gives: the refresh token, and the account that consented if known."""

    provider: str  # "google" or "microsoft"
    refresh_token: str
    account: str | None
    setting: str  # where the pipeline reads it: GMAIL_REFRESH_TOKEN or MS_REFRESH_TOKEN


@dataclass(frozen=True)
class Browser:
    """How the person reaches the consent page: the URL is always printed to `out`; a browser
    is opened too when `open` is set and this machine can show one."""

    open: bool = True
    out: TextIO = sys.stderr
    timeout: float = 300.0  # seconds to wait for the redirect (or device approval)
    port: int = 0  # loopback port of the redirect listener; 0: any free one

    def show(self, url: str, what: str) -> None:
        print(f"{what}, open this URL in a browser:\n\n    {url}\n", file=self.out, flush=True)
        if self.open and can_open_browser():
            webbrowser.open(url, new=1)


def can_open_browser() -> bool:
    """Whether opening a browser can work: on Linux without a display, Python's webbrowser
    would start a text browser in this very terminal instead."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


# -- Google -----------------------------------------------------------------------------------


def google_consent(
    *,
    client_id: str,
    client_secret: str,
    auth_uri: str,
    token_uri: str,
    browser: Browser,
    login_hint: str | None = None,
) -> Consent:
    """Google's installed-app flow: loopback redirect, PKCE, offline access with consent."""
    register_secret(client_secret)
    config = {
        "installed": {
            "client_id": client_id,
            "client_secret": client_secret,
            "auth_uri": auth_uri,
            "token_uri": token_uri,
            "redirect_uris": ["http://localhost"],
        }
    }
    flow = InstalledAppFlow.from_client_config(config, scopes=GOOGLE_SCOPES)  # PKCE (S256) by default
    http_session(HTTP_TIMEOUT_SECONDS, flow.oauth2session)  # its code exchange would wait forever
    extra = {"login_hint": login_hint} if login_hint else {}
    print(f"Google: waiting up to {browser.timeout:.0f} s for the consent in the browser", file=browser.out)
    try:
        # run_local_server print()s the URL; it belongs with the other prompts, not on stdout.
        # The scope check is ours (below): a person may untick the e-mail scope and that is fine.
        with contextlib.redirect_stdout(browser.out), _relaxed_scope_check():
            credentials = flow.run_local_server(
                host="localhost",
                port=browser.port,
                open_browser=browser.open and can_open_browser(),
                authorization_prompt_message="To let mail_syncer read Gmail over IMAP, open this URL in a browser:\n\n    {url}\n",
                success_message=BROWSER_DONE_PAGE,
                timeout_seconds=browser.timeout,
                access_type="offline",
                prompt="consent",
                **extra,
            )
    except WSGITimeoutError:
        raise AuthFailed(f"Google: no answer from the browser within {browser.timeout:.0f} s; run the command again") from None
    except oauthlib.oauth2.OAuth2Error as exc:
        raise AuthFailed(scrub(f"Google refused at {token_uri}: {exc.error}: {exc.description or ''}".rstrip(": "))) from None
    except (requests.RequestException, google.auth.exceptions.TransportError) as exc:
        raise AuthFailed(scrub(f"Google: cannot reach {token_uri}: {brief(exc)}")) from None
    granted = set(credentials.granted_scopes or GOOGLE_SCOPES)
    if GOOGLE_SCOPE not in granted:
        raise AuthFailed(
            f"Google: the consent did not include {GOOGLE_SCOPE} (\"Read, compose, send and permanently delete all "
            "your email from Gmail\"); run the command again and tick it"
        )
    for token in (credentials.token, credentials.refresh_token):
        register_secret(token)
    if not credentials.refresh_token:
        raise AuthFailed("Google answered without a refresh token; run the command again (it asks for offline access)")
    return Consent("google", credentials.refresh_token, _google_account(credentials.id_token), "GMAIL_REFRESH_TOKEN")


@contextlib.contextmanager
def _relaxed_scope_check():
    # oauthlib raises a bare Warning when the granted scopes differ from those asked for,
    # unless this is set; we check the one scope that matters ourselves.
    saved = os.environ.get("OAUTHLIB_RELAX_TOKEN_SCOPE")
    os.environ["OAUTHLIB_RELAX_TOKEN_SCOPE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OAUTHLIB_RELAX_TOKEN_SCOPE", None)
        else:
            os.environ["OAUTHLIB_RELAX_TOKEN_SCOPE"] = saved


def _google_account(id_token: str | None) -> str | None:
    if not id_token:
        return None
    try:
        # Not verified: it came straight from the token endpoint over verified TLS (OpenID
        # Connect Core 3.1.3.7), and it only labels the output.
        claims = google.auth.jwt.decode(id_token, verify=False)
    except ValueError:
        return None
    return claims.get("email")


# -- Microsoft --------------------------------------------------------------------------------


def microsoft_consent(
    *,
    client_id: str,
    authority: str,
    browser: Browser,
    client_secret: str | None = None,
    login_hint: str | None = None,
) -> Consent:
    """msal's authorization-code flow: loopback redirect (form_post, as msal's listener wants),
    PKCE, state and nonce checked by msal."""
    app = _msal_app(client_id, client_secret, authority)
    with AuthCodeReceiver(port=browser.port) as receiver:
        flow = app.initiate_auth_code_flow(
            MICROSOFT_SCOPES,
            redirect_uri=f"http://localhost:{receiver.get_port()}",
            response_mode="form_post",
            prompt="select_account",
            login_hint=login_hint,
        )
        if "auth_uri" not in flow:
            raise AuthFailed(_microsoft_error(authority, flow))
        print(f"Microsoft: waiting up to {browser.timeout:.0f} s for the sign-in in the browser", file=browser.out)
        browser.show(flow["auth_uri"], "To let mail_syncer use the Outlook mailbox over IMAP")
        # msal's listener: checks the state, answers the browser, and takes only a POSTed code.
        response = receiver.get_auth_response(timeout=browser.timeout, state=flow["state"], success_template=BROWSER_DONE_PAGE)
    if not response:
        raise AuthFailed(f"Microsoft: no answer from the browser within {browser.timeout:.0f} s; run the command again")
    try:
        result = app.acquire_token_by_auth_code_flow(flow, response, scopes=MICROSOFT_SCOPES)
    except (requests.RequestException, ValueError, RuntimeError) as exc:
        raise AuthFailed(scrub(f"Microsoft: the sign-in answer was refused at {authority}: {brief(exc)}")) from None
    return _microsoft_consent(authority, result)


def microsoft_device_consent(*, client_id: str, authority: str, browser: Browser) -> Consent:
    """msal's device-code flow: the person enters a short code on another device's browser."""
    app = _msal_app(client_id, None, authority)
    assert isinstance(app, msal.PublicClientApplication)
    try:
        flow = app.initiate_device_flow(scopes=MICROSOFT_SCOPES)
    except (requests.RequestException, ValueError) as exc:
        raise AuthFailed(scrub(f"Microsoft: cannot start the device-code sign-in at {authority}: {brief(exc)}")) from None
    if "user_code" not in flow:
        raise AuthFailed(_microsoft_error(authority, flow))
    # msal polls until this time; ours is the sooner of the two.
    flow["expires_at"] = min(flow["expires_at"], time.time() + browser.timeout)
    print(flow.get("message") or f"Open {flow['verification_uri']} and enter the code {flow['user_code']}", file=browser.out, flush=True)
    try:
        result = app.acquire_token_by_device_flow(flow)
    except (requests.RequestException, ValueError) as exc:
        raise AuthFailed(scrub(f"Microsoft: cannot reach {authority}: {brief(exc)}")) from None
    return _microsoft_consent(authority, result)


def _msal_app(client_id: str, client_secret: str | None, authority: str) -> msal.ClientApplication:
    host = urlparse(authority).hostname or ""
    # Instance discovery asks Microsoft about the authority; only its own hosts know it.
    discovery = None if host in msal.authority.WELL_KNOWN_AUTHORITY_HOSTS else False
    kwargs = {"authority": authority, "instance_discovery": discovery, "timeout": HTTP_TIMEOUT_SECONDS}
    try:
        if client_secret:
            register_secret(client_secret)
            return msal.ConfidentialClientApplication(client_id, client_credential=client_secret, **kwargs)
        return msal.PublicClientApplication(client_id, **kwargs)
    except (requests.RequestException, ValueError) as exc:
        raise AuthFailed(scrub(f"Microsoft: cannot use the authority {authority}: {brief(exc)}")) from None


def _microsoft_consent(authority: str, result: dict) -> Consent:
    if "error" in result:
        raise AuthFailed(_microsoft_error(authority, result))
    for token in (result.get("access_token"), result.get("refresh_token")):
        register_secret(token)
    refresh_token = result.get("refresh_token")
    if not refresh_token:
        raise AuthFailed("Microsoft answered without a refresh token (the offline_access scope was not granted)")
    claims = result.get("id_token_claims") or {}
    account = claims.get("preferred_username") or claims.get("email")
    return Consent("microsoft", refresh_token, account, "MS_REFRESH_TOKEN")


def _microsoft_error(authority: str, answer: dict) -> str:
    error = answer.get("error", "no answer")
    detail = (answer.get("error_description") or "").splitlines()[:1]
    return scrub(f"Microsoft refused at {authority}: {error} {' '.join(detail)}".strip())

