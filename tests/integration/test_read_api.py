"""The query HTTP API against real PostgreSQL, served by uvicorn so that SSE really streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from commands.messages import (
    AskQuestion,
    CancelTicket,
    CompleteSubtask,
    CreateTicket,
    FailSubtask,
    RecordIngestion,
    StartSubtask,
    UploadedDocument,
)
from commands.service import CommandService
from inference.embeddings import FakeEmbedder
from inference.retrieval import ChunkRecord, ChunkStore, DocumentStats
from projections import Projector
from projections.history import fold_into_temporary_tables
from read_api import queries
from read_api.app import QuerySettings
from read_api.routes.common import READ_MODELS_PROJECTION
from read_api.schemas import Question, Subtask
from read_api.wiring import query_api
from streams import contract
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.support import random_tenant, sample
from ticketflow.bootstrap import jwt_codec, open_authenticator
from ticketflow.embedded import free_port
from ticketflow.settings import Settings

PDF = sample("research-paper.pdf").read_bytes()
USAGE = contract.TokenUsage(prompt_tokens=100, completion_tokens=20, cached_tokens=40)


@dataclass
class World:
    """A fresh database with the command service, the projector and a running query API."""

    service: CommandService
    settings: Settings
    database_url: str
    pool: asyncpg.Pool
    client: httpx.AsyncClient
    tenant: str

    def headers(self, tenant: str | None = None, *roles: str) -> dict[str, str]:
        token = jwt_codec(self.settings).mint(
            subject="alice", tenant=tenant or self.tenant, roles=roles or ("user",)
        )
        return {"Authorization": f"Bearer {token}"}

    def create(self, pipeline: str = "tiny", tenant: str | None = None) -> tuple[uuid.UUID, int]:
        document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
        command = CreateTicket(tenant or self.tenant, "alice", (document,), pipeline)
        result = self.service.create_ticket(command)
        return result.ticket_id, result.position

    def ingest(self, ticket_id: uuid.UUID) -> int:
        ingested = contract.IngestedDocument(
            role="main", sha256="0" * 64, pages=3, characters=1200, chunks=4
        )
        return self.service.record_ingestion(RecordIngestion(ticket_id, (ingested,))).position

    def complete(self, ticket_id: uuid.UUID, subtask_id: str, attempt: int = 1) -> int:
        output = {"x": f"{subtask_id} says <b>hello</b>"}
        command = CompleteSubtask(ticket_id, subtask_id, attempt, output, "smollm2", USAGE, 12.5)
        return self.service.complete_subtask(command).position

    def finish(self, ticket_id: uuid.UUID) -> int:
        """Everything after ingestion: a, b, c failing once and retried, then d."""
        self.complete(ticket_id, "a")
        self.complete(ticket_id, "b")
        self.service.fail_subtask(FailSubtask(ticket_id, "c", 1, "not valid", retryable=True))
        self.complete(ticket_id, "c", attempt=2)
        return self.complete(ticket_id, "d")

    def completed_ticket(self, tenant: str | None = None) -> uuid.UUID:
        ticket_id, _ = self.create(tenant=tenant)
        self.ingest(ticket_id)
        self.finish(ticket_id)
        return ticket_id

    async def project(self) -> int:
        projector = Projector(self.pool)
        await projector.catch_up()
        return projector.position


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Runs the app (its lifespan included) with uvicorn on a free port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError("the query API did not start")
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def world_for(
    servers: Servers, database_url: str, query_settings: QuerySettings
) -> AsyncIterator[World]:
    settings = settings_for(servers, database_url)
    service = service_for(settings, database_url)
    app = query_api(
        database_url,
        open_authenticator(settings),
        FakeEmbedder,
        settings=query_settings,
        history=fold_into_temporary_tables,
    )
    try:
        async with (
            serving(app) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=30) as client,
        ):
            pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
            try:
                yield World(service, settings, database_url, pool, client, random_tenant())
            finally:
                await pool.close()
    finally:
        service.close()


@pytest.fixture
async def world(servers: Servers, fresh_database: str) -> AsyncIterator[World]:
    async with world_for(servers, fresh_database, QuerySettings(max_wait_s=3)) as world:
        yield world


@pytest.fixture
def patient_settings() -> QuerySettings:
    # Polls rarely, so a quick answer proves the NOTIFY woke the waiter.
    return QuerySettings(max_wait_s=10, poll_interval_s=8, stream_poll_interval_s=8)


def ticket_routes(ticket_id: uuid.UUID) -> list[str]:
    return [
        f"/tickets/{ticket_id}",
        f"/tickets/{ticket_id}/report",
        f"/tickets/{ticket_id}/events",
        f"/tickets/{ticket_id}/stream",
    ]


@dataclass(frozen=True)
class Sse:
    id: int
    event: str
    data: dict[str, Any]


async def read_sse(response: httpx.Response, count: int | None = None) -> list[Sse]:
    """Reads SSE messages until `count` were read, or the stream ends."""
    messages: list[Sse] = []
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                messages.append(Sse(int(fields["id"]), fields["event"], json.loads(fields["data"])))
                if count is not None and len(messages) == count:
                    break
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    return messages


# -- tickets -------------------------------------------------------------------------------------


async def test_the_ticket_list_pages_newest_first_without_duplicates(world: World) -> None:
    created = [world.create()[0] for _ in range(5)]
    failing = world.create("tiny-once")[0]
    world.create(tenant=random_tenant())  # another tenant's ticket is never listed
    await world.project()

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = await world.client.get("/tickets", params=params, headers=world.headers())
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["items"]) <= 2
        seen += [item["ticket_id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 6
    assert set(seen) == {str(ticket_id) for ticket_id in [*created, failing]}

    everything = (await world.client.get("/tickets", headers=world.headers())).json()["items"]
    keys = [(item["created_at"], item["ticket_id"]) for item in everything]
    assert [item["ticket_id"] for item in everything] == seen
    assert keys == sorted(keys, reverse=True)

    by_pipeline = await world.client.get(
        "/tickets", params={"pipeline": "tiny-once"}, headers=world.headers()
    )
    assert [item["ticket_id"] for item in by_pipeline.json()["items"]] == [str(failing)]
    assert by_pipeline.json()["items"][0]["progress"] == {
        "total": 4,
        "completed": 0,
        "failed_attempts": 0,
        "percent": 0,
    }


async def test_the_list_filters_by_status_and_refuses_bad_input(world: World) -> None:
    done = world.completed_ticket()
    world.create()
    await world.project()
    response = await world.client.get(
        "/tickets", params={"status": "completed"}, headers=world.headers()
    )
    assert [item["ticket_id"] for item in response.json()["items"]] == [str(done)]
    assert response.json()["items"][0]["progress"]["percent"] == 100

    for params in ({"cursor": "not-a-cursor"}, {"limit": 101}, {"status": "sleeping"}):
        refused = await world.client.get("/tickets", params=params, headers=world.headers())
        assert refused.status_code == 422, params
        assert refused.json()["error"]["code"] in {"invalid_cursor", "invalid_request"}


async def test_the_ticket_detail_reads_in_one_statement_what_the_separate_reads_give(
    world: World,
) -> None:
    ticket_id = world.completed_ticket()
    world.service.ask_question(AskQuestion(ticket_id, world.tenant, "alice", "Why?"))
    world.service.ask_question(AskQuestion(ticket_id, world.tenant, "alice", "And then?"))
    position = await world.project()
    async with world.pool.acquire() as conn:
        # Times inside the jsonb arrays are text in the session's zone: any zone reads the same.
        await conn.execute("SET TIME ZONE 'Asia/Kolkata'")
        found = await queries.ticket_detail(
            conn, world.tenant, ticket_id, projection=READ_MODELS_PROJECTION
        )
        ticket = await queries.ticket(conn, world.tenant, ticket_id)
        subtasks = await queries.subtasks(conn, world.tenant, ticket_id)
        questions = await queries.questions(conn, world.tenant, ticket_id)
        at = await queries.ticket_detail(conn, world.tenant, ticket_id)
        missing = await queries.ticket_detail(
            conn, world.tenant, uuid.uuid4(), projection=READ_MODELS_PROJECTION
        )
        other = await queries.ticket_detail(conn, random_tenant(), ticket_id)
    assert found is not None
    assert at is not None
    assert (found.position, at.position) == (position, None)
    assert found.ticket == ticket
    assert [Subtask.model_validate(row) for row in found.subtasks] == [
        Subtask.model_validate(row) for row in subtasks
    ]
    assert [Question.model_validate(row) for row in found.questions] == [
        Question.model_validate(row) for row in questions
    ]
    assert [row["subtask_id"] for row in found.subtasks] == ["a", "b", "c", "d"]
    assert [row["question"] for row in found.questions] == ["Why?", "And then?"]
    assert missing is None
    assert other is None


async def test_a_ticket_shows_its_subtasks_in_order_with_progress(world: World) -> None:
    ticket_id = world.completed_ticket()
    position = await world.project()
    response = await world.client.get(f"/tickets/{ticket_id}", headers=world.headers())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed"
    assert [subtask["subtask_id"] for subtask in body["subtasks"]] == ["a", "b", "c", "d"]
    assert [subtask["ordinal"] for subtask in body["subtasks"]] == [0, 1, 2, 3]
    assert body["subtasks"][2]["attempts"] == 2
    assert body["progress"] == {"total": 4, "completed": 4, "failed_attempts": 1, "percent": 100}
    assert body["subtask_counts"]["completed"] == 4
    assert body["projection"] == {"position": position, "behind": False}
    assert response.headers["X-Projection-Position"] == str(position)
    assert response.headers["X-Projection-Behind"] == "false"


async def test_the_report_answers_json_and_markdown(world: World) -> None:
    ticket_id = world.completed_ticket()
    await world.project()
    url = f"/tickets/{ticket_id}/report"
    as_json = await world.client.get(url, headers=world.headers())
    assert as_json.status_code == 200, as_json.text
    body = as_json.json()
    assert body["final_subtask_id"] == "d"
    assert body["verdict"] == {"x": "d says <b>hello</b>"}
    assert set(body["outputs"]) == {"a", "b", "c", "d"}

    markdown = await world.client.get(url, headers={**world.headers(), "Accept": "text/markdown"})
    assert markdown.status_code == 200
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert markdown.text == body["markdown"]
    assert "d says" in markdown.text
    assert "<b>" not in markdown.text  # the projector escapes outputs
    assert markdown.headers["X-Projection-Behind"] == "false"
    # One URL, several formats: caches are told the format depends on Accept.
    assert as_json.headers["Vary"] == "Accept"
    assert markdown.headers["Vary"] == "Accept"


async def test_a_cancelled_tickets_unfinished_subtasks_read_cancelled(world: World) -> None:
    ticket_id, _ = world.create()
    world.ingest(ticket_id)
    world.service.start_subtask(StartSubtask(ticket_id, "a", 1, "w1"))
    world.complete(ticket_id, "a")
    world.service.start_subtask(StartSubtask(ticket_id, "b", 1, "w1"))
    await world.project()
    assert await console_queue(world) == ("1", "1")  # `c` waits, `b` runs
    world.service.cancel_ticket(CancelTicket(ticket_id, world.tenant, "alice"))
    # `b` was under way: its answer comes back after the cancel and is kept, ignored.
    world.complete(ticket_id, "b")
    await world.project()

    response = await world.client.get(f"/tickets/{ticket_id}", headers=world.headers())

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled"
    statuses = {s["subtask_id"]: (s["status"], s["ignored"]) for s in body["subtasks"]}
    assert statuses == {
        "a": ("completed", False),
        "b": ("completed", True),
        "c": ("cancelled", False),
        "d": ("cancelled", False),
    }
    assert body["subtask_counts"] == {
        "pending": 0,
        "ready": 0,
        "running": 0,
        "completed": 2,
        "failed": 0,
        "cancelled": 2,
    }
    assert body["progress"]["completed"] == 1  # `b`'s answer came too late to count
    assert await console_queue(world) == ("0", "0")
    report = await world.client.get(f"/tickets/{ticket_id}/report", headers=world.headers())
    assert report.status_code == 409
    assert report.json()["error"] == {
        "code": "ticket_not_completed",
        "message": f"Ticket {ticket_id} was cancelled; it has no report.",
    }


async def console_queue(world: World) -> tuple[str, str]:
    """The operations console's subtasks waiting for inference, and running."""
    response = await world.client.get(
        "/console/fragments/operations", headers=world.headers(None, "admin")
    )
    assert response.status_code == 200, response.text
    ready = re.search(r'<dd id="queue-ready">(\d+)</dd>', response.text)
    running = re.search(r'<dd id="queue-running">(\d+)</dd>', response.text)
    assert ready is not None, response.text
    assert running is not None, response.text
    return ready[1], running[1]


async def test_a_report_of_an_unfinished_ticket_is_a_409_naming_its_status(world: World) -> None:
    ticket_id, _ = world.create()
    world.ingest(ticket_id)
    await world.project()
    response = await world.client.get(f"/tickets/{ticket_id}/report", headers=world.headers())
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "ticket_not_completed"
    assert "running" in error["message"]


async def test_the_event_history_lists_every_event_in_order(world: World) -> None:
    ticket_id = world.completed_ticket()
    for roles in (("user",), ("auditor",)):
        response = await world.client.get(
            f"/tickets/{ticket_id}/events", headers=world.headers(None, *roles)
        )
        assert response.status_code == 200, response.text
        events = response.json()["events"]
        assert events[0]["type"] == "created"
        assert events[0]["topic"] == "ticketflow.ticket.created.v1"
        assert events[-1]["type"] == "completed"
        assert [event["version"] for event in events] == list(range(1, len(events) + 1))
        positions = [event["position"] for event in events]
        assert positions == sorted(positions)
        assert all(event["payload"]["ticket_id"] == str(ticket_id) for event in events)
        assert all(event["payload"]["tenant"] == world.tenant for event in events)
        assert all(event["time"] for event in events)

    integrator = await world.client.get(
        f"/tickets/{ticket_id}/events", headers=world.headers(None, "integrator")
    )
    assert integrator.status_code == 403
    assert integrator.json()["error"]["code"] == "forbidden"


# -- live progress -------------------------------------------------------------------------------


async def test_the_stream_resumes_after_last_event_id_without_gaps_or_repeats(
    servers: Servers, fresh_database: str, patient_settings: QuerySettings
) -> None:
    async with world_for(servers, fresh_database, patient_settings) as world:
        ticket_id, _ = world.create()
        world.ingest(ticket_id)  # created, document_ingested, subtask_ready(a)
        url = f"/tickets/{ticket_id}/stream"
        async with world.client.stream("GET", url, headers=world.headers()) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            first = await read_sse(response, count=2)
        assert [message.event for message in first] == ["created", "document_ingested"]

        resumed = {**world.headers(), "Last-Event-ID": str(first[-1].id)}
        started = time.monotonic()
        async with world.client.stream("GET", url, headers=resumed) as response:
            # The rest arrives live while the stream is open: woken by NOTIFY, not by polling.
            finishing = asyncio.create_task(asyncio.to_thread(world.finish, ticket_id))
            rest = await asyncio.wait_for(read_sse(response), 30)
            await finishing
        assert time.monotonic() - started < patient_settings.stream_poll_interval_s

        history = await world.client.get(f"/tickets/{ticket_id}/events", headers=world.headers())
        expected = [(event["position"], event["type"]) for event in history.json()["events"]]
        received = [(message.id, message.event) for message in [*first, *rest]]
        assert received == expected
        assert rest[-1].event == "completed"
        assert all(message.data["ticket_id"] == str(ticket_id) for message in rest)

        # After the final event the stream ends at once.
        done = {**world.headers(), "Last-Event-ID": str(rest[-1].id)}
        async with world.client.stream("GET", url, headers=done) as response:
            assert await asyncio.wait_for(read_sse(response), 5) == []


async def test_a_finished_ticket_streams_its_whole_history_and_ends(world: World) -> None:
    ticket_id = world.completed_ticket()
    async with world.client.stream(
        "GET", f"/tickets/{ticket_id}/stream", headers=world.headers()
    ) as response:
        messages = await asyncio.wait_for(read_sse(response), 10)
    assert messages[0].event == "created"
    assert messages[-1].event == "completed"
    bad = await world.client.get(
        f"/tickets/{ticket_id}/stream", headers={**world.headers(), "Last-Event-ID": "x"}
    )
    assert bad.status_code == 422


# -- read-your-writes ----------------------------------------------------------------------------


async def test_min_position_waits_until_the_projection_reaches_it(
    servers: Servers, fresh_database: str, patient_settings: QuerySettings
) -> None:
    async with world_for(servers, fresh_database, patient_settings) as world:
        ticket_id, position = world.create()

        async def project_later() -> None:
            await asyncio.sleep(0.3)
            await world.project()

        projecting = asyncio.create_task(project_later())
        started = time.monotonic()
        response = await world.client.get(
            f"/tickets/{ticket_id}", params={"min_position": position}, headers=world.headers()
        )
        elapsed = time.monotonic() - started
        await projecting
        assert response.status_code == 200, response.text
        assert response.json()["projection"] == {"position": position, "behind": False}
        assert response.headers["X-Projection-Behind"] == "false"
        assert 0.25 <= elapsed < patient_settings.poll_interval_s


async def test_min_position_gives_up_after_the_bounded_wait_and_says_so(
    servers: Servers, fresh_database: str
) -> None:
    async with world_for(servers, fresh_database, QuerySettings(max_wait_s=0.5)) as world:
        _, position = world.create()
        reached = await world.project()
        started = time.monotonic()
        response = await world.client.get(
            "/tickets", params={"min_position": position + 1000}, headers=world.headers()
        )
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert response.json()["projection"] == {"position": reached, "behind": True}
        assert response.headers["X-Projection-Behind"] == "true"
        assert response.headers["X-Projection-Position"] == str(reached)
        assert 0.5 <= elapsed < 3


# -- search --------------------------------------------------------------------------------------


async def test_search_finds_the_tenants_chunks_only(world: World) -> None:
    embedder = FakeEmbedder()
    texts = ["the cat sat on the mat", "quarterly revenue grew by ten percent", "rain in spain"]
    vectors = await embedder.embed(texts)
    sha = "ab" * 32
    chunks = [
        ChunkRecord(ordinal, text, 1, None, vector)
        for ordinal, (text, vector) in enumerate(zip(texts, vectors, strict=True))
    ]
    store = ChunkStore(world.pool)
    await store.store(world.tenant, sha, chunks, DocumentStats(3, 60, 1))

    body = {"query": "quarterly revenue", "top_k": 2}
    response = await world.client.post("/search", json=body, headers=world.headers())
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["text"] == texts[1]
    assert results[0]["document_sha256"] == sha
    assert len(results) <= 2

    other = await world.client.post("/search", json=body, headers=world.headers(random_tenant()))
    assert other.json() == {"results": []}
    elsewhere = {**body, "document_sha256s": ["cd" * 32]}
    assert (await world.client.post("/search", json=elsewhere, headers=world.headers())).json() == {
        "results": []
    }
    for bad in (
        {"query": "x", "top_k": 21},
        {"query": ""},
        {"query": " \t\n "},
        {"query": "x", "document_sha256s": ["z"]},
    ):
        refused = await world.client.post("/search", json=bad, headers=world.headers())
        assert refused.status_code == 422, bad
        assert refused.json()["error"]["code"] == "invalid_request"


# -- health, authentication, tenants -------------------------------------------------------------


async def test_health_reports_the_database(world: World) -> None:
    response = await world.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok"}}


async def test_every_route_needs_a_token(world: World) -> None:
    ticket_id = world.completed_ticket()
    await world.project()
    for url in ["/tickets", *ticket_routes(ticket_id)]:
        for headers in ({}, {"Authorization": "Bearer not-a-token"}):
            response = await world.client.get(url, headers=headers)
            assert response.status_code == 401, url
            assert response.json()["error"]["code"] in {"unauthenticated", "invalid_token"}
            assert response.headers["WWW-Authenticate"] == "Bearer"
    response = await world.client.post("/search", json={"query": "x"})
    assert response.status_code == 401


async def test_ticket_reads_need_role_user_or_admin(world: World) -> None:
    """Auditors read tickets and reports (read-only), but neither stream nor search."""
    ticket_id = world.completed_ticket()
    await world.project()
    snapshots = ["/tickets", f"/tickets/{ticket_id}", f"/tickets/{ticket_id}/report"]
    live = [f"/tickets/{ticket_id}/stream"]
    for roles, forbidden in ((("auditor",), live), (("integrator",), snapshots + live)):
        headers = world.headers(None, *roles)
        for url in forbidden:
            response = await world.client.get(url, headers=headers)
            assert response.status_code == 403, (url, roles)
            assert response.json()["error"]["code"] == "forbidden"
        search = await world.client.post("/search", json={"query": "x"}, headers=headers)
        assert search.status_code == 403
    for role in ("user", "admin", "auditor"):
        for url in snapshots:
            response = await world.client.get(url, headers=world.headers(None, role))
            assert response.status_code == 200, (url, role)


async def test_the_tenant_history_pages_through_the_tenants_events_only(world: World) -> None:
    first = world.completed_ticket()
    world.create(tenant=random_tenant())  # another tenant's events are never shown
    second, _ = world.create()
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await world.client.get(
            "/events", params={"after": after, "limit": 4}, headers=world.headers(None, "auditor")
        )
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["events"]) <= 4
        events.extend(page["events"])
        after = page["next_after"]
        if page["caught_up"]:
            break
    assert {e["aggregate_id"] for e in events} == {str(first), str(second)}
    assert all(e["payload"]["tenant"] == world.tenant for e in events)
    assert [e["position"] for e in events] == sorted(e["position"] for e in events)
    assert events[-1]["type"] == "created"
    for roles in (("user",), ("integrator",)):
        refused = await world.client.get("/events", headers=world.headers(None, *roles))
        assert refused.status_code == 403


async def test_another_tenants_ticket_answers_404_on_every_route(world: World) -> None:
    ticket_id = world.completed_ticket()
    await world.project()
    stranger = world.headers(random_tenant(), "user", "auditor", "admin")
    for url in ticket_routes(ticket_id):
        mine = await world.client.get(url, headers=world.headers())
        assert mine.status_code == 200, url
        response = await world.client.get(url, headers=stranger)
        assert response.status_code == 404, url
        assert response.json()["error"]["code"] == "ticket_not_found"
        missing = await world.client.get(url.replace(str(ticket_id), str(uuid.uuid4())))
        assert missing.status_code == 401
    listed = await world.client.get("/tickets", headers=stranger)
    assert listed.json()["items"] == []


async def test_the_openapi_document_shows_an_example_for_every_route(world: World) -> None:
    document = (await world.client.get("/openapi.json")).json()
    text = json.dumps(document)
    assert "example" in text
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert "example" in json.dumps(operation) or "examples" in json.dumps(operation), path


async def test_an_audit_export_whose_range_ends_before_it_starts_is_refused(world: World) -> None:
    response = await world.client.get(
        "/audit/export",
        params={"since": "50", "until": "10"},
        headers=world.headers(None, "auditor"),
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == {
        "code": "invalid_range",
        "message": "query: since (50) is after until (10)",
    }
