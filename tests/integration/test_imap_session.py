"""open_session and the token sources against the real servers of the harness."""

from __future__ import annotations

import pytest

from shared.errors import ImapFailure, TokenRefreshFailed
from shared.mailbox.session import ImapAccount, ImapEndpoint, open_session
from shared.tokens.sources import GoogleTokenSource, InMemoryRefreshToken, MicrosoftTokenSource


@pytest.fixture
def google_tokens(oauth_server, trust_test_ca):
    def make(user: str) -> GoogleTokenSource:
        return GoogleTokenSource(
            account=user,
            refresh_token=oauth_server.issue_refresh_token(user, "google"),
            client_id=oauth_server.google_client_id,
            client_secret=oauth_server.google_client_secret,
            token_uri=oauth_server.google_token_uri,
        )

    return make


def account(server, user, tokens=None, password=None, *, ssl=True) -> ImapAccount:
    port = server.imaps_port if ssl else server.plain_port
    endpoint = ImapEndpoint(server.host, port, ssl=ssl, ca_bundle=server.ca_bundle_path, timeout=10)
    return ImapAccount(f"test account {user}", user, endpoint, token_source=tokens, password=password)


def test_access_token_is_cached_until_near_expiry(oauth_server, google_tokens, dovecot_pair):
    user = dovecot_pair.gmail.new_user("cache")
    tokens = google_tokens(user)
    before = oauth_server.refresh_count("google")
    first = tokens.access_token()
    assert tokens.access_token() == first
    assert oauth_server.refresh_count("google") == before + 1
    for _ in range(2):
        with open_session(account(dovecot_pair.gmail, user, tokens)) as client:
            assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 0
    assert oauth_server.refresh_count("google") == before + 1


def test_token_revoked_early_is_refreshed_and_login_goes_on(oauth_server, google_tokens, dovecot_pair):
    """The server refuses a cached token that has not reached its expiry: one fresh refresh."""
    user = dovecot_pair.gmail.new_user("early")
    tokens = google_tokens(user)
    tokens.access_token()
    oauth_server.expire_access_tokens()
    before = oauth_server.refresh_count("google")
    with open_session(account(dovecot_pair.gmail, user, tokens)) as client:
        assert client.noop()
    assert oauth_server.refresh_count("google") == before + 1


def test_token_for_another_user_is_refused(google_tokens, dovecot_pair):
    alice, mallory = dovecot_pair.gmail.new_user("alice"), dovecot_pair.gmail.new_user("mallory")
    with pytest.raises(ImapFailure) as failure:
        open_session(account(dovecot_pair.gmail, alice, google_tokens(mallory)))
    assert failure.value.step == "XOAUTH2 login"
    assert str(failure.value).startswith(
        f"test account {alice} at 127.0.0.1:{dovecot_pair.gmail.imaps_port}: XOAUTH2 login failed: "
    )


def test_refused_refresh_token(oauth_server, google_tokens, dovecot_pair):
    user = dovecot_pair.gmail.new_user("revoked")
    tokens = google_tokens(user)
    oauth_server.revoke(tokens._credentials.refresh_token)
    with pytest.raises(TokenRefreshFailed) as refused:
        tokens.access_token()
    assert refused.value.refused is True
    assert str(refused.value).startswith(f"Google token refresh for {user} refused by {oauth_server.google_token_uri}: invalid_grant")
    assert tokens._credentials.refresh_token not in str(refused.value)


def test_microsoft_rotation_keeps_the_newest_refresh_token(oauth_server, trust_test_ca, dovecot_pair):
    user = dovecot_pair.outlook.new_user("me")
    first = oauth_server.issue_refresh_token(user, "microsoft")
    keeper = RecordingRefreshToken(first)
    clock = [1000.0]
    tokens = MicrosoftTokenSource(
        account=user,
        refresh_token=keeper,
        client_id=oauth_server.ms_client_id,
        authority=oauth_server.ms_authority,
        clock=lambda: clock[0],
    )
    with open_session(account(dovecot_pair.outlook, user, tokens)) as client:
        assert client.noop()
    assert len(keeper.issued) == 1 and keeper.current() == keeper.issued[0] != first
    # Near expiry (the stand-in issues 3600 s tokens): the next use refreshes with the new token.
    clock[0] += 3600 - 299
    oauth_server.revoke(first)
    tokens.access_token()
    assert len(keeper.issued) == 2 and keeper.current() == keeper.issued[1]


class RecordingRefreshToken(InMemoryRefreshToken):
    """The keeper, with every refresh token the endpoint issued in turn."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.issued: list[str] = []

    def rotated(self, used: str, issued: str) -> None:
        super().rotated(used, issued)
        self.issued.append(issued)


def test_unreachable_server_names_the_step(dovecot_pair):
    endpoint = ImapEndpoint("127.0.0.1", 9, ca_bundle=dovecot_pair.gmail.ca_bundle_path, timeout=5)
    with pytest.raises(ImapFailure) as failure:
        open_session(ImapAccount("route x source a@b", "a@b", endpoint, password=None))
    assert str(failure.value) == "route x source a@b at 127.0.0.1:9: connect failed: connection refused"
    assert failure.value.step == "connect"
