"""The read models as they stood at a past position, folded from history by the projector's code.

Time travel (`as_of` on the query API) and `ticketflow audit replay` do not keep snapshots: they
take the events up to a position and apply them with the same `ReadModelWriter` and
`apply_events` the projector uses, into tables of their own:

- `fold_into_temporary_tables`: temporary copies of the read-model tables (`pg_temp`, dropped
  when the caller's transaction ends), for one request;
- `replay_into_schema`: tables in a scratch schema, for the CLI, which may keep them.

The copies are made with `CREATE TABLE … (LIKE live INCLUDING ALL)`, like a rebuild's, so the
rows are those the live tables held when the projector had applied that position.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from projections.writer import (
    READ_MODEL_TABLES,
    Connection,
    ReadModelWriter,
    apply_events,
    quote_identifier,
)
from streams.contract.eventlog import RecordedEvent
from streams.contract.history import tenant_ticket_events_until

TEMPORARY_SCHEMA = "pg_temp"
SCRATCH_SCHEMA_PREFIX = "audit_replay_"
_BATCH = 1000

# The primary key of each read model, to compare two states row by row.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "rm_tickets": ("ticket_id",),
    "rm_subtasks": ("ticket_id", "subtask_id"),
    "rm_reports": ("ticket_id",),
    "rm_tenant_counts": ("tenant",),
    "rm_questions": ("ticket_id", "question_id"),
}


async def fold_into_temporary_tables(conn: Connection, events: Sequence[RecordedEvent]) -> None:
    """Temporary read-model tables holding `events` folded; call inside a transaction.

    The tables are `pg_temp.<read model>` and are dropped when the transaction ends. Read them
    qualified with `pg_temp`.
    """
    live = quote_identifier(str(await conn.fetchval("SELECT current_schema()")))
    for table in READ_MODEL_TABLES:
        await conn.execute(
            f"CREATE TEMPORARY TABLE {table} (LIKE {live}.{table} INCLUDING ALL) ON COMMIT DROP"
        )
    writer = ReadModelWriter(TEMPORARY_SCHEMA)
    for start in range(0, len(events), _BATCH):
        await apply_events(conn, writer, events[start : start + _BATCH])


@dataclass(frozen=True)
class Replay:
    schema: str
    position: int
    events: int


async def replay_into_schema(
    conn: Connection, tenant: str, position: int, *, schema: str | None = None
) -> Replay:
    """A scratch schema with the read models of `tenant` as they stood at `position`."""
    schema = schema or f"{SCRATCH_SCHEMA_PREFIX}{secrets.token_hex(4)}"
    live = quote_identifier(str(await conn.fetchval("SELECT current_schema()")))
    scratch = quote_identifier(schema)
    events = await tenant_ticket_events_until(conn, tenant, position)
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA {scratch}")
        for table in READ_MODEL_TABLES:
            await conn.execute(
                f"CREATE TABLE {scratch}.{table} (LIKE {live}.{table} INCLUDING ALL)"
            )
        writer = ReadModelWriter(schema)
        for start in range(0, len(events), _BATCH):
            await apply_events(conn, writer, events[start : start + _BATCH])
    return Replay(schema, position, len(events))


async def drop_schema(conn: Connection, schema: str) -> None:
    await conn.execute(f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE")


@dataclass(frozen=True)
class TableDiff:
    table: str
    added: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    changed: list[tuple[dict[str, Any], dict[str, Any]]]
    """(row before, row after) for rows whose key is in both but whose values differ."""

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


async def table_rows(
    conn: Connection, schema: str, table: str
) -> dict[tuple[Any, ...], dict[str, Any]]:
    keys = TABLE_KEYS[table]
    rows = await conn.fetch(
        f"SELECT * FROM {quote_identifier(schema)}.{table} ORDER BY {', '.join(keys)}"
    )
    return {tuple(row[key] for key in keys): dict(row) for row in rows}


async def diff_schemas(conn: Connection, before: str, after: str) -> list[TableDiff]:
    """Rows added, removed and changed, per read model, from schema `before` to `after`."""
    diffs = []
    for table in READ_MODEL_TABLES:
        old = await table_rows(conn, before, table)
        new = await table_rows(conn, after, table)
        diffs.append(
            TableDiff(
                table,
                added=[new[key] for key in new if key not in old],
                removed=[old[key] for key in old if key not in new],
                changed=[
                    (old[key], new[key]) for key in new if key in old and old[key] != new[key]
                ],
            )
        )
    return diffs
