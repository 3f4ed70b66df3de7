"""The query HTTP API: tickets, reports, event history, live progress (SSE) and search.

Reads the read models the projector writes, and the event store itself for a ticket's history
and its progress stream. Every query is filtered by the caller's tenant; another tenant's ticket
answers 404 exactly like a missing one. Errors are `{"error": {"code": ..., "message": ...}}`,
as in the command API (`security.http`). Ticket reads need role `user` or `admin`; tickets,
reports, explanations, diffs and a ticket's history also `auditor` (read-only); the tenant-wide
history `GET /events` is for `auditor` and `admin` (docs/security.md).

Time travel: the list, a ticket and its report accept `as_of` (a global position or an RFC 3339
time) and answer from history: the tenant's (or the ticket's) events up to that position, folded
by the projector's own code into temporary tables
(docs/adr/0019-time-travel-provenance-rerun.md).

Read-your-writes: the GET routes on tickets accept `min_position` (the position a command
response returned) and wait, at most `QuerySettings.max_wait_s`, until the read models have
applied it. Every such response says how fresh it is: headers `X-Projection-Position` and
`X-Projection-Behind`, and a `projection` object in JSON bodies. The history and the stream read
the event store, which already holds every event a command reported, so they never wait.

Reports: while a ticket of the caller's tenant has no report (it is not completed),
`GET /tickets/{id}/report` answers 409 `ticket_not_completed`, naming the ticket's status.

The routes live in `read_api/routes/`, one module per resource (tickets, reports, events,
contract, search, audit, health); this module assembles them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from read_api import console
from read_api.routes import audit, contract, events, health, reports, search, tickets
from read_api.routes.common import CHANNELS, HistoryFolder, QueryApiDeps, QuerySettings
from security.http import api_lifespan, install_error_handlers

__all__ = ["CHANNELS", "HistoryFolder", "QueryApiDeps", "QuerySettings", "create_app"]


def create_app(
    resources: Callable[[], AbstractAsyncContextManager[QueryApiDeps]],
    *,
    docs: bool = True,
) -> FastAPI:
    """The API; `resources` opens its connections at start-up and closes them at shutdown.
    `docs` serves `/openapi.json`, `/docs` and `/redoc` (not in production)."""

    app = FastAPI(
        title="ticketflow queries",
        version="1",
        description=(
            "Reads tickets, reports, event histories and live progress, and searches documents."
            " Every answer is limited to the caller's tenant."
        ),
        lifespan=api_lifespan(resources),
        # Without the OpenAPI document FastAPI serves no /docs and no /redoc either.
        openapi_url="/openapi.json" if docs else None,
    )

    install_error_handlers(app)
    for routes in (tickets, reports, events, contract, search, audit):
        app.include_router(routes.router)
    app.include_router(console.router)
    app.include_router(health.router)
    return app
