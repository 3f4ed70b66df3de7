"""The contract of the NATS event stream (the AsyncAPI document), for integrators."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from security.http import AUTH_UNAVAILABLE_DOC, UNAUTHENTICATED_DOC, CurrentPrincipal
from streams.contract.asyncapi import asyncapi_bytes

router = APIRouter()


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
