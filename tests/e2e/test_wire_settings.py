"""A setting written onto the wire cannot smuggle a second IMAP command: the red team's
OUTLOOK_USER ending in "\\r\\nX1 DELETE INBOX" (issue 13, fault 8) stops the CLI at the settings,
named but not shown, before any mailbox is opened."""

from __future__ import annotations

import pytest

from tests.harness.mail import corpus_seed, seed

INJECTED = "\r\nX1 DELETE INBOX"


@pytest.mark.parametrize("login", ["xoauth2", "password"])
@pytest.mark.parametrize("command", ["check", "drain"])
def test_outlook_user_with_cr_lf_stops_at_the_settings(sync_env, dovecot_pair, command, login):
    setup = sync_env()
    seed(dovecot_pair.gmail, setup.routes[0].gmail_user, "INBOX", corpus_seed(1))  # drain has one to copy
    if login == "password":  # LOGIN puts the user on the command line itself, in quotes
        del setup.env["MS_REFRESH_TOKEN"]
        setup.env["OUTLOOK_PASSWORD"] = dovecot_pair.outlook.password
    setup.env["OUTLOOK_USER"] = setup.outlook_user + INJECTED
    logins_before = dovecot_pair.outlook.logins()

    done = setup.cli(command)

    output = done.stdout + done.stderr
    assert done.returncode == 3, output
    assert "OUTLOOK_USER: must not contain control characters" in output
    assert setup.outlook_user not in output and "DELETE INBOX" not in output
    assert dovecot_pair.outlook.logins(setup.outlook_user) == 0
    assert dovecot_pair.outlook.logins() == logins_before
