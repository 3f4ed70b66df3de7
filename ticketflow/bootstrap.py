"""One function per process kind: each builds that process's dependencies at start-up.

Nothing here runs at import time; connections are opened inside these functions and closed
when the process stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import nats
import redis.asyncio as aioredis
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from psycopg_pool import ConnectionPool

from commands.api import CommandApiDeps, UploadLimits, create_app
from commands.application import open_application
from commands.blobs import PostgresBlobStore
from commands.service import CommandService, PipelineCatalog
from projections import ProjectionStatus, Projector, RebuildResult, rebuild, status
from streams.jetstream import StreamSettings
from streams.relay import Relay, RelaySettings
from ticketflow.auth import JwtCodec
from ticketflow.embedded import running_stack
from ticketflow.pipelines import ShippedPipelines
from ticketflow.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerUrls:
    database_url: str
    nats_url: str
    redis_url: str


def server_urls(settings: Settings) -> ServerUrls:
    """URLs from the environment, else those of the stack running on the data directory."""
    stack = None if not settings.uses_embedded_servers else running_stack(settings.data_dir)
    if stack is not None:
        settings = settings.model_copy(
            update={
                "database_url": settings.database_url or stack.database_url,
                "nats_url": settings.nats_url or stack.nats_url,
                "redis_url": settings.redis_url or stack.redis_url,
            }
        )
    database_url, nats_url, redis_url = settings.require_urls()
    return ServerUrls(database_url, nats_url, redis_url)


def stream_settings(settings: Settings) -> StreamSettings:
    return StreamSettings(
        name=settings.stream_name,
        replicas=settings.stream_replicas,
        storage=settings.stream_storage,
        max_age_s=settings.stream_max_age_days * 24 * 3600,
        duplicate_window_s=settings.stream_duplicate_window_s,
    )


def jwt_codec(settings: Settings) -> JwtCodec:
    return JwtCodec(settings.jwt_secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience)


async def connect_nats(url: str, name: str) -> NATS:
    return await nats.connect(
        url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5
    )


def command_service(
    settings: Settings, database_url: str, pipelines: PipelineCatalog | None = None
) -> CommandService:
    """The write side: the only writer of events. The caller closes it."""
    pool = ConnectionPool(
        database_url, min_size=1, max_size=settings.db_pool_size, open=True, name="commands"
    )
    app = open_application(database_url, pool_size=settings.db_pool_size)
    return CommandService(app, PostgresBlobStore(pool), pipelines or ShippedPipelines(), pool)


def commands_api(settings: Settings) -> FastAPI:
    """The command HTTP API process."""

    @asynccontextmanager
    async def resources() -> AsyncIterator[CommandApiDeps]:
        urls = server_urls(settings)
        service = await asyncio.to_thread(command_service, settings, urls.database_url)
        nc = await connect_nats(urls.nats_url, "ticketflow-commands")
        cache = aioredis.from_url(urls.redis_url)

        async def database() -> None:
            await asyncio.to_thread(service.ping)

        async def nats_server() -> None:
            if not nc.is_connected:
                raise ConnectionError("not connected")
            await nc.jetstream().account_info()

        async def redis_server() -> None:
            await cache.ping()

        try:
            yield CommandApiDeps(
                service=service,
                authenticate=jwt_codec(settings).verify,
                health_checks={"database": database, "nats": nats_server, "redis": redis_server},
                limits=UploadLimits(
                    max_document_bytes=settings.max_upload_bytes,
                    max_documents=settings.max_documents_per_ticket,
                    max_options_bytes=settings.max_options_bytes,
                ),
            )
        finally:
            await cache.aclose()
            await nc.drain()
            service.close()

    return create_app(resources)


def queries_api(settings: Settings) -> FastAPI:
    """The query HTTP API process."""
    from inference.embeddings import SentenceTransformerEmbedder
    from read_api.wiring import query_api

    return query_api(
        lambda: server_urls(settings).database_url,
        jwt_codec(settings).verify,
        lambda: SentenceTransformerEmbedder().load(),
        pool_size=settings.db_pool_size,
    )


async def run_relay(settings: Settings, stop: asyncio.Event) -> None:
    """The relay process: event store → JetStream."""
    urls = server_urls(settings)
    pool = await asyncpg.create_pool(urls.database_url, min_size=2, max_size=4)
    nc = await connect_nats(urls.nats_url, "ticketflow-relay")
    try:
        relay = Relay(
            pool,
            nc,
            stream_settings(settings),
            RelaySettings(
                max_in_flight=settings.relay_max_in_flight, batch_size=settings.relay_batch_size
            ),
        )
        await relay.run(stop)
    finally:
        await nc.drain()
        await pool.close()


async def _projection_pool(settings: Settings, application_name: str) -> asyncpg.Pool:
    # The application name lets operators (and tests) tell these connections apart.
    return await asyncpg.create_pool(
        server_urls(settings).database_url,
        min_size=2,
        max_size=4,
        server_settings={"application_name": application_name},
    )


async def run_projector(settings: Settings, stop: asyncio.Event) -> None:
    """The projector process: event store → read models."""
    pool = await _projection_pool(settings, "ticketflow-projector")
    try:
        await Projector(pool).run(stop)
    finally:
        await pool.close()


async def rebuild_projections(
    settings: Settings, progress: Callable[[int, int], None] | None = None
) -> RebuildResult:
    """Replays the whole log into new read-model tables and swaps them in."""
    pool = await _projection_pool(settings, "ticketflow-rebuild")
    try:
        return await rebuild(pool, progress=progress)
    finally:
        await pool.close()


async def projection_status(settings: Settings) -> list[ProjectionStatus]:
    pool = await asyncpg.create_pool(server_urls(settings).database_url, min_size=1, max_size=1)
    try:
        return await status(pool)
    finally:
        await pool.close()


@asynccontextmanager
async def _worker_resources(
    settings: Settings, name: str
) -> AsyncIterator[tuple[ServerUrls, CommandService, asyncpg.Pool, NATS]]:
    urls = server_urls(settings)
    service = await asyncio.to_thread(command_service, settings, urls.database_url)
    pool = await asyncpg.create_pool(urls.database_url, min_size=1, max_size=settings.db_pool_size)
    nc = await connect_nats(urls.nats_url, name)
    try:
        yield urls, service, pool, nc
    finally:
        await nc.drain()
        await pool.close()
        service.close()


async def run_ingest_worker(settings: Settings, stop: asyncio.Event) -> None:
    """The ingest worker: created tickets → extracted, chunked, embedded documents."""
    from handlers.consumer import ConsumerSettings, JetStreamWorker
    from handlers.extraction import ExtractionLimits
    from handlers.ingest import DocumentTexts, IngestHandler, IngestSettings
    from handlers.isolation import ExtractionPool
    from inference.embeddings import SentenceTransformerEmbedder
    from inference.retrieval import ChunkStore
    from streams.contract.subjects import event_filter

    embedder = await asyncio.to_thread(SentenceTransformerEmbedder().load)
    async with _worker_resources(settings, "ticketflow-ingest") as (_, service, pool, nc):
        handler = IngestHandler(
            service,
            ChunkStore(pool),
            DocumentTexts(pool),
            embedder,
            ExtractionPool(
                workers=settings.ingest_concurrency,
                timeout_s=settings.ingest_timeout_s,
                memory_bytes=settings.extraction_memory_bytes,
            ),
            IngestSettings(
                limits=ExtractionLimits(
                    max_bytes=settings.max_upload_bytes,
                    max_pages=settings.max_pages,
                    max_characters=settings.max_characters,
                    max_docx_uncompressed_bytes=settings.max_docx_uncompressed_bytes,
                )
            ),
        )
        worker = JetStreamWorker(
            nc.jetstream(),
            ConsumerSettings(
                durable="ingest",
                filter_subject=event_filter("created"),
                stream=settings.stream_name,
                concurrency=settings.ingest_concurrency,
                job_timeout_s=settings.ingest_timeout_s * 3,
            ),
            handler,
            handler.fail,
        )
        await worker.run(stop)


async def run_inference_worker(settings: Settings, stop: asyncio.Event) -> None:
    """The inference worker: ready subtasks → validated outputs, on the CPU model."""
    from handlers.consumer import ConsumerSettings, JetStreamWorker
    from handlers.inference import InferenceHandler, InferenceSettings
    from handlers.ingest import DocumentTexts
    from inference.backends import LlamaCppBackend
    from inference.embeddings import SentenceTransformerEmbedder
    from inference.retrieval import ChunkStore
    from streams.contract.subjects import event_filter

    embedder = await asyncio.to_thread(SentenceTransformerEmbedder().load)
    backend = await asyncio.to_thread(
        LlamaCppBackend(settings.model_path, n_threads=settings.inference_threads).load
    )
    try:
        async with _worker_resources(settings, "ticketflow-inference") as (_, service, pool, nc):
            handler = InferenceHandler(
                service,
                backend,
                ChunkStore(pool),
                DocumentTexts(pool),
                embedder,
                InferenceSettings(max_document_chars=settings.max_prompt_document_chars),
            )
            worker = JetStreamWorker(
                nc.jetstream(),
                ConsumerSettings(
                    durable="inference",
                    filter_subject=event_filter("subtask_ready"),
                    stream=settings.stream_name,
                    concurrency=settings.inference_concurrency,
                    max_deliver=settings.inference_max_deliver,
                    ack_wait_s=settings.inference_ack_wait_s,
                    job_timeout_s=settings.inference_timeout_s,
                ),
                handler,
                handler.fail,
            )
            await worker.run(stop)
    finally:
        await backend.aclose()
