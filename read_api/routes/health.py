"""`/health`: the database and the other servers the query API needs."""

from __future__ import annotations

from fastapi import Request

from read_api.routes.common import deps_of
from security.http import HealthCheck, health_router


def _health_checks(request: Request) -> dict[str, HealthCheck]:
    deps = deps_of(request)

    async def database() -> None:
        await deps.pool.fetchval("SELECT 1")

    return {"database": database, **deps.health_checks}


router = health_router(_health_checks, servers="PostgreSQL and Redis")
