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
from tests.conftest import Servers
from tests.integration.conftest import (
    CatalogWithTestPipelines,
    isolated_stack_settings,
    running_workers,
)
from tests.support import random_tenant
from ticketflow.settings import Settings

# Starting the stack and the model, then up to 400 s for the 31 tickets to finish.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(540)]

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
    with isolated_stack_settings(
        servers,
        tmp_path_factory.mktemp("nats"),
        inference_concurrency=1,
        inference_tenant_concurrency=1,
    ) as settings:
        yield settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def service(stack_settings: Settings) -> AsyncIterator[CommandService]:
    async with running_workers(stack_settings) as service:
        yield service


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
