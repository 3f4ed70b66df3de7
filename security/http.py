"""What both HTTP APIs share: the error envelope and its handlers, the Bearer dependency, role
checks.

Every error is `{"error": {"code": ..., "message": ...}}`. A missing or bad token answers 401
(`unauthenticated` / `invalid_token`) with `WWW-Authenticate: Bearer`; a valid token without a
needed role answers 403 `forbidden`. An app that uses `CurrentPrincipal` or `require_roles` takes
`api_lifespan(resources)` as its lifespan.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    "The revocation list (Redis) cannot be read; retry after `Retry-After` seconds.",
)


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


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises, FastAPI's own included, answers in the envelope."""

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
    authenticator where the bearer dependency finds it, and closes them at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with resources() as deps:
            app.state.deps = deps
            app.state.authenticate = deps.authenticate
            yield

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
