"""What a ticket's user reads when it fails for a reason that is not the document's or the
model's: a generic sentence, never a driver's or a server's error; the details go to the log.

On the real stack: the relay, the ingest worker and the inference worker in this process. The
model is the deterministic `FakeBackend`; neither failure here gets as far as calling it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from uuid import UUID

import psycopg
import pytest

from commands.messages import CreateTicket, UploadedDocument
from commands.service import CommandService
from commands.ticket import Ticket, TicketStatus
from handlers.inference import INFERENCE_INTERNAL_ERROR
from handlers.ingest import INGEST_INTERNAL_ERROR
from inference.backends import FakeBackend
from tests.conftest import Servers
from tests.integration.conftest import isolated_stack_settings, running_workers, service_for
from tests.support import random_tenant, sample
from ticketflow.bootstrap import run_ingest_worker, run_relay
from ticketflow.settings import Settings

PDF = sample("research-paper.pdf").read_bytes()
DATABASE_ERROR = 'relation "document_chunks" does not exist'


@pytest.fixture
def stack_settings(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    # One delivery: the first failure is the last, so the tests need not sit out backoffs.
    with isolated_stack_settings(
        servers, tmp_path_factory.mktemp("nats"), inference_max_deliver=1
    ) as settings:
        yield settings


async def finished(service: CommandService, ticket_id: UUID) -> Ticket:
    deadline = time.monotonic() + 120
    while not (ticket := await asyncio.to_thread(service.get_ticket, ticket_id)).is_finished:
        assert time.monotonic() < deadline, "the ticket did not finish"
        await asyncio.sleep(0.1)
    return ticket


@pytest.mark.timeout(240)
async def test_a_database_error_in_a_subtask_reaches_the_log_and_not_the_user(
    stack_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # The document is ingested first; then the chunk table goes missing (an operator's mistake),
    # so the subtask's retrieval query fails in PostgreSQL. (A NUL in options, which once got
    # that far, is refused at submit and by the event store itself.)
    assert stack_settings.database_url is not None
    document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
    question = {"question": "What is the main result?"}
    service = service_for(stack_settings, stack_settings.database_url)
    stop = asyncio.Event()
    ingesting = [
        asyncio.create_task(run_relay(stack_settings, stop)),
        asyncio.create_task(run_ingest_worker(stack_settings, stop)),
    ]
    try:
        ticket_id = service.create_ticket(
            CreateTicket(random_tenant(), "someone", (document,), "document-qa", question)
        ).ticket_id
        deadline = time.monotonic() + 120
        while not (await asyncio.to_thread(service.get_ticket, ticket_id)).ingested_documents:
            assert time.monotonic() < deadline, "the document was not ingested"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*ingesting, return_exceptions=True), 60)
        service.close()
    with psycopg.connect(stack_settings.database_url) as conn:
        conn.execute("ALTER TABLE document_chunks RENAME TO document_chunks_gone")

    with caplog.at_level(logging.ERROR, logger="handlers.inference"):
        async with running_workers(stack_settings, backend=FakeBackend()) as service:
            ticket = await finished(service, ticket_id)

    assert ticket.status is TicketStatus.FAILED
    assert ticket.failure_reason == (
        f'Step "Answer" failed after 1 attempt: {INFERENCE_INTERNAL_ERROR}'
    )
    assert "document_chunks" not in (ticket.failure_reason or "")
    logged = [r for r in caplog.records if getattr(r, "ticket_id", None) == str(ticket_id)]
    assert any(DATABASE_ERROR in r.getMessage() for r in logged), caplog.text


@pytest.mark.timeout(240)
async def test_a_document_missing_from_the_blob_store_fails_with_a_generic_reason(
    stack_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    assert stack_settings.database_url is not None
    opener = service_for(stack_settings, stack_settings.database_url)
    tenant = random_tenant()
    document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
    try:
        ticket_id = opener.create_ticket(
            CreateTicket(tenant, "someone", (document,), "document-review")
        ).ticket_id
    finally:
        opener.close()
    # Lost before any worker ran: an operator's mistake, nothing the uploader can fix.
    with psycopg.connect(stack_settings.database_url) as conn:
        conn.execute("DELETE FROM blobs WHERE tenant = %s", (tenant,))

    with caplog.at_level(logging.ERROR, logger="handlers.ingest"):
        async with running_workers(stack_settings, backend=FakeBackend()) as service:
            ticket = await finished(service, ticket_id)

    assert ticket.status is TicketStatus.FAILED
    assert ticket.failure_reason == INGEST_INTERNAL_ERROR
    assert "not in the blob store" in caplog.text
