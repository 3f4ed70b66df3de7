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
from tests.conftest import Servers
from tests.integration.conftest import isolated_stack_settings, running_workers
from tests.integration.test_fairness import DOCX_TYPE, note
from tests.support import random_tenant
from ticketflow.settings import Settings


@pytest.fixture
def stack_settings(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    with isolated_stack_settings(
        servers, tmp_path_factory.mktemp("nats"), inference_max_deliver=2
    ) as settings:
        yield settings


async def test_an_overloaded_backend_pauses_the_model_and_costs_no_delivery_attempt(
    stack_settings: Settings, servers: Servers
) -> None:
    model = f"fake-{random_tenant()}"
    throttled = BackendThrottled("429 Too Many Requests", model=model, retry_after_s=1.5)
    backend = FakeBackend([throttled], model_name=model)
    redis = aioredis.from_url(servers.redis_url)
    try:
        async with running_workers(stack_settings, backend=backend) as service:
            document = UploadedDocument("main", "note.docx", DOCX_TYPE, note("A short note."))
            started = time.monotonic()
            ticket_id = service.create_ticket(
                CreateTicket(random_tenant(), "someone", (document,), "one-step")
            ).ticket_id
            while not (
                ticket := await asyncio.to_thread(service.get_ticket, ticket_id)
            ).is_finished:
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
        await redis.aclose()
