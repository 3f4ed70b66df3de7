"""The ingest handler: turns a `created` ticket's documents into searchable chunks.

For each document: extract its text in an isolated process (with limits), chunk it by structure,
embed the chunks on CPU and store them in pgvector, then issue `RecordIngestion`, which makes the
ticket's first subtasks ready. A document that cannot be read fails the ticket with a reason its
user understands. Everything is idempotent by document hash: a redelivered message re-ingests
nothing and the aggregate ignores a repeated `RecordIngestion`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
from nats.aio.msg import Msg
from pydantic import ValidationError

from commands.port import FailTicket, RecordIngestion, WriteSide
from handlers import telemetry
from handlers.chunking import chunk
from handlers.consumer import PermanentFailure
from handlers.extraction import ExtractionError, ExtractionLimits
from handlers.isolation import ExtractionPool
from inference.embeddings import Embedder
from inference.retrieval import ChunkRecord, ChunkStore, DocumentStats
from streams import contract

logger = logging.getLogger(__name__)

#: What the user reads when ingestion failed for a reason that is not the document's.
INGEST_INTERNAL_ERROR = (
    "Internal error while reading the document; the operators have been notified. "
    "Please try again later."
)


@dataclass(frozen=True)
class IngestSettings:
    limits: ExtractionLimits
    chunk_tokens: int = 200
    chunk_overlap_tokens: int = 30


class DocumentTexts:
    """The extracted text of each document, for subtasks that read the whole document."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def store(self, tenant: str, sha256: str, text: str, pages: int | None) -> None:
        await self._pool.execute(
            "INSERT INTO document_texts (tenant, document_sha256, text, pages) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (tenant, document_sha256) DO NOTHING",
            tenant,
            sha256,
            text,
            pages,
        )

    async def get(self, tenant: str, sha256: str) -> str | None:
        value = await self._pool.fetchval(
            "SELECT text FROM document_texts WHERE tenant = $1 AND document_sha256 = $2",
            tenant,
            sha256,
        )
        return str(value) if value is not None else None


class IngestHandler:
    def __init__(
        self,
        write: WriteSide,
        chunks: ChunkStore,
        texts: DocumentTexts,
        embedder: Embedder,
        extraction: ExtractionPool,
        settings: IngestSettings,
    ) -> None:
        self._write = write
        self._chunks = chunks
        self._texts = texts
        self._embedder = embedder
        self._extraction = extraction
        self._settings = settings

    async def __call__(self, message: Msg) -> None:
        created = _parse(message)
        traceparent = (message.headers or {}).get("traceparent")
        ingested: list[contract.IngestedDocument] = []
        for document in created.documents:
            try:
                stats = await self._ingest(created.tenant, document)
            except ExtractionError as error:
                logger.info(
                    "document refused",
                    extra={"ticket_id": str(created.ticket_id), "code": error.code},
                )
                await self._write.fail_ticket(
                    FailTicket(created.ticket_id, _for_user(document, error.reason), traceparent)
                )
                return
            ingested.append(
                contract.IngestedDocument(
                    role=document.role,
                    sha256=document.sha256,
                    pages=stats.pages,
                    characters=stats.characters,
                    chunks=stats.chunks,
                )
            )
        await self._write.record_ingestion(
            RecordIngestion(created.ticket_id, tuple(ingested), traceparent)
        )

    async def fail(self, message: Msg, reason: str) -> None:
        """Dead letter: the ticket fails instead of waiting forever.

        `reason` describes an unexpected error (a driver's, a crashed extraction process's):
        it goes to the log, and the user reads a generic reason instead.
        """
        try:
            created = _parse(message)
        except PermanentFailure:
            logger.error("dropping an unreadable created event: %s", reason)
            return
        logger.error(
            "ingestion failed for good: %s",
            reason,
            extra={"ticket_id": str(created.ticket_id), "tenant": created.tenant},
        )
        await self._write.fail_ticket(FailTicket(created.ticket_id, INGEST_INTERNAL_ERROR))

    async def _ingest(self, tenant: str, document: contract.DocumentRef) -> DocumentStats:
        existing = await self._chunks.ingested(tenant, document.sha256)
        if existing is not None:
            return existing
        content = await self._write.document(tenant, document.sha256)
        if content is None:
            raise PermanentFailure(f"document {document.sha256} is not in the blob store")
        if len(content) > self._settings.limits.max_bytes:
            raise ExtractionError(
                f"The document is larger than {self._settings.limits.max_bytes} bytes.",
                "too_large",
            )
        with telemetry.step("extract", media_type=document.media_type, bytes=len(content)):
            extracted = await self._extraction.extract(
                content, document.media_type, self._settings.limits
            )
        with telemetry.step("chunk", characters=extracted.character_count):
            pieces = chunk(
                extracted,
                max_tokens=self._settings.chunk_tokens,
                overlap_tokens=self._settings.chunk_overlap_tokens,
            )
        with telemetry.step("embed", chunks=len(pieces)):
            vectors = await self._embedder.embed([piece.text for piece in pieces])
        stats = DocumentStats(
            chunks=len(pieces), characters=extracted.character_count, pages=extracted.page_count
        )
        # The text first: a document counts as ingested only once its chunks are stored.
        await self._texts.store(tenant, document.sha256, extracted.text, extracted.page_count)
        await self._chunks.store(
            tenant,
            document.sha256,
            [
                ChunkRecord(
                    ordinal=piece.ordinal,
                    text=piece.text,
                    page=piece.page,
                    heading=piece.heading,
                    embedding=vector,
                )
                for piece, vector in zip(pieces, vectors, strict=True)
            ],
            stats,
        )
        logger.info(
            "document ingested",
            extra={"sha256": document.sha256[:12], "chunks": len(pieces), "tenant": tenant},
        )
        return stats


def _parse(message: Msg) -> contract.TicketCreated:
    try:
        return contract.TicketCreated.model_validate_json(message.data)
    except ValidationError as error:
        raise PermanentFailure(f"not a valid created event: {error}") from None


def _for_user(document: contract.DocumentRef, reason: str) -> str:
    return f"{document.filename}: {reason}"
