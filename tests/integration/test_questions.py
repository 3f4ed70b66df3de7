"""Follow-up questions on a finished ticket, end to end on the real servers and the real CPU model:
both HTTP APIs as the processes build them, the relay, the ingest and inference workers and the
projector in this process, on a database and NATS server of their own.

A document Q&A ticket on the sample paper completes; two questions are asked over the command
API, the second referring to the first; the SSE stream of the ticket delivers both answers, the
query API serves the conversation, and the second prompt (stored as a blob under the hash its
provenance names) holds the first question and its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import markupsafe
import pytest
import pytest_asyncio

from commands.service import CommandService
from projections import Projector
from streams import contract
from streams.contract.history import ticket_events_until
from tests.conftest import Servers
from tests.integration.conftest import isolated_stack_settings, running_workers
from tests.integration.served_apis import serving
from tests.support import random_tenant, sample
from ticketflow.bootstrap import commands_api, jwt_codec, queries_api
from ticketflow.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FIRST = "What is the goal of the paper?"
SECOND = "Who would benefit from that?"


@dataclass
class Stack:
    settings: Settings
    service: CommandService
    pool: asyncpg.Pool
    commands: httpx.AsyncClient
    queries: httpx.AsyncClient
    tenant: str

    def headers(self, tenant: str | None = None, **more: str) -> dict[str, str]:
        token = jwt_codec(self.settings).mint(
            subject="alice", tenant=tenant or self.tenant, roles=("user",)
        )
        return {"Authorization": f"Bearer {token}", **more}

    async def open_ticket(self, name: str, options: dict[str, Any] | None = None) -> uuid.UUID:
        response = await self.commands.post(
            "/tickets",
            headers=self.headers(),
            files={"file": (name, sample(name).read_bytes(), "application/pdf")},
            data={"pipeline": "document-qa", "options": json.dumps(options or {})},
        )
        assert response.status_code == 202, response.text
        return uuid.UUID(response.json()["ticket_id"])

    async def finished(self, ticket_id: uuid.UUID, timeout: float = 420) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ticket = await asyncio.to_thread(self.service.get_ticket, ticket_id)
            if ticket.is_finished:
                return str(ticket.status)
            await asyncio.sleep(0.3)
        raise TimeoutError(f"ticket {ticket_id} did not finish")

    async def ask(
        self, ticket_id: uuid.UUID, question: Any, tenant: str | None = None, **headers: str
    ) -> httpx.Response:
        return await self.commands.post(
            f"/tickets/{ticket_id}/questions",
            headers=self.headers(tenant, **headers),
            json={"question": question},
        )


@pytest.fixture(scope="module")
def stack_settings(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    with isolated_stack_settings(
        servers,
        tmp_path_factory.mktemp("nats"),
        rate_limits_enabled=False,
        inference_ack_wait_s=4.0,
    ) as settings:
        yield settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(stack_settings: Settings) -> AsyncIterator[Stack]:
    url = stack_settings.database_url
    assert url is not None
    stop = asyncio.Event()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    projector = asyncio.create_task(Projector(pool).run(stop))
    try:
        with (
            serving(commands_api(stack_settings)) as commands_url,
            serving(queries_api(stack_settings)) as queries_url,
        ):
            async with (
                running_workers(stack_settings) as service,
                httpx.AsyncClient(base_url=commands_url, timeout=60) as commands,
                httpx.AsyncClient(base_url=queries_url, timeout=60) as queries,
            ):
                yield Stack(stack_settings, service, pool, commands, queries, random_tenant())
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(projector, 30)
        await pool.close()


async def sse_events(stack: Stack, ticket_id: uuid.UUID, after: int) -> list[tuple[str, Any]]:
    """Every (event, data) the ticket's SSE stream sends after position `after`, until it ends."""
    received: list[tuple[str, Any]] = []
    async with stack.queries.stream(
        "GET",
        f"/tickets/{ticket_id}/stream",
        headers=stack.headers(**{"Last-Event-ID": str(after)}),
        timeout=httpx.Timeout(60, read=600),
    ) as response:
        assert response.status_code == 200
        name = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name is not None:
                received.append((name, json.loads(line.removeprefix("data: "))))
                name = None
    return received


async def test_two_questions_on_a_finished_ticket_are_answered_as_a_conversation(
    stack: Stack,
) -> None:
    ticket_id = await stack.open_ticket("research-paper.pdf", {"question": "What is measured?"})
    assert await stack.finished(ticket_id) == "completed"
    events = await ticket_events_until(stack.pool, ticket_id, 2**62)
    final_position = events[-1].position

    first = await stack.ask(ticket_id, FIRST, **{"Idempotency-Key": "first-question"})
    assert first.status_code == 202, first.text
    second = await stack.ask(ticket_id, SECOND)
    assert second.status_code == 202, second.text
    again = await stack.ask(ticket_id, FIRST, **{"Idempotency-Key": "first-question"})
    assert again.json()["question_id"] == first.json()["question_id"]
    first_id, second_id = first.json()["question_id"], second.json()["question_id"]

    # The stream of a completed ticket stays open until both questions ended.
    streamed = await asyncio.wait_for(sse_events(stack, ticket_id, final_position), 600)
    names = [name for name, _ in streamed]
    asked = [data["question_id"] for name, data in streamed if name == "question_asked"]
    answered = [data["question_id"] for name, data in streamed if name == "question_answered"]
    assert asked == [first_id, second_id]
    assert answered == [first_id, second_id], names
    completed_answers = [
        data for name, data in streamed if name == "subtask_completed" and not data["ignored"]
    ]
    assert [data["subtask_id"] for data in completed_answers] == [
        f"question_{uuid.UUID(first_id).hex}",
        f"question_{uuid.UUID(second_id).hex}",
    ]
    # The ticket stays completed, with its one final event.
    assert "completed" not in names
    events = await ticket_events_until(stack.pool, ticket_id, 2**62)
    finals = [e for e in events if e.event_type.name in ("completed", "failed", "cancelled")]
    assert [e.event_type.name for e in finals] == ["completed"]

    first_answer, second_answer = (data["output"] for data in completed_answers)
    first_prompt, second_prompt = (
        stack.service.prompt(stack.tenant, data["provenance"]["prompt_sha256"])
        for data in completed_answers
    )
    assert first_prompt is not None
    assert second_prompt is not None
    second_user = json.loads(second_prompt)[-1]["content"]
    history = second_user.index("Earlier questions and answers")
    assert second_user.index("[excerpt 1") < history < second_user.index("<options>")
    shown = json.loads(second_user[history:].split("\n", 1)[1].split("\n\n", 1)[0])
    assert shown == [{"question": FIRST, "answer": first_answer["answer"]}]
    assert "Earlier questions" not in json.loads(first_prompt)[-1]["content"]
    # Each citation names an excerpt its prompt showed, with that excerpt's page and heading.
    for output, prompt in ((first_answer, first_prompt), (second_answer, second_prompt)):
        content = json.loads(prompt)[-1]["content"]
        labels = dict(re.findall(r"\[excerpt (\d+)((?: \| [^\]\n]*)?)\]", content))
        for citation in output["citations"]:
            label = labels[str(citation["excerpt"])]
            if citation["page"] is not None:
                assert f"| page {citation['page']}" in label
            if citation["heading"]:
                assert citation["heading"] in label

    # The query API serves the conversation, also in the ticket's detail.
    listed = await stack.queries.get(
        f"/tickets/{ticket_id}/questions",
        params={"min_position": events[-1].position},
        headers=stack.headers(),
    )
    assert listed.status_code == 200, listed.text
    items = listed.json()["items"]
    assert [(q["question"], q["status"]) for q in items] == [
        (FIRST, "answered"),
        (SECOND, "answered"),
    ]
    assert [q["answer"] for q in items] == [first_answer, second_answer]
    assert items[1]["prompt_sha256"] == completed_answers[1]["provenance"]["prompt_sha256"]
    detail = await stack.queries.get(f"/tickets/{ticket_id}", headers=stack.headers())
    assert detail.json()["status"] == "completed"
    assert [q["question_id"] for q in detail.json()["questions"]] == [first_id, second_id]
    # As of the first answer, from history: the second question was not answered yet.
    first_answered = next(e.position for e in events if e.event_type.name == "question_answered")
    then = await stack.queries.get(
        f"/tickets/{ticket_id}", params={"as_of": first_answered}, headers=stack.headers()
    )
    assert then.status_code == 200, then.text
    assert [q["status"] for q in then.json()["questions"]] == ["answered", "asked"]
    # The console's view of the ticket shows the conversation too.
    console = await stack.queries.get(
        f"/console/fragments/tickets/{ticket_id}", headers=stack.headers()
    )
    assert console.status_code == 200, console.text
    conversation = console.text[console.text.index('<ol id="questions">') :]
    for asked_text, answer in ((FIRST, first_answer), (SECOND, second_answer)):
        assert markupsafe.escape(asked_text) in conversation
        assert markupsafe.escape(answer["answer"]) in conversation
    # The ticket's explanation covers its pipeline's subtasks, questions or not.
    explained = await stack.queries.get(f"/tickets/{ticket_id}/explain", headers=stack.headers())
    assert explained.status_code == 200, explained.text
    assert [s["subtask_id"] for s in explained.json()["subtasks"]] == ["answer"]


async def test_bad_questions_get_a_clear_4xx(stack: Stack) -> None:
    ticket_id = uuid.uuid4()
    assert (await stack.ask(ticket_id, "What is it?")).status_code == 404
    unreadable = await stack.open_ticket("bad-no-text-layer.pdf", {"question": "What is it?"})
    assert await stack.finished(unreadable) == "failed"

    refused = await stack.ask(unreadable, "What is it?")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "documents_not_ingested"
    # It will never be read: the answer says so, instead of asking to come back later.
    assert "failed before its documents were read" in refused.json()["error"]["message"]
    assert (await stack.ask(unreadable, "What is it?", tenant=random_tenant())).status_code == 404
    blank = await stack.ask(unreadable, "   ")
    assert blank.status_code == 422
    assert blank.json()["error"]["message"] == "The question is empty."
    for bad in ("", "x" * (contract.QUESTION_MAX_CHARS + 1), 42, None):
        response = await stack.ask(unreadable, bad)
        assert response.status_code == 422, (bad, response.text)
        assert "question" in response.text
