"""How each refresh token is doing, judged from what the state store recorded of it, for
`status` and `check`: when it last worked, and the warnings a person must act on.

- Microsoft: a refresh token unused for 90 days expires (every refresh rotates it, so "used" is
  the last refresh that worked). Warned of from 60 days on, with the date it expires.
- Google: an OAuth client whose consent screen is in "Testing" gets refresh tokens that expire
  7 days after the consent. Nothing tells it beforehand: a refresh's answer carries no lifetime
  of the refresh token (`refresh_token_expires_in` comes only with a user's time-limited grant:
  https://github.com/google/GoogleSignIn-iOS/issues/565), and Google has no endpoint that
  describes a refresh token (https://github.com/googleapis/google-api-nodejs-client/pull/2553).
  So it is told afterwards: a token refused (invalid_grant) 6 days or more after it first worked
  here, and which had worked for about 7 days at most, is the mark of a Testing client
  (https://developers.google.com/identity/protocols/oauth2#expiration). README ("Google: the
  OAuth client", step 5) says how to avoid it: publish the app "In production".
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.settings import Route, Settings
from shared.state.port import StateStore, TokenHealth, TokenProblem

GOOGLE = "google"
MICROSOFT = "microsoft"

DAY = 24 * 3600.0
MICROSOFT_INACTIVITY_DAYS = 90
MICROSOFT_WARN_AFTER_DAYS = 60
GOOGLE_TESTING_DAYS = 7
# A refusal this long after the first success may be the Testing client's expiry.
GOOGLE_TESTING_REFUSED_AFTER_DAYS = 6
# "Last worked" is written once an hour at most (StateStore.record_token_worked): its slack.
_LAST_WORKED_SLACK = 3600.0

GOOGLE_TESTING_FIX = (
    'publish the OAuth client\'s app "In production" (README "Google: the OAuth client", step 5), '
    "then get a new refresh token with `python -m shared.cli auth gmail`"
)


def token_tag(token: str) -> str:
    """Tells one configured refresh token from the next in the state store. 8 hex digits of its
    SHA-256: 32 bits cannot stand for a token of hundreds of random bits, nor be read back into
    one; they only change when the token does."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def token_problem_name(provider: str, account: str) -> str:
    """The name a token's refusal is recorded under (StateStore.record_token_problem). The one
    destination's is "microsoft", as recorded before source tokens were."""
    return MICROSOFT if provider == MICROSOFT else f"{provider} {account}"


@dataclass(frozen=True)
class TokenState:
    """One refresh token as `status` and `check` show it."""

    provider: str
    account: str
    # Of the configured token; None when it has not worked here yet (a record of the token it
    # replaced does not count).
    health: TokenHealth | None
    problem: TokenProblem | None
    warnings: list[str] = field(default_factory=list)

    @property
    def what(self) -> str:
        return f"token {self.provider} {self.account}"

    def summary(self) -> str:
        """`last worked ...`, with its first success and a refusal, if any."""
        if self.health is None:
            text = "has not worked here yet"
        else:
            text = f"last worked {_time(self.health.last_worked_at)} (first {_time(self.health.first_worked_at)})"
        if self.problem is not None:
            text += f"; REFUSED since {_time(self.problem.first_at)}"
        return text

    def as_json(self) -> dict:
        health, problem = self.health, self.problem
        return {
            "provider": self.provider,
            "account": self.account,
            "last_worked": None if health is None else _time(health.last_worked_at),
            "first_worked": None if health is None else _time(health.first_worked_at),
            "refused_since": None if problem is None else _time(problem.first_at),
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class ConfiguredToken:
    provider: str
    account: str
    tag: str  # token_tag of the configured refresh token


def configured_tokens(settings: Settings, routes: Sequence[Route]) -> list[ConfiguredToken]:
    """The refresh tokens `routes` log in with (one an account: the first route's), then the
    destination's."""
    tokens = {}
    for route in routes:
        if route.source_auth == "xoauth2" and route.gmail_refresh_token is not None:
            tag = token_tag(route.gmail_refresh_token.get_secret_value())
            tokens.setdefault(route.gmail_user, ConfiguredToken(GOOGLE, route.gmail_user, tag))
    found = list(tokens.values())
    if settings.ms_refresh_token is not None and settings.outlook_user is not None:
        found.append(ConfiguredToken(MICROSOFT, settings.outlook_user, token_tag(settings.ms_refresh_token.get_secret_value())))
    return found


def read_token_states(state: StateStore, tokens: Sequence[ConfiguredToken], now: float) -> list[TokenState]:
    return [
        token_state(
            token.provider,
            token.account,
            token.tag,
            state.read_token_health(token.provider, token.account),
            state.read_token_problem(token_problem_name(token.provider, token.account)),
            now,
        )
        for token in tokens
    ]


def token_state(
    provider: str, account: str, tag: str, health: TokenHealth | None, problem: TokenProblem | None, now: float
) -> TokenState:
    """The configured token (`tag`) of `account` at `provider` as recorded, judged at `now`."""
    if health is not None and health.tag != tag:
        health = None
    if provider == MICROSOFT:
        warnings = _microsoft_warnings(health, problem, now)
    else:
        warnings = _google_warnings(health, problem)
    return TokenState(provider, account, health, problem, warnings)


def _microsoft_warnings(health: TokenHealth | None, problem: TokenProblem | None, now: float) -> list[str]:
    if health is None:
        return []
    last = health.last_worked_at
    expires = last + MICROSOFT_INACTIVITY_DAYS * DAY
    if problem is not None:
        if problem.first_at >= expires:
            return [
                f"it had not worked since {_date(last)}: Microsoft expires a refresh token unused for "
                f"{MICROSOFT_INACTIVITY_DAYS} days, this one on {_date(expires)}"
            ]
        return []
    if now >= expires:
        return [
            f"not used since {_date(last)}: Microsoft expires a refresh token unused for {MICROSOFT_INACTIVITY_DAYS} "
            f"days, this one on {_date(expires)}; get a new one with `python -m shared.cli auth microsoft`"
        ]
    if now - last >= MICROSOFT_WARN_AFTER_DAYS * DAY:
        return [
            f"not used since {_date(last)}: Microsoft expires a refresh token unused for {MICROSOFT_INACTIVITY_DAYS} "
            f"days, this one on {_date(expires)}; a `drain` or `check` before then keeps it alive"
        ]
    return []


def _google_warnings(health: TokenHealth | None, problem: TokenProblem | None) -> list[str]:
    if health is None or problem is None:
        return []
    refused_after = problem.first_at - health.first_worked_at
    worked_for = health.last_worked_at - health.first_worked_at
    if refused_after < GOOGLE_TESTING_REFUSED_AFTER_DAYS * DAY or worked_for > GOOGLE_TESTING_DAYS * DAY + _LAST_WORKED_SLACK:
        return []
    return [
        f"refused {refused_after / DAY:.0f} days after it first worked here ({_date(health.first_worked_at)}): the "
        f"{GOOGLE_TESTING_DAYS}-day life of a refresh token of an OAuth client in \"Testing\" (it expired about "
        f"{_date(health.first_worked_at + GOOGLE_TESTING_DAYS * DAY)}); {GOOGLE_TESTING_FIX}"
    ]


def _time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


def _date(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).date().isoformat()
