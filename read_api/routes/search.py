"""Hybrid (vector + full-text) search over the tenant's document chunks."""

from __future__ import annotations

from fastapi import APIRouter

from inference.retrieval import ChunkStore
from read_api.routes.common import COMMON_ERRORS, Deps, Reader
from read_api.schemas import SearchHit, SearchRequest, SearchResults

router = APIRouter()


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
        **COMMON_ERRORS,
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
