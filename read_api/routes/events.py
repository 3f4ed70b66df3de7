"""Event history: a ticket's events, the tenant's whole history for audit, and a ticket's live
progress as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from read_api import audit, queries
from read_api.routes.common import (
    AUDITORS,
    COMMON_ERRORS,
    HISTORY_ERRORS,
    MAX_POSITION,
    TICKET_ERRORS,
    Auditor,
    Deps,
    HistoryReader,
    QueryApiDeps,
    Reader,
    not_found,
)
from read_api.schemas import EventHistory, HistoryEvent
from security.http import ApiError, forbidden_doc
from streams.contract.eventlog import NOTIFY_CHANNEL, RecordedEvent, UnknownEventTopic
from streams.contract.events import (
    BY_TOPIC,
    QuestionAnswered,
    QuestionAsked,
    QuestionFailed,
    event_type_of,
)
from streams.contract.tracing import record_span

router = APIRouter()


FINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
_FINAL_TOPICS = [
    topic
    for topic, kind in BY_TOPIC.items()
    if kind.aggregate == "ticket" and kind.name in FINAL_EVENTS
]
_QUESTION_ASKED = event_type_of(QuestionAsked).topic
_QUESTION_ENDED = [event_type_of(QuestionAnswered).topic, event_type_of(QuestionFailed).topic]
_HIDDEN_STATE = ("timestamp", "traceparent", "originator_topic", "password_hash")


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


async def _revealed_payload(pool: asyncpg.Pool, event: RecordedEvent) -> dict[str, Any]:
    """The payload with the ticket's personal options decrypted (or `[erased]`)."""
    payload = _event_payload(event)
    try:
        aggregate = event.aggregate
    except UnknownEventTopic:
        return payload
    return await audit.revealed_ticket_payload(
        pool, aggregate, _event_name(event), event.aggregate_id, payload
    )


def sse_message(event: RecordedEvent, payload: dict[str, Any] | None = None) -> str:
    shown = _event_payload(event) if payload is None else payload
    data = json.dumps(shown, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.position}\nevent: {_event_name(event)}\ndata: {data}\n\n"


async def _ticket_of_tenant(deps: QueryApiDeps, tenant: str, ticket_id: UUID) -> None:
    """404 unless the event store holds the ticket and it belongs to `tenant`."""
    if await queries.ticket_tenant(deps.pool, ticket_id) != tenant:
        raise not_found(ticket_id)


async def _questions_open(deps: QueryApiDeps, ticket_id: UUID, position: int) -> bool:
    count = await queries.open_questions(
        deps.pool, ticket_id, position, _QUESTION_ASKED, _QUESTION_ENDED
    )
    return count > 0


async def progress_stream(deps: QueryApiDeps, ticket_id: UUID, after: int) -> AsyncIterator[str]:
    """SSE messages for the ticket's events after `after`, live, until its final event and
    the end of every follow-up question asked by then (a question asked on a finished ticket
    keeps the stream open until it is answered or failed)."""
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
            yield sse_message(event, await _revealed_payload(deps.pool, event))
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
                finished = True
                if not await _questions_open(deps, ticket_id, after):
                    return
        if len(events) == settings.stream_batch:
            continue
        if finished and not await _questions_open(deps, ticket_id, after):
            return
        if loop.time() - last_sent >= settings.heartbeat_s:
            yield ": keep-alive\n\n"
            last_sent = loop.time()
        await deps.notifications.wait(
            latch, min(settings.stream_poll_interval_s, settings.heartbeat_s)
        )


@router.get(
    "/tickets/{ticket_id}/events",
    response_model=EventHistory,
    responses=HISTORY_ERRORS,
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
                    payload=await _revealed_payload(deps.pool, event),
                )
            )
        after = events[-1].position
    return EventHistory(ticket_id=ticket_id, events=history)


@router.get(
    "/events",
    response_model=audit.AuditLog,
    responses={**COMMON_ERRORS, 403: forbidden_doc(*AUDITORS)},
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
                " ticket's final event (completed, failed or cancelled) once every follow-up"
                " question asked by then was answered or failed: connect after asking one"
                " (Last-Event-ID: any position before the ask) to follow its answer."
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
        **TICKET_ERRORS,
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
