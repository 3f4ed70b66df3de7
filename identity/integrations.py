"""Command API routes for integrators: NATS credentials to subscribe to their tenant's events.

The router is built by `integrations_router`, given how to authenticate the caller and how to
mint credentials; the command API includes it. No `from __future__ import annotations` here:
FastAPI reads the dependency annotations of the routes defined inside the factory at run time.
"""

import base64
import binascii
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from streams.contract.identity import Principal
from streams.contract.subjects import tenant_filter

logger = logging.getLogger(__name__)

NATS_CREDENTIALS_ROLES = ("integrator", "admin")

Mint = Callable[[Principal], Awaitable[str] | str]
"""Mints a `.creds` file for the principal's tenant; raises `CredentialsUnavailable`."""

_USER_JWT_RE = re.compile(r"-----BEGIN NATS USER JWT-----\s*([\w\-]+)\.([\w\-]+)\.")


class CredentialsUnavailable(Exception):
    """No key to sign integrator credentials with is configured on this deployment."""


class NatsCredentialsPublic(BaseModel):
    tenant: str
    subject: str = Field(description="What the credentials may subscribe to: `tf.evt.<tenant>.>`.")
    expires_at: datetime | None = Field(description="When the server stops accepting them.")
    credentials: str = Field(
        description="A NATS `.creds` file (user JWT and seed): keep it secret, e.g. "
        "`nats --creds FILE sub 'tf.evt.<tenant>.>'`."
    )


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _expires_at(credentials: str) -> datetime | None:
    """The `exp` claim of the user JWT in a `.creds` file (no verification: we just signed it)."""
    match = _USER_JWT_RE.search(credentials)
    if match is None:
        return None
    payload = match[2]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    expires = claims.get("exp") if isinstance(claims, dict) else None
    return datetime.fromtimestamp(expires, UTC) if isinstance(expires, int) else None


def integrations_router(*, principal: Callable[..., Any], mint: Mint) -> APIRouter:
    """The integrations routes.

    `principal` is the API's dependency that authenticates the caller (answering 401 itself);
    `mint` makes credentials for the caller's tenant.
    """
    router = APIRouter(tags=["integrations"])
    Caller = Annotated[Principal, Depends(principal)]

    @router.post(
        "/integrations/nats-credentials",
        status_code=201,
        response_model=NatsCredentialsPublic,
        responses={
            401: {"description": "No valid Bearer token."},
            403: {"description": "The caller lacks role `integrator` (or `admin`)."},
            503: {"description": "This deployment has no key to sign NATS credentials with."},
        },
        summary="Mint NATS credentials that subscribe to the caller's tenant's events",
        operation_id="createNatsCredentials",
    )
    async def create_nats_credentials(caller: Caller) -> JSONResponse:
        """New credentials on each call, for the caller's own tenant only.

        They may subscribe to `tf.evt.<tenant>.>` (core NATS) and do nothing else: no publishing,
        no JetStream API, no other tenant. They expire; ask again before they do.
        """
        if not caller.has_role(*NATS_CREDENTIALS_ROLES):
            return _error(403, "forbidden", "NATS credentials need role 'integrator' or 'admin'.")
        try:
            minted = mint(caller)
            credentials = await minted if inspect.isawaitable(minted) else minted
        except CredentialsUnavailable as error:
            logger.warning("cannot mint NATS credentials: %s", error)
            return _error(
                503,
                "nats_credentials_unavailable",
                "This deployment cannot issue NATS credentials; ask its operator.",
            )
        body = NatsCredentialsPublic(
            tenant=caller.tenant,
            subject=tenant_filter(caller.tenant),
            expires_at=_expires_at(credentials),
            credentials=credentials,
        )
        # A secret: never stored by a cache on the way.
        return JSONResponse(
            body.model_dump(mode="json"), status_code=201, headers={"Cache-Control": "no-store"}
        )

    return router
