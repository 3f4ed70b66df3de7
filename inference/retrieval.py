"""Document chunks in PostgreSQL (pgvector) and hybrid search over them: vector similarity and
full text, fused by reciprocal rank."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg

logger = logging.getLogger(__name__)

# all-MiniLM-L6-v2; the column is vector(384) (migrations/0004_chunks.sql).
EMBEDDING_DIMENSIONS = 384
RRF_K = 60
# hnsw.ef_search bounds: pgvector accepts 1..1000; below 40 (its default) recall drops quickly.
_MIN_EF_SEARCH = 40
_MAX_EF_SEARCH = 1000

_ADVISORY_LOCK_NAMESPACE = b"ticketflow.document_chunks"


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk to store: its place in the document, its text and its embedding."""

    ordinal: int
    text: str
    page: int | None
    heading: str | None
    embedding: Sequence[float]


@dataclass(frozen=True)
class RetrievedChunk:
    """A chunk found by `ChunkStore.search`; `score` is its reciprocal-rank-fusion score."""

    document_sha256: str
    ordinal: int
    text: str
    page: int | None
    heading: str | None
    score: float


@dataclass(frozen=True)
class DocumentStats:
    """What ingestion recorded about a document; `pages` is None for formats without pages."""

    chunks: int
    characters: int
    pages: int | None


class _RankKey(Hashable, Protocol):
    """A fusion key: hashable to merge rankings, ordered to break ties the same way every time."""

    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_RankKey)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[K]], k: int = RRF_K
) -> list[tuple[K, float]]:
    """Fuse best-first rankings into one: each key scores the sum of ``1 / (k + rank)`` over the
    rankings it appears in (ranks start at 1), best first; equal scores go in key order.

    Only ranks matter, never the rankers' own scores, which is what makes cosine distances and
    ts_rank_cd values comparable at all. A key listed twice in one ranking counts once, at its
    better rank, so a ranker cannot vote twice for the same item.
    """
    if k < 0:
        raise ValueError(f"k must not be negative, got {k}")
    scores: dict[K, float] = {}
    for ranking in rankings:
        seen: set[K] = set()
        for rank, key in enumerate(ranking, start=1):
            if key in seen:
                continue
            seen.add(key)
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    # Sorting by key on ties keeps results identical across runs and across the order of rankings.
    ordered = sorted(scores.items(), key=lambda item: item[0])
    ordered.sort(key=lambda item: item[1], reverse=True)
    return ordered


def vector_literal(embedding: Sequence[float]) -> str:
    """pgvector's text form of an embedding; refuses the wrong size and NaN or infinity."""
    # Vectors travel as ``'[x,y,...]'::vector`` text: no extra Python package and no codec to
    # register on each connection, so any asyncpg pool works as it is. Nine significant digits
    # round-trip a float4 exactly; parsing 384 numbers costs PostgreSQL microseconds, and
    # maintaining the HNSW index dwarfs it on insert (about 1 ms per chunk).
    if len(embedding) != EMBEDDING_DIMENSIONS:
        raise ValueError(
            f"an embedding has {EMBEDDING_DIMENSIONS} dimensions, this one has {len(embedding)}"
        )
    values = [float(value) for value in embedding]
    if not all(math.isfinite(value) for value in values):
        raise ValueError("an embedding must not contain NaN or infinity")
    return "[" + ",".join(f"{value:.9g}" for value in values) + "]"


def _document_lock_key(tenant: str, document_sha256: str) -> int:
    # A signed 64-bit key for pg_advisory_xact_lock. A collision between two documents only makes
    # their writers take turns; it never changes what is written.
    digest = hashlib.sha256(
        b"\0".join((_ADVISORY_LOCK_NAMESPACE, tenant.encode(), document_sha256.encode()))
    ).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_INGESTED = """
SELECT chunks, characters, pages FROM ingested_documents
WHERE tenant = $1 AND document_sha256 = $2
"""

# One statement for all chunks: arrays unnested server-side, so storing a document costs one
# round trip however many chunks it has. ON CONFLICT is a second line of defence; the advisory
# lock and the ingested_documents check already keep a document from being written twice.
_INSERT_CHUNKS = """
INSERT INTO document_chunks (tenant, document_sha256, ordinal, text, page, heading, embedding)
SELECT $1, $2, c.ordinal, c.text, c.page, c.heading, c.embedding::vector
FROM unnest($3::integer[], $4::text[], $5::integer[], $6::text[], $7::text[])
    AS c (ordinal, text, page, heading, embedding)
ON CONFLICT (tenant, document_sha256, ordinal) DO NOTHING
"""

_INSERT_INGESTED = """
INSERT INTO ingested_documents (tenant, document_sha256, chunks, characters, pages)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant, document_sha256) DO NOTHING
"""

# 'simple' keeps stop words, so plainto_tsquery's AND of every word would demand that a chunk
# contain each "what", "is" and "the" of a question, and almost nothing would match. OR-ing the
# lexemes instead lets ts_rank_cd put chunks that match more of the query, closer together, first.
# Rewriting the query's text form is safe: lexemes never contain spaces, so " & " is only ever
# the operator.
_TSQUERY = "replace(plainto_tsquery('simple', $3)::text, ' & ', ' | ')::tsquery"

# Both rankings in one round trip. The vector ranking orders by distance alone so that the HNSW
# index can serve it; ties are broken by the window function over the candidates it returns.
_SEARCH = """
WITH vector_hits AS MATERIALIZED (
    SELECT document_sha256, ordinal, embedding <=> $2::vector AS distance
    FROM document_chunks
    WHERE tenant = $1 {document_filter}
    ORDER BY embedding <=> $2::vector
    LIMIT $4
),
text_hits AS MATERIALIZED (
    SELECT document_sha256, ordinal, ts_rank_cd(tsv, query) AS relevance
    FROM document_chunks CROSS JOIN (SELECT {tsquery} AS query) AS q
    WHERE tenant = $1 {document_filter} AND tsv @@ query
    ORDER BY relevance DESC, document_sha256, ordinal
    LIMIT $4
)
SELECT 'vector' AS ranking,
       row_number() OVER (ORDER BY distance, document_sha256, ordinal) AS position,
       document_sha256, ordinal
FROM vector_hits
UNION ALL
SELECT 'text', row_number() OVER (ORDER BY relevance DESC, document_sha256, ordinal),
       document_sha256, ordinal
FROM text_hits
"""

# Two statements rather than one with an `$5 IS NULL OR ...` clause: asyncpg prepares statements
# and PostgreSQL may switch them to a generic plan, which cannot drop a clause like that.
_SEARCH_ALL_DOCUMENTS = _SEARCH.format(document_filter="", tsquery=_TSQUERY)
_SEARCH_SOME_DOCUMENTS = _SEARCH.format(
    document_filter="AND document_sha256 = ANY($5::text[])", tsquery=_TSQUERY
)

_FETCH = """
SELECT c.document_sha256, c.ordinal, c.text, c.page, c.heading
FROM document_chunks c
JOIN unnest($2::text[], $3::integer[]) AS wanted (document_sha256, ordinal)
    USING (document_sha256, ordinal)
WHERE c.tenant = $1
"""


class ChunkStore:
    """Document chunks of every tenant in PostgreSQL; every read is filtered by tenant."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def ingested(self, tenant: str, document_sha256: str) -> DocumentStats | None:
        """What was recorded when the document's chunks were stored, or None if they were not."""
        row = await self._pool.fetchrow(_INGESTED, tenant, document_sha256)
        if row is None:
            return None
        return DocumentStats(chunks=row["chunks"], characters=row["characters"], pages=row["pages"])

    async def store(
        self,
        tenant: str,
        document_sha256: str,
        chunks: Sequence[ChunkRecord],
        stats: DocumentStats,
    ) -> bool:
        """Store a document's chunks and mark it ingested, all in one transaction.

        Returns False, and changes nothing, when the document was already stored, including by
        a concurrent call that got there first: that one's transaction commits before this one
        looks, because both take the same advisory lock.
        """
        if stats.chunks != len(chunks):
            raise ValueError(f"stats say {stats.chunks} chunks, {len(chunks)} were given")
        ordinals = [chunk.ordinal for chunk in chunks]
        # ON CONFLICT would silently drop the second of two chunks sharing an ordinal.
        if len(set(ordinals)) != len(ordinals):
            raise ValueError("chunk ordinals must be unique within a document")
        embeddings = [vector_literal(chunk.embedding) for chunk in chunks]

        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", _document_lock_key(tenant, document_sha256)
            )
            if await conn.fetchval(_INGESTED, tenant, document_sha256) is not None:
                logger.debug("document %s of %s is already stored", document_sha256, tenant)
                return False
            await conn.execute(
                _INSERT_CHUNKS,
                tenant,
                document_sha256,
                ordinals,
                [chunk.text for chunk in chunks],
                [chunk.page for chunk in chunks],
                [chunk.heading for chunk in chunks],
                embeddings,
            )
            status = await conn.execute(
                _INSERT_INGESTED,
                tenant,
                document_sha256,
                stats.chunks,
                stats.characters,
                stats.pages,
            )
        stored = status == "INSERT 0 1"
        if stored:
            logger.info(
                "stored %d chunks of document %s for %s", len(chunks), document_sha256, tenant
            )
        return stored

    async def search(
        self,
        tenant: str,
        query_text: str,
        query_embedding: Sequence[float],
        *,
        top_k: int = 5,
        document_sha256s: Sequence[str] | None = None,
        candidates: int = 40,
    ) -> list[RetrievedChunk]:
        """The `top_k` chunks of the tenant (and of the given documents, when given) that best
        match the query, best first, by reciprocal rank fusion of the `candidates` nearest
        embeddings and the `candidates` best full-text matches.

        An empty `document_sha256s` means no documents, so nothing is found.
        """
        if top_k <= 0 or (document_sha256s is not None and not document_sha256s):
            return []
        candidates = max(candidates, top_k)
        vector = vector_literal(query_embedding)
        # ef_search is how many neighbours HNSW keeps while searching; fewer than `candidates`
        # would cap the result. Iterative scans (pgvector 0.8) resume the index scan when the
        # tenant and document filters reject too many neighbours, instead of returning short.
        # relaxed_order is fine because the candidates are re-sorted by distance anyway.
        ef_search = min(max(2 * candidates, _MIN_EF_SEARCH), _MAX_EF_SEARCH)
        arguments: list[object] = [tenant, vector, query_text, candidates]
        statement = _SEARCH_ALL_DOCUMENTS
        if document_sha256s is not None:
            statement = _SEARCH_SOME_DOCUMENTS
            arguments.append(list(document_sha256s))

        async with self._pool.acquire() as conn:
            async with conn.transaction():
                # set_config(..., true) is SET LOCAL with a parameter: it ends with the transaction,
                # so the pooled connection goes back with its defaults.
                await conn.execute(
                    "SELECT set_config('hnsw.ef_search', $1, true),"
                    " set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                    str(ef_search),
                )
                rows = await conn.fetch(statement, *arguments)
            rankings: dict[str, list[tuple[str, int]]] = {"vector": [], "text": []}
            for row in sorted(rows, key=lambda r: (r["ranking"], r["position"])):
                rankings[row["ranking"]].append((row["document_sha256"], row["ordinal"]))
            fused = reciprocal_rank_fusion([rankings["vector"], rankings["text"]])[:top_k]
            if not fused:
                return []
            found = await conn.fetch(
                _FETCH,
                tenant,
                [key[0] for key, _ in fused],
                [key[1] for key, _ in fused],
            )
        by_key = {(row["document_sha256"], row["ordinal"]): row for row in found}
        results: list[RetrievedChunk] = []
        for key, score in fused:
            chunk = by_key.get(key)
            if chunk is None:
                continue  # chunks are never deleted in place; this is only a guard
            results.append(
                RetrievedChunk(
                    document_sha256=chunk["document_sha256"],
                    ordinal=chunk["ordinal"],
                    text=chunk["text"],
                    page=chunk["page"],
                    heading=chunk["heading"],
                    score=score,
                )
            )
        return results
