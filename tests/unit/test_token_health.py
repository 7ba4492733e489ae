"""Token health on fakes: what `RecordingTokens` writes to the state store as refreshes work and
fail, and the warnings `status` and `check` show from it (shared.tokens.health)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.errors import StateStoreUnavailable, TokenRefreshFailed
from shared.state.port import TokenHealth, TokenProblem
from shared.state.sqlite import SqliteStateStore
from shared.tokens.health import DAY, GOOGLE, MICROSOFT, token_state, token_tag
from shared.tokens.store import RecordingTokens
from tests.fakes.clock import START, FakeClock
from tests.fakes.state import FailingStateStore

TOKEN = "1//0g-configured-refresh-token-" + "x" * 80
TAG = token_tag(TOKEN)
ALICE = "alice@gmail.test"


class ScriptedTokens:
    """A token source whose refreshes are scripted: each `refresh()` makes the next access_token
    a new one; `refuse()` makes it raise as a refused refresh token does."""

    endpoint = "https://oauth.test/token"

    def __init__(self) -> None:
        self.refreshes = 0
        self.refused = False

    def refresh(self) -> None:
        self.refreshes += 1

    def refuse(self) -> None:
        self.refused = True

    def access_token(self) -> str:
        if self.refused:
            raise TokenRefreshFailed("Google token refresh refused: invalid_grant", refused=True)
        return f"access-{self.refreshes}"

    def invalidate(self) -> None:
        pass


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def state(tmp_path, clock):
    store = FailingStateStore(SqliteStateStore(tmp_path / "state.db", clock=clock))
    yield store
    store.close()


def recording(state, inner, provider=GOOGLE, account=ALICE):
    return RecordingTokens(inner, state, provider=provider, account=account, configured=TOKEN)


# -- what is recorded ----------------------------------------------------------------------


def test_a_refresh_that_worked_is_recorded_once_an_hour_with_a_tag_and_never_the_token(state, clock):
    inner = ScriptedTokens()
    tokens = recording(state, inner)

    assert tokens.access_token() == "access-0"
    for _ in range(5):  # the same access token handed out again: no refresh, nothing asked
        tokens.access_token()
    assert state.calls_to("record_token_worked") == 1
    clock.advance(1800)
    inner.refresh()
    tokens.access_token()  # a refresh within the hour: asked, and the store writes nothing
    assert state.calls_to("record_token_worked") == 2

    health = state.read_token_health(GOOGLE, ALICE)
    assert health == TokenHealth(GOOGLE, ALICE, TAG, START, START)
    assert TOKEN not in repr(health) and len(health.tag) == 8
    clock.advance(1800)
    inner.refresh()
    tokens.access_token()
    assert state.read_token_health(GOOGLE, ALICE).last_worked_at == START + 3600


def test_a_refusal_is_recorded_under_the_account_and_cleared_when_a_refresh_works(state, clock):
    inner = ScriptedTokens()
    tokens = recording(state, inner)
    inner.refuse()

    with pytest.raises(TokenRefreshFailed):
        tokens.access_token()

    problem = state.read_token_problem(f"google {ALICE}")
    assert problem is not None and "invalid_grant" in problem.error
    assert state.read_token_health(GOOGLE, ALICE) is None
    inner.refused = False
    tokens.access_token()
    assert state.read_token_problem(f"google {ALICE}") is None
    assert state.read_token_health(GOOGLE, ALICE) is not None


def test_the_destination_keeps_its_problem_name(state):
    inner = ScriptedTokens()
    inner.refuse()
    with pytest.raises(TokenRefreshFailed):
        recording(state, inner, MICROSOFT, "me@outlook.test").access_token()
    assert state.read_token_problem("microsoft") is not None  # as `status` has always read it


def test_a_state_store_that_fails_does_not_fail_the_token(state):
    state.fail("record_token_worked")
    state.fail("record_token_problem")
    tokens = recording(state, ScriptedTokens())

    assert tokens.access_token() == "access-0"


def test_state_store_failure_error_is_the_tokens_own(state):
    state.fail("record_token_problem", error=StateStoreUnavailable("down"))
    inner = ScriptedTokens()
    inner.refuse()
    with pytest.raises(TokenRefreshFailed, match="invalid_grant"):
        recording(state, inner).access_token()


# -- what is said of it --------------------------------------------------------------------


def health(first_days_ago: float, last_days_ago: float, now: float, tag: str = TAG, provider: str = GOOGLE) -> TokenHealth:
    return TokenHealth(provider, ALICE, tag, now - first_days_ago * DAY, now - last_days_ago * DAY)


def problem(days_ago: float, now: float) -> TokenProblem:
    return TokenProblem("x", "invalid_grant: Token has been expired or revoked.", now - days_ago * DAY, now)


NOW = START + 400 * DAY


def test_a_microsoft_token_unused_for_60_days_is_warned_of_with_the_date_it_expires():
    # NOW is 2024-12-18T22:13:20Z; last worked 61 days before: it expires 90 days after that.
    seen = token_state(MICROSOFT, "me@outlook.test", TAG, health(100, 61, NOW, provider=MICROSOFT), None, NOW)

    [warning] = seen.warnings
    assert warning.startswith("not used since 2024-10-18: Microsoft expires a refresh token unused for 90 days, this one on 2025-01-16")
    assert "a `drain` or `check` before then keeps it alive" in warning
    assert seen.summary().startswith("last worked 2024-10-18T")


def test_a_microsoft_token_used_within_60_days_is_not_warned_of():
    assert token_state(MICROSOFT, "me", TAG, health(100, 59, NOW, provider=MICROSOFT), None, NOW).warnings == []


def test_a_microsoft_token_past_90_days_says_it_expired():
    [warning] = token_state(MICROSOFT, "me", TAG, health(200, 91, NOW, provider=MICROSOFT), None, NOW).warnings
    assert "this one on 2024-12-17; get a new one with `python -m shared.cli auth microsoft`" in warning
    refused = token_state(MICROSOFT, "me", TAG, health(200, 91, NOW, provider=MICROSOFT), problem(0, NOW), NOW)
    assert refused.warnings == [
        "it had not worked since 2024-09-18: Microsoft expires a refresh token unused for 90 days, this one on 2024-12-17"
    ]


def test_a_google_token_refused_a_week_after_it_first_worked_is_the_mark_of_a_testing_client():
    seen = token_state(GOOGLE, ALICE, TAG, health(7, 0.5, NOW), problem(0.2, NOW), NOW)

    [warning] = seen.warnings
    assert warning.startswith("refused 7 days after it first worked here (2024-12-11): the 7-day life of a refresh token of an OAuth client in \"Testing\"")
    assert 'publish the OAuth client\'s app "In production" (README "Google: the OAuth client", step 5)' in warning
    assert seen.summary().endswith(f"; REFUSED since {seen.as_json()['refused_since']}")


@pytest.mark.parametrize(
    ("first", "last", "refused", "why"),
    [
        (3, 0.5, 0.2, "refused 3 days in: revoked, not expired"),
        (100, 0.5, 0.2, "worked for months: not a Testing client's token"),
        (7, 0.5, None, "not refused"),
    ],
)
def test_other_google_tokens_are_not_taken_for_a_testing_clients(first, last, refused, why):
    seen = token_state(GOOGLE, ALICE, TAG, health(first, last, NOW), None if refused is None else problem(refused, NOW), NOW)
    assert seen.warnings == [], why


def test_a_record_of_the_token_before_is_not_this_ones():
    seen = token_state(GOOGLE, ALICE, TAG, health(8, 1, NOW, tag="0ld0ld00"), problem(0.2, NOW), NOW)

    assert seen.health is None and seen.warnings == []
    assert seen.summary().startswith("has not worked here yet; REFUSED since ")


def test_the_readme_step_the_testing_warning_points_to_says_to_publish_the_app():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Google: the OAuth client", 1)[1].split("\n### ", 1)[0]
    step = re.search(r"^5\. (.*?)^6\. ", section, re.MULTILINE | re.DOTALL).group(1)
    assert "**Publish app**" in step and "In production" in step and "7 days" in step
