"""The SQL the query API runs: read models, the event store's rows of one ticket, positions.

Every read of ticket data takes the caller's tenant and filters by it, so another tenant's ticket
is indistinguishable from one that does not exist.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from streams.contract.eventlog import EVENTS_TABLE, RecordedEvent

_TICKET_COLUMNS = """
ticket_id, owner, pipeline_name, pipeline_version, status, subtasks_total, subtasks_completed,
subtasks_failed, documents, created_at, updated_at, ingested_at, completed_at, finished_at,
failure_reason, failed_subtask_id, cancelled_by, last_position
"""

_TICKET = f"SELECT {_TICKET_COLUMNS} FROM rm_tickets WHERE tenant = $1 AND ticket_id = $2"

_SUBTASKS_OF_TICKET = """
SELECT subtask_id, ordinal, title, depends_on, status, attempts, worker, last_error, output,
       output_sha256, model, prompt_tokens, completion_tokens, cached_tokens, latency_ms, ignored,
       updated_at
FROM rm_subtasks WHERE tenant = $1 AND ticket_id = $2
"""

_SUBTASKS = f"{_SUBTASKS_OF_TICKET} ORDER BY ordinal, subtask_id"

_REPORT = """
SELECT ticket_id, final_subtask_id, verdict, outputs, markdown, completed_at, position
FROM rm_reports WHERE tenant = $1 AND ticket_id = $2
"""

HISTORY_SCHEMA = "pg_temp"
"""Where an `as_of` request's read models are folded (temporary tables of its transaction)."""


def _in(sql: str, schema: str | None) -> str:
    """`sql` reading the read models of `schema` (the live ones when None).

    Only `HISTORY_SCHEMA` is accepted: the statements are fixed text, never built from input.
    """
    if schema is None:
        return sql
    if schema != HISTORY_SCHEMA:
        raise ValueError(f"unexpected read-model schema {schema!r}")
    for table in ("rm_tickets", "rm_subtasks", "rm_reports", "rm_questions"):
        sql = sql.replace(f"FROM {table} ", f"FROM {schema}.{table} ")
    return sql


_EVENTS_OF_TICKET = (
    "SELECT notification_id, originator_id, originator_version, topic, state"
    f" FROM {EVENTS_TABLE} WHERE originator_id = $1 AND notification_id > $2"
    " ORDER BY notification_id LIMIT $3"
)

# Users and tenants share the event store: only a ticket's own first event makes it a ticket.
_FIRST_EVENT = (
    f"SELECT notification_id, originator_id, originator_version, topic, state FROM {EVENTS_TABLE}"
    " WHERE originator_id = $1 AND originator_version = 1 AND topic LIKE 'ticketflow.ticket.%'"
)

_POSITION = "SELECT position FROM projection_positions WHERE name = $1"


if TYPE_CHECKING:
    Executor: TypeAlias = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]


class InvalidCursor(ValueError):
    """A `cursor` this API did not hand out (or one that was altered)."""


@dataclass(frozen=True)
class Cursor:
    """Where a page of the ticket list ends: its last (created_at, ticket_id)."""

    created_at: datetime
    ticket_id: UUID

    def encode(self) -> str:
        raw = json.dumps({"c": self.created_at.isoformat(), "i": str(self.ticket_id)})
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            fields = json.loads(raw)
            created_at = datetime.fromisoformat(fields["c"])
            if created_at.tzinfo is None:
                raise InvalidCursor("cursor time has no zone")
            return cls(created_at, UUID(str(fields["i"])))
        except (binascii.Error, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise InvalidCursor("not a cursor from this API") from error


def json_value(value: Any) -> Any:
    """jsonb arrives as text unless a codec was registered on the pool; accept both."""
    if isinstance(value, str):
        return json.loads(value)
    return value


def ticket_dict(row: asyncpg.Record) -> dict[str, Any]:
    values = dict(row)
    values["documents"] = json_value(values["documents"])
    return values


async def list_tickets(
    conn: Executor,
    tenant: str,
    *,
    limit: int,
    status: str | None = None,
    pipeline: str | None = None,
    after: Cursor | None = None,
    schema: str | None = None,
) -> tuple[list[dict[str, Any]], Cursor | None]:
    """A page of the tenant's tickets, newest first, and the cursor of the next page (if any)."""
    conditions = ["tenant = $1"]
    arguments: list[object] = [tenant]
    if status is not None:
        arguments.append(status)
        conditions.append(f"status = ${len(arguments)}")
    if pipeline is not None:
        arguments.append(pipeline)
        conditions.append(f"pipeline_name = ${len(arguments)}")
    if after is not None:
        arguments.extend((after.created_at, after.ticket_id))
        conditions.append(f"(created_at, ticket_id) < (${len(arguments) - 1}, ${len(arguments)})")
    arguments.append(limit + 1)
    # Fragments are fixed strings; only values travel as parameters.
    sql = (
        f"SELECT {_TICKET_COLUMNS} FROM rm_tickets WHERE {' AND '.join(conditions)}"
        f" ORDER BY created_at DESC, ticket_id DESC LIMIT ${len(arguments)}"
    )
    rows = await conn.fetch(_in(sql, schema), *arguments)
    page = [ticket_dict(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = Cursor(last["created_at"], last["ticket_id"])
    return page, next_cursor


async def ticket(
    conn: Executor, tenant: str, ticket_id: UUID, *, schema: str | None = None
) -> dict[str, Any] | None:
    row = await conn.fetchrow(_in(_TICKET, schema), tenant, ticket_id)
    return None if row is None else ticket_dict(row)


async def subtasks(
    conn: Executor, tenant: str, ticket_id: UUID, *, schema: str | None = None
) -> list[dict[str, Any]]:
    rows = await conn.fetch(_in(_SUBTASKS, schema), tenant, ticket_id)
    result = []
    for row in rows:
        values = dict(row)
        values["output"] = json_value(values["output"])
        values["depends_on"] = list(values["depends_on"])
        result.append(values)
    return result


_QUESTIONS_OF_TICKET = """
SELECT question_id, subtask_id, ordinal, question, asked_by, status, attempts, answer, model,
       prompt_sha256, last_error, failure_reason, asked_at, answered_at, updated_at
FROM rm_questions WHERE tenant = $1 AND ticket_id = $2
"""

_QUESTIONS = f"{_QUESTIONS_OF_TICKET} ORDER BY ordinal"

# One statement, so one snapshot: the ticket, its subtasks and questions (as jsonb arrays, in
# the order the separate statements give) and, live, the position the rows reflect.
_DETAIL = f"""
SELECT {_TICKET_COLUMNS},
       (SELECT coalesce(jsonb_agg(s ORDER BY s.ordinal, s.subtask_id), '[]'::jsonb)
        FROM ({_SUBTASKS_OF_TICKET}) s) AS subtask_rows,
       (SELECT coalesce(jsonb_agg(q ORDER BY q.ordinal), '[]'::jsonb)
        FROM ({_QUESTIONS_OF_TICKET}) q) AS question_rows
       {{position}}
FROM rm_tickets WHERE tenant = $1 AND ticket_id = $2
"""
_DETAIL_AT = _DETAIL.format(position="")
_DETAIL_LIVE = _DETAIL.format(
    position=", (SELECT position FROM projection_positions WHERE name = $3) AS read_position"
)


SUBTASK_STATUSES = ("pending", "ready", "running", "completed", "failed", "cancelled")
_UNFINISHED = frozenset({"pending", "ready", "running"})


def shown_subtask(ticket_status: str, subtask: dict[str, Any]) -> dict[str, Any]:
    """A subtask as the API shows it. One that had not finished when its ticket was cancelled
    reads `cancelled`: nothing will run it, and work already under way may never report back
    (an answer that fails its checks after the cancel is not retried). The read model keeps
    what the events said, so a rebuild still equals it."""
    if ticket_status == "cancelled" and subtask["status"] in _UNFINISHED:
        return {**subtask, "status": "cancelled"}
    return subtask


@dataclass(frozen=True)
class TicketDetailRows:
    """What `ticket_detail` read: the ticket's row, its subtasks in pipeline order, its
    questions in the order asked and, for the live tables, the position they reflect."""

    ticket: dict[str, Any]
    subtasks: list[dict[str, Any]]
    questions: list[dict[str, Any]]
    position: int | None


async def ticket_detail(
    conn: Executor,
    tenant: str,
    ticket_id: UUID,
    *,
    projection: str | None = None,
    schema: str | None = None,
) -> TicketDetailRows | None:
    """The ticket, its subtasks and its questions in one statement, hence one snapshot without a
    transaction; with `projection`, also that projection's position in the same snapshot.

    Subtasks and questions travel as jsonb: their times arrive as RFC 3339 text in the session's
    time zone (the query API's pool sets UTC), which the response models parse back."""
    if projection is None:
        row = await conn.fetchrow(_in(_DETAIL_AT, schema), tenant, ticket_id)
    else:
        row = await conn.fetchrow(_in(_DETAIL_LIVE, schema), tenant, ticket_id, projection)
    if row is None:
        return None
    ticket = ticket_dict(row)
    subtasks = json_value(ticket.pop("subtask_rows"))
    questions = json_value(ticket.pop("question_rows"))
    position = ticket.pop("read_position", None)
    if projection is not None:
        position = 0 if position is None else int(position)
    return TicketDetailRows(ticket, subtasks, questions, position)


async def questions(
    conn: Executor, tenant: str, ticket_id: UUID, *, schema: str | None = None
) -> list[dict[str, Any]]:
    """The ticket's follow-up questions in the order asked, with their answers."""
    rows = await conn.fetch(_in(_QUESTIONS, schema), tenant, ticket_id)
    result = []
    for row in rows:
        values = dict(row)
        values["answer"] = json_value(values["answer"])
        result.append(values)
    return result


async def report(
    conn: Executor, tenant: str, ticket_id: UUID, *, schema: str | None = None
) -> dict[str, Any] | None:
    row = await conn.fetchrow(_in(_REPORT, schema), tenant, ticket_id)
    if row is None:
        return None
    values = dict(row)
    values["verdict"] = json_value(values["verdict"])
    values["outputs"] = json_value(values["outputs"])
    return values


async def rerun_of(conn: Executor, ticket_id: UUID) -> UUID | None:
    """The ticket `ticket_id` re-runs, from its `TicketRerunRequested` (its second event)."""
    row = await conn.fetchrow(
        f"SELECT notification_id, originator_id, originator_version, topic, state"
        f" FROM {EVENTS_TABLE} WHERE originator_id = $1 AND originator_version = 2"
        " AND topic LIKE 'ticketflow.ticket.rerun_requested.%'",
        ticket_id,
    )
    if row is None:
        return None
    return UUID(str(RecordedEvent.from_row(row).state["rerun_of"]))


async def projection_position(conn: Executor, name: str) -> int:
    value = await conn.fetchval(_POSITION, name)
    return 0 if value is None else int(value)


async def ticket_tenant(conn: Executor, ticket_id: UUID) -> str | None:
    """The tenant that opened the ticket, from its first event in the event store."""
    row = await conn.fetchrow(_FIRST_EVENT, ticket_id)
    return None if row is None else RecordedEvent.from_row(row).tenant


async def ticket_events(
    conn: Executor,
    ticket_id: UUID,
    *,
    after: int = 0,
    limit: int = 1000,
) -> list[RecordedEvent]:
    """The ticket's events after global position `after`, in order.

    Reading one ticket by position never skips an event: each event of a ticket is appended by a
    transaction that read the previous one (optimistic concurrency on the version), so a ticket's
    events commit in the order of their positions and a later one is never visible before an
    earlier one.
    """
    rows = await conn.fetch(_EVENTS_OF_TICKET, ticket_id, after, limit)
    return [RecordedEvent.from_row(row) for row in rows]


async def open_questions(
    conn: Executor, ticket_id: UUID, position: int, asked: str, ended: list[str]
) -> int:
    """How many of the ticket's questions recorded at or before `position` (topic `asked`) had
    not ended by then (topics `ended`)."""
    value = await conn.fetchval(
        "SELECT count(*) FILTER (WHERE topic = $3)"
        " - count(*) FILTER (WHERE topic = ANY($4::text[]))"
        f" FROM {EVENTS_TABLE} WHERE originator_id = $1 AND notification_id <= $2"
        " AND (topic = $3 OR topic = ANY($4::text[]))",
        ticket_id,
        position,
        asked,
        ended,
    )
    return int(value or 0)


async def has_event_up_to(
    conn: Executor, ticket_id: UUID, position: int, topics: list[str]
) -> bool:
    """Whether the ticket has an event of one of `topics` at or before `position`."""
    value = await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {EVENTS_TABLE} WHERE originator_id = $1"
        " AND notification_id <= $2 AND topic = ANY($3::text[]))",
        ticket_id,
        position,
        topics,
    )
    return bool(value)
