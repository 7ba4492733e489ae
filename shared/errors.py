"""The errors a user can be shown. Each says what failed and where, never a secret."""

from __future__ import annotations

from pathlib import Path

# An error message quotes at most this much of what a library or a server said.
MAX_QUOTED_CHARS = 300


class MailSyncerError(Exception):
    """Base for errors that end a command with one clear line instead of a traceback."""


class SettingsInvalid(MailSyncerError):
    """Settings could not be read or validated; each problem names its place."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class StateStoreUnavailable(MailSyncerError):
    """The state store cannot be read and written: the fail-safe gate stays shut."""


class ClaimLost(MailSyncerError):
    """The caller no longer owns the UID claim it tried to change (its lease was taken over)."""


class QueueUnavailable(MailSyncerError):
    """The queue could not be reached or refused an operation."""

    def __init__(self, message: str, *, path: Path | None = None):
        # path: the local file that failed (the SQLite queue). It is usually the state file too,
        # and then the state store has failed: the CLI tells the two apart by it.
        self.path = path
        super().__init__(message)


class MalformedMessageRef(MailSyncerError):
    """A queue body that is not a valid message reference; it is quarantined, never retried."""


class UidNotAssigned(MailSyncerError):
    """A reference to a UID the source folder has not handed out yet: not one the producer made.
    It is failed, not skipped, so the message that later gets that UID is still copied."""


class TokenRefreshFailed(MailSyncerError):
    """An OAuth refresh token was refused or the token endpoint failed."""

    def __init__(self, message: str, *, refused: bool = False):
        # refused: the endpoint said the refresh token itself is bad (invalid_grant), so retrying
        # cannot help until a new token is issued.
        self.refused = refused
        super().__init__(message)


class ImapFailure(MailSyncerError):
    """An IMAP step (connect, TLS, login, select, fetch, append) failed for a named account."""

    def __init__(self, message: str, *, step: str):
        self.step = step
        super().__init__(message)


def shorten(text: str) -> str:
    """`text` cut to MAX_QUOTED_CHARS, marked where it was cut: a server or a library may say a lot."""
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


def brief(exc: BaseException) -> str:
    """What an exception says, in short (its class name when it says nothing)."""
    return shorten(str(exc) or type(exc).__name__)
