"""A token endpoint whose TLS certificate is not trusted (a proxy that re-signs TLS, a missing CA):
the refresh fails once, with one line naming the endpoint and REQUESTS_CA_BUNDLE, the variable
that fixes it; it is not retried as if the endpoint were down. And REQUESTS_CA_BUNDLE in .env
is trusted as README says (it was refused as an unknown setting)."""

from __future__ import annotations

import pytest

from shared.tokens.sources import GoogleTokenSource, MicrosoftTokenSource, TokenEndpointUntrusted
from tests.harness.black_hole import BlackHole
from tests.harness.mail import corpus_seed, seed


@pytest.fixture
def tls_hole(test_ca):
    """Completes the TLS handshake with the test certificate, then never answers."""
    hole = BlackHole(test_ca.server_context)
    yield hole
    hole.close()


def test_token_sources_name_the_endpoint_and_the_variable_and_try_once(tls_hole, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    google = GoogleTokenSource(
        account="a@gmail.test", refresh_token="rt-google", client_id="id", client_secret="untrusted-client-secret",
        token_uri=tls_hole.url("/token"), timeout=5,
    )
    microsoft = MicrosoftTokenSource(
        account="me@outlook.test", refresh_token="rt-ms", client_id="id", authority=tls_hole.url("/consumers"), timeout=5
    )
    for source, endpoint in ((google, tls_hole.url("/token")), (microsoft, tls_hole.url("/consumers"))):
        connections = tls_hole.connections
        with pytest.raises(TokenEndpointUntrusted) as untrusted:
            source.access_token()
        text = str(untrusted.value)
        assert f"the TLS certificate of {endpoint} is not trusted" in text, text
        assert "REQUESTS_CA_BUNDLE" in text
        assert not untrusted.value.refused  # the token itself is not in question
        assert tls_hole.connections == connections + 1


def test_drain_says_once_which_variable_to_set_and_trusts_it_from_env_file(sync_env, dovecot_pair):
    setup = sync_env()
    bundle = setup.env.pop("REQUESTS_CA_BUNDLE")  # the token endpoints' CA, no longer trusted
    seed(dovecot_pair.gmail, setup.routes[0].gmail_user, "INBOX", corpus_seed(2))

    refused = setup.cli("drain")

    lines = [line for line in refused.stdout.splitlines() if "REQUESTS_CA_BUNDLE" in line]
    assert len(lines) == 1, refused.stdout
    assert "not trusted" in lines[0] and setup.env["GOOGLE_TOKEN_URI"] in lines[0], lines[0]
    assert refused.returncode == 5, refused.stdout + refused.stderr
    # The log has the scan's one ERROR line: no retries, no library lines.
    assert len(refused.stderr.splitlines()) == 1 and "ERROR" in refused.stderr, refused.stderr

    (setup.workdir / ".env").write_text(f"REQUESTS_CA_BUNDLE={bundle}\n")
    done = setup.cli("drain")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "route work: 2 copied, 0 skipped, 0 failed" in done.stdout
