"""The tenant's tickets: a page of them, and one with its subtasks and progress (now, or as of a
position or time)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from read_api import queries
from read_api.routes.common import (
    AS_OF_ERRORS,
    COMMON_ERRORS,
    PROJECTION_HEADERS,
    SNAPSHOT_ERRORS,
    SNAPSHOT_READERS,
    AsOf,
    Deps,
    MinPosition,
    SnapshotReader,
    json_response,
    live_snapshot,
    live_state,
    not_found,
    read_snapshot,
    ticket_snapshot,
    wait_for_projection,
)
from read_api.schemas import (
    Progress,
    Question,
    Subtask,
    TicketDetail,
    TicketPage,
    TicketQuestions,
    TicketSummary,
)
from security.http import ApiError, forbidden_doc
from streams.contract import history

router = APIRouter()


TicketStatus = Literal["pending", "running", "completed", "failed", "cancelled"]


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


@router.get(
    "/tickets",
    response_model=TicketPage,
    responses={
        200: {"headers": PROJECTION_HEADERS},
        **COMMON_ERRORS,
        **AS_OF_ERRORS,
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
    async with read_snapshot(
        deps,
        as_of=as_of,
        min_position=min_position,
        history_events=lambda position: history.tenant_ticket_events_until(
            deps.pool, tenant, position
        ),
    ) as snapshot:
        rows, next_cursor = await queries.list_tickets(
            snapshot.conn,
            tenant,
            limit=limit,
            status=status,
            pipeline=pipeline,
            after=after,
            schema=snapshot.schema,
        )
    state = snapshot.state
    page = TicketPage(
        items=[TicketSummary.model_validate(_summary_fields(row)) for row in rows],
        next_cursor=next_cursor.encode() if next_cursor else None,
        projection=state,
    )
    return json_response(page, state)


@router.get(
    "/tickets/{ticket_id}",
    response_model=TicketDetail,
    responses={200: {"headers": PROJECTION_HEADERS}, **SNAPSHOT_ERRORS},
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
    if as_of is None:
        # The live tables: one statement reads the rows and the position they reflect.
        await wait_for_projection(deps, min_position)
        found = await queries.ticket_detail(
            deps.pool, tenant, ticket_id, projection=deps.settings.projection_name
        )
        if found is None:
            raise not_found(ticket_id)
        state = live_state(found.position or 0, min_position)
    else:
        async with ticket_snapshot(
            deps, tenant, ticket_id, as_of=as_of, min_position=min_position
        ) as snapshot:
            found = await queries.ticket_detail(
                snapshot.conn, tenant, ticket_id, schema=snapshot.schema
            )
        state = snapshot.state
        if found is None:
            raise not_found(ticket_id)
    subtasks = [queries.shown_subtask(found.ticket["status"], s) for s in found.subtasks]
    counts = dict.fromkeys(queries.SUBTASK_STATUSES, 0)
    for subtask in subtasks:
        counts[subtask["status"]] = counts.get(subtask["status"], 0) + 1
    detail = TicketDetail.model_validate(
        {
            **_summary_fields(found.ticket),
            "subtasks": [Subtask.model_validate(subtask) for subtask in subtasks],
            "questions": [Question.model_validate(question) for question in found.questions],
            "subtask_counts": counts,
            "projection": state,
        }
    )
    return json_response(detail, state)


@router.get(
    "/tickets/{ticket_id}/questions",
    response_model=TicketQuestions,
    responses={200: {"headers": PROJECTION_HEADERS}, **SNAPSHOT_ERRORS},
    summary="The ticket's follow-up questions and their answers, in the order asked",
    operation_id="listTicketQuestions",
    tags=["tickets"],
)
async def list_questions(
    ticket_id: UUID,
    principal: SnapshotReader,
    deps: Deps,
    min_position: MinPosition = None,
) -> JSONResponse:
    """The conversation on the ticket's documents (`POST /tickets/{id}/questions` on the command
    API asks): each question with its status and, once answered, its answer and citations to
    the pages and headings of the excerpts it was shown. Pass the ask's `position` as
    `min_position` to read your own question."""
    tenant = principal.tenant
    async with live_snapshot(deps, min_position) as snapshot:
        row = await queries.ticket(snapshot.conn, tenant, ticket_id)
        question_rows = await queries.questions(snapshot.conn, tenant, ticket_id)
    state = snapshot.state
    if row is None:
        raise not_found(ticket_id)
    body = TicketQuestions(
        ticket_id=ticket_id,
        items=[Question.model_validate(question) for question in question_rows],
        projection=state,
    )
    return json_response(body, state)
