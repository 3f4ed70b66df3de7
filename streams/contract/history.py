"""Reading history up to a point: the events of a tenant or of a ticket at or before a position,
and the position the log had reached at a given time.

What `as_of` answers and audit replays are folded from (see projections/history.py). Positions
are global (`notification_id`); a time names the last position whose event was recorded at or
before it.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeAlias
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from streams.contract.eventlog import EVENTS_TABLE, RecordedEvent

Executor: TypeAlias = (
    "asyncpg.Pool | asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
)

_COLUMNS = "notification_id, originator_id, originator_version, topic, state"
_STATE = "convert_from(state, 'UTF8')::jsonb"
# The library stores times as {"_type_": "datetime_iso", "_data_": "<ISO 8601>"}.
_RECORDED_AT = f"(coalesce({_STATE} #>> '{{timestamp,_data_}}', {_STATE} ->> 'timestamp'))"


async def tenant_ticket_events_until(
    conn: Executor, tenant: str, position: int
) -> list[RecordedEvent]:
    """Every ticket event of `tenant` at or before `position`, in log order."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM {EVENTS_TABLE} WHERE notification_id <= $2"
        f" AND topic LIKE 'ticketflow.ticket.%' AND {_STATE} ->> 'tenant' = $1"
        " ORDER BY notification_id",
        tenant,
        position,
    )
    return [RecordedEvent.from_row(row) for row in rows]


async def ticket_events_until(
    conn: Executor, ticket_id: UUID, position: int
) -> list[RecordedEvent]:
    """The ticket's events at or before `position`, in order; [] for what is not a ticket."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM {EVENTS_TABLE} WHERE originator_id = $1"
        " AND notification_id <= $2 AND topic LIKE 'ticketflow.ticket.%'"
        " ORDER BY notification_id",
        ticket_id,
        position,
    )
    return [RecordedEvent.from_row(row) for row in rows]


async def last_position(conn: Executor) -> int:
    """The position of the last event recorded (0 for an empty log)."""
    value = await conn.fetchval(f"SELECT coalesce(max(notification_id), 0) FROM {EVENTS_TABLE}")
    return int(value)


async def position_at(conn: Executor, moment: datetime) -> int:
    """The last position recorded at or before `moment` (0 when nothing was)."""
    value = await conn.fetchval(
        f"SELECT coalesce(max(notification_id), 0) FROM {EVENTS_TABLE}"
        f" WHERE {_RECORDED_AT}::timestamptz <= $1",
        moment,
    )
    return int(value)
