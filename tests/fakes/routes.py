"""Routes for tests: valid settings objects without secrets worth keeping."""

from __future__ import annotations

import datetime as dt

from shared.settings import Route


def make_route(
    name: str = "work",
    *,
    gmail_user: str = "alice@gmail.test",
    gmail_folder: str = "INBOX",
    outlook_folder: str | None = None,
    since: dt.date | None = None,
) -> Route:
    """A password route (the password is never used by the fakes); outlook_folder defaults to
    the name, capitalised."""
    return Route(
        name=name,
        gmail_user=gmail_user,
        gmail_password="not-a-real-password",
        gmail_folder=gmail_folder,
        outlook_folder=outlook_folder or name.capitalize(),
        since=since,
    )
