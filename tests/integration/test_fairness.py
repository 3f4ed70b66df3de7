"""Fair inference between tenants on the real stack and the real CPU model.

One tenant floods the queue with thirty tickets; another tenant then opens one. Tenants take
turns at the model, so the second tenant's ticket finishes while most of the flood still waits.
A plain FIFO queue would finish it last.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import docx
import pytest
import pytest_asyncio

from commands.messages import CreateTicket, UploadedDocument
from commands.service import CommandService
from commands.ticket import TicketStatus
from tests.conftest import Servers, new_database, new_nats_server
from tests.integration.conftest import CatalogWithTestPipelines, service_for, settings_for
from tests.support import random_tenant
from ticketflow.bootstrap import run_inference_worker, run_ingest_worker, run_relay
from ticketflow.settings import Settings

pytestmark = pytest.mark.slow

DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
FLOOD = 30

CatalogWithTestPipelines.extra["one-step"] = {
    "name": "one-step",
    "version": 1,
    "system_prompt": "You label short notes. Answer only with JSON.",
    "subtasks": [
        {
            "id": "label",
            "title": "Label",
            "instruction": "Give the note a one-word label.",
            "output_schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "maxLength": 20}},
                "required": ["label"],
                "additionalProperties": False,
            },
            "max_tokens": 16,
        }
    ],
}


def note(text: str) -> bytes:
    document = docx.Document()
    document.add_paragraph(text)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
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
            inference_concurrency=1,
            inference_tenant_concurrency=1,
        )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def service(stack_settings: Settings) -> AsyncIterator[CommandService]:
    assert stack_settings.database_url is not None
    service = service_for(stack_settings, stack_settings.database_url)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run(stack_settings, stop))
        for run in (run_relay, run_ingest_worker, run_inference_worker)
    ]
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        service.close()
    for task in tasks:
        if task.exception():
            raise task.exception()  # type: ignore[misc]


def open_ticket(service: CommandService, tenant: str, text: str) -> uuid.UUID:
    document = UploadedDocument("main", "note.docx", DOCX_TYPE, note(text))
    command = CreateTicket(tenant, "someone", (document,), "one-step")
    return service.create_ticket(command).ticket_id


async def test_one_tenants_flood_does_not_starve_another_tenants_single_ticket(
    service: CommandService,
) -> None:
    flooder, patient = random_tenant(), random_tenant()
    flood = [
        open_ticket(service, flooder, f"Note {n}: the quarterly report is due on Friday.")
        for n in range(FLOOD)
    ]
    single = open_ticket(service, patient, "Note: the server room door is broken.")

    finished_at: dict[uuid.UUID, float] = {}
    deadline = time.monotonic() + 400
    while len(finished_at) < FLOOD + 1 and time.monotonic() < deadline:
        for ticket_id in [*flood, single]:
            if ticket_id in finished_at:
                continue
            ticket = await asyncio.to_thread(service.get_ticket, ticket_id)
            if ticket.is_finished:
                assert ticket.status is TicketStatus.COMPLETED, ticket.failure_reason
                finished_at[ticket_id] = time.monotonic()
        await asyncio.sleep(0.2)
    assert len(finished_at) == FLOOD + 1, "not every ticket finished in time"

    flood_done_before = sum(1 for t in flood if finished_at[t] < finished_at[single])
    # The single ticket is ingested after the whole flood, then served at the next turn.
    assert flood_done_before < FLOOD // 2, (
        f"{flood_done_before} of the flooding tenant's {FLOOD} tickets finished first"
    )
