"""The test harness itself: real Dovecot servers, real google-auth and msal refreshes
against the local identity providers, TLS with the test CA, and the shared corpus."""

from __future__ import annotations

import email
import re
import ssl
from datetime import datetime, timedelta, timezone

import google.auth.exceptions
import msal
import pytest
import requests
from google.auth.transport.requests import Request
from google.oauth2.credentials import Credentials
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.harness.mail import append, connect, corpus, read_folder, seed, tls_client
from tests.harness.oauth import MS_SCOPE

CORPUS = corpus()
# What Dovecot 2.3.19 does not give back byte for byte (APPEND of exact bytes, then
# FETCH BODY.PEEK[]); see test_corpus_round_trip.
BARE_LF = {m.name for m in CORPUS if "lf" in m.traits}  # LF-only or mixed line ends
HAS_NUL = {"077-mimekit-as2-smime-binary-nul.eml"}
BINARY_CTE_REENCODED = {"035-mail-binary-encoded-part.eml", "106-mime4j-binary-cte-postcard.eml"}
BARE_CR = {"059-flanker-bare-cr-in-body.eml", "077-mimekit-as2-smime-binary-nul.eml"}


def lf_to_crlf(data: bytes) -> bytes:
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


# ---- OAuth: real client libraries against the local providers -------------------------------
def verifying_session(ca_bundle_path: str | None) -> requests.Session:
    session = requests.Session()
    # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (set machine-wide on these hosts, to
    # the system bundle) win over session.verify, and so over msal's verify=, unless the
    # session ignores the environment.
    session.trust_env = False
    if ca_bundle_path:
        session.verify = ca_bundle_path
    return session


def google_access_token(oauth_server, refresh_token: str, client_secret: str | None = None) -> str:
    creds = Credentials(
        None,
        refresh_token=refresh_token,
        token_uri=oauth_server.google_token_uri,
        client_id=oauth_server.google_client_id,
        client_secret=client_secret or oauth_server.google_client_secret,
    )
    creds.refresh(Request(verifying_session(oauth_server.ca_bundle_path)))
    return creds.token


def ms_app(oauth_server, **kwargs) -> msal.PublicClientApplication:
    return msal.PublicClientApplication(
        oauth_server.ms_client_id, authority=oauth_server.ms_authority, instance_discovery=False, **kwargs
    )


def test_google_refresh_gives_a_token_that_logs_in_with_xoauth2(dovecot_pair, oauth_server):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("alice")
    before = oauth_server.refresh_count("google")
    token = google_access_token(oauth_server, oauth_server.issue_refresh_token(user, "google"))
    assert oauth_server.refresh_count("google") == before + 1

    client = tls_client(gmail)
    client.oauth2_login(user, token)
    assert client.select_folder("INBOX")[b"EXISTS"] == 0
    client.logout()
    client = tls_client(gmail, ssl=False)
    client.oauthbearer_login(user, token)
    client.logout()
    assert gmail.logins(user) == 2


def test_google_refresh_refused_for_wrong_client_unknown_or_revoked_token(dovecot_pair, oauth_server):
    user = dovecot_pair.gmail.new_user("bob")
    refresh_token = oauth_server.issue_refresh_token(user, "google")
    with pytest.raises(google.auth.exceptions.RefreshError, match="invalid_grant"):
        google_access_token(oauth_server, refresh_token, client_secret="not-the-secret")
    with pytest.raises(google.auth.exceptions.RefreshError, match="invalid_grant"):
        google_access_token(oauth_server, "rt-never-issued")
    oauth_server.revoke(refresh_token)
    with pytest.raises(google.auth.exceptions.RefreshError, match="invalid_grant"):
        google_access_token(oauth_server, refresh_token)


def test_msal_refresh_rotates_and_logs_in_to_outlook(dovecot_pair, oauth_server):
    outlook = dovecot_pair.outlook
    user = outlook.new_user("carol")
    app = ms_app(oauth_server, http_client=verifying_session(oauth_server.ca_bundle_path))
    first = oauth_server.issue_refresh_token(user, "microsoft")
    before = oauth_server.refresh_count("microsoft")

    result = app.acquire_token_by_refresh_token(first, scopes=[MS_SCOPE])
    assert "access_token" in result, result
    second = result["refresh_token"]
    assert second != first
    client = tls_client(outlook)
    client.oauth2_login(user, result["access_token"])
    client.logout()

    result = app.acquire_token_by_refresh_token(second, scopes=[MS_SCOPE])  # the rotated one works
    assert "access_token" in result, result
    assert result["refresh_token"] not in (first, second)
    assert oauth_server.refresh_count("microsoft") == before + 2

    oauth_server.revoke(result["refresh_token"])
    refused = app.acquire_token_by_refresh_token(result["refresh_token"], scopes=[MS_SCOPE])
    assert refused.get("error") == "invalid_grant", refused
    assert outlook.logins(user) == 1


def test_msal_trusts_the_test_ca_through_requests_ca_bundle(oauth_server, trust_test_ca):
    refresh_token = oauth_server.issue_refresh_token("dave@outlook.test", "microsoft")
    result = ms_app(oauth_server).acquire_token_by_refresh_token(refresh_token, scopes=[MS_SCOPE])
    assert "access_token" in result, result


def test_token_servers_are_not_trusted_without_the_test_ca(oauth_server, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    creds = Credentials(
        None,
        refresh_token=oauth_server.issue_refresh_token("erin@gmail.test", "google"),
        token_uri=oauth_server.google_token_uri,
        client_id=oauth_server.google_client_id,
        client_secret=oauth_server.google_client_secret,
    )
    with pytest.raises(google.auth.exceptions.TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        creds.refresh(Request(verifying_session(None)))
    with pytest.raises(requests.exceptions.SSLError):
        ms_app(oauth_server)


def test_xoauth2_refuses_a_wrong_token_another_users_token_and_an_expired_one(dovecot_pair, oauth_server):
    gmail = dovecot_pair.gmail
    alice, mallory = gmail.new_user("alice"), gmail.new_user("mallory")
    alices_token = google_access_token(oauth_server, oauth_server.issue_refresh_token(alice, "google"))
    for user, token in ((alice, "at-not-issued"), (mallory, alices_token)):
        client = tls_client(gmail)
        with pytest.raises(LoginError):
            client.oauth2_login(user, token)
        client.shutdown()

    oauth_server.expire_access_tokens()
    client = tls_client(gmail)
    with pytest.raises(LoginError):
        client.oauth2_login(alice, alices_token)
    client.shutdown()
    fresh = google_access_token(oauth_server, oauth_server.issue_refresh_token(alice, "google"))
    client = tls_client(gmail)
    client.oauth2_login(alice, fresh)  # a refresh mid-run gets back in
    client.logout()
    assert gmail.logins(alice) == 1 and gmail.logins(mallory) == 0


# ---- TLS and passwords -----------------------------------------------------------------------
def test_imaps_verifies_only_with_the_test_ca(dovecot_pair):
    gmail = dovecot_pair.gmail
    with pytest.raises(ssl.SSLCertVerificationError):
        IMAPClient(gmail.host, port=gmail.imaps_port, ssl=True, ssl_context=ssl.create_default_context(), timeout=10)
    client = connect(gmail, gmail.new_user("tls"))
    assert set(client.socket().getpeercert()["subjectAltName"]) == {("DNS", "localhost"), ("IP Address", "127.0.0.1")}
    client.logout()


def test_starttls_on_the_plain_port(dovecot_pair):
    outlook = dovecot_pair.outlook
    client = IMAPClient(outlook.host, port=outlook.plain_port, ssl=False, timeout=10)
    assert b"STARTTLS" in client.capabilities()
    with pytest.raises(ssl.SSLCertVerificationError):
        client.starttls(ssl.create_default_context())
    client = connect(outlook, outlook.new_user("starttls"), ssl=False)
    assert isinstance(client.socket(), ssl.SSLSocket)
    client.logout()


def test_password_login_and_a_wrong_password(dovecot_pair):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("pw")
    for _ in range(3):  # without the auth penalty these answer at once
        client = tls_client(gmail)
        with pytest.raises(LoginError):
            client.login(user, "wrong-password")
        client.shutdown()
        connect(gmail, user).logout()
    assert gmail.logins(user) == 3
    assert "Password mismatch" in gmail.log_text()


def test_logins_counts_successful_logins_only(dovecot_pair):
    outlook = dovecot_pair.outlook
    user = outlook.new_user("count")
    assert outlook.logins(user) == 0
    total = outlook.logins()
    connect(outlook, user).logout()
    assert outlook.logins(user) == 1
    assert outlook.logins() == total + 1
    assert dovecot_pair.gmail.logins(user) == 0  # two separate servers


# ---- mail ------------------------------------------------------------------------------------
def test_seed_and_read_folder_keep_flags_dates_and_nested_folders(dovecot_pair):
    gmail, outlook = dovecot_pair.gmail, dovecot_pair.outlook
    user = gmail.new_user("seed")
    when = datetime(2021, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=-7)))
    folder = "Work/2024.Q1/[Gmail] Ünïcode"
    uids = seed(gmail, user, folder, [b"Subject: a\r\n\r\na\r\n", (b"Subject: b\r\n\r\nb\r\n", [r"\Seen", "$Label1"], when)])
    stored = read_folder(gmail, user, folder)
    assert [s.uid for s in stored] == uids == [1, 2]
    assert stored[1].body == b"Subject: b\r\n\r\nb\r\n"
    assert stored[1].flags == {rb"\Seen", b"$Label1"} and stored[0].flags == set()
    assert stored[1].internaldate == when
    assert seed(gmail, user, folder, [b"Subject: c\r\n\r\nc\r\n"]) == [3]  # existing folder
    assert read_folder(outlook, user.replace("gmail", "outlook"), "INBOX") == []
    client = connect(gmail, user)
    assert {name for _, _, name in client.list_folders()} >= {"INBOX", "Work", "Work/2024.Q1", folder}
    client.logout()
    assert re.fullmatch(r"seed-[0-9a-f]{6}@gmail\.test", user)


def test_doveadm_changes_uidvalidity(dovecot_pair):
    gmail = dovecot_pair.gmail
    user = gmail.new_user("uidv")
    seed(gmail, user, "INBOX", [b"Subject: x\r\n\r\nx\r\n"])
    client = connect(gmail, user)
    old = client.folder_status("INBOX", [b"UIDVALIDITY"])[b"UIDVALIDITY"]
    gmail.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(old + 1000), "INBOX")
    assert client.folder_status("INBOX", [b"UIDVALIDITY"])[b"UIDVALIDITY"] == old + 1000
    client.logout()
    assert len(read_folder(gmail, user, "INBOX")) == 1


def corpus_seeds():
    """Each corpus message with some flags and an INTERNALDATE in some zone."""
    flag_sets = [(), (r"\Seen",), (r"\Seen", r"\Flagged"), (r"\Answered", "$Label1"), ("Work", r"\Draft")]
    base = datetime(2019, 12, 31, 23, 59, 58, tzinfo=timezone.utc)
    return [
        (m.bytes, flag_sets[i % 5], (base + timedelta(days=i, seconds=7 * i)).astimezone(timezone(timedelta(hours=i % 27 - 13))))
        for i, m in enumerate(CORPUS)
    ]


def check_corpus(stored, seeds):
    """Flags and dates must all survive; returns {name: body} for the bodies that changed."""
    assert len(stored) == len(CORPUS)
    for s, (_, flags, when), m in zip(stored, seeds, CORPUS):
        assert s.flags == {f.encode() for f in flags}, m.name
        assert s.internaldate == when, m.name
    return {m.name: s.body for s, m in zip(stored, CORPUS) if s.body != m.bytes}


def test_corpus_round_trip(dovecot_pair):
    """Every corpus message APPENDed byte for byte (a plain literal) is accepted, and comes
    back from FETCH BODY.PEEK[] with its flags and INTERNALDATE, and its bytes except:
    - every bare LF comes back as CRLF (Dovecot keeps maildir files with LF line ends and
      serves CRLF): all messages with LF-only or mixed line ends (bare CRs are kept);
    - NUL bytes come back as 0x80 (they are stored; BODY[] cannot carry NUL).
    """
    assert len(CORPUS) == 107 and len(BARE_LF) == 58
    assert {m.name for m in CORPUS if re.search(rb"(?<!\r)\n", m.bytes)} == BARE_LF
    assert {m.name for m in CORPUS if b"\0" in m.bytes} == HAS_NUL
    gmail = dovecot_pair.gmail
    user = gmail.new_user("corpus")
    seeds = corpus_seeds()
    seed(gmail, user, "INBOX", seeds)
    changed = check_corpus(read_folder(gmail, user, "INBOX"), seeds)

    assert set(changed) == BARE_LF | HAS_NUL
    for m in CORPUS:
        if m.name in changed:
            assert changed[m.name] == lf_to_crlf(m.bytes).replace(b"\0", b"\x80"), m.name


def test_corpus_binary_append_fixes_nothing_and_reencodes_binary_parts(dovecot_pair):
    """APPEND with a BINARY literal8 (~{n}) changes the same messages the same way, and
    also rewrites parts with Content-Transfer-Encoding: binary as base64."""
    gmail = dovecot_pair.gmail
    user = gmail.new_user("binary")
    seeds = corpus_seeds()
    seed(gmail, user, "INBOX", seeds, binary=True)
    changed = check_corpus(read_folder(gmail, user, "INBOX"), seeds)

    assert set(changed) == BARE_LF | HAS_NUL | BINARY_CTE_REENCODED
    for m in CORPUS:
        if m.name in BINARY_CTE_REENCODED:  # same decoded parts; the binary leaves now base64
            sent, got = (list(email.message_from_bytes(b).walk()) for b in (m.bytes, changed[m.name]))
            leaves = [(a, b) for a, b in zip(sent, got, strict=True) if not a.is_multipart()]
            assert [b.get_payload(decode=True) for _, b in leaves] == [a.get_payload(decode=True) for a, _ in leaves]
            assert {(a["Content-Transfer-Encoding"], b["Content-Transfer-Encoding"]) for a, b in leaves} >= {("binary", "base64")}
            assert all(b["Content-Transfer-Encoding"] != "binary" for _, b in leaves)
        elif m.name in changed:
            assert changed[m.name] == lf_to_crlf(m.bytes).replace(b"\0", b"\x80"), m.name


def test_corpus_imapclient_append_also_rewrites_bare_cr(dovecot_pair):
    """imapclient's own append() (through imaplib) turns every CR, LF and CRLF into CRLF
    before sending: bare CRs are lost too, which the harness's append() keeps."""
    gmail = dovecot_pair.gmail
    user = gmail.new_user("imapclient")
    client = connect(gmail, user)
    for m in CORPUS:
        client.append("INBOX", m.bytes)
    client.logout()
    changed = {s.uid: s.body for s in read_folder(gmail, user, "INBOX")}
    changed = {m.name: changed[i] for i, m in enumerate(CORPUS, 1) if changed[i] != m.bytes}

    assert set(changed) == BARE_LF | HAS_NUL
    for m in CORPUS:
        if m.name in changed:
            all_crlf = re.sub(rb"\r\n|\r|\n", b"\r\n", m.bytes).replace(b"\0", b"\x80")
            assert changed[m.name] == all_crlf, m.name
            assert (changed[m.name] != lf_to_crlf(m.bytes).replace(b"\0", b"\x80")) == (m.name in BARE_CR)


def test_append_returns_the_uid(dovecot_pair):
    outlook = dovecot_pair.outlook
    user = outlook.new_user("append")
    client = connect(outlook, user)
    assert [append(client, "INBOX", b"Subject: %d\r\n\r\n" % i) for i in range(3)] == [1, 2, 3]
    client.logout()
