"""What both HTTP APIs share: the error envelope and its handlers, the Bearer dependency, role
checks.

Every error is `{"error": {"code": ..., "message": ...}}`. A missing or bad token answers 401
(`unauthenticated` / `invalid_token`) with `WWW-Authenticate: Bearer`; a valid token without a
needed role answers 403 `forbidden`. An app that uses `CurrentPrincipal` or `require_roles` takes
`api_lifespan(resources)` as its lifespan.

A server the request needs that is away (PostgreSQL, Redis, NATS: `security.availability`)
answers 503 `dependency_unavailable` with `Retry-After`, never the driver's text. `health_router`
gives both APIs the same `/health` (ready), `/health/live` and, for admins, `/health/details`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, Literal, Protocol, TypeVar

import asyncpg
import eventsourcing.persistence
import nats.errors
import psycopg
import redis.exceptions
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.js.errors import ServiceUnavailableError
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from security.availability import MESSAGES, DependencyUnavailable, unavailable_dependency
from security.tokens import RevocationUnavailable
from streams.contract.identity import AuthenticationError, Principal

logger = logging.getLogger(__name__)

Authenticate = Callable[[str], Awaitable[Principal]]
"""Bearer token → the caller; raises `AuthenticationError` (and `RevocationUnavailable`)."""


class ApiError(Exception):
    """An error response: status, a stable machine-readable code and a message for people."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class ErrorBody(BaseModel):
    code: str = Field(examples=["ticket_not_found"])
    message: str = Field(examples=["No ticket 6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f here."])


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers or None
    )


def error_doc(code: str, message: str, description: str | None = None) -> dict[str, Any]:
    """One entry of a route's `responses=`: the envelope's schema and an example."""
    entry: dict[str, Any] = {
        "model": ErrorResponse,
        "content": {"application/json": {"example": {"error": {"code": code, "message": message}}}},
    }
    if description:
        entry["description"] = description
    return entry


UNAUTHENTICATED_DOC = error_doc(
    "unauthenticated", "A Bearer token is required.", "No token, or an invalid or revoked one."
)
INVALID_REQUEST_DOC = error_doc("invalid_request", "body.email: String should match pattern")
AUTH_UNAVAILABLE_DOC = error_doc(
    "authentication_unavailable",
    "Tokens cannot be checked right now; try again shortly.",
    "The revocation list (Redis) cannot be read, or a server the route needs (PostgreSQL,"
    " Redis, NATS) is unavailable (`dependency_unavailable`); retry after `Retry-After` seconds.",
)
DEPENDENCY_UNAVAILABLE_DOC = error_doc(
    "dependency_unavailable",
    "The database is unavailable; retry shortly.",
    "A server this route needs (PostgreSQL, Redis, NATS) is unavailable; retry after"
    " `Retry-After` seconds.",
)
RETRY_AFTER_S = 2
"""What `Retry-After` says when a server is away: about as long as a restart takes."""


def forbidden_doc(*roles: str) -> dict[str, Any]:
    return error_doc("forbidden", _forbidden_message(roles), "The token lacks a needed role.")


def auth_docs(*roles: str) -> dict[int | str, dict[str, Any]]:
    """401, 403 (when roles are needed), 422 and 503 entries for a route that needs a token."""
    docs: dict[int | str, dict[str, Any]] = {
        401: UNAUTHENTICATED_DOC,
        422: INVALID_REQUEST_DOC,
        503: AUTH_UNAVAILABLE_DOC,
    }
    if roles:
        docs[403] = forbidden_doc(*roles)
    return docs


def _forbidden_message(roles: tuple[str, ...]) -> str:
    names = " or ".join(f"'{role}'" for role in roles)
    return f"This needs role {names}."


# The exception classes whose instances may mean a server is away; `unavailable_dependency`
# decides for each instance (a psycopg `InterfaceError` may also be misuse, and so on).
_OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    DependencyUnavailable,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    PoolTimeout,
    # The event store's own errors, raised from psycopg's (judged by their cause).
    eventsourcing.persistence.OperationalError,
    eventsourcing.persistence.InterfaceError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    nats.errors.Error,
    ServiceUnavailableError,
    ConnectionError,
    TimeoutError,
)
_warned_at: dict[str, float] = {}


def dependency_unavailable_response(dependency: str) -> JSONResponse:
    message = MESSAGES.get(dependency, "A server this request needs is unavailable; retry shortly.")
    return error_response(
        503, "dependency_unavailable", message, {"Retry-After": str(RETRY_AFTER_S)}
    )


def _log_outage(request: Request, dependency: str, error: BaseException) -> None:
    # One warning per server every 10 s: an outage under load would otherwise flood the log.
    now = time.monotonic()
    if now - _warned_at.get(dependency, -math.inf) > 10:
        _warned_at[dependency] = now
        logger.warning(
            "%s unavailable, answering 503 (%s %s): %s: %s",
            dependency,
            request.method,
            request.url.path,
            type(error).__name__,
            error,
        )


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises, FastAPI's own included, answers in the envelope."""

    async def _unavailable(request: Request, error: Exception) -> JSONResponse:
        dependency = unavailable_dependency(error)
        if dependency is None:
            raise error  # not an outage: a bug, answered 500 by the server
        _log_outage(request, dependency, error)
        return dependency_unavailable_response(dependency)

    for error_class in _OUTAGE_ERRORS:
        app.add_exception_handler(error_class, _unavailable)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        headers = dict(error.headers)
        if error.status == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return error_response(error.status, error.code, error.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        )
        return error_response(422, "invalid_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:
            # FastAPI's answer to a body it cannot parse (bytes that are not UTF-8 JSON, a
            # broken multipart form): bad input like any other, 422 as every route documents.
            return error_response(422, "invalid_request", str(error.detail))
        return error_response(
            error.status_code, "http_error", str(error.detail), dict(error.headers or {})
        )


class HasAuthenticator(Protocol):
    @property
    def authenticate(self) -> Authenticate: ...


Deps = TypeVar("Deps", bound=HasAuthenticator)


def api_lifespan(
    resources: Callable[[], AbstractAsyncContextManager[Deps]],
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """An app's lifespan: opens `resources` at start-up as `app.state.deps`, with their
    authenticator where the bearer dependency finds it, and closes them at shutdown.

    Once started, the heap built so far (modules, the app, its schemas and resources: about
    two hundred thousand objects) is frozen out of the cyclic collector's reach: each full
    collection would otherwise walk all of it, a pause of a hundred milliseconds or more for
    every request in flight. Shutdown hands it back."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with resources() as deps:
            app.state.deps = deps
            app.state.authenticate = deps.authenticate
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()

    return lifespan


bearer_scheme = HTTPBearer(
    auto_error=False,
    bearerFormat="JWT",
    description="An access token from `POST /auth/login`, or one of the identity provider's.",
)

BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


async def authenticate_credentials(request: Request, token: str) -> Principal:
    """The caller a Bearer token names, or the 401 (503 when revocations cannot be read)."""
    authenticate: Authenticate = request.app.state.authenticate
    try:
        principal = await authenticate(token)
    except AuthenticationError as error:
        raise ApiError(401, "invalid_token", str(error)) from None
    except RevocationUnavailable as error:
        logger.warning("token revocations unavailable: %s", error)
        raise ApiError(
            503,
            "authentication_unavailable",
            "Tokens cannot be checked right now; try again shortly.",
            {"Retry-After": "1"},
        ) from None
    request.state.principal = principal
    return principal


async def current_principal(request: Request, credentials: BearerCredentials) -> Principal:
    if credentials is None:
        raise ApiError(401, "unauthenticated", "A Bearer token is required.")
    return await authenticate_credentials(request, credentials.credentials)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_roles(*roles: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency: the caller, if they hold at least one of `roles`; else 403 `forbidden`."""
    if not roles:
        raise ValueError("name at least one role")
    message = _forbidden_message(roles)

    async def holds_a_role(principal: CurrentPrincipal) -> Principal:
        if not principal.has_role(*roles):
            raise ApiError(403, "forbidden", message)
        return principal

    return holds_a_role


HealthCheck = Callable[[], Awaitable[object]]
"""Returns when the server it checks answers; raises (or hangs) when it does not."""


class HealthReport(BaseModel):
    status: Literal["ok", "degraded"] = Field(examples=["ok"])
    checks: dict[str, Literal["ok", "unavailable"]] = Field(
        examples=[{"database": "ok", "nats": "ok", "redis": "ok"}]
    )


class HealthDetails(HealthReport):
    details: dict[str, str] = Field(
        description="Why each failing check failed, in the words of its client library.",
        examples=[{"redis": "TimeoutError: did not answer within 1.0 s"}],
    )


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


async def check_health(checks: Mapping[str, HealthCheck], timeout_s: float = 1.0) -> HealthDetails:
    """Runs every check at once, each for at most `timeout_s`."""

    async def run(check: HealthCheck) -> str | None:
        try:
            async with asyncio.timeout(timeout_s):
                await check()
        except TimeoutError:
            return f"TimeoutError: did not answer within {timeout_s} s"
        except Exception as error:  # a health probe reports every failure
            text = str(error).strip()
            return f"{type(error).__name__}: {text}" if text else type(error).__name__
        return None

    names = list(checks)
    failures = await asyncio.gather(*(run(checks[name]) for name in names))
    details = {name: failure for name, failure in zip(names, failures, strict=True) if failure}
    return HealthDetails(
        status="degraded" if details else "ok",
        checks={name: "unavailable" if name in details else "ok" for name in names},
        details=details,
    )


def health_router(
    checks_of: Callable[[Request], Mapping[str, HealthCheck]],
    *,
    servers: str,
    timeout_s: float = 1.0,
) -> APIRouter:
    """`GET /health/live` (the process runs), `GET /health` (ready: every server the API needs
    answers; 503 otherwise) and `GET /health/details` (for admins: why a check failed).

    `checks_of` gives the app's checks by name; `servers` names them for the documentation."""
    router = APIRouter(tags=["health"])
    degraded = {
        "status": "degraded",
        "checks": {"database": "ok", "redis": "unavailable"},
    }
    unhealthy: dict[int | str, dict[str, Any]] = {
        503: {
            "model": HealthReport,
            "description": "A server the API needs does not answer.",
            "content": {"application/json": {"example": degraded}},
        }
    }

    @router.get(
        "/health/live",
        response_model=Liveness,
        responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
        summary="Liveness: the process runs and answers",
        description="200 while the process serves requests, whatever the servers it needs do.",
        operation_id="getLiveness",
    )
    async def live() -> Liveness:
        return Liveness()

    @router.get(
        "/health",
        response_model=HealthReport,
        responses=unhealthy,
        summary=f"Readiness: whether {servers} answer",
        description=(
            "200 when every server the API needs answers within a second, else 503 naming the"
            " unavailable ones. No addresses or error text: see `GET /health/details`."
        ),
        operation_id="getReadiness",
    )
    async def ready(request: Request) -> JSONResponse:
        report = await check_health(checks_of(request), timeout_s)
        public = HealthReport(status=report.status, checks=report.checks)
        return _health_response(public)

    @router.get(
        "/health/details",
        response_model=HealthDetails,
        responses={
            **auth_docs("admin"),
            503: {
                "model": HealthDetails,
                "description": "A server the API needs does not answer; `details` says why.",
            },
        },
        summary="Readiness with the reason of each failing check (admins)",
        description=(
            "Like `GET /health`, plus `details`: each failing check's error as its client"
            " library reported it (which may name hosts and ports). Needs role `admin`."
        ),
        operation_id="getHealthDetails",
    )
    async def details(
        request: Request, _: Annotated[Principal, Depends(require_roles("admin"))]
    ) -> JSONResponse:
        return _health_response(await check_health(checks_of(request), timeout_s))

    return router


def _health_response(report: HealthReport) -> JSONResponse:
    if report.status == "ok":
        return JSONResponse(report.model_dump())
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(report.model_dump(), status_code=503, headers=headers)
