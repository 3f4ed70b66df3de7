"""What the query API's route modules share: the API's dependencies (`QueryApiDeps`, read from
the app's state), the roles each kind of read needs, the documented errors, read-your-writes
(`min_position`) and time travel (`as_of`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from inference.embeddings import Embedder
from read_api import queries
from read_api.explain import InvalidAsOf, parse_as_of
from read_api.notifications import Notifications
from read_api.schemas import TICKET_ID_EXAMPLE, ProjectionState
from security.http import (
    AUTH_UNAVAILABLE_DOC,
    UNAUTHENTICATED_DOC,
    ApiError,
    Authenticate,
    HealthCheck,
    error_doc,
    forbidden_doc,
    require_roles,
)
from streams.contract import history
from streams.contract.eventlog import NOTIFY_CHANNEL, RecordedEvent
from streams.contract.identity import Principal

# The projector's name for the read models and the channel it announces batches on
# (projections.READ_MODELS and projections.PROJECTION_NOTIFY_CHANNEL; this package may not
# import projections).
READ_MODELS_PROJECTION = "read_models"
PROJECTION_NOTIFY_CHANNEL = "ticketflow_projections"
CHANNELS = (NOTIFY_CHANNEL, PROJECTION_NOTIFY_CHANNEL)
MAX_POSITION = 2**63 - 1
"""Global positions are PostgreSQL bigints: a larger one is refused (422), never sent to SQL."""


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
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: UNAUTHENTICATED_DOC,
    403: forbidden_doc(*TICKET_READERS),
    422: _INVALID,
    503: AUTH_UNAVAILABLE_DOC,
}
TICKET_ERRORS: dict[int | str, dict[str, Any]] = {**COMMON_ERRORS, 404: _NOT_FOUND}
HISTORY_ERRORS: dict[int | str, dict[str, Any]] = {
    **TICKET_ERRORS,
    403: forbidden_doc(*HISTORY_READERS),
}
AS_OF_ERRORS: dict[int | str, dict[str, Any]] = {
    422: error_doc(
        "invalid_as_of",
        "as_of must be a global position (an integer) or an RFC 3339 time with its zone,"
        " e.g. 2025-03-01T12:00:00Z",
    ),
    501: error_doc("as_of_unavailable", "This query API cannot answer as_of."),
}
SNAPSHOT_ERRORS: dict[int | str, dict[str, Any]] = {
    **TICKET_ERRORS,
    **AS_OF_ERRORS,
    403: forbidden_doc(*SNAPSHOT_READERS),
}

PROJECTION_HEADERS = {
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


def deps_of(request: Request) -> QueryApiDeps:
    deps: QueryApiDeps = request.app.state.deps
    return deps


async def get_deps(request: Request) -> QueryApiDeps:
    """`deps_of` as a dependency: FastAPI runs a plain function dependency in a worker thread,
    a coroutine on the event loop, which costs a thread hop less per request."""
    return deps_of(request)


Deps = Annotated[QueryApiDeps, Depends(get_deps)]


Reader = Annotated[Principal, Depends(require_roles(*TICKET_READERS))]
HistoryReader = Annotated[Principal, Depends(require_roles(*HISTORY_READERS))]
Auditor = Annotated[Principal, Depends(require_roles(*AUDITORS))]
SnapshotReader = Annotated[Principal, Depends(require_roles(*SNAPSHOT_READERS))]


def not_found(ticket_id: UUID) -> ApiError:
    return ApiError(404, "ticket_not_found", f"No ticket {ticket_id} in this tenant.")


async def wait_for_projection(deps: QueryApiDeps, min_position: int | None) -> None:
    """Waits (boundedly) until the read models reach `min_position`, if one is given. The caller
    reads the position its rows reflect in their own snapshot (`snapshot_state`), which also
    says whether it is still behind after the wait."""
    if min_position is None:
        return
    settings = deps.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.max_wait_s
    while True:
        latch = deps.notifications.latch(PROJECTION_NOTIFY_CHANNEL)
        position = await queries.projection_position(deps.pool, settings.projection_name)
        if position >= min_position:
            return
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
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


@dataclass(frozen=True)
class Snapshot:
    """Read models to answer one request from, and the position they reflect."""

    conn: PoolConnectionProxy[asyncpg.Record]
    state: ProjectionState
    schema: str | None
    """`queries.HISTORY_SCHEMA` for a past position, None for the live tables."""


@asynccontextmanager
async def read_snapshot(
    deps: QueryApiDeps,
    *,
    as_of: str | None,
    min_position: int | None,
    history_events: Callable[[int], Awaitable[Sequence[RecordedEvent]]],
) -> AsyncIterator[Snapshot]:
    """With `as_of`: the events `history_events(position)` returns for that position, folded
    into temporary tables. Without: the live tables, once they reach `min_position` (if given),
    read in one repeatable-read snapshot."""
    if as_of is not None:
        position = await resolve_as_of(deps, as_of)
        events = await history_events(position)
        async with folded(deps, events) as conn:
            past = ProjectionState(position=position, behind=False)
            yield Snapshot(conn, past, queries.HISTORY_SCHEMA)
        return
    async with live_snapshot(deps, min_position) as snapshot:
        yield snapshot


@asynccontextmanager
async def live_snapshot(deps: QueryApiDeps, min_position: int | None) -> AsyncIterator[Snapshot]:
    """The live tables, once they reach `min_position` (if given), read in one repeatable-read
    snapshot."""
    await wait_for_projection(deps, min_position)
    async with deps.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        yield Snapshot(conn, await snapshot_state(deps, conn, min_position), None)


def ticket_snapshot(
    deps: QueryApiDeps,
    tenant: str,
    ticket_id: UUID,
    *,
    as_of: str | None,
    min_position: int | None,
) -> AbstractAsyncContextManager[Snapshot]:
    """`read_snapshot` for one ticket's routes: at `as_of`, only that ticket's events are folded
    (404 unless it existed then, in `tenant`)."""
    return read_snapshot(
        deps,
        as_of=as_of,
        min_position=min_position,
        history_events=lambda position: ticket_history(deps, tenant, ticket_id, position),
    )


async def ticket_history(
    deps: QueryApiDeps, tenant: str, ticket_id: UUID, position: int = MAX_POSITION
) -> list[RecordedEvent]:
    """The ticket's events up to `position`; 404 unless it existed then, in `tenant`."""
    events = await history.ticket_events_until(deps.pool, ticket_id, position)
    if not events or events[0].tenant != tenant:
        raise not_found(ticket_id)
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
    return live_state(position, min_position)


def live_state(position: int, min_position: int | None) -> ProjectionState:
    """The state of live rows read at projection `position`, for a request that asked to see
    `min_position`."""
    return ProjectionState(
        position=position, behind=min_position is not None and position < min_position
    )


def projection_headers(state: ProjectionState) -> dict[str, str]:
    return {
        "X-Projection-Position": str(state.position),
        "X-Projection-Behind": "true" if state.behind else "false",
    }


class ModelResponse(JSONResponse):
    """A JSON response whose body pydantic has already serialised: its serialiser writes the
    bytes directly, where `model_dump` and the json module would build and then encode a dict
    (a third of the time, for a ticket's detail)."""

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else super().render(content)


def json_response(
    body: BaseModel, state: ProjectionState | None = None, *, vary: str | None = None
) -> JSONResponse:
    """`body` as JSON, with the projection's headers when `state` is given, and `Vary` when the
    route answers in more than one format at the same URL."""
    headers = projection_headers(state) if state is not None else {}
    if vary is not None:
        headers["Vary"] = vary
    return ModelResponse(body.model_dump_json().encode(), headers=headers or None)
