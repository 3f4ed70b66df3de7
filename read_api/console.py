"""The operator console under `/console`: server-rendered pages (Jinja2) driven by htmx.

The pages themselves (`/console`, `/console/login`, `/console/tickets/{id}`,
`/console/operations`) and the static files are public shells holding no data. Every piece of
data is an HTML fragment under `/console/fragments/…`, fetched by htmx with the access token the
login page keeps in `sessionStorage` (sent as `Authorization: Bearer` by an `htmx:configRequest`
handler), and role-checked like every other route: tickets and timelines for `user`, `admin` and
`auditor`; dead letters and operations for `admin` and `auditor`. Auditors see no retry
buttons, and the retry action refuses them (admins only).

Live progress reads `GET /tickets/{id}/stream` with `fetch` (which, unlike `EventSource`, sends
the `Authorization` header), so the stream route needs no token in its URL.

Login and retry go to the command API, server-side, from this process (no CORS): its URL is
`configure_console(commands_url=…)`, else `TF_CONSOLE_COMMANDS_URL`, else
`http://127.0.0.1:$TF_COMMANDS_PORT` (8000).

What the console shows across processes (docs/adr/0023-observability.md): the tenant's queue
as the read models hold it (subtasks ready and running) plus the per-tenant inference slots in
Redis; the model cool-downs in Redis; the projection's and the relay's lag from PostgreSQL.
Dead letters: every message a handler gives up on is recorded as a failure of its ticket, so the
dead-letter page lists the tenant's failed tickets with their failed subtask, retryable by a
command (`POST /tickets/{id}/subtasks/{sid}/retry`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import quote
from uuid import UUID

import httpx
import jinja2
from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from redis import asyncio as aioredis

from read_api import queries
from read_api.audit_export import verify_live
from security.http import (
    UNAUTHENTICATED_DOC,
    ApiError,
    auth_docs,
    error_doc,
    require_roles,
)
from streams.contract.eventlog import RecordedEvent, UnknownEventTopic
from streams.contract.identity import Principal

HERE = FilePath(__file__).parent
STATIC = HERE / "static"
STATIC_TYPES = {
    "htmx.min.js": "text/javascript",
    "console.js": "text/javascript",
    "console.css": "text/css",
}
READERS = ("user", "admin", "auditor")
OPERATORS = ("admin", "auditor")
RETRIERS = ("admin",)
COOLDOWN_PREFIX = "tf:cooldown"
SLOTS_PREFIX = "tf:inference:slots"
RELAY_CHECKPOINT_SQL = "SELECT max(position) FROM relay_checkpoints"

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates" / "console"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)

Reader = Annotated[Principal, Depends(require_roles(*READERS))]
Operator = Annotated[Principal, Depends(require_roles(*OPERATORS))]
Retrier = Annotated[Principal, Depends(require_roles(*RETRIERS))]
TicketStatus = Literal["pending", "running", "completed", "failed", "cancelled"]


@dataclass
class ConsoleConfig:
    commands_url: str | None = None
    """The command API, for login and retry; None: from the environment."""
    redis: Callable[[], aioredis.Redis] | None = None
    """The process's Redis client (cool-downs, inference slots); None: not shown."""


def configure_console(
    app: Any,
    *,
    commands_url: str | None = None,
    redis: Callable[[], aioredis.Redis] | None = None,
) -> None:
    app.state.console = ConsoleConfig(commands_url=commands_url, redis=redis)


def _config(request: Request) -> ConsoleConfig:
    config = getattr(request.app.state, "console", None)
    return config if isinstance(config, ConsoleConfig) else ConsoleConfig()


def commands_url(request: Request) -> str:
    configured = _config(request).commands_url or os.environ.get("TF_CONSOLE_COMMANDS_URL")
    if configured:
        return configured.rstrip("/")
    return f"http://127.0.0.1:{os.environ.get('TF_COMMANDS_PORT', '8000')}"


def _pool(request: Request) -> Any:
    return request.app.state.deps.pool


def _html(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(template).render(**values), status_code=status)


_PAGE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {}}, "description": "An HTML page (no data)."}
}
_FRAGMENT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {}}, "description": "An HTML fragment."}
}
_NOT_FOUND = error_doc("ticket_not_found", "No ticket 6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f here.")

# The console is a user interface, not part of the HTTP API: its pages and HTML fragments stay out
# of the OpenAPI document (and so out of generated clients), while every fragment is role-checked
# like any route (tests/integration/test_auth_matrix.py walks the mounted routes, not the document).
router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)


# -- public shells ------------------------------------------------------------------------------


@router.get(
    "",
    response_class=HTMLResponse,
    responses=_PAGE,
    summary="The console: the tenant's tickets (a page shell; its data needs a token)",
    operation_id="consoleTicketsPage",
)
async def tickets_page() -> HTMLResponse:
    return _html("tickets.html", page="tickets")


@router.get(
    "/login",
    response_class=HTMLResponse,
    responses=_PAGE,
    summary="The console's login page",
    operation_id="consoleLoginPage",
)
async def login_page() -> HTMLResponse:
    return _html("login.html", page="login")


@router.get(
    "/tickets/{ticket_id}",
    response_class=HTMLResponse,
    responses=_PAGE,
    summary="The console's page of a ticket (a shell; its data needs a token)",
    operation_id="consoleTicketPage",
)
async def ticket_page(ticket_id: UUID) -> HTMLResponse:
    return _html("ticket.html", page="ticket", ticket_id=ticket_id)


@router.get(
    "/operations",
    response_class=HTMLResponse,
    responses=_PAGE,
    summary="The console's operations page: dead letters, queues, cool-downs, lag (a shell)",
    operation_id="consoleOperationsPage",
)
async def operations_page() -> HTMLResponse:
    return _html("operations.html", page="operations")


@router.get(
    "/static/{name}",
    responses={200: {"description": "A static file of the console (htmx, script, style)."}},
    summary="The console's static files, served from the package (nothing from the network)",
    operation_id="consoleStaticFile",
)
async def static_file(name: str) -> Response:
    if name not in STATIC_TYPES:
        raise ApiError(404, "not_found", f"No static file {name!r}.")
    return Response(
        (STATIC / name).read_bytes(),
        media_type=STATIC_TYPES[name],
        headers={"Cache-Control": "public, max-age=300"},
    )


@router.post(
    "/login",
    responses={
        200: {"description": "The command API's token response, passed through."},
        401: error_doc("invalid_credentials", "Wrong e-mail or password."),
        502: error_doc("commands_unavailable", "The command API cannot be reached."),
    },
    summary="Logs in through the command API's POST /auth/login (e-mail and password)",
    operation_id="consoleLogin",
)
async def login(
    request: Request,
    tenant: Annotated[str, Form(min_length=1, max_length=100)],
    email: Annotated[str, Form(min_length=3, max_length=320)],
    password: Annotated[str, Form(min_length=1, max_length=1000)],
) -> JSONResponse:
    body = {"tenant": tenant, "email": email, "password": password}
    try:
        async with httpx.AsyncClient(timeout=15) as client:
            answer = await client.post(f"{commands_url(request)}/auth/login", json=body)
    except httpx.HTTPError:
        raise ApiError(502, "commands_unavailable", "The command API cannot be reached.") from None
    try:
        content = answer.json()
    except ValueError:
        content = {"error": {"code": "bad_gateway", "message": "Unexpected login answer."}}
    return JSONResponse(content, status_code=answer.status_code)


# -- fragments (role-checked) -------------------------------------------------------------------


@router.get(
    "/fragments/tickets",
    response_class=HTMLResponse,
    responses={**_FRAGMENT, **auth_docs(*READERS)},
    summary="Console fragment: the tenant's newest tickets, filtered by status and pipeline",
    operation_id="consoleTicketsFragment",
)
async def tickets_fragment(
    request: Request,
    principal: Reader,
    status: Annotated[TicketStatus | Literal[""] | None, Query()] = None,
    pipeline: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
) -> HTMLResponse:
    rows, _ = await queries.list_tickets(
        _pool(request),
        principal.tenant,
        limit=50,
        status=status or None,
        pipeline=pipeline or None,
    )
    return _html("tickets_fragment.html", tickets=rows)


async def _ticket_or_404(request: Request, tenant: str, ticket_id: UUID) -> dict[str, Any]:
    row = await queries.ticket(_pool(request), tenant, ticket_id)
    if row is None:
        if await queries.ticket_tenant(_pool(request), ticket_id) == tenant:
            return {"ticket_id": ticket_id, "status": "pending", "pipeline_name": "…"}
        raise ApiError(404, "ticket_not_found", f"No ticket {ticket_id} in this tenant.")
    return row


@router.get(
    "/fragments/tickets/{ticket_id}",
    response_class=HTMLResponse,
    responses={**_FRAGMENT, **auth_docs(*READERS), 404: _NOT_FOUND},
    summary="Console fragment: a ticket, its subtasks, its report once completed, and the"
    " follow-up questions asked on it with their answers",
    operation_id="consoleTicketFragment",
)
async def ticket_fragment(request: Request, ticket_id: UUID, principal: Reader) -> HTMLResponse:
    pool = _pool(request)
    ticket = await _ticket_or_404(request, principal.tenant, ticket_id)
    subtasks = await queries.subtasks(pool, principal.tenant, ticket_id)
    report = await queries.report(pool, principal.tenant, ticket_id)
    questions = await queries.questions(pool, principal.tenant, ticket_id)
    return _html(
        "ticket_fragment.html",
        ticket=ticket,
        subtasks=subtasks,
        report=report,
        questions=questions,
        can_retry="admin" in principal.roles,
    )


def _trace_id(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def _event_name(event: RecordedEvent) -> str:
    try:
        return event.event_type.name
    except UnknownEventTopic:
        return event.topic


@router.get(
    "/fragments/tickets/{ticket_id}/timeline",
    response_class=HTMLResponse,
    responses={**_FRAGMENT, **auth_docs(*READERS), 404: _NOT_FOUND},
    summary="Console fragment: a ticket's events, positions, trace ids and chain verification",
    operation_id="consoleTimelineFragment",
)
async def timeline_fragment(request: Request, ticket_id: UUID, principal: Reader) -> HTMLResponse:
    pool = _pool(request)
    if await queries.ticket_tenant(pool, ticket_id) != principal.tenant:
        raise ApiError(404, "ticket_not_found", f"No ticket {ticket_id} in this tenant.")
    events: list[RecordedEvent] = []
    after = 0
    while batch := await queries.ticket_events(pool, ticket_id, after=after):
        events.extend(batch)
        after = batch[-1].position
    report = await verify_live(pool, principal.tenant)
    broken = {problem.position for problem in report.problems}
    rows = [
        {
            "position": event.position,
            "version": event.version,
            "name": _event_name(event),
            "time": event.timestamp,
            "trace_id": _trace_id(event.traceparent),
            "ok": event.position not in broken,
        }
        for event in events
    ]
    return _html("timeline_fragment.html", events=rows, chain=report)


@router.get(
    "/fragments/dead-letters",
    response_class=HTMLResponse,
    responses={**_FRAGMENT, **auth_docs(*OPERATORS)},
    summary="Console fragment: the tenant's failed tickets and their failed subtasks",
    operation_id="consoleDeadLettersFragment",
)
async def dead_letters_fragment(request: Request, principal: Operator) -> HTMLResponse:
    rows = await _pool(request).fetch(
        "SELECT t.ticket_id, t.pipeline_name, t.failure_reason, t.finished_at,"
        " s.subtask_id, s.title, s.attempts, s.last_error"
        " FROM rm_tickets AS t JOIN rm_subtasks AS s"
        "  ON s.ticket_id = t.ticket_id AND s.tenant = t.tenant AND s.status = 'failed'"
        " WHERE t.tenant = $1 AND t.status = 'failed'"
        " ORDER BY t.finished_at DESC NULLS LAST, t.ticket_id LIMIT 100",
        principal.tenant,
    )
    return _html(
        "dead_letters_fragment.html",
        letters=[dict(row) for row in rows],
        can_retry="admin" in principal.roles,
    )


@router.get(
    "/fragments/operations",
    response_class=HTMLResponse,
    responses={**_FRAGMENT, **auth_docs(*OPERATORS)},
    summary="Console fragment: the tenant's queue, model cool-downs, projection and relay lag",
    operation_id="consoleOperationsFragment",
)
async def operations_fragment(request: Request, principal: Operator) -> HTMLResponse:
    pool = _pool(request)
    queue = await pool.fetchrow(
        # A cancelled ticket's subtasks wait for nothing and hold no slot (`shown_subtask`).
        "SELECT count(*) FILTER (WHERE s.status = 'ready') AS ready,"
        " count(*) FILTER (WHERE s.status = 'running') AS running"
        " FROM rm_subtasks AS s JOIN rm_tickets AS t"
        "  ON t.ticket_id = s.ticket_id AND t.tenant = s.tenant AND t.status <> 'cancelled'"
        " WHERE s.tenant = $1",
        principal.tenant,
    )
    head = int(
        await pool.fetchval("SELECT coalesce(max(notification_id), 0) FROM ticketflow_events")
    )
    projection = await queries.projection_position(
        pool, request.app.state.deps.settings.projection_name
    )
    relay = await pool.fetchval(RELAY_CHECKPOINT_SQL)
    slots: int | None = None
    cooldowns: list[dict[str, Any]] = []
    redis_error: str | None = None
    make_redis = _config(request).redis
    if make_redis is not None:
        try:
            client = make_redis()
            seconds, micros = await client.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            slots = int(
                await client.zcount(f"{SLOTS_PREFIX}:{principal.tenant}", f"({now_ms}", "+inf")
            )
            async for raw in client.scan_iter(match=f"{COOLDOWN_PREFIX}:*", count=100):
                key = raw.decode() if isinstance(raw, bytes) else str(raw)
                if key.endswith(":counts"):
                    continue
                ttl_ms = int(await client.pttl(key))
                counts = await client.hgetall(f"{key}:counts")
                cooldowns.append(
                    {
                        "model": key.removeprefix(f"{COOLDOWN_PREFIX}:"),
                        "remaining_s": max(0, ttl_ms) / 1000,
                        "pauses": int(counts.get(b"pauses", counts.get("pauses", 0)) or 0),
                    }
                )
        except Exception as error:  # Redis away: say so, show the rest
            redis_error = type(error).__name__
    return _html(
        "operations_fragment.html",
        tenant=principal.tenant,
        queue=dict(queue) if queue else {"ready": 0, "running": 0},
        slots=slots,
        cooldowns=sorted(cooldowns, key=lambda c: str(c["model"])),
        redis_configured=make_redis is not None,
        redis_error=redis_error,
        head=head,
        projection=projection,
        projection_lag=max(0, head - projection),
        relay=relay,
        relay_lag=None if relay is None else max(0, head - int(relay)),
        now=datetime.now(UTC),
    )


# -- actions ------------------------------------------------------------------------------------


@router.post(
    "/actions/tickets/{ticket_id}/subtasks/{subtask_id}/retry",
    response_class=HTMLResponse,
    responses={
        **_FRAGMENT,
        **auth_docs(*RETRIERS),
        401: UNAUTHENTICATED_DOC,
        502: error_doc("commands_unavailable", "The command API cannot be reached."),
    },
    summary="Console action: retry a failed subtask (the command API's retry, for admins)",
    operation_id="consoleRetrySubtask",
)
async def retry_action(
    request: Request,
    ticket_id: UUID,
    subtask_id: Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[^\x00/]*$")],
    principal: Retrier,
) -> HTMLResponse:
    del principal  # checked here; the command API checks the same token again
    authorization = request.headers.get("authorization", "")
    url = f"{commands_url(request)}/tickets/{ticket_id}/subtasks/{quote(subtask_id, safe='')}/retry"
    try:
        async with httpx.AsyncClient(timeout=15) as client:
            answer = await client.post(url, headers={"Authorization": authorization})
    except httpx.HTTPError:
        raise ApiError(502, "commands_unavailable", "The command API cannot be reached.") from None
    if answer.status_code != 202:
        try:
            error = answer.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "retry_failed", answer.text[:200]
        raise ApiError(answer.status_code, code, message)
    return _html(
        "retried_fragment.html",
        ticket_id=ticket_id,
        subtask_id=subtask_id,
        position=answer.json().get("position"),
    )
