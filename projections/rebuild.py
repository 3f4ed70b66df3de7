"""Rebuilding the read models from history without downtime, and where each projection stands.

A rebuild creates empty copies of the read-model tables in a schema of its own
(`CREATE TABLE … (LIKE … INCLUDING ALL)`), replays the whole log into them, then, in one
transaction, locks the projection's position row (so a running projector pauses between two
batches), applies the last few events, drops the live tables and moves the new ones into their
place, and stores the position it reached. Readers see the old tables until that commit and the
complete new ones after it; a running projector carries on from the stored position.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from projections.projector import READ_MODELS
from projections.writer import (
    READ_MODEL_TABLES,
    BatchPlan,
    Connection,
    Operation,
    ReadModelWriter,
    apply_planned,
    quote_identifier,
)
from streams.contract.eventlog import EVENTS_TABLE, EventLogReader, RecordedEvent

logger = logging.getLogger(__name__)

PROJECTIONS: tuple[str, ...] = (READ_MODELS,)
REBUILD_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"ticketflow.projections.rebuild").digest()[:8], "big", signed=True
)
BUILD_SCHEMA_PREFIX = "rm_build_"
_INDEX_HEAD = re.compile(r"^CREATE (UNIQUE )?INDEX \S+ ON \S+ ")

Progress = Callable[[int, int], None]
"""Called after each batch with (position reached, the log's max position when last read)."""


class RebuildInProgress(RuntimeError):
    """Another rebuild holds the rebuild lock."""


@dataclass(frozen=True)
class RebuildResult:
    position: int
    events: int
    seconds: float


@dataclass(frozen=True)
class ProjectionStatus:
    name: str
    position: int
    max_position: int
    lag: int
    """Events recorded after `position` that the projection has not applied yet."""
    updated_at: datetime | None
    rebuilt_at: datetime | None


async def status(pool: asyncpg.Pool) -> list[ProjectionStatus]:
    """Each projection's position, the log's max position and how many events it lags behind."""
    async with pool.acquire() as conn:
        rows = {
            row["name"]: row
            for row in await conn.fetch(
                "SELECT name, position, updated_at, rebuilt_at FROM projection_positions"
            )
        }
        max_position = int(
            await conn.fetchval(f"SELECT coalesce(max(notification_id), 0) FROM {EVENTS_TABLE}")
        )
        statuses = []
        for name in sorted({*PROJECTIONS, *rows}):
            row = rows.get(name)
            position = int(row["position"]) if row else 0
            lag = await conn.fetchval(
                f"SELECT count(*) FROM {EVENTS_TABLE} WHERE notification_id > $1", position
            )
            statuses.append(
                ProjectionStatus(
                    name=name,
                    position=position,
                    max_position=max_position,
                    lag=int(lag),
                    updated_at=row["updated_at"] if row else None,
                    rebuilt_at=row["rebuilt_at"] if row else None,
                )
            )
    return statuses


async def rebuild(
    pool: asyncpg.Pool,
    *,
    progress: Progress | None = None,
    batch_size: int = 1000,
    swap_lock_timeout_s: float = 5.0,
    swap_attempts: int = 5,
    name: str = READ_MODELS,
) -> RebuildResult:
    """Replay the whole log into new tables, then swap them in atomically.

    Raises `RebuildInProgress` when another rebuild is running. A running projector keeps
    serving and writing the old tables until the swap, and continues on the new ones after it.
    """
    started = time.monotonic()
    reader = EventLogReader(pool)
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK_KEY):
            raise RebuildInProgress("another rebuild of the read models is running")
        try:
            live_schema = str(await conn.fetchval("SELECT current_schema()"))
            await _drop_abandoned_builds(conn)
            build_schema = f"{BUILD_SCHEMA_PREFIX}{secrets.token_hex(4)}"
            try:
                await _create_build_tables(conn, live_schema, build_schema)
                build = _Build(conn, reader, ReadModelWriter(build_schema), batch_size, progress)
                with fewer_collections():
                    await build.catch_up()
                await _make_durable(conn, build_schema)
                await _create_secondary_indexes(conn, live_schema, build_schema)
                logger.info("rebuilt up to position %d; swapping", build.position)
                for attempt in range(1, swap_attempts + 1):
                    try:
                        await _swap(
                            conn, build, live_schema, build_schema, name, swap_lock_timeout_s
                        )
                        break
                    except asyncpg.exceptions.LockNotAvailableError:
                        if attempt == swap_attempts:
                            raise
                        logger.info("read models busy; retrying the swap (attempt %d)", attempt)
            finally:
                await conn.execute(
                    f"DROP SCHEMA IF EXISTS {quote_identifier(build_schema)} CASCADE"
                )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK_KEY)
    result = RebuildResult(build.position, build.applied, time.monotonic() - started)
    logger.info(
        "read models rebuilt",
        extra={"position": result.position, "events": result.events, "seconds": result.seconds},
    )
    return result


@contextlib.contextmanager
def fewer_collections(young: int = 50_000) -> Iterator[None]:
    """The garbage collector's youngest generation collected every `young` allocations instead
    of every 700, and the older ones rarely, until the block ends.

    A replay allocates millions of short-lived objects (decoded events, statements, their
    arguments) and makes almost no reference cycles, so the collections the default thresholds
    trigger find next to nothing, while each one walks the objects alive; with these a rebuild
    takes about a fifth less time. The settings before come back after the block."""
    before = gc.get_threshold()
    gc.set_threshold(young, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*before)


_Planned = tuple[list[RecordedEvent], list[list[Operation]]]
"""A batch of events and its operations queued per ticket (`BatchPlan.queues`)."""


class _Build:
    """Replays the log into the tables of the build schema; tracks the position in memory."""

    def __init__(
        self,
        conn: PoolConnectionProxy[asyncpg.Record],
        reader: EventLogReader,
        writer: ReadModelWriter,
        batch_size: int,
        progress: Progress | None,
    ) -> None:
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.batch_size = batch_size
        self.progress = progress
        self.position = 0
        self.applied = 0
        self.max_position = 0

    async def catch_up(self) -> None:
        """Batches in transactions of their own, until one finds the end of the log.

        A batch that is not full reached the end: what writers add meanwhile is left to the
        swap, so a busy log cannot keep the rebuild from finishing.
        """
        # Batches are read, decoded and planned ahead (up to READ_AHEAD of them) while the
        # server runs the statements of the one being applied: the two use different
        # processors, and a batch that is slow on one side is made up by the next.
        planned: asyncio.Queue[_Planned] = asyncio.Queue(self.READ_AHEAD)
        planning = asyncio.ensure_future(self._plan_ahead(planned))
        try:
            while True:
                getting = asyncio.ensure_future(planned.get())
                await asyncio.wait({getting, planning}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done() and planning.exception() is not None:
                    getting.cancel()
                    planning.result()  # the reader failed: raise what it raised
                # Otherwise the planner may have ended, after queueing the last batch.
                events, queues = await getting
                async with self.conn.transaction():
                    # A lost build batch is harmless (a crashed rebuild starts over), so its
                    # commit need not wait for the disk; the swap's commit does.
                    await self.conn.execute("SET LOCAL synchronous_commit = off")
                    await self._apply(events, queues)
                if len(events) < self.batch_size:
                    return
        finally:
            if not planning.done():
                planning.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await planning

    READ_AHEAD = 2

    async def _plan_ahead(self, planned: asyncio.Queue[_Planned]) -> None:
        after = self.position
        while True:
            events, queues = await self._read_and_plan(after)
            await planned.put((events, queues))
            if len(events) < self.batch_size:
                return
            after = events[-1].position

    async def _read_and_plan(self, after: int) -> _Planned:
        events = await self.reader.read_after(after, self.batch_size)
        plan = BatchPlan(self.writer)
        for number, event in enumerate(events, start=1):
            plan.add(event)
            if number % 16 == 0:
                # Let the batch being applied send its next statement as soon as it may.
                await asyncio.sleep(0)
        return events, plan.queues()

    async def apply_next_batch(self) -> int:
        events, queues = await self._read_and_plan(self.position)
        await self._apply(events, queues)
        return len(events)

    async def _apply(self, events: list[RecordedEvent], queues: list[list[Operation]]) -> None:
        if events:
            await apply_planned(self.conn, self.writer, queues)
            self.position = events[-1].position
            self.applied += len(events)
        if self.progress is not None:
            if not events or self.position >= self.max_position:
                self.max_position = await self.reader.max_position()
            self.progress(self.position, max(self.max_position, self.position))


async def _swap(
    conn: PoolConnectionProxy[asyncpg.Record],
    build: _Build,
    live_schema: str,
    build_schema: str,
    name: str,
    lock_timeout_s: float,
) -> None:
    live, new = quote_identifier(live_schema), quote_identifier(build_schema)
    position, applied = build.position, build.applied
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO projection_positions (name, position) VALUES ($1, 0)"
                " ON CONFLICT (name) DO NOTHING",
                name,
            )
            # Waits for the running projector's batch, then keeps it from starting another.
            await conn.execute(
                "SELECT position FROM projection_positions WHERE name = $1 FOR UPDATE", name
            )
            # Up to where the log ended when the projector paused; it carries on from there.
            target = await build.reader.max_position()
            while build.position < target and await build.apply_next_batch():
                pass
            await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_s * 1000)}")
            tables = ", ".join(f"{live}.{table}" for table in READ_MODEL_TABLES)
            await conn.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
            for table in READ_MODEL_TABLES:
                index_names = await _index_names(conn, live_schema, table)
                await _copy_grants(conn, f"{live}.{table}", f"{new}.{table}")
                await conn.execute(f"DROP TABLE {live}.{table}")
                await conn.execute(f"ALTER TABLE {new}.{table} SET SCHEMA {live}")
                await _rename_indexes(conn, live_schema, table, index_names)
            await conn.execute(
                "UPDATE projection_positions SET position = $2, updated_at = now(),"
                " rebuilt_at = now() WHERE name = $1",
                name,
                build.position,
            )
    except BaseException:
        # The swap's own catch-up was rolled back with it.
        build.position, build.applied = position, applied
        raise


async def _create_build_tables(conn: Connection, live_schema: str, build_schema: str) -> None:
    """Copies of the live tables with their keys and storage parameters but none of their other
    indexes yet: the replay updates each row many times, and every secondary index would make
    each update non-HOT and be written again. They are built once, at the end.

    The copies are unlogged while the replay fills them, for the same reason: every version of
    a row would go through the write-ahead log, where `_make_durable` writes each table once, as
    it ends up. A crash in between empties them, which costs nothing: a rebuild that did not
    finish starts over (`_drop_abandoned_builds`)."""
    live, new = quote_identifier(live_schema), quote_identifier(build_schema)
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA {new}")
        for table in READ_MODEL_TABLES:
            await conn.execute(
                f"CREATE UNLOGGED TABLE {new}.{table}"
                f" (LIKE {live}.{table} INCLUDING ALL EXCLUDING INDEXES)"
            )
            # LIKE copies no storage parameters; the fill factors of 0012 keep the replay's many
            # updates of one row on its page (HOT), so they matter most here.
            options = await conn.fetchval(
                "SELECT reloptions FROM pg_class WHERE oid = $1::regclass", f"{live}.{table}"
            )
            if options:
                await conn.execute(f"ALTER TABLE {new}.{table} SET ({', '.join(options)})")
            keys = await conn.fetch(
                "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint"
                " WHERE conrelid = $1::regclass AND contype IN ('p', 'u', 'x') ORDER BY conname",
                f"{live}.{table}",
            )
            for key in keys:
                await conn.execute(
                    f"ALTER TABLE {new}.{table} ADD CONSTRAINT"
                    f" {quote_identifier(key['conname'])} {key['definition']}"
                )


async def _make_durable(conn: Connection, build_schema: str) -> None:
    """The built tables logged like the live ones (each written to the write-ahead log once),
    before they get their other indexes and are swapped in."""
    new = quote_identifier(build_schema)
    async with conn.transaction():
        for table in READ_MODEL_TABLES:
            await conn.execute(f"ALTER TABLE {new}.{table} SET LOGGED")


async def _create_secondary_indexes(conn: Connection, live_schema: str, build_schema: str) -> None:
    """The live tables' other indexes on the built tables, under the same names (index names
    are per schema, and the live ones are gone by the time these move in), then statistics,
    so the first queries after the swap are planned on real numbers."""
    new = quote_identifier(build_schema)
    for table in READ_MODEL_TABLES:
        rows = await conn.fetch(
            "SELECT i.indexname, i.indexdef FROM pg_indexes AS i"
            " WHERE i.schemaname = $1 AND i.tablename = $2 AND NOT EXISTS ("
            "  SELECT 1 FROM pg_constraint AS c"
            "  WHERE c.conindid = (quote_ident(i.schemaname) || '.' ||"
            "   quote_ident(i.indexname))::regclass)",
            live_schema,
            table,
        )
        for row in rows:
            head = _INDEX_HEAD.match(row["indexdef"])
            if head is None:
                raise RuntimeError(f"unexpected index definition: {row['indexdef']}")
            unique = head.group(1) or ""
            rest = row["indexdef"][head.end() :]
            await conn.execute(
                f"CREATE {unique}INDEX {quote_identifier(row['indexname'])} ON {new}.{table} {rest}"
            )
        await conn.execute(f"ANALYZE {new}.{table}")


async def _drop_abandoned_builds(conn: Connection) -> None:
    """Schemas left by a rebuild that crashed; only one rebuild runs at a time (the lock)."""
    rows = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", BUILD_SCHEMA_PREFIX
    )
    for row in rows:
        logger.info("dropping the abandoned rebuild schema %s", row["nspname"])
        await conn.execute(f"DROP SCHEMA {quote_identifier(row['nspname'])} CASCADE")


async def _index_names(conn: Connection, schema: str, table: str) -> dict[str, str]:
    """Index definition (from USING on, without names) → the live index's name."""
    rows = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
        schema,
        table,
    )
    return {_INDEX_HEAD.sub("", row["indexdef"]): row["indexname"] for row in rows}


async def _rename_indexes(
    conn: Connection, schema: str, table: str, live_names: dict[str, str]
) -> None:
    """LIKE names the copied indexes itself; give them back the names the migrations chose.

    Through temporary names first, so that no rename collides with an index not yet renamed.
    """
    prefix = quote_identifier(schema)
    renames = [
        (index_name, live_names[definition])
        for definition, index_name in (await _index_names(conn, schema, table)).items()
        if live_names.get(definition, index_name) != index_name
    ]
    for number, (index_name, _) in enumerate(renames):
        await conn.execute(
            f"ALTER INDEX {prefix}.{quote_identifier(index_name)}"
            f" RENAME TO {quote_identifier(f'rm_swap_{table}_{number}')}"
        )
    for number, (_, wanted) in enumerate(renames):
        await conn.execute(
            f"ALTER INDEX {prefix}.{quote_identifier(f'rm_swap_{table}_{number}')}"
            f" RENAME TO {quote_identifier(wanted)}"
        )


async def _copy_grants(conn: Connection, live_table: str, new_table: str) -> None:
    """LIKE copies no privileges: grant on the new table what roles hold on the live one."""
    rows = await conn.fetch(
        "SELECT a.privilege_type, a.grantee, a.is_grantable FROM pg_class AS c,"
        " aclexplode(c.relacl) AS a WHERE c.oid = $1::regclass AND a.grantee <> c.relowner",
        live_table,
    )
    for row in rows:
        grantee = "PUBLIC"
        if row["grantee"] != 0:
            grantee = await conn.fetchval(
                "SELECT quote_ident(rolname) FROM pg_roles WHERE oid = $1", row["grantee"]
            )
        option = " WITH GRANT OPTION" if row["is_grantable"] else ""
        await conn.execute(f"GRANT {row['privilege_type']} ON {new_table} TO {grantee}{option}")
