"""The query API's routes for the tamper-evident history (docs/adr/0020-audit-chain.md):
the public keys that sign checkpoints, and a tenant's audit bundle for its auditors."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from read_api.audit_export import Bound, check_range, export_bundle, stored_keys
from security.http import (
    AUTH_UNAVAILABLE_DOC,
    UNAUTHENTICATED_DOC,
    ApiError,
    CurrentPrincipal,
    error_doc,
    forbidden_doc,
    require_roles,
)
from streams.contract.identity import Principal

router = APIRouter()

EXPORTERS = ("auditor",)
Exporter = Annotated[Principal, Depends(require_roles(*EXPORTERS))]


async def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.deps.pool
    return pool


Pool = Annotated[asyncpg.Pool, Depends(_pool)]


class AuditKey(BaseModel):
    key_id: str = Field(examples=["3f9a1c0d5e7b2a46"], description="sha256 of the raw key, 16 hex.")
    algorithm: str = Field(examples=["Ed25519"])
    public_key_pem: str = Field(examples=["-----BEGIN PUBLIC KEY-----\n…"])
    public_key_base64: str = Field(description="The raw 32-byte public key, base64.")
    created_at: str = Field(description="When a signer first used the key.")


class AuditKeys(BaseModel):
    keys: list[AuditKey]


@router.get(
    "/audit/keys",
    response_model=AuditKeys,
    responses={401: UNAUTHENTICATED_DOC, 503: AUTH_UNAVAILABLE_DOC},
    summary="The public keys that sign the chain checkpoints, for verifying audit bundles",
    operation_id="listAuditKeys",
    tags=["audit"],
)
async def audit_keys(_: CurrentPrincipal, pool: Pool) -> AuditKeys:
    """Every key that ever signed checkpoints (old ones still verify old checkpoints). The same
    for every tenant; any valid token reads them. Pin them when verifying a bundle
    (`ticketflow audit verify --key`), so that a bundle's own keys are not taken on trust."""
    return AuditKeys(keys=[AuditKey(**key) for key in await stored_keys(pool)])


_BOUND_DOC = (
    "A global position (`1234`) or an RFC 3339 time with a time zone (`2026-12-01T00:00:00Z`,"
    " compared with the events' `recorded_at`)."
)


def _bound(name: str, value: str | None) -> Bound | None:
    if value is None or not value.strip():
        return None
    try:
        return Bound.parse(value)
    except ValueError as error:
        raise ApiError(422, "invalid_range", f"query.{name}: {error}") from None


@router.get(
    "/audit/export",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The tenant's audit bundle, a .tar.gz (docs/adr/0020-audit-chain.md);"
            " verify it with `ticketflow audit verify FILE`.",
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        },
        401: UNAUTHENTICATED_DOC,
        403: forbidden_doc(*EXPORTERS),
        422: error_doc("invalid_range", "query.since: 'yesterday' is neither a position nor …"),
        503: AUTH_UNAVAILABLE_DOC,
    },
    summary="The caller's tenant's hash-chained history as a self-verifying bundle",
    operation_id="exportAuditBundle",
    tags=["audit"],
)
async def audit_export(
    principal: Exporter,
    pool: Pool,
    since: Annotated[str | None, Query(description=_BOUND_DOC, examples=["1"])] = None,
    until: Annotated[str | None, Query(description=_BOUND_DOC)] = None,
) -> FileResponse:
    """Events (with their hashes and canonical fields; states with private fields are left out,
    their sha256 kept), signed checkpoints, public keys and the manifest of referenced blobs, of
    the caller's own tenant only."""
    start, end = _bound("since", since), _bound("until", until)
    try:
        check_range(start, end)
    except ValueError as error:
        raise ApiError(422, "invalid_range", f"query: {error}") from None
    scratch = Path(tempfile.mkdtemp(prefix="tf-audit-"))
    out = scratch / f"ticketflow-audit-{principal.tenant}.tar.gz"
    try:
        await export_bundle(pool, principal.tenant, out, since=start, until=end)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    cleanup: Any = BackgroundTask(shutil.rmtree, scratch, ignore_errors=True)
    return FileResponse(out, media_type="application/gzip", filename=out.name, background=cleanup)
