"""Builds the query API process from plain parameters, for the composition root to call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import asyncpg
from fastapi import FastAPI

from inference.embeddings import Embedder
from read_api.app import CHANNELS, HistoryFolder, QueryApiDeps, QuerySettings, create_app
from read_api.notifications import Notifications
from security.http import Authenticate, HealthCheck
from streams.contract.eventlog import reset_nothing

APPLICATION_NAME = "ticketflow-queries"


def query_api(
    database_url: str | Callable[[], str],
    open_authenticator: Callable[[], AbstractAsyncContextManager[Authenticate]],
    load_embedder: Callable[[], Embedder],
    *,
    pool_size: int = 5,
    settings: QuerySettings | None = None,
    docs: bool = True,
    health_checks: Mapping[str, HealthCheck] | None = None,
    history: HistoryFolder | None = None,
) -> FastAPI:
    """The query HTTP API. Nothing connects until start-up: then the pool, the LISTEN connection,
    the token verifier (`open_authenticator`, which holds its own Redis connection for the
    revocation list) and the embedder (`load_embedder` runs in a thread, as loading a model
    blocks) are opened, and they are closed at shutdown. `database_url` may be a callable,
    resolved at start-up. `docs` serves the OpenAPI document and its pages. `/health` checks the
    database, and the servers of `health_checks` (by name) besides. `history` answers `as_of`
    (projections.history.fold_into_temporary_tables); without it `as_of` answers 501."""

    @asynccontextmanager
    async def resources() -> AsyncIterator[QueryApiDeps]:
        url = database_url() if callable(database_url) else database_url
        # UTC: rows read as jsonb carry their times as text in the session's zone.
        server_settings = {"application_name": APPLICATION_NAME, "timezone": "UTC"}
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=pool_size,
            server_settings=server_settings,
            # The query API leaves nothing on a connection it gives back: it takes no advisory
            # lock, sets nothing outside a transaction, opens cursors only inside one, its
            # temporary tables drop on commit, and it listens on a connection of its own.
            reset=reset_nothing,
        )

        async def listen_connection() -> asyncpg.Connection:
            return await asyncpg.connect(url, server_settings=server_settings)

        notifications = Notifications(listen_connection, CHANNELS)
        try:
            embedder = await asyncio.to_thread(load_embedder)
            await notifications.start()
            try:
                async with open_authenticator() as authenticate:
                    yield QueryApiDeps(
                        pool=pool,
                        authenticate=authenticate,
                        embedder=embedder,
                        notifications=notifications,
                        settings=settings or QuerySettings(),
                        health_checks=dict(health_checks or {}),
                        history=history,
                    )
            finally:
                close = getattr(embedder, "aclose", None)
                if close is not None:
                    await close()
        finally:
            await notifications.close()
            await pool.close()

    return create_app(resources, docs=docs)
