"""The projector: follows the global log and folds it into the read models, one batch at a time.

Each batch is one transaction that locks the projection's row in `projection_positions`, reads
the position there, applies the events after it and stores the new position. The rows and the
position therefore commit together, so a crash at any point re-applies nothing; reading the
position under the lock lets a rebuild swap the tables underneath a running projector.

It catches up first, then waits for the event store's NOTIFY (with a timeout fallback, since a
notification can be missed while reconnecting). A PostgreSQL advisory lock keeps one active.
While PostgreSQL is away it waits and tries again with backoff; it never exits for an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from projections.writer import Connection, ReadModelWriter, apply_events
from streams.contract.availability import Backoff, database_unavailable
from streams.contract.eventlog import (
    NOTIFY_CHANNEL,
    EventLogReader,
    leading,
)
from streams.contract.tracing import record_span

logger = logging.getLogger(__name__)

READ_MODELS = "read_models"
LEADER_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"ticketflow.projector").digest()[:8], "big", signed=True
)
# Listeners (the query API waiting for read-your-writes) hear `{"projection", "position"}` here
# when a batch commits.
PROJECTION_NOTIFY_CHANNEL = "ticketflow_projections"


@dataclass(frozen=True)
class ProjectorSettings:
    batch_size: int = 500
    poll_interval_s: float = 1.0


class Projector:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: ProjectorSettings | None = None,
        *,
        name: str = READ_MODELS,
    ) -> None:
        self._pool = pool
        self._settings = settings or ProjectorSettings()
        self._reader = EventLogReader(pool)
        self._wakeup = asyncio.Event()
        self._writer: ReadModelWriter | None = None
        self.name = name
        self.position = 0
        self.applied = 0

    async def run(self, stop: asyncio.Event, backoff: Backoff | None = None) -> None:
        """Project until `stop` is set.

        While PostgreSQL is away it waits (`backoff`) and starts again from the stored position
        (a batch that did not commit is applied again). Any other error is raised.
        """
        backoff = backoff or Backoff()
        while not stop.is_set():
            try:
                await self._run(stop, backoff)
                return
            except Exception as error:
                if not database_unavailable(error):
                    raise
                logger.warning(
                    "projector paused, the database is unavailable (attempt %d): %s: %s",
                    backoff.attempts + 1,
                    type(error).__name__,
                    error,
                )
            await backoff.wait(stop)

    async def _run(self, stop: asyncio.Event, backoff: Backoff) -> None:
        async with leading(self._pool, LEADER_LOCK_KEY, "projector", stop) as leader:
            if leader is None:
                return
            await leader.add_listener(NOTIFY_CHANNEL, self._on_notify)
            try:
                await self.ensure_position()
                backoff.reset()
                logger.info("projector resuming after position %d", self.position)
                await self._loop(leader, stop)
            finally:
                with contextlib.suppress(Exception):
                    await leader.remove_listener(NOTIFY_CHANNEL, self._on_notify)

    async def ensure_position(self) -> int:
        """Create the projection's position row if it is missing; returns its position."""
        await self._pool.execute(
            "INSERT INTO projection_positions (name, position) VALUES ($1, 0)"
            " ON CONFLICT (name) DO NOTHING",
            self.name,
        )
        value = await self._pool.fetchval(
            "SELECT position FROM projection_positions WHERE name = $1", self.name
        )
        self.position = int(value)
        return self.position

    async def catch_up(self) -> int:
        """Apply batches until nothing more is safe to read; returns how many events it applied."""
        await self.ensure_position()
        applied = 0
        while count := await self.apply_next_batch():
            applied += count
        return applied

    async def apply_next_batch(self) -> int:
        """One transaction: the next events after the stored position, and the new position."""
        async with self._pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchval(
                "SELECT position FROM projection_positions WHERE name = $1 FOR UPDATE", self.name
            )
            if stored is None:
                raise LookupError(f"projection {self.name!r} has no position row")
            position = int(stored)
            events = await self._reader.read_after(position, self._settings.batch_size)
            if not events:
                self.position = position
                return 0
            started = time.time_ns()
            await apply_events(conn, await self._writer_for(conn), events)
            applied_ns = time.time_ns()
            for event in events:  # one span per event, child of the span that appended it
                record_span(
                    "ticketflow.projector",
                    f"apply {event.event_type.name}",
                    event.traceparent,
                    start_ns=started,
                    end_ns=applied_ns,
                    attributes={
                        "ticketflow.position": event.position,
                        "ticketflow.batch": len(events),
                    },
                )
            self.position = events[-1].position
            await conn.execute(
                "UPDATE projection_positions SET position = $2, updated_at = now() WHERE name = $1",
                self.name,
                self.position,
            )
            await conn.execute(
                "SELECT pg_notify($1, json_build_object('projection', $2::text,"
                " 'position', $3::bigint)::text)",
                PROJECTION_NOTIFY_CHANNEL,
                self.name,
                self.position,
            )
        self.applied += len(events)
        logger.debug("applied %d events up to position %d", len(events), self.position)
        return len(events)

    async def _writer_for(self, conn: Connection) -> ReadModelWriter:
        # The tables the query API reads are the ones its search_path finds: the first schema.
        if self._writer is None:
            self._writer = ReadModelWriter(str(await conn.fetchval("SELECT current_schema()")))
        return self._writer

    def _on_notify(self, *_: Any) -> None:
        self._wakeup.set()

    async def _loop(self, leader: PoolConnectionProxy[asyncpg.Record], stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Cleared before reading, so a notification that arrives mid-batch is not lost.
            self._wakeup.clear()
            if await self.apply_next_batch():
                continue
            # Proves the leader connection (and with it the advisory lock) is still alive.
            await leader.fetchval("SELECT 1")
            waiters = {
                asyncio.ensure_future(self._wakeup.wait()),
                asyncio.ensure_future(stop.wait()),
            }
            try:
                await asyncio.wait(
                    waiters,
                    timeout=self._settings.poll_interval_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
