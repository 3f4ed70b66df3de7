"""Whole tickets on the real servers and the real CPU model: ingest, inference, failures, crashes.

One stack per module: a fresh database and NATS server, the relay, the ingest worker and the
inference worker running in this process, the command service creating tickets.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema
import psycopg
import pytest
import pytest_asyncio

from commands.errors import InvalidDocument
from commands.messages import CreateTicket, UploadedDocument
from commands.service import CommandService
from commands.ticket import Ticket, TicketStatus
from tests.conftest import Servers
from tests.integration.conftest import (
    CatalogWithTestPipelines,
    isolated_stack_settings,
    running_workers,
)
from tests.support import random_tenant, sample, short_answers, small_pipeline
from ticketflow.settings import Settings

# Starting the stack and the model, then up to 300 s for a ticket to finish (`finished`).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PDF_TYPE = "application/pdf"
DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"

NEVER_VALID = small_pipeline("never-valid", max_attempts=2)
for _subtask in NEVER_VALID["subtasks"]:
    # Satisfiable by the grammar the model decodes with, never by the validator.
    _subtask["output_schema"] = {
        "type": "object",
        "properties": {"x": {"type": "string", "maxLength": 20}},
        "required": ["x"],
        "not": {"required": ["x"]},
    }
    _subtask["max_tokens"] = 24
QUICK = short_answers(small_pipeline("quick"))
CatalogWithTestPipelines.extra.update({"never-valid": NEVER_VALID, "quick": QUICK})


@dataclass
class PipelineStack:
    settings: Settings
    service: CommandService
    database_url: str
    tenant: str

    def submit(self, name: str, pipeline: str = "document-review", **kwargs: Any) -> uuid.UUID:
        content = sample(name).read_bytes()
        media_type = DOCX_TYPE if name.endswith(".docx") else PDF_TYPE
        document = UploadedDocument("main", name, media_type, content)
        command = CreateTicket(self.tenant, "alice", (document,), pipeline, **kwargs)
        return self.service.create_ticket(command).ticket_id

    async def finished(self, ticket_id: uuid.UUID, timeout: float = 300) -> Ticket:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ticket = await asyncio.to_thread(self.service.get_ticket, ticket_id)
            if ticket.is_finished:
                return ticket
            await asyncio.sleep(0.3)
        raise TimeoutError(f"ticket {ticket_id} did not finish: {ticket.status}")

    def topics(self, ticket_id: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT topic, state FROM ticketflow_events WHERE originator_id = %s "
                "ORDER BY originator_version",
                (ticket_id,),
            ).fetchall()
        return [(row[0].rsplit(".", 2)[-2], json.loads(bytes(row[1]))) for row in rows]


@pytest.fixture(scope="module")
def stack_settings(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    with isolated_stack_settings(
        servers, tmp_path_factory.mktemp("nats"), inference_ack_wait_s=4.0
    ) as settings:
        yield settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(stack_settings: Settings) -> AsyncIterator[PipelineStack]:
    assert stack_settings.database_url is not None
    async with running_workers(stack_settings) as service:
        yield PipelineStack(stack_settings, service, stack_settings.database_url, random_tenant())


def assert_outputs_validate(ticket: Ticket) -> None:
    for subtask in ticket.pipeline.subtasks:
        output = ticket.subtasks[subtask.id].output
        assert output is not None, subtask.id
        # As recorded: steps and checks may add fields (`unverified`) to what the model wrote.
        jsonschema.validate(output, subtask.stored_output_schema)


@pytest.mark.parametrize("name", ["research-paper.pdf", "coursework-ru.docx"])
async def test_a_document_review_completes_with_a_valid_output_for_every_subtask(
    stack: PipelineStack, name: str
) -> None:
    ticket_id = stack.submit(name)
    ticket = await stack.finished(ticket_id)
    assert ticket.status is TicketStatus.COMPLETED, ticket.failure_reason
    assert_outputs_validate(ticket)
    names = [topic for topic, _ in stack.topics(ticket_id)]
    assert names.count("subtask_completed") == len(ticket.pipeline.subtasks)
    assert names[-1] == "completed"


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("bad-encrypted.pdf", "password-protected"),
        ("bad-truncated.pdf", "damaged or incomplete"),
        ("bad-no-text-layer.pdf", "no text layer"),
    ],
)
async def test_a_bad_document_fails_the_ticket_with_a_readable_reason(
    stack: PipelineStack, name: str, words: str
) -> None:
    ticket = await stack.finished(stack.submit(name))
    assert ticket.status is TicketStatus.FAILED
    assert ticket.failure_reason is not None
    assert words in ticket.failure_reason
    assert ticket.failure_reason.startswith(name)


def test_a_file_that_is_not_a_document_is_refused_before_any_ticket_exists(
    stack: PipelineStack,
) -> None:
    with pytest.raises(InvalidDocument, match="PDF and DOCX"):
        stack.submit("bad-not-a-pdf.pdf")


async def test_an_output_that_never_validates_fails_the_subtask_then_the_ticket_while_others_flow(
    stack: PipelineStack,
) -> None:
    doomed = stack.submit("research-paper.pdf", "never-valid")
    healthy = stack.submit("research-paper.pdf", "quick")
    failed, completed = await asyncio.gather(stack.finished(doomed), stack.finished(healthy))
    assert failed.status is TicketStatus.FAILED
    assert failed.failure_reason is not None
    assert "not valid" in failed.failure_reason
    events = stack.topics(doomed)
    failures = [state for topic, state in events if topic == "subtask_failed"]
    assert [f["attempt"] for f in failures] == [1, 2]
    assert [f["will_retry"] for f in failures] == [True, False]
    assert completed.status is TicketStatus.COMPLETED
