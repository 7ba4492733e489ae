"""`--route NAME` (repeatable): the routes a command runs on."""

from __future__ import annotations

import argparse

from shared.cli.report import UsageProblem
from shared.settings import Route, Settings


def selected_routes(args: argparse.Namespace, settings: Settings) -> list[Route]:
    """The routes `--route` names (each known), in the settings' order; every route without it.
    An unknown name raises UsageProblem naming the routes there are."""
    routes = settings.routes
    names = getattr(args, "route", None)
    if not names:
        return list(routes)
    known = [route.name for route in routes]
    unknown = [name for name in dict.fromkeys(names) if name not in known]
    if unknown:
        raise UsageProblem(f"--route: unknown route {', '.join(map(repr, unknown))} (routes: {', '.join(known)})")
    return [route for route in routes if route.name in names]
