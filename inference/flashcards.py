"""Flashcards in PostgreSQL (pgvector): every card a ticket wrote, with the embedding of its front
and back, so later tickets of the same tenant can find the cards they repeat.

Every query is filtered by tenant. Writing is idempotent per subtask: a retried subtask replaces
the cards its earlier attempts stored, and writing the same attempt again changes nothing more
than writing it once.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from inference.retrieval import vector_literal

logger = logging.getLogger(__name__)

_ADVISORY_LOCK_NAMESPACE = b"ticketflow.flashcards"


@dataclass(frozen=True)
class FlashcardRecord:
    """One card to store: its place in the output, its text and its embedding."""

    ordinal: int
    front: str
    back: str
    cloze: str | None
    difficulty: str
    embedding: Sequence[float]
    duplicate: bool = False


@dataclass(frozen=True)
class SimilarFlashcard:
    """The tenant's stored card closest to a new one; `similarity` is their cosine similarity."""

    ticket_id: UUID
    front: str
    similarity: float


@dataclass(frozen=True)
class StoredFlashcard:
    ticket_id: UUID
    subtask_id: str
    ordinal: int
    attempt: int
    language: str | None
    front: str
    back: str
    cloze: str | None
    difficulty: str
    duplicate: bool


def card_text(front: str, back: str) -> str:
    """The text a card is embedded as: what it asks and what it answers."""
    return f"{front}\n{back}"


def _subtask_lock_key(tenant: str, ticket_id: UUID, subtask_id: str) -> int:
    digest = hashlib.sha256(
        b"\0".join(
            (_ADVISORY_LOCK_NAMESPACE, tenant.encode(), ticket_id.bytes, subtask_id.encode())
        )
    ).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# One round trip for all new cards: for each embedding, the nearest card of the tenant outside
# the asking ticket. ORDER BY distance alone with LIMIT 1 lets the HNSW index serve each lookup.
_MOST_SIMILAR = """
SELECT q.position, n.ticket_id, n.front, n.distance
FROM unnest($3::text[]) WITH ORDINALITY AS q (embedding, position)
LEFT JOIN LATERAL (
    SELECT f.ticket_id, f.front, f.embedding <=> q.embedding::vector AS distance
    FROM flashcards f
    WHERE f.tenant = $1 AND f.ticket_id <> $2
    ORDER BY f.embedding <=> q.embedding::vector
    LIMIT 1
) AS n ON true
ORDER BY q.position
"""

_NEWEST_ATTEMPT = """
SELECT max(attempt) FROM flashcards WHERE tenant = $1 AND ticket_id = $2 AND subtask_id = $3
"""

_DELETE_SUBTASK = """
DELETE FROM flashcards WHERE tenant = $1 AND ticket_id = $2 AND subtask_id = $3
"""

_INSERT = """
INSERT INTO flashcards (tenant, ticket_id, subtask_id, ordinal, attempt, language, front, back,
                        cloze, difficulty, duplicate, embedding)
SELECT $1, $2, $3, c.ordinal, $4, $5, c.front, c.back, c.cloze, c.difficulty, c.duplicate,
       c.embedding::vector
FROM unnest($6::integer[], $7::text[], $8::text[], $9::text[], $10::text[], $11::boolean[],
            $12::text[]) AS c (ordinal, front, back, cloze, difficulty, duplicate, embedding)
ON CONFLICT (tenant, ticket_id, subtask_id, ordinal) DO NOTHING
"""

_CARDS = """
SELECT ticket_id, subtask_id, ordinal, attempt, language, front, back, cloze, difficulty, duplicate
FROM flashcards WHERE tenant = $1 AND ticket_id = $2
ORDER BY subtask_id, ordinal
"""


class FlashcardStore:
    """The flashcards of every tenant in PostgreSQL; every read is filtered by tenant."""

    def __init__(self, pool: asyncpg.Pool, *, ef_search: int = 40) -> None:
        self._pool = pool
        self._ef_search = ef_search

    async def most_similar(
        self, tenant: str, embeddings: Sequence[Sequence[float]], *, exclude_ticket: UUID
    ) -> list[SimilarFlashcard | None]:
        """For each embedding, the tenant's most similar card from another ticket, or None."""
        if not embeddings:
            return []
        vectors = [vector_literal(embedding) for embedding in embeddings]
        async with self._pool.acquire() as conn, conn.transaction():
            # Iterative scans (pgvector 0.8) resume the index scan when the tenant filter rejects
            # the nearest neighbours; strict order keeps LIMIT 1 the nearest one. Both settings
            # end with the transaction.
            await conn.execute(
                "SELECT set_config('hnsw.ef_search', $1, true),"
                " set_config('hnsw.iterative_scan', 'strict_order', true)",
                str(self._ef_search),
            )
            rows = await conn.fetch(_MOST_SIMILAR, tenant, exclude_ticket, vectors)
        found: list[SimilarFlashcard | None] = []
        for row in rows:
            if row["ticket_id"] is None:
                found.append(None)
                continue
            # Cosine distance is 1 - similarity; rounding can push it a hair outside [0, 2].
            similarity = min(1.0, max(-1.0, 1.0 - float(row["distance"])))
            if not math.isfinite(similarity):
                found.append(None)
                continue
            found.append(SimilarFlashcard(row["ticket_id"], row["front"], similarity))
        return found

    async def replace(
        self,
        tenant: str,
        ticket_id: UUID,
        subtask_id: str,
        attempt: int,
        language: str | None,
        cards: Sequence[FlashcardRecord],
    ) -> bool:
        """Store the cards of one subtask attempt in place of any stored before.

        Returns False, and changes nothing, when a later attempt of the subtask already stored
        its cards. Writers of the same subtask take turns on an advisory lock, so the rows always
        come from one attempt.
        """
        ordinals = [card.ordinal for card in cards]
        if len(set(ordinals)) != len(ordinals):
            raise ValueError("card ordinals must be unique within a subtask")
        embeddings = [vector_literal(card.embedding) for card in cards]
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)",
                _subtask_lock_key(tenant, ticket_id, subtask_id),
            )
            newest = await conn.fetchval(_NEWEST_ATTEMPT, tenant, ticket_id, subtask_id)
            if newest is not None and newest > attempt:
                logger.info(
                    "not storing the cards of attempt %d: attempt %d stored its own",
                    attempt,
                    newest,
                    extra={"ticket_id": str(ticket_id), "subtask": subtask_id},
                )
                return False
            await conn.execute(_DELETE_SUBTASK, tenant, ticket_id, subtask_id)
            await conn.execute(
                _INSERT,
                tenant,
                ticket_id,
                subtask_id,
                attempt,
                language,
                ordinals,
                [card.front for card in cards],
                [card.back for card in cards],
                [card.cloze for card in cards],
                [card.difficulty for card in cards],
                [card.duplicate for card in cards],
                embeddings,
            )
        return True

    async def cards(self, tenant: str, ticket_id: UUID) -> list[StoredFlashcard]:
        """The cards a ticket stored, by subtask and place; another tenant's ticket has none."""
        rows = await self._pool.fetch(_CARDS, tenant, ticket_id)
        return [
            StoredFlashcard(
                ticket_id=row["ticket_id"],
                subtask_id=row["subtask_id"],
                ordinal=row["ordinal"],
                attempt=row["attempt"],
                language=row["language"],
                front=row["front"],
                back=row["back"],
                cloze=row["cloze"],
                difficulty=row["difficulty"],
                duplicate=row["duplicate"],
            )
            for row in rows
        ]
