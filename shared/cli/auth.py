"""`auth gmail` and `auth microsoft`: the OAuth consent that gives a refresh token."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from shared.cli.report import ExitCode, Report
from shared.errors import SettingsInvalid
from shared.logs import configure_logging
from shared.redaction import scrub
from shared.settings import reveal


def auth(args: argparse.Namespace) -> ExitCode:
    """`auth gmail` / `auth microsoft`: consent in a browser (or with a device code), then the
    refresh token as JSON on stdout, or merged into a Secrets Manager secret. Needs no routes
    yet: it reads only the OAuth clients and endpoints (flags first, then env and .env)."""
    from shared.settings import load_auth_settings, microsoft_authority, missing_env_file, trust_ca_bundle
    from shared.tokens.consent import (
        AuthFailed,
        Browser,
        google_consent,
        microsoft_consent,
        microsoft_device_consent,
    )
    from shared.tokens.store import SecretWriteFailed

    configure_logging("WARNING")  # the libraries' info lines are not for this screen
    report = Report(out=sys.stderr)
    if problems := missing_env_file(args.env_file):
        return report.settings_invalid(problems)
    try:
        settings = load_auth_settings(args.env_file or ".env")
    except SettingsInvalid as exc:
        return report.settings_invalid(exc.problems)
    trust_ca_bundle(settings.requests_ca_bundle)
    browser = Browser(open=not args.no_browser, out=sys.stderr, timeout=args.timeout, port=args.port)
    try:
        if args.provider == "gmail":
            client_id = args.client_id or settings.gmail_client_id
            client_secret = args.client_secret or reveal(settings.gmail_client_secret)
            missing = [name for name, value in (("--client-id (or GMAIL_CLIENT_ID)", client_id),
                                                ("--client-secret (or GMAIL_CLIENT_SECRET)", client_secret)) if not value]
            if missing:
                print(f"auth gmail: needs {' and '.join(missing)}: the Desktop app OAuth client (see README)", file=sys.stderr)
                return ExitCode.USAGE
            consent = google_consent(
                client_id=client_id,
                client_secret=client_secret,
                auth_uri=settings.google_auth_uri,
                token_uri=settings.google_token_uri,
                browser=browser,
                login_hint=args.login_hint,
            )
        else:
            client_id = args.client_id or settings.ms_client_id
            if not client_id:
                print("auth microsoft: needs --client-id (or MS_CLIENT_ID): the app registration's "
                      "Application (client) ID (see README)", file=sys.stderr)
                return ExitCode.USAGE
            client_secret = args.client_secret or reveal(settings.ms_client_secret)
            authority = microsoft_authority(args.tenant or settings.ms_tenant, settings.ms_authority)
            if args.device_code:
                if client_secret:
                    print("auth microsoft: --device-code needs a public client: leave out --client-secret "
                          "(and MS_CLIENT_SECRET)", file=sys.stderr)
                    return ExitCode.USAGE
                consent = microsoft_device_consent(client_id=client_id, authority=authority, browser=browser)
            else:
                consent = microsoft_consent(
                    client_id=client_id,
                    client_secret=client_secret,
                    authority=authority,
                    browser=browser,
                    login_hint=args.login_hint,
                )
        if args.write_secret_id:
            write = _write_secret(args, settings, consent)
            output = {"provider": consent.provider, "account": consent.account, "written_to": write.secret_id,
                      "key": write.key, "created": write.created}
            print(f"{consent.provider}: the refresh token is in secret {write.secret_id}, key {write.key}", file=sys.stderr)
        else:
            output = {
                "provider": consent.provider,
                "refresh_token": consent.refresh_token,
                "account": consent.account,
                "env_export": f"export {consent.setting}={shlex.quote(consent.refresh_token)}",
            }
    except (AuthFailed, SecretWriteFailed) as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    print(json.dumps(output, indent=2))
    return ExitCode.OK


def _write_secret(args: argparse.Namespace, settings, consent):
    from shared.aws import make_client
    from shared.tokens.store import merge_secret_key

    key = args.write_secret_key or consent.setting
    client = make_client("secretsmanager", settings.aws_endpoint_url, settings.aws_region)
    return merge_secret_key(client, args.write_secret_id, key, consent.refresh_token)
