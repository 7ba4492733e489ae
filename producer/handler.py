"""The producer Lambda: on its schedule, scan every route and enqueue new message references."""

from __future__ import annotations

from typing import Any

from shared import bootstrap
from shared.errors import MailSyncerError
from shared.pipeline.scan import scan_routes
from shared.redaction import scrubbed_exceptions


class RoutesFailed(MailSyncerError):
    """Raised after every route had its turn, so the function's Errors metric (and alarm) sees it."""


# The runtime reports an uncaught exception itself, past the log filter.
@scrubbed_exceptions()
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    app = bootstrap.lambda_app()
    scans = scan_routes(
        app.settings.routes,
        state=app.state,
        queue=app.queue,
        open_source=app.connections.borrowed_source,
        limits=app.scan_limits(),
        download_budget=app.download_budget(),
    )
    failed = [f"{scan.route}: {scan.error}" for scan in scans if scan.error]
    if failed:
        raise RoutesFailed("scan failed for route " + "; ".join(failed))
    return {
        "routes": [
            {
                "route": s.route,
                "found": s.found,
                "enqueued": s.enqueued,
                "left_for_next_run": s.left_for_next_run,
                "paused": s.paused,
            }
            for s in scans
        ]
    }
