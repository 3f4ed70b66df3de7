"""Turns recorded events into writes on the read-model tables.

`ReadModelWriter` is pure: one method per event type, each returning the operations (SQL
statements, or "write this ticket's report") that fold one event into the tables of one schema.
`apply_events` runs them on a connection, inside the caller's transaction.

Every statement is guarded by the position of the row it changes (`last_position < $position`,
or a primary-key conflict for inserts), and counters move only together with the ticket row they
count, so applying an event a second time changes nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from projections.report import ReportSource, SubtaskOutcome, build_report
from streams.contract import (
    DocumentIngested,
    EventPayload,
    QuestionAnswered,
    QuestionAsked,
    QuestionFailed,
    SubtaskCompletedV2,
    SubtaskFailed,
    SubtaskReady,
    SubtaskRetried,
    SubtaskStarted,
    TicketCancelled,
    TicketCompleted,
    TicketCreated,
    TicketFailed,
    TicketRerunRequested,
    is_question_subtask,
    upcast,
)
from streams.contract.eventlog import RecordedEvent

logger = logging.getLogger(__name__)

READ_MODEL_TABLES: tuple[str, ...] = (
    "rm_tickets",
    "rm_subtasks",
    "rm_reports",
    "rm_tenant_counts",
    "rm_questions",
)
TICKET_STATUSES: tuple[str, ...] = ("pending", "running", "completed", "failed", "cancelled")
OPEN_STATUSES: tuple[str, ...] = ("pending", "running")

# A plain connection or one from a pool; asyncpg's classes are generic only to type checkers.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


Combine: TypeAlias = (
    "Callable[[str, Sequence[tuple[Any, ...]]], tuple[str, list[list[Any]]] | None]"
)
"""One statement, and its arrays, that does what running `sql` once per argument row does."""


@dataclass(frozen=True)
class Statement:
    sql: str
    args: tuple[Any, ...]
    # For a statement that `set_based` cannot turn into one (it writes a row that several
    # tickets share), how to run the rows of a whole wave at once.
    combine: Combine | None = field(default=None, compare=False, repr=False)
    # What it sets on one row of its ticket, for `without_overwritten_writes`.
    writes: RowWrite | None = None


@dataclass(frozen=True)
class RowWrite:
    """Columns a statement sets on one row of its ticket (`row`: "ticket", or "subtask <id>"),
    with `attempt` for `attempts = greatest(attempts, attempt)` among them; `only` when the
    statement does nothing else, so a later statement that sets them all again overwrites it."""

    row: str
    columns: frozenset[str]
    only: bool = False
    attempt: int = 0


TICKET_ROW = "ticket"
STAMPS = frozenset({"updated_at", "last_position", "last_version"})
"""What every event sets on its ticket's row."""
_ASSIGNED = re.compile(r"(?:^|, )(\w+) = ")


@dataclass(frozen=True)
class WriteReport:
    """Render the report of a ticket that just completed, from the rows written before it."""

    ticket_id: UUID
    completed_at: datetime
    position: int


Operation = Statement | WriteReport


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ReadModelWriter:
    """The operations that apply one event to the read models in `schema`."""

    def __init__(self, schema: str = "public") -> None:
        self.schema = schema
        prefix = quote_identifier(schema)
        self.tickets = f"{prefix}.rm_tickets"
        self.subtasks = f"{prefix}.rm_subtasks"
        self.reports = f"{prefix}.rm_reports"
        self.counts = f"{prefix}.rm_tenant_counts"
        self.questions = f"{prefix}.rm_questions"
        self._by_payload: dict[type[EventPayload], Callable[[Any, _Meta], list[Operation]]] = {
            TicketCreated: self.ticket_created,
            DocumentIngested: self.document_ingested,
            SubtaskReady: self.subtask_ready,
            SubtaskStarted: self.subtask_started,
            SubtaskCompletedV2: self.subtask_completed,
            SubtaskFailed: self.subtask_failed,
            SubtaskRetried: self.subtask_retried,
            TicketCompleted: self.ticket_completed,
            TicketFailed: self.ticket_failed,
            TicketCancelled: self.ticket_cancelled,
            TicketRerunRequested: self.rerun_requested,
            QuestionAsked: self.question_asked,
            QuestionAnswered: self.question_answered,
            QuestionFailed: self.question_failed,
        }

    def operations(self, event: RecordedEvent) -> list[Operation]:
        """What applying `event` means; raises `UnknownEventTopic` for a topic we do not know.

        Users' and tenants' events change no read model here: nothing. Older versions of an
        event are upcast first (a v1 `subtask_completed` applies as a v2 without provenance),
        so every version of an event folds through the same method.
        """
        payload = upcast(event.payload())
        if not isinstance(payload, EventPayload):
            return []
        meta = _Meta(
            ticket_id=event.aggregate_id,
            position=event.position,
            version=event.version,
            at=datetime.fromisoformat(event.timestamp),
        )
        return self._by_payload[type(payload)](payload, meta)

    # -- one method per event type ----------------------------------------------------------

    def ticket_created(self, payload: TicketCreated, meta: _Meta) -> list[Operation]:
        documents = [
            {
                "role": d.role,
                "filename": d.filename,
                "sha256": d.sha256,
                "media_type": d.media_type,
                "size": d.size,
            }
            for d in payload.documents
        ]
        subtasks = [
            {
                "subtask_id": s.id,
                "ordinal": ordinal,
                "title": s.title,
                "depends_on": list(s.depends_on),
            }
            for ordinal, s in enumerate(payload.pipeline.subtasks)
        ]
        ticket = Statement(
            "WITH inserted AS ("
            f" INSERT INTO {self.tickets} (ticket_id, tenant, owner, pipeline_name,"
            "  pipeline_version, status, subtasks_total, documents, created_at, updated_at,"
            "  last_position, last_version)"
            " VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7::jsonb, $8, $8, $9, $10)"
            " ON CONFLICT (ticket_id) DO NOTHING RETURNING tenant)"
            f" INSERT INTO {self.counts} AS c (tenant, tickets, pending)"
            " SELECT tenant, count(*), count(*) FROM inserted GROUP BY tenant"
            " ON CONFLICT (tenant) DO UPDATE"
            " SET tickets = c.tickets + excluded.tickets, pending = c.pending + excluded.pending",
            (
                meta.ticket_id,
                payload.tenant,
                payload.owner,
                payload.pipeline.name,
                payload.pipeline.version,
                len(subtasks),
                _json(documents),
                meta.at,
                meta.position,
                meta.version,
            ),
            # The counts add up per tenant, so the inserts of many tickets can run as one.
            combine=_combine_with_insert,
        )
        rows = Statement(
            f"INSERT INTO {self.subtasks} (ticket_id, subtask_id, tenant, ordinal, title,"
            " depends_on, status, updated_at, last_position)"
            " SELECT $1, s.subtask_id, $2, s.ordinal, s.title, s.depends_on, 'pending', $3, $4"
            " FROM jsonb_to_recordset($5::jsonb)"
            "  AS s(subtask_id text, ordinal integer, title text, depends_on text[])"
            " ON CONFLICT (ticket_id, subtask_id) DO NOTHING",
            (meta.ticket_id, payload.tenant, meta.at, meta.position, _json(subtasks)),
        )
        return [ticket, rows]

    def document_ingested(self, payload: DocumentIngested, meta: _Meta) -> list[Operation]:
        ingested = {
            d.role: {"pages": d.pages, "characters": d.characters, "chunks": d.chunks}
            for d in payload.documents
        }
        return [
            *self._transition(meta, "running", from_statuses=("pending",)),
            Statement(
                f"UPDATE {self.tickets} AS t SET"
                " status = CASE WHEN t.status = 'pending' THEN 'running' ELSE t.status END,"
                " documents = (SELECT coalesce(jsonb_agg(d.value"
                "   || coalesce($2::jsonb -> (d.value ->> 'role'), '{}'::jsonb)"
                "   ORDER BY d.ordinality), '[]'::jsonb)"
                "  FROM jsonb_array_elements(t.documents) WITH ORDINALITY AS d),"
                " ingested_at = $3, updated_at = $3, last_position = $4, last_version = $5"
                " WHERE t.ticket_id = $1 AND t.last_position < $4",
                (meta.ticket_id, _json(ingested), meta.at, meta.position, meta.version),
                writes=RowWrite(TICKET_ROW, STAMPS),
            ),
        ]

    def subtask_ready(self, payload: SubtaskReady, meta: _Meta) -> list[Operation]:
        if is_question_subtask(payload.subtask_id):
            return self._question(
                meta,
                payload.subtask_id,
                "status = 'ready', attempts = greatest(attempts, $5)",
                (payload.attempt,),
            )
        return [
            self._subtask(
                meta,
                payload.subtask_id,
                "status = 'ready', attempts = greatest(attempts, $5)",
                (payload.attempt,),
            ),
            self._touch_ticket(meta),
        ]

    def subtask_started(self, payload: SubtaskStarted, meta: _Meta) -> list[Operation]:
        if is_question_subtask(payload.subtask_id):
            return self._question(
                meta,
                payload.subtask_id,
                "status = 'running', attempts = greatest(attempts, $5)",
                (payload.attempt,),
            )
        return [
            self._subtask(
                meta,
                payload.subtask_id,
                "status = 'running', attempts = greatest(attempts, $5), worker = $6",
                (payload.attempt, payload.worker),
            ),
            self._touch_ticket(meta),
        ]

    def subtask_completed(self, payload: SubtaskCompletedV2, meta: _Meta) -> list[Operation]:
        if is_question_subtask(payload.subtask_id):
            if payload.ignored:
                return [self._record_position(meta)]
            # The question reads answered with its `question_answered`, the next event.
            return self._question(
                meta,
                payload.subtask_id,
                "answer = $5::jsonb, model = $6, prompt_sha256 = $7",
                (
                    None if payload.output is None else _json(payload.output),
                    payload.model,
                    payload.provenance.prompt_sha256 if payload.provenance else None,
                ),
            )
        subtask = self._subtask(
            meta,
            payload.subtask_id,
            "status = 'completed', attempts = greatest(attempts, $5), output = $6::jsonb,"
            " output_sha256 = $7, model = $8, prompt_tokens = $9, completion_tokens = $10,"
            " cached_tokens = $11, latency_ms = $12, ignored = $13",
            (
                payload.attempt,
                None if payload.output is None else _json(payload.output),
                payload.output_sha256,
                payload.model,
                payload.usage.prompt_tokens,
                payload.usage.completion_tokens,
                payload.usage.cached_tokens,
                payload.latency_ms,
                payload.ignored,
            ),
        )
        if payload.ignored:
            # The ticket had already ended: the result is kept on the subtask only.
            return [subtask, self._record_position(meta)]
        return [subtask, self._touch_ticket(meta, "subtasks_completed = subtasks_completed + 1")]

    def rerun_requested(self, payload: TicketRerunRequested, meta: _Meta) -> list[Operation]:
        # The link is served from the event store (GET /tickets/{a}/diff/{b}); the ticket shows
        # nothing new, only its position moves.
        return [self._record_position(meta)]

    def subtask_failed(self, payload: SubtaskFailed, meta: _Meta) -> list[Operation]:
        if is_question_subtask(payload.subtask_id):
            return self._question(meta, payload.subtask_id, "last_error = $5", (payload.reason,))
        return [
            self._subtask(
                meta,
                payload.subtask_id,
                "status = 'failed', attempts = greatest(attempts, $5), last_error = $6",
                (payload.attempt, payload.reason),
            ),
            self._touch_ticket(meta, "subtasks_failed = subtasks_failed + 1"),
        ]

    def subtask_retried(self, payload: SubtaskRetried, meta: _Meta) -> list[Operation]:
        # The failed ticket re-opens; its `SubtaskReady` (next event) readies the subtask.
        return [
            *self._transition(meta, "running", from_statuses=("failed",)),
            self._touch_ticket(
                meta,
                "status = CASE WHEN status = 'failed' THEN 'running' ELSE status END,"
                " finished_at = NULL, failure_reason = NULL, failed_subtask_id = NULL",
            ),
        ]

    def ticket_completed(self, payload: TicketCompleted, meta: _Meta) -> list[Operation]:
        return [
            *self._transition(meta, "completed"),
            self._finish_ticket(meta, "completed", "completed_at = $4"),
            WriteReport(meta.ticket_id, meta.at, meta.position),
        ]

    def ticket_failed(self, payload: TicketFailed, meta: _Meta) -> list[Operation]:
        return [
            *self._transition(meta, "failed"),
            self._finish_ticket(
                meta,
                "failed",
                "failure_reason = $7, failed_subtask_id = $8",
                (payload.reason, payload.subtask_id),
            ),
        ]

    def ticket_cancelled(self, payload: TicketCancelled, meta: _Meta) -> list[Operation]:
        return [
            *self._transition(meta, "cancelled"),
            self._finish_ticket(
                meta,
                "cancelled",
                "failure_reason = $7, cancelled_by = $8",
                (payload.reason, payload.cancelled_by),
            ),
        ]

    def question_asked(self, payload: QuestionAsked, meta: _Meta) -> list[Operation]:
        return [
            Statement(
                f"INSERT INTO {self.questions} (ticket_id, question_id, tenant, subtask_id,"
                " ordinal, question, asked_by, status, asked_at, updated_at, last_position)"
                " SELECT $1, $2, $3, $4,"
                f"  (SELECT count(*) FROM {self.questions} WHERE ticket_id = $1),"
                "  $5, $6, 'asked', $7, $7, $8"
                " ON CONFLICT (ticket_id, question_id) DO NOTHING",
                (
                    meta.ticket_id,
                    payload.question_id,
                    payload.tenant,
                    payload.subtask_id,
                    payload.question,
                    payload.asked_by,
                    meta.at,
                    meta.position,
                ),
            ),
            self._record_position(meta),
        ]

    def question_answered(self, payload: QuestionAnswered, meta: _Meta) -> list[Operation]:
        return self._question(meta, payload.subtask_id, "status = 'answered', answered_at = $4", ())

    def question_failed(self, payload: QuestionFailed, meta: _Meta) -> list[Operation]:
        return self._question(
            meta, payload.subtask_id, "status = 'failed', failure_reason = $5", (payload.reason,)
        )

    # -- shared statements ------------------------------------------------------------------

    def _question(
        self, meta: _Meta, subtask_id: str, assignments: str, args: tuple[Any, ...]
    ) -> list[Operation]:
        """A question's row changes (`assignments` may use $4, the event's time, and $5 on);
        the ticket shows nothing new, only its position moves: questions never change it."""
        return [
            Statement(
                f"UPDATE {self.questions} SET {assignments}, updated_at = $4,"
                " last_position = $3"
                " WHERE ticket_id = $1 AND subtask_id = $2 AND last_position < $3",
                (meta.ticket_id, subtask_id, meta.position, meta.at, *args),
            ),
            self._record_position(meta),
        ]

    def _transition(
        self, meta: _Meta, to_status: str, *, from_statuses: tuple[str, ...] = OPEN_STATUSES
    ) -> list[Operation]:
        """Move the ticket's count from its current status to `to_status`.

        Runs before the ticket row is updated: it reads the status and position it is leaving.
        """
        moves = ", ".join(
            f"{s} = c.{s} - (t.status = '{s}')::int + ($3::text = '{s}')::int"
            for s in TICKET_STATUSES
        )
        return [
            Statement(
                f"UPDATE {self.counts} AS c SET {moves} FROM {self.tickets} AS t"
                " WHERE t.ticket_id = $1 AND t.last_position < $2 AND c.tenant = t.tenant"
                " AND t.status = ANY($4::text[]) AND t.status <> $3",
                (meta.ticket_id, meta.position, to_status, list(from_statuses)),
                combine=self._combine_transitions,
            )
        ]

    def _combine_transitions(
        self, sql: str, rows: Sequence[tuple[Any, ...]]
    ) -> tuple[str, list[list[Any]]] | None:
        """Many tickets' count moves as one UPDATE: the moves summed per tenant first, since an
        UPDATE … FROM changes each row of the counts once however many rows join it."""
        sums = ", ".join(
            f"sum((v.to_status = '{s}')::int - (t.status = '{s}')::int) AS {s}"
            for s in TICKET_STATUSES
        )
        moves = ", ".join(f"{s} = c.{s} + d.{s}" for s in TICKET_STATUSES)
        combined = (
            f"UPDATE {self.counts} AS c SET {moves} FROM ("
            f" SELECT t.tenant, {sums}"
            " FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[])"
            "  AS v(ticket_id, position, to_status, from_statuses)"
            f" JOIN {self.tickets} AS t ON t.ticket_id = v.ticket_id"
            " WHERE t.last_position < v.position AND t.status <> v.to_status"
            "  AND t.status = ANY(string_to_array(v.from_statuses, ','))"
            " GROUP BY t.tenant) AS d WHERE c.tenant = d.tenant"
        )
        ids, positions, targets, sources = zip(*rows, strict=True)
        return combined, [
            list(ids),
            list(positions),
            list(targets),
            [",".join(statuses) for statuses in sources],
        ]

    def _finish_ticket(
        self, meta: _Meta, status: str, assignments: str, args: tuple[Any, ...] = ()
    ) -> Statement:
        """Close the ticket; `assignments` may use $4 (the event's time) and $7 onwards."""
        return Statement(
            f"UPDATE {self.tickets} SET"
            " status = CASE WHEN status = ANY($5::text[]) THEN $6 ELSE status END,"
            f" finished_at = coalesce(finished_at, $4), {assignments},"
            " updated_at = $4, last_position = $2, last_version = $3"
            " WHERE ticket_id = $1 AND last_position < $2",
            (
                meta.ticket_id,
                meta.position,
                meta.version,
                meta.at,
                list(OPEN_STATUSES),
                status,
                *args,
            ),
            writes=RowWrite(TICKET_ROW, STAMPS),
        )

    def _touch_ticket(self, meta: _Meta, assignments: str = "") -> Statement:
        """The ticket moved on: its time, position and version, plus `assignments`."""
        changes = f"{assignments}, " if assignments else ""
        return Statement(
            f"UPDATE {self.tickets} SET {changes}updated_at = $4, last_position = $2,"
            " last_version = $3 WHERE ticket_id = $1 AND last_position < $2",
            (meta.ticket_id, meta.position, meta.version, meta.at),
            writes=RowWrite(TICKET_ROW, STAMPS, only=not assignments),
        )

    def _record_position(self, meta: _Meta) -> Statement:
        """Only the ticket's position and version move; what it shows stays as it was."""
        return Statement(
            f"UPDATE {self.tickets} SET last_position = $2, last_version = $3"
            " WHERE ticket_id = $1 AND last_position < $2",
            (meta.ticket_id, meta.position, meta.version),
            writes=RowWrite(TICKET_ROW, STAMPS - {"updated_at"}, only=True),
        )

    def _subtask(
        self, meta: _Meta, subtask_id: str, assignments: str, args: tuple[Any, ...]
    ) -> Statement:
        """A subtask's row changes: `assignments`, which may use $4 (the event's time) and $5
        on, with `attempts = greatest(attempts, $5)` where `args` starts with the attempt."""
        columns = _subtask_columns(assignments)
        attempt = args[0] if "attempts" in columns else 0
        return Statement(
            f"UPDATE {self.subtasks} SET {assignments}, updated_at = $4, last_position = $3"
            " WHERE ticket_id = $1 AND subtask_id = $2 AND last_position < $3",
            (meta.ticket_id, subtask_id, meta.position, meta.at, *args),
            writes=RowWrite(f"subtask {subtask_id}", columns, True, attempt),
        )


@functools.cache
def _subtask_columns(assignments: str) -> frozenset[str]:
    """The columns a subtask update sets: `assignments`, then its time and position."""
    assigned = _ASSIGNED.findall(assignments)
    if len(assigned) != assignments.count(" = "):
        raise ValueError(f"not a list of plain assignments: {assignments}")
    if "attempts" in assigned and "attempts = greatest(attempts, $5)" not in assignments:
        raise ValueError(f"attempts must be set as the greatest with $5: {assignments}")
    return frozenset({*assigned, "updated_at", "last_position"})


@dataclass(frozen=True)
class _Meta:
    ticket_id: UUID
    position: int
    version: int
    at: datetime


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


class BatchPlan:
    """The operations of a batch of events, queued per ticket: `add` each event in log order,
    then run `queues()` with `apply_planned`. Planning is pure Python, so a caller may plan the
    next batch while the database runs this one (the rebuild does)."""

    def __init__(self, writer: ReadModelWriter) -> None:
        self.writer = writer
        self._per_ticket: dict[UUID, list[Operation]] = {}

    def add(self, event: RecordedEvent) -> None:
        operations = self.writer.operations(event)
        if operations:
            self._per_ticket.setdefault(event.aggregate_id, []).extend(operations)

    def queues(self) -> list[list[Operation]]:
        """Each ticket's operations, less those a later one overwrites."""
        return [without_overwritten_writes(queue) for queue in self._per_ticket.values()]


async def apply_events(
    conn: Connection, writer: ReadModelWriter, events: Sequence[RecordedEvent]
) -> None:
    """Apply `events` in order on `conn`; call it inside a transaction."""
    plan = BatchPlan(writer)
    for event in events:
        plan.add(event)
    await apply_planned(conn, writer, plan.queues())


async def apply_planned(
    conn: Connection, writer: ReadModelWriter, queues: Sequence[Sequence[Operation]]
) -> None:
    """Run a batch's operations, queued per ticket (`BatchPlan`), on `conn`.

    Only the operations of one ticket depend on each other: a statement reads and writes the
    rows of its own ticket, and what it adds to its tenant's counts commutes with what other
    tickets add. So the operations run in waves: the first pending operation of every ticket
    in the batch, then the second, and so on, each wave as one `executemany` per statement
    text (one round trip each, pipelined by asyncpg) instead of one round trip per statement.
    Each ticket still sees its own operations in log order, less the statements whose writes
    a later one of the same batch overwrites (`without_overwritten_writes`): most events of a
    running ticket only stamp its row, and a subtask's ready, started and completed may come
    in one batch.
    """
    depth = max((len(queue) for queue in queues), default=0)
    for wave in range(depth):
        statements: dict[str, list[tuple[Any, ...]]] = {}
        combiners: dict[str, Combine] = {}
        reports: list[WriteReport] = []
        for queue in queues:
            if wave < len(queue):
                operation = queue[wave]
                if isinstance(operation, Statement):
                    statements.setdefault(operation.sql, []).append(operation.args)
                    if operation.combine is not None:
                        combiners[operation.sql] = operation.combine
                else:
                    reports.append(operation)
        for sql, args in statements.items():
            await _run_statement(conn, writer, sql, args, combiners.get(sql))
        if reports:
            await write_reports(conn, writer, reports)


def without_overwritten_writes(queue: Sequence[Operation]) -> list[Operation]:
    """A ticket's operations less each statement that only sets columns of one row that later
    statements of the queue set again, up to the next report (which reads the rows as they
    are at its place).

    Running the rest gives the same rows: every column ends with the value of its last writer
    (`attempts` with the greatest attempt, so a later one must name at least the same); each
    row's statements are guarded by `last_position < $position` alone, so a later one applies
    whenever an earlier one would have (positions grow along the queue); and what statements
    in between read of the row is that guard, which the earlier position on the row passes
    exactly when the dropped statement's would have.
    """
    kept: list[Operation] = []
    later: dict[str, tuple[set[str], int]] = {}
    for operation in reversed(queue):
        if isinstance(operation, WriteReport):
            later.clear()
        elif operation.writes is not None:
            write = operation.writes
            columns, attempt = later.setdefault(write.row, (set(), 0))
            if write.only and write.columns <= columns and write.attempt <= attempt:
                continue
            columns |= write.columns
            later[write.row] = (columns, max(attempt, write.attempt))
        kept.append(operation)
    kept.reverse()
    return kept


async def _run_statement(
    conn: Connection,
    writer: ReadModelWriter,
    sql: str,
    args: Sequence[tuple[Any, ...]],
    combine: Combine | None,
) -> None:
    """`sql` once per argument row, as one statement where that means the same."""
    if len(args) == 1:
        await conn.execute(sql, *args[0])
        return
    many = combine(sql, args) if combine else set_based(sql, args, writer.counts)
    if many is None:
        await conn.executemany(sql, args)
    else:
        await conn.execute(many[0], *many[1])


_PARAMETER = re.compile(r"\$(\d+)")
_PG_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: bool is an int
    (int, "bigint"),
    (float, "double precision"),
    (str, "text"),
    (UUID, "uuid"),
    (datetime, "timestamptz"),
)


def set_based(
    sql: str, rows: Sequence[tuple[Any, ...]], shared_table: str
) -> tuple[str, list[list[Any]]] | None:
    """One statement for many argument rows: the rows become a relation (`unnest` of one array
    per parameter, `$k` read as `v.pk`) that an UPDATE joins to its table, an INSERT … VALUES
    selects from, and an INSERT … SELECT puts first in its FROM list. None when that is not the
    same as running the statement once per row: any other statement (a WITH, whose writes to a
    shared row would collide), an UPDATE of `shared_table` (rows of several tickets update one
    row of it, and an UPDATE … FROM changes a row once), or a parameter with no scalar
    PostgreSQL type to make an array of.

    Callers pass rows of different tickets only, so no row of a ticket's tables is written twice.
    """
    if sql.startswith(f"UPDATE {shared_table} ") or not sql.startswith(("UPDATE ", "INSERT ")):
        return None
    return _over_rows(sql, rows, _set_based_text)


def _over_rows(
    sql: str,
    rows: Sequence[tuple[Any, ...]],
    text: Callable[[str, tuple[str | None, ...]], str | None],
) -> tuple[str, list[list[Any]]] | None:
    """`text`'s statement for the parameter types of `rows`, and the rows' arrays; None when
    the rows have no scalar types or `text` has no statement for them."""
    columns = _columns(rows)
    if columns is None:
        return None
    types, arrays = columns
    statement = text(sql, types)
    return None if statement is None else (statement, arrays)


@functools.lru_cache(maxsize=512)
def _set_based_text(sql: str, types: tuple[str | None, ...]) -> str | None:
    """`set_based`'s statement for rows whose parameters have `types` (the same for every wave
    of a statement text, so worked out once)."""
    replacements, source = _rows_source(types)
    return _join_rows(_PARAMETER.sub(lambda m: replacements[m.group(1)], sql), source)


def _combine_with_insert(
    sql: str, rows: Sequence[tuple[Any, ...]]
) -> tuple[str, list[list[Any]]] | None:
    """`WITH x AS (INSERT … VALUES (…) … RETURNING …) <statement aggregating x>` for many rows:
    the inner INSERT reads the rows; the outer statement, which takes no parameters and folds
    whatever `x` returns, then sees them all at once."""
    return _over_rows(sql, rows, _combined_text)


@functools.lru_cache(maxsize=64)
def _combined_text(sql: str, types: tuple[str | None, ...]) -> str | None:
    opening = sql.index(" AS (") + len(" AS ")
    closing = _closing(sql, opening)
    joined = _set_based_text(sql[opening + 1 : closing].strip(), types)
    if joined is None:
        return None
    return f"{sql[: opening + 1]} {joined}{sql[closing:]}"


def _columns(
    rows: Sequence[tuple[Any, ...]],
) -> tuple[tuple[str | None, ...], list[list[Any]]] | None:
    """Each parameter's PostgreSQL type (None where every row has None), and an array per typed
    parameter; None when a parameter has no scalar type, or none has a type."""
    types: list[str | None] = []
    arrays: list[list[Any]] = []
    for column in zip(*rows, strict=True):
        kinds = {type(value) for value in column if value is not None}
        if not kinds:
            types.append(None)
            continue
        if kinds == {int, float}:
            kinds = {float}
        kind = kinds.pop() if len(kinds) == 1 else None
        pg_type = next((name for base, name in _PG_TYPES if kind and issubclass(kind, base)), None)
        if pg_type is None:
            return None
        types.append(pg_type)
        arrays.append(list(column))
    if not arrays:
        return None
    return tuple(types), arrays


def _rows_source(types: tuple[str | None, ...]) -> tuple[dict[str, str], str]:
    """What stands for each parameter number (a column of `v`, or NULL where every row has None:
    an untyped NULL takes its type from where it is used, as the parameter did), and the
    `unnest` relation `v` of the typed parameters' arrays."""
    replacements: dict[str, str] = {}
    typed: list[str] = []
    for number, pg_type in enumerate(types, start=1):
        if pg_type is None:
            replacements[str(number)] = "NULL"
        else:
            typed.append(pg_type)
            replacements[str(number)] = f"v.p{len(typed)}"
    source = (
        "unnest("
        + ", ".join(f"${n}::{pg_type}[]" for n, pg_type in enumerate(typed, start=1))
        + ") AS v("
        + ", ".join(f"p{n}" for n in range(1, len(typed) + 1))
        + ")"
    )
    return replacements, source


def _join_rows(statement: str, source: str) -> str | None:
    """`statement` reading its rows from `source`, or None for a shape not handled here."""
    if statement.startswith("INSERT "):
        values = _top_level(statement, " VALUES (")
        if values >= 0:
            # INSERT … VALUES (…) [ON CONFLICT …]: the row list becomes a SELECT from the rows.
            end = _closing(statement, values + len(" VALUES "))
            row = statement[values + len(" VALUES (") : end]
            return f"{statement[:values]} SELECT {row} FROM {source}{statement[end + 1 :]}"
        select, frm = _top_level(statement, " SELECT "), _top_level(statement, " FROM ")
        if select < 0 or frm < select:
            return None
        # INSERT … SELECT … FROM x: the rows come first, so x may refer to them (LATERAL).
        at = frm + len(" FROM ")
        return f"{statement[:at]}{source}, {statement[at:]}"
    where = _top_level(statement, " WHERE ")
    if where < 0:
        return None
    head, tail = statement[:where], statement[where:]
    if _top_level(head, " FROM ") >= 0:
        return f"{head}, {source}{tail}"
    return f"{head} FROM {source}{tail}"


def _closing(sql: str, opening: int) -> int:
    """The index of the parenthesis that closes the one at `opening`."""
    depth, quoted = 0, False
    for index in range(opening, len(sql)):
        char = sql[index]
        if char == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced parentheses in {sql!r}")


def _top_level(sql: str, keyword: str) -> int:
    """Where `keyword` occurs in `sql` outside parentheses and quotes (the last time), or -1."""
    depth, quoted, found = 0, False, -1
    for index, char in enumerate(sql):
        if char == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif depth == 0 and sql.startswith(keyword, index):
            found = index
    return found


async def write_reports(
    conn: Connection, writer: ReadModelWriter, requests: Sequence[WriteReport]
) -> None:
    """The reports of tickets that just completed (one ticket per request), in three queries."""
    by_ticket = {request.ticket_id: request for request in requests}
    ids = list(by_ticket)
    tickets = {
        row["ticket_id"]: row
        for row in await conn.fetch(
            "SELECT ticket_id, tenant, pipeline_name, pipeline_version, documents"
            f" FROM {writer.tickets} WHERE ticket_id = ANY($1::uuid[])",
            ids,
        )
    }
    subtasks: dict[UUID, list[asyncpg.Record]] = {}
    for row in await conn.fetch(
        "SELECT ticket_id, subtask_id, title, depends_on, output, output_sha256"
        f" FROM {writer.subtasks} WHERE ticket_id = ANY($1::uuid[])"
        " ORDER BY ticket_id, ordinal",
        ids,
    ):
        subtasks.setdefault(row["ticket_id"], []).append(row)
    rows = []
    for ticket_id, request in by_ticket.items():
        ticket = tickets.get(ticket_id)
        if ticket is None:
            logger.warning("no ticket row for the report of %s", ticket_id)
            continue
        rows.append(_report_row(request, ticket, subtasks.get(ticket_id, [])))
    if len(rows) == 1:
        await conn.execute(_insert_report_sql(writer), *rows[0])
    elif rows:
        many = set_based(_insert_report_sql(writer), rows, writer.counts)
        if many is None:
            await conn.executemany(_insert_report_sql(writer), rows)
        else:
            await conn.execute(many[0], *many[1])


def _report_row(
    request: WriteReport, ticket: asyncpg.Record, subtasks: Sequence[asyncpg.Record]
) -> tuple[Any, ...]:
    report = build_report(
        ReportSource(
            ticket_id=request.ticket_id,
            tenant=ticket["tenant"],
            pipeline_name=ticket["pipeline_name"],
            pipeline_version=ticket["pipeline_version"],
            documents=json.loads(ticket["documents"]),
            completed_at=request.completed_at,
            subtasks=[
                SubtaskOutcome(
                    subtask_id=row["subtask_id"],
                    title=row["title"],
                    depends_on=tuple(row["depends_on"]),
                    output=None if row["output"] is None else json.loads(row["output"]),
                    output_sha256=row["output_sha256"],
                )
                for row in subtasks
            ],
        )
    )
    return (
        request.ticket_id,
        ticket["tenant"],
        report.final_subtask_id,
        None if report.verdict is None else _json(report.verdict),
        _json(report.outputs),
        report.markdown,
        request.completed_at,
        request.position,
    )


def _insert_report_sql(writer: ReadModelWriter) -> str:
    return (
        f"INSERT INTO {writer.reports} AS r (ticket_id, tenant, final_subtask_id, verdict,"
        " outputs, markdown, completed_at, position)"
        " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8)"
        " ON CONFLICT (ticket_id) DO UPDATE SET final_subtask_id = excluded.final_subtask_id,"
        " verdict = excluded.verdict, outputs = excluded.outputs, markdown = excluded.markdown,"
        " completed_at = excluded.completed_at, position = excluded.position"
        " WHERE r.position < excluded.position"
    )


async def write_report(conn: Connection, writer: ReadModelWriter, request: WriteReport) -> None:
    await write_reports(conn, writer, [request])
