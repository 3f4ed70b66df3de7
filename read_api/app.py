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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from inference.embeddings import Embedder
from inference.retrieval import ChunkStore
from read_api import audit, audit_routes, console, queries
from read_api.explain import (
    Explanation,
    InvalidAsOf,
    ReportDiff,
    ReportRef,
    diff_reports,
    explain,
    parse_as_of,
)
from read_api.notifications import Notifications
from read_api.schemas import (
    TICKET_ID_EXAMPLE,
    EventHistory,
    HistoryEvent,
    Progress,
    ProjectionState,
    ReportBody,
    SearchHit,
    SearchRequest,
    SearchResults,
    Subtask,
    TicketDetail,
    TicketPage,
    TicketSummary,
)
from security.http import (
    AUTH_UNAVAILABLE_DOC,
    UNAUTHENTICATED_DOC,
    ApiError,
    Authenticate,
    CurrentPrincipal,
    HealthCheck,
    api_lifespan,
    error_doc,
    forbidden_doc,
    health_router,
    install_error_handlers,
    require_roles,
)
from streams.contract import history
from streams.contract.asyncapi import asyncapi_bytes
from streams.contract.eventlog import NOTIFY_CHANNEL, RecordedEvent, UnknownEventTopic
from streams.contract.events import BY_TOPIC
from streams.contract.identity import Principal
from streams.contract.tracing import record_span

logger = logging.getLogger(__name__)

# The projector's name for the read models and the channel it announces batches on
# (projections.READ_MODELS and projections.PROJECTION_NOTIFY_CHANNEL; this package may not
# import projections).
READ_MODELS_PROJECTION = "read_models"
PROJECTION_NOTIFY_CHANNEL = "ticketflow_projections"
CHANNELS = (NOTIFY_CHANNEL, PROJECTION_NOTIFY_CHANNEL)

FINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
MAX_POSITION = 2**63 - 1
"""Global positions are PostgreSQL bigints: a larger one is refused (422), never sent to SQL."""
_FINAL_TOPICS = [
    topic
    for topic, kind in BY_TOPIC.items()
    if kind.aggregate == "ticket" and kind.name in FINAL_EVENTS
]
_HIDDEN_STATE = ("timestamp", "traceparent", "originator_topic", "password_hash")
TicketStatus = Literal["pending", "running", "completed", "failed", "cancelled"]


@dataclass(frozen=True)
class QuerySettings:
    projection_name: str = READ_MODELS_PROJECTION
    max_wait_s: float = 5.0
    """The longest a request waits for `min_position`."""
    poll_interval_s: float = 0.5
    """How often a waiter re-reads positions even without a notification."""
    stream_poll_interval_s: float = 2.0
    heartbeat_s: float = 15.0
    """An SSE comment this often keeps idle proxies from closing a quiet stream."""
    stream_batch: int = 500


class HistoryFolder(Protocol):
    """Folds `events` into temporary read-model tables (`queries.HISTORY_SCHEMA`) on `conn`,
    inside its transaction, with the projector's own code (projections.history; given by the
    composition root, since this package may not import projections)."""

    async def __call__(
        self, conn: PoolConnectionProxy[asyncpg.Record], events: Sequence[RecordedEvent]
    ) -> None: ...


@dataclass
class QueryApiDeps:
    pool: asyncpg.Pool
    authenticate: Authenticate
    embedder: Embedder
    notifications: Notifications
    settings: QuerySettings = field(default_factory=QuerySettings)
    health_checks: dict[str, HealthCheck] = field(default_factory=dict)
    """Servers besides the database that `/health` checks (Redis), by name."""
    history: HistoryFolder | None = None
    """What answers `as_of`; without it, `as_of` answers 501."""


TICKET_READERS = ("user", "admin")
HISTORY_READERS = ("user", "admin", "auditor")
AUDITORS = ("auditor", "admin")
SNAPSHOT_READERS = HISTORY_READERS
"""Tickets, reports (now or `as_of`), explanations and diffs: auditors read them too."""

_NOT_FOUND = error_doc("ticket_not_found", f"No ticket {TICKET_ID_EXAMPLE} in this tenant.")
_INVALID = error_doc("invalid_request", "query.limit: Input should be at most 100")
_COMMON: dict[int | str, dict[str, Any]] = {
    401: UNAUTHENTICATED_DOC,
    403: forbidden_doc(*TICKET_READERS),
    422: _INVALID,
    503: AUTH_UNAVAILABLE_DOC,
}
_TICKET_ERRORS: dict[int | str, dict[str, Any]] = {**_COMMON, 404: _NOT_FOUND}
_HISTORY_ERRORS: dict[int | str, dict[str, Any]] = {
    **_TICKET_ERRORS,
    403: forbidden_doc(*HISTORY_READERS),
}
_AS_OF_ERRORS: dict[int | str, dict[str, Any]] = {
    422: error_doc(
        "invalid_as_of",
        "as_of must be a global position (an integer) or an RFC 3339 time with its zone,"
        " e.g. 2025-03-01T12:00:00Z",
    ),
    501: error_doc("as_of_unavailable", "This query API cannot answer as_of."),
}
_SNAPSHOT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_TICKET_ERRORS,
    **_AS_OF_ERRORS,
    403: forbidden_doc(*SNAPSHOT_READERS),
}

_PROJECTION_HEADERS = {
    "X-Projection-Position": {
        "description": "Global position the read models had applied when they were read.",
        "schema": {"type": "integer"},
        "example": 42,
    },
    "X-Projection-Behind": {
        "description": "`true` when `min_position` was not reached within the wait.",
        "schema": {"type": "string", "enum": ["true", "false"]},
        "example": "false",
    },
}

MinPosition = Annotated[
    int | None,
    Query(
        ge=0,
        description=(
            "Read-your-writes: wait (boundedly) until the read models have applied this global"
            " position, e.g. the `position` a command returned."
        ),
        examples=[42],
    ),
]


AsOf = Annotated[
    str | None,
    Query(
        max_length=64,
        description=(
            "Answer from history, as the read models stood at this global position, or at this"
            " RFC 3339 time (the last position recorded at or before it). A position after the"
            " last event, or a time in the future, answers 422. `min_position` is then ignored."
        ),
        examples=["42", "2025-03-01T12:00:00Z"],
    ),
]


def _get_deps(request: Request) -> QueryApiDeps:
    deps: QueryApiDeps = request.app.state.deps
    return deps


Deps = Annotated[QueryApiDeps, Depends(_get_deps)]


Reader = Annotated[Principal, Depends(require_roles(*TICKET_READERS))]
HistoryReader = Annotated[Principal, Depends(require_roles(*HISTORY_READERS))]
Auditor = Annotated[Principal, Depends(require_roles(*AUDITORS))]
SnapshotReader = Annotated[Principal, Depends(require_roles(*SNAPSHOT_READERS))]


def _not_found(ticket_id: UUID) -> ApiError:
    return ApiError(404, "ticket_not_found", f"No ticket {ticket_id} in this tenant.")


async def wait_for_projection(deps: QueryApiDeps, min_position: int | None) -> ProjectionState:
    """The read models' position, after waiting (boundedly) for `min_position` if given."""
    settings = deps.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.max_wait_s
    while True:
        latch = deps.notifications.latch(PROJECTION_NOTIFY_CHANNEL)
        position = await queries.projection_position(deps.pool, settings.projection_name)
        if min_position is None or position >= min_position:
            return ProjectionState(position=position, behind=False)
        remaining = deadline - loop.time()
        if remaining <= 0:
            return ProjectionState(position=position, behind=True)
        await deps.notifications.wait(latch, min(remaining, settings.poll_interval_s))


async def resolve_as_of(deps: QueryApiDeps, raw: str) -> int:
    """The global position `as_of` names; 422 for what is not one, or lies in the future."""
    try:
        point = parse_as_of(raw)
    except InvalidAsOf as error:
        raise ApiError(422, "invalid_as_of", str(error)) from None
    end = await history.last_position(deps.pool)
    if isinstance(point, int):
        if point > end:
            raise ApiError(
                422,
                "as_of_in_future",
                f"as_of position {point} is after the last recorded event ({end}).",
            )
        return point
    if point > datetime.now(UTC):
        raise ApiError(422, "as_of_in_future", f"as_of time {raw.strip()} is in the future.")
    return await history.position_at(deps.pool, point)


@asynccontextmanager
async def folded(
    deps: QueryApiDeps, events: Sequence[RecordedEvent]
) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
    """A connection whose `queries.HISTORY_SCHEMA` tables hold `events` folded."""
    if deps.history is None:
        raise ApiError(501, "as_of_unavailable", "This query API cannot answer as_of.")
    async with deps.pool.acquire() as conn, conn.transaction():
        await deps.history(conn, events)
        yield conn


async def ticket_history(
    deps: QueryApiDeps, tenant: str, ticket_id: UUID, position: int = MAX_POSITION
) -> list[RecordedEvent]:
    """The ticket's events up to `position`; 404 unless it existed then, in `tenant`."""
    events = await history.ticket_events_until(deps.pool, ticket_id, position)
    if not events or events[0].tenant != tenant:
        raise _not_found(ticket_id)
    return events


async def snapshot_state(
    deps: QueryApiDeps, conn: PoolConnectionProxy[asyncpg.Record], min_position: int | None
) -> ProjectionState:
    """The position the rows read in `conn`'s (repeatable read) transaction reflect.

    The projector commits rows and position together, so reading the position in the same
    snapshot as the rows makes it exactly the position they show (the same answer `as_of` that
    position gives), even while the projector moves on.
    """
    position = await queries.projection_position(conn, deps.settings.projection_name)
    return ProjectionState(
        position=position, behind=min_position is not None and position < min_position
    )


def _projection_headers(state: ProjectionState) -> dict[str, str]:
    return {
        "X-Projection-Position": str(state.position),
        "X-Projection-Behind": "true" if state.behind else "false",
    }


def _json(body: BaseModel, state: ProjectionState | None = None) -> JSONResponse:
    headers = _projection_headers(state) if state is not None else None
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


def _progress(row: dict[str, Any]) -> Progress:
    total = int(row["subtasks_total"])
    completed = int(row["subtasks_completed"])
    percent = 100 if total == 0 and row["status"] == "completed" else 0
    if total:
        percent = min(100, completed * 100 // total)
    return Progress(
        total=total,
        completed=completed,
        failed_attempts=int(row["subtasks_failed"]),
        percent=percent,
    )


def _summary_fields(row: dict[str, Any]) -> dict[str, Any]:
    values = {key: value for key, value in row.items() if key in TicketSummary.model_fields}
    return {**values, "progress": _progress(row)}


def _event_name(event: RecordedEvent) -> str:
    try:
        return event.event_type.name
    except UnknownEventTopic:
        return event.topic


def _event_payload(event: RecordedEvent) -> dict[str, Any]:
    try:
        return event.payload().model_dump(mode="json")
    except UnknownEventTopic:
        fields = {k: v for k, v in event.state.items() if k not in _HIDDEN_STATE}
        return {"ticket_id": str(event.aggregate_id), **fields}


def prefers_markdown(accept: str | None) -> bool:
    """True when `Accept` ranks text/markdown above application/json."""
    if not accept:
        return False
    ranks: dict[str, float] = {}
    for part in accept.split(","):
        media_type, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranks[media_type.lower()] = max(quality, ranks.get(media_type.lower(), 0.0))
    markdown = ranks.get("text/markdown", 0.0)
    json_rank = max(ranks.get("application/json", 0.0), ranks.get("application/*", 0.0))
    return markdown > 0 and markdown >= json_rank


def sse_message(event: RecordedEvent) -> str:
    data = json.dumps(_event_payload(event), separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.position}\nevent: {_event_name(event)}\ndata: {data}\n\n"


async def _ticket_of_tenant(deps: QueryApiDeps, tenant: str, ticket_id: UUID) -> None:
    """404 unless the event store holds the ticket and it belongs to `tenant`."""
    if await queries.ticket_tenant(deps.pool, ticket_id) != tenant:
        raise _not_found(ticket_id)


async def progress_stream(deps: QueryApiDeps, ticket_id: UUID, after: int) -> AsyncIterator[str]:
    """SSE messages for the ticket's events after `after`, live, until its final event."""
    settings = deps.settings
    loop = asyncio.get_running_loop()
    # Resuming after the final event: send what was recorded since (late, ignored results), end.
    finished = await queries.has_event_up_to(deps.pool, ticket_id, after, _FINAL_TOPICS)
    yield f"retry: {int(settings.stream_poll_interval_s * 1000)}\n\n"
    last_sent = loop.time()
    while True:
        latch = deps.notifications.latch(NOTIFY_CHANNEL)
        events = await queries.ticket_events(
            deps.pool, ticket_id, after=after, limit=settings.stream_batch
        )
        for event in events:
            sent_ns = time.time_ns()
            yield sse_message(event)
            # The delivery to this client, in the trace of the command that appended the event.
            record_span(
                "ticketflow.read_api",
                f"sse {_event_name(event)}",
                event.traceparent,
                start_ns=sent_ns,
                end_ns=time.time_ns(),
                attributes={"ticketflow.position": event.position},
            )
            after = event.position
            last_sent = loop.time()
            if _event_name(event) in FINAL_EVENTS:
                return
        if len(events) == settings.stream_batch:
            continue
        if finished:
            return
        if loop.time() - last_sent >= settings.heartbeat_s:
            yield ": keep-alive\n\n"
            last_sent = loop.time()
        await deps.notifications.wait(
            latch, min(settings.stream_poll_interval_s, settings.heartbeat_s)
        )


router = APIRouter()


@router.get(
    "/tickets",
    response_model=TicketPage,
    responses={
        200: {"headers": _PROJECTION_HEADERS},
        **_COMMON,
        **_AS_OF_ERRORS,
        403: forbidden_doc(*SNAPSHOT_READERS),
    },
    summary="The tenant's tickets, newest first, a page at a time (now, or as of a position)",
    operation_id="listTickets",
    tags=["tickets"],
)
async def list_tickets(
    principal: SnapshotReader,
    deps: Deps,
    status: Annotated[TicketStatus | None, Query(examples=["running"])] = None,
    pipeline: Annotated[
        str | None, Query(max_length=200, pattern=r"^[^\x00]*$", examples=["document-review"])
    ] = None,
    cursor: Annotated[
        str | None,
        Query(
            max_length=500,
            description="`next_cursor` of the previous page.",
            examples=["eyJjIjoiMjAyNS0wMy0wMVQxMjowMDowMCswMDowMCIsImkiOiI2ZjFjIn0"],
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, examples=[20])] = 20,
    min_position: MinPosition = None,
    as_of: AsOf = None,
) -> JSONResponse:
    try:
        after = queries.Cursor.decode(cursor) if cursor else None
    except queries.InvalidCursor as error:
        raise ApiError(422, "invalid_cursor", str(error)) from None
    tenant = principal.tenant
    if as_of is not None:
        position = await resolve_as_of(deps, as_of)
        state = ProjectionState(position=position, behind=False)
        events = await history.tenant_ticket_events_until(deps.pool, tenant, position)
        async with folded(deps, events) as conn:
            rows, next_cursor = await queries.list_tickets(
                conn,
                tenant,
                limit=limit,
                status=status,
                pipeline=pipeline,
                after=after,
                schema=queries.HISTORY_SCHEMA,
            )
    else:
        await wait_for_projection(deps, min_position)
        async with deps.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            state = await snapshot_state(deps, conn, min_position)
            rows, next_cursor = await queries.list_tickets(
                conn, tenant, limit=limit, status=status, pipeline=pipeline, after=after
            )
    page = TicketPage(
        items=[TicketSummary.model_validate(_summary_fields(row)) for row in rows],
        next_cursor=next_cursor.encode() if next_cursor else None,
        projection=state,
    )
    return _json(page, state)


@router.get(
    "/tickets/{ticket_id}",
    response_model=TicketDetail,
    responses={200: {"headers": _PROJECTION_HEADERS}, **_SNAPSHOT_ERRORS},
    summary="One ticket with its subtasks (in pipeline order) and progress (now, or as of)",
    operation_id="getTicket",
    tags=["tickets"],
)
async def get_ticket(
    ticket_id: UUID,
    principal: SnapshotReader,
    deps: Deps,
    min_position: MinPosition = None,
    as_of: AsOf = None,
) -> JSONResponse:
    tenant = principal.tenant
    if as_of is not None:
        position = await resolve_as_of(deps, as_of)
        state = ProjectionState(position=position, behind=False)
        events = await ticket_history(deps, tenant, ticket_id, position)
        async with folded(deps, events) as conn:
            row = await queries.ticket(conn, tenant, ticket_id, schema=queries.HISTORY_SCHEMA)
            subtask_rows = await queries.subtasks(
                conn, tenant, ticket_id, schema=queries.HISTORY_SCHEMA
            )
    else:
        await wait_for_projection(deps, min_position)
        async with deps.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            state = await snapshot_state(deps, conn, min_position)
            row = await queries.ticket(conn, tenant, ticket_id)
            subtask_rows = await queries.subtasks(conn, tenant, ticket_id)
    if row is None:
        raise _not_found(ticket_id)
    counts = dict.fromkeys(("pending", "ready", "running", "completed", "failed"), 0)
    for subtask in subtask_rows:
        counts[subtask["status"]] = counts.get(subtask["status"], 0) + 1
    detail = TicketDetail.model_validate(
        {
            **_summary_fields(row),
            "subtasks": [Subtask.model_validate(subtask) for subtask in subtask_rows],
            "subtask_counts": counts,
            "projection": state,
        }
    )
    return _json(detail, state)


@router.get(
    "/tickets/{ticket_id}/report",
    response_model=ReportBody,
    responses={
        200: {
            "headers": _PROJECTION_HEADERS,
            "content": {
                "text/markdown": {
                    "schema": {"type": "string"},
                    "example": "# document-review report\n\n## Verdict\n\naccept\n",
                }
            },
            "description": "JSON, or Markdown with `Accept: text/markdown`.",
        },
        **_TICKET_ERRORS,
        409: error_doc(
            "ticket_not_completed",
            "Ticket 6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f is running; its report exists"
            " once it completes.",
        ),
        **_AS_OF_ERRORS,
        403: forbidden_doc(*SNAPSHOT_READERS),
    },
    summary="The report of a completed ticket (JSON or Markdown; now, or as of)",
    operation_id="getTicketReport",
    tags=["reports"],
)
async def get_report(
    ticket_id: UUID,
    principal: SnapshotReader,
    deps: Deps,
    min_position: MinPosition = None,
    accept: Annotated[str | None, Header(examples=["text/markdown"])] = None,
    as_of: AsOf = None,
) -> Response:
    tenant = principal.tenant
    if as_of is not None:
        position = await resolve_as_of(deps, as_of)
        state = ProjectionState(position=position, behind=False)
        events = await ticket_history(deps, tenant, ticket_id, position)
        async with folded(deps, events) as conn:
            found = await queries.report(conn, tenant, ticket_id, schema=queries.HISTORY_SCHEMA)
            ticket = None
            if found is None:
                ticket = await queries.ticket(
                    conn, tenant, ticket_id, schema=queries.HISTORY_SCHEMA
                )
    else:
        await wait_for_projection(deps, min_position)
        async with deps.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            state = await snapshot_state(deps, conn, min_position)
            found = await queries.report(conn, tenant, ticket_id)
            ticket = None if found else await queries.ticket(conn, tenant, ticket_id)
    if found is None:
        if ticket is None:
            raise _not_found(ticket_id)
        status = ticket["status"]
        raise ApiError(
            409,
            "ticket_not_completed",
            f"Ticket {ticket_id} is {status}; its report exists once it completes.",
        )
    headers = _projection_headers(state)
    if prefers_markdown(accept):
        return Response(
            found["markdown"], media_type="text/markdown; charset=utf-8", headers=headers
        )
    body = ReportBody.model_validate({**found, "projection": state})
    return _json(body, state)


@router.get(
    "/tickets/{ticket_id}/explain",
    response_model=Explanation,
    responses=_SNAPSHOT_ERRORS,
    summary="Where each field of the ticket's report came from: subtask, events, prompt, model",
    operation_id="explainTicketReport",
    tags=["reports"],
)
async def explain_ticket(
    ticket_id: UUID, principal: SnapshotReader, deps: Deps, as_of: AsOf = None
) -> Explanation:
    """For each field of the report (`verdict.<key>`, `outputs.<subtask>.<key>`): the subtask
    that produced it, the positions of that subtask's events, the prompt's sha256 (its blob
    key), the model and the dependency outputs it was given (by position and sha256). Read from
    the ticket's events, so it explains any ticket, finished or not, now or `as_of`."""
    position = MAX_POSITION if as_of is None else await resolve_as_of(deps, as_of)
    return explain(await ticket_history(deps, principal.tenant, ticket_id, position))


async def _report_of(
    deps: QueryApiDeps, tenant: str, ticket_id: UUID
) -> tuple[ReportRef, dict[str, Any]]:
    async with deps.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        ticket = await queries.ticket(conn, tenant, ticket_id)
        found = await queries.report(conn, tenant, ticket_id)
        rerun_of = await queries.rerun_of(conn, ticket_id) if ticket else None
    if ticket is None:
        raise _not_found(ticket_id)
    if found is None:
        raise ApiError(
            409,
            "ticket_not_completed",
            f"Ticket {ticket_id} is {ticket['status']}; its report exists once it completes.",
        )
    reference = ReportRef(
        ticket_id=ticket_id,
        pipeline_name=ticket["pipeline_name"],
        pipeline_version=ticket["pipeline_version"],
        rerun_of=rerun_of,
        position=found["position"],
    )
    return reference, found


@router.get(
    "/tickets/{ticket_id}/diff/{other_id}",
    response_model=ReportDiff,
    responses={
        **_TICKET_ERRORS,
        403: forbidden_doc(*SNAPSHOT_READERS),
        409: error_doc(
            "ticket_not_completed",
            "Ticket 6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f is running; its report exists"
            " once it completes.",
        ),
    },
    summary="Two reports of the tenant compared field by field (e.g. a ticket and its re-run)",
    operation_id="diffTicketReports",
    tags=["reports"],
)
async def diff_tickets(
    ticket_id: UUID,
    other_id: UUID,
    principal: SnapshotReader,
    deps: Deps,
    min_position: MinPosition = None,
) -> ReportDiff:
    """Compares the verdicts and every subtask's output of two completed tickets of the
    caller's tenant. Each field is a path (`outputs.<subtask>.output.<key>…`); objects are
    walked, lists compared whole. Another tenant's ticket answers 404."""
    await wait_for_projection(deps, min_position)
    a, report_a = await _report_of(deps, principal.tenant, ticket_id)
    b, report_b = await _report_of(deps, principal.tenant, other_id)
    compared, changes = diff_reports(report_a, report_b)
    return ReportDiff(a=a, b=b, equal=not changes, compared=compared, changes=changes)


@router.get(
    "/tickets/{ticket_id}/events",
    response_model=EventHistory,
    responses=_HISTORY_ERRORS,
    summary="The ticket's event history from the event store, in order",
    operation_id="listTicketEvents",
    tags=["events"],
)
async def get_events(
    ticket_id: UUID,
    principal: HistoryReader,
    deps: Deps,
    min_position: Annotated[
        int | None,
        Query(
            ge=0,
            description=(
                "Accepted for symmetry; the history reads the event store itself, which"
                " already holds every event a command reported, so it never waits."
            ),
            examples=[42],
        ),
    ] = None,
) -> EventHistory:
    del min_position
    await _ticket_of_tenant(deps, principal.tenant, ticket_id)
    history: list[HistoryEvent] = []
    after = 0
    while events := await queries.ticket_events(deps.pool, ticket_id, after=after):
        for event in events:
            history.append(
                HistoryEvent(
                    position=event.position,
                    version=event.version,
                    topic=event.topic,
                    type=_event_name(event),
                    time=event.timestamp,
                    traceparent=event.traceparent,
                    payload=_event_payload(event),
                )
            )
        after = events[-1].position
    return EventHistory(ticket_id=ticket_id, events=history)


@router.get(
    "/events",
    response_model=audit.AuditLog,
    responses={**_COMMON, 403: forbidden_doc(*AUDITORS)},
    summary="The tenant's whole event history (tickets, users), by global position, for audit",
    operation_id="listTenantEvents",
    tags=["events"],
)
async def get_tenant_events(
    principal: Auditor,
    deps: Deps,
    after: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_POSITION,
            description="Global position to continue after (`next_after`).",
            examples=[0],
        ),
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=500, examples=[100])] = 100,
) -> audit.AuditLog:
    page = await audit.tenant_events(deps.pool, principal.tenant, after=after, limit=limit)
    return audit.AuditLog(
        events=await audit.revealed_events(deps.pool, principal.tenant, page.events),
        next_after=page.next_after,
        caught_up=page.caught_up,
    )


@router.get(
    "/tickets/{ticket_id}/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": (
                "Server-Sent Events: one per stored event of the ticket (`id` = global"
                " position, `event` = event name, `data` = JSON payload). Ends after the"
                " ticket's final event (completed, failed or cancelled)."
            ),
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": (
                        "retry: 2000\n\n"
                        "id: 41\nevent: created\n"
                        'data: {"ticket_id":"6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f",'
                        '"tenant":"acme"}\n\n'
                        "id: 57\nevent: completed\n"
                        'data: {"ticket_id":"6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f",'
                        '"tenant":"acme"}\n\n'
                    ),
                }
            },
        },
        **_TICKET_ERRORS,
    },
    summary="Live progress of a ticket as Server-Sent Events; resumes after Last-Event-ID",
    operation_id="streamTicketProgress",
    tags=["events"],
)
async def stream(
    ticket_id: UUID,
    principal: Reader,
    deps: Deps,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="Resume after this global position (sent by EventSource).",
            examples=["41"],
        ),
    ] = None,
) -> StreamingResponse:
    after = 0
    if last_event_id is not None and last_event_id.strip():
        try:
            after = int(last_event_id)
        except ValueError:
            raise ApiError(
                422, "invalid_last_event_id", "Last-Event-ID must be an event's position."
            ) from None
        if not 0 <= after <= MAX_POSITION:
            raise ApiError(
                422, "invalid_last_event_id", "Last-Event-ID must be an event's position."
            )
    await _ticket_of_tenant(deps, principal.tenant, ticket_id)
    return StreamingResponse(
        progress_stream(deps, ticket_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/asyncapi.json",
    responses={
        200: {
            "description": "The AsyncAPI 3.0 document (docs/integrators.md).",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        401: UNAUTHENTICATED_DOC,
        503: AUTH_UNAVAILABLE_DOC,
    },
    summary="The contract of the NATS event stream, for integrators",
    operation_id="getAsyncApiDocument",
    tags=["contract"],
)
async def asyncapi(_: CurrentPrincipal) -> Response:
    """Every subject, message, CloudEvents header and payload schema of the event stream.

    Any valid token may read it, whatever its roles and tenant: the document is the same for
    every tenant and holds no data. It is served in every environment (unlike `/openapi.json`),
    because integrators build against it; `ticketflow contract asyncapi` prints the same.
    """
    return Response(asyncapi_bytes(), media_type="application/json")


@router.post(
    "/search",
    response_model=SearchResults,
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "results": [
                            {
                                "document_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
                                "2b0b822cd15d6c15b0f00a08",
                                "ordinal": 3,
                                "text": "We recruited 120 participants …",
                                "page": 2,
                                "heading": "2 Methods",
                                "score": 0.0328,
                            }
                        ]
                    }
                }
            }
        },
        **_COMMON,
    },
    summary="Hybrid (vector + full-text) search over the tenant's document chunks",
    operation_id="searchChunks",
    tags=["search"],
)
async def search(request: SearchRequest, principal: Reader, deps: Deps) -> SearchResults:
    [embedding] = await deps.embedder.embed([request.query])
    found = await ChunkStore(deps.pool).search(
        principal.tenant,
        request.query,
        embedding,
        top_k=request.top_k,
        document_sha256s=request.document_sha256s,
    )
    return SearchResults(
        results=[
            SearchHit(
                document_sha256=hit.document_sha256,
                ordinal=hit.ordinal,
                text=hit.text,
                page=hit.page,
                heading=hit.heading,
                score=hit.score,
            )
            for hit in found
        ]
    )


def _health_checks(request: Request) -> dict[str, HealthCheck]:
    deps = _get_deps(request)

    async def database() -> None:
        await deps.pool.fetchval("SELECT 1")

    return {"database": database, **deps.health_checks}


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
    app.include_router(router)
    app.include_router(audit_routes.router)
    app.include_router(console.router)
    app.include_router(health_router(_health_checks, servers="PostgreSQL and Redis"))
    return app
