"""The inference worker's handling of an overloaded backend, on the real servers.

The backend here is the deterministic `FakeBackend` scripted to answer "overloaded" once: what
is under test is the worker (JetStream, the Redis cool-down, the aggregate), not a model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from commands.messages import CreateTicket, UploadedDocument
from commands.ticket import TicketStatus
from handlers.cooldown import ModelCooldown
from inference.backends import BackendThrottled, FakeBackend
from tests.conftest import Servers, new_database, new_nats_server
from tests.integration.conftest import service_for, settings_for
from tests.integration.test_fairness import DOCX_TYPE, note
from tests.support import random_tenant
from ticketflow.bootstrap import run_inference_worker, run_ingest_worker, run_relay
from ticketflow.settings import Settings


@pytest.fixture
def stack_settings(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    with (
        new_database(servers) as database_url,
        new_nats_server(tmp_path_factory.mktemp("nats"), servers.nats_authority) as nats_url,
    ):
        yield settings_for(
            servers,
            database_url,
            nats_url=nats_url,
            stream_storage="memory",
            inference_max_deliver=2,
        )


async def test_an_overloaded_backend_pauses_the_model_and_costs_no_delivery_attempt(
    stack_settings: Settings, servers: Servers
) -> None:
    model = f"fake-{random_tenant()}"
    throttled = BackendThrottled("429 Too Many Requests", model=model, retry_after_s=1.5)
    backend = FakeBackend([throttled], model_name=model)
    assert stack_settings.database_url is not None
    service = service_for(stack_settings, stack_settings.database_url)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_relay(stack_settings, stop)),
        asyncio.create_task(run_ingest_worker(stack_settings, stop)),
        asyncio.create_task(run_inference_worker(stack_settings, stop, backend=backend)),
    ]
    redis = aioredis.from_url(servers.redis_url)
    try:
        document = UploadedDocument("main", "note.docx", DOCX_TYPE, note("A short note."))
        started = time.monotonic()
        ticket_id = service.create_ticket(
            CreateTicket(random_tenant(), "someone", (document,), "one-step")
        ).ticket_id
        while not (ticket := await asyncio.to_thread(service.get_ticket, ticket_id)).is_finished:
            assert time.monotonic() - started < 120, "the ticket did not finish"
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        assert ticket.status is TicketStatus.COMPLETED, ticket.failure_reason
        # The overloaded answer did not count as a failed attempt: attempt 1 completed, with
        # inference_max_deliver=2 leaving room for exactly one more try had it been burned.
        assert ticket.subtasks["label"].attempt == 1
        assert backend.calls == 2
        assert elapsed >= 1.5, "the retry waited for the Retry-After"
        counts = await ModelCooldown(redis).counts(model)
        assert counts["pauses"] == 1
        assert counts["resumes"] >= 1
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await redis.aclose()
        service.close()
