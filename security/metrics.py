"""Prometheus metrics both APIs share, and their `GET /metrics` route (admins only).

The APIs' metrics are operational aggregates with no tenant in their labels; series per tenant
are served by the workers on their own metrics ports (ticketflow/metrics.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest

from security.http import auth_docs, require_roles
from streams.contract.identity import Principal

RATE_LIMITED = Counter(
    "ticketflow_rate_limited_requests",
    "Requests refused with 429 by a rate limit",
    ["route"],
)

Refresh = Callable[[Request], Awaitable[None]]


def metrics_router(refresh: Refresh | None = None) -> APIRouter:
    """`GET /metrics` in Prometheus' text format; `refresh` updates gauges read at scrape."""
    router = APIRouter()

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            **auth_docs("admin"),
            200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        },
        summary="Prometheus metrics of this API (admins)",
        description=(
            "This process's metrics in Prometheus' text format: requests refused by rate"
            " limits, and on the query API the tickets by state and pipeline. Needs role"
            " `admin` (a scraper sends a bearer token)."
        ),
    )
    async def metrics(
        request: Request, _: Annotated[Principal, Depends(require_roles("admin"))]
    ) -> Response:
        if refresh is not None:
            await refresh(request)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router
