"""Provenance, explanations, re-runs and time travel on tickets that really ran.

One stack for the module: a database and NATS server of its own, the relay, the ingest worker
and the inference worker in this process, the projector running, and the query API served. The
inference worker runs the deterministic fake backend (`FakeBackend`): what is tested is what the
stack records and serves about each result, not the model (the llama.cpp backend's own
provenance, the model file's hash, is tested in tests/unit/test_model_hash.py). Tickets of two
tenants and two small pipelines run while a poller records what the query API answers, with the
position each answer reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from commands.messages import CreateTicket, RerunTicket, UploadedDocument
from commands.service import CommandService
from commands.ticket import Ticket
from handlers.inference import prompt_text
from handlers.ingest import DocumentTexts
from handlers.prompting import PromptAssembler
from inference.backends import FakeBackend, GenerationRequest
from inference.embeddings import FakeEmbedder
from inference.prompts import build_messages
from inference.retrieval import ChunkStore
from projections import Projector
from projections.history import SCRATCH_SCHEMA_PREFIX, fold_into_temporary_tables
from read_api.app import QuerySettings
from read_api.wiring import query_api
from streams import contract
from streams.contract.history import ticket_events_until
from tests.conftest import Servers
from tests.integration.conftest import (
    CatalogWithTestPipelines,
    isolated_stack_settings,
    running_workers,
)
from tests.integration.test_read_api import serving
from tests.support import random_tenant, sample, short_answers, small_pipeline
from ticketflow.audit_history_cli import replay
from ticketflow.bootstrap import jwt_codec, open_authenticator
from ticketflow.settings import Settings

pytestmark = pytest.mark.slow

PDF = sample("research-paper.pdf").read_bytes()


def _quick(name: str, subtasks: list[dict[str, Any]]) -> dict[str, Any]:
    pipeline = small_pipeline(name)
    pipeline["subtasks"] = subtasks
    return short_answers(pipeline)


DIAMOND = _quick("audit-diamond", small_pipeline()["subtasks"])
CHAIN = _quick("audit-chain", small_pipeline()["subtasks"][:2])
CatalogWithTestPipelines.extra.update({"audit-diamond": DIAMOND, "audit-chain": CHAIN})


@dataclass
class Capture:
    tenant: str
    path: str
    position: int
    content: bytes


@dataclass
class Run:
    settings: Settings
    service: CommandService
    pool: asyncpg.Pool
    client: httpx.AsyncClient
    tenants: tuple[str, str]
    tickets: dict[uuid.UUID, str] = field(default_factory=dict)
    """Ticket → tenant, of the run."""
    captures: list[Capture] = field(default_factory=list)

    def headers(self, tenant: str, *roles: str) -> dict[str, str]:
        token = jwt_codec(self.settings).mint(
            subject="alice", tenant=tenant, roles=roles or ("user",)
        )
        return {"Authorization": f"Bearer {token}"}

    def submit(self, tenant: str, pipeline: str) -> uuid.UUID:
        document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
        result = self.service.create_ticket(CreateTicket(tenant, "alice", (document,), pipeline))
        self.tickets[result.ticket_id] = tenant
        return result.ticket_id

    async def finished(self, ticket_id: uuid.UUID, timeout: float = 400) -> Ticket:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ticket = await asyncio.to_thread(self.service.get_ticket, ticket_id)
            if ticket.is_finished:
                return ticket
            await asyncio.sleep(0.3)
        raise TimeoutError(f"ticket {ticket_id} did not finish")

    async def projected(self) -> int:
        """Waits until the running projector has applied the whole log."""
        end = int(await self.pool.fetchval("SELECT max(notification_id) FROM ticketflow_events"))
        while True:
            position = int(
                await self.pool.fetchval(
                    "SELECT position FROM projection_positions WHERE name = 'read_models'"
                )
            )
            if position >= end:
                return position
            await asyncio.sleep(0.1)

    async def poll(self, stop: asyncio.Event) -> None:
        """Records the query API's answers, with the position each one reports, until `stop`."""
        while not stop.is_set():
            for ticket_id, tenant in list(self.tickets.items()):
                for path in ("/tickets", f"/tickets/{ticket_id}", f"/tickets/{ticket_id}/report"):
                    response = await self.client.get(path, headers=self.headers(tenant))
                    if response.status_code == 200:
                        position = int(response.headers["X-Projection-Position"])
                        self.captures.append(Capture(tenant, path, position, response.content))
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def run_settings(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with isolated_stack_settings(servers, tmp_path_factory.mktemp("nats")) as settings:
        yield settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def run(run_settings: Settings) -> AsyncIterator[Run]:
    url = run_settings.database_url
    assert url is not None
    app = query_api(
        url,
        open_authenticator(run_settings),
        FakeEmbedder,
        settings=QuerySettings(max_wait_s=3),
        history=fold_into_temporary_tables,
    )
    stop = asyncio.Event()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    projector = asyncio.create_task(Projector(pool).run(stop))
    try:
        async with (
            running_workers(run_settings, backend=FakeBackend()) as service,
            serving(app) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=60) as client,
        ):
            state = Run(run_settings, service, pool, client, (random_tenant(), random_tenant()))
            polling = asyncio.Event()
            poller = asyncio.create_task(state.poll(polling))
            a, b = state.tenants
            started = [
                state.submit(a, "audit-diamond"),
                state.submit(b, "audit-chain"),
                state.submit(a, "audit-chain"),
                state.submit(b, "audit-diamond"),
            ]
            try:
                for ticket_id in started:
                    await state.finished(ticket_id)
                await state.projected()
            finally:
                polling.set()
                await poller
            yield state
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(projector, 30)
        await pool.close()


@pytest.mark.timeout(900)
async def test_as_of_the_position_an_answer_reported_gives_the_same_bytes(run: Run) -> None:
    for ticket_id in run.tickets:
        ticket = await asyncio.to_thread(run.service.get_ticket, ticket_id)
        assert ticket.status == "completed", ticket.failure_reason
    distinct = {(c.tenant, c.path, c.position): c for c in run.captures}
    positions = {c.position for c in distinct.values()}
    assert len(positions) >= 5, "the poller saw too few states of the run"
    assert {c.tenant for c in distinct.values()} == set(run.tenants)
    assert any(c.path.endswith("/report") for c in distinct.values())
    for capture in distinct.values():
        response = await run.client.get(
            capture.path, params={"as_of": capture.position}, headers=run.headers(capture.tenant)
        )
        assert response.status_code == 200, response.text
        assert response.content == capture.content, (capture.path, capture.position)


@pytest.mark.timeout(120)
async def test_every_result_records_its_provenance(run: Run) -> None:
    for ticket_id, tenant in run.tickets.items():
        events = await ticket_events_until(run.pool, ticket_id, 2**62)
        completions = [e for e in events if e.event_type.name == "subtask_completed"]
        assert completions
        for event in completions:
            assert event.topic == "ticketflow.ticket.subtask_completed.v2"
            payload = event.payload()
            assert isinstance(payload, contract.SubtaskCompletedV2)
            provenance = payload.provenance
            assert provenance is not None
            assert provenance.backend == "fake"
            assert provenance.model == "fake" == payload.model
            assert provenance.model_sha256 is None
            assert provenance.sampling["max_tokens"] == 24
            assert "temperature" in provenance.sampling
            assert payload.output is not None
            output_bytes = contract.canonical_json(payload.output)
            assert provenance.output_sha256 == hashlib.sha256(output_bytes).hexdigest()
            prompt = run.service.prompt(tenant, provenance.prompt_sha256)
            assert prompt is not None
            assert hashlib.sha256(prompt.encode()).hexdigest() == provenance.prompt_sha256
            assert payload.usage.prompt_tokens > 0
            assert payload.latency_ms >= 0


@pytest.mark.timeout(120)
async def test_explain_names_what_each_field_came_from_and_the_prompt_rebuilds(run: Run) -> None:
    ticket_id, tenant = next(
        (t, tenant) for t, tenant in run.tickets.items() if tenant == run.tenants[0]
    )
    response = await run.client.get(
        f"/tickets/{ticket_id}/explain", headers=run.headers(tenant, "auditor")
    )
    assert response.status_code == 200, response.text
    explained = response.json()
    report = (
        await run.client.get(f"/tickets/{ticket_id}/report", headers=run.headers(tenant))
    ).json()
    ticket = await asyncio.to_thread(run.service.snapshot, ticket_id)
    events = await ticket_events_until(run.pool, ticket_id, 2**62)
    completed_at = {
        e.payload().subtask_id: e  # type: ignore[attr-defined]
        for e in events
        if e.event_type.name == "subtask_completed"
    }
    fields = {entry["field"]: entry for entry in explained["fields"]}
    for sid, entry in report["outputs"].items():
        for key in entry["output"]:
            assert fields[f"outputs.{sid}.{key}"]["subtask_id"] == sid
    for key in report["verdict"]:
        assert fields[f"verdict.{key}"]["subtask_id"] == report["final_subtask_id"]

    assembler = PromptAssembler(ChunkStore(run.pool), DocumentTexts(run.pool), FakeEmbedder())
    for subtask in explained["subtasks"]:
        sid = subtask["subtask_id"]
        event = completed_at[sid]
        payload = event.payload()
        assert isinstance(payload, contract.SubtaskCompletedV2)
        assert payload.provenance is not None
        assert subtask["completed_position"] == event.position
        assert subtask["prompt_sha256"] == payload.provenance.prompt_sha256
        assert subtask["model"] == payload.model
        assert event.position in [ref["position"] for ref in subtask["events"]]
        for dependency in subtask["dependencies"]:
            assert dependency["position"] == completed_at[dependency["subtask_id"]].position
        # The prompt, built again from the ticket, is the stored blob, byte for byte.
        definition = ticket.pipeline.subtask(sid)
        prompt_input = replace(
            await assembler.build(ticket, definition),
            output_schema=definition.output_schema_for(dict(ticket.options)),
        )
        messages = build_messages(
            prompt_input, max_document_chars=run.settings.max_prompt_document_chars
        )
        rebuilt = prompt_text(GenerationRequest(messages, {}, 1))
        stored = run.service.prompt(tenant, subtask["prompt_sha256"])
        assert stored == rebuilt
        assert hashlib.sha256(rebuilt.encode()).hexdigest() == subtask["prompt_sha256"]


@pytest.mark.timeout(600)
async def test_a_rerun_is_linked_to_its_ticket_and_the_reports_diff(run: Run) -> None:
    a_tenant, b_tenant = run.tenants
    original = next(t for t, tenant in run.tickets.items() if tenant == a_tenant)
    result = await asyncio.to_thread(
        run.service.rerun_ticket, RerunTicket(original, a_tenant, "auditor-1")
    )
    rerun = result.ticket_id
    ticket = await run.finished(rerun)
    assert ticket.status == "completed", ticket.failure_reason
    assert ticket.rerun_of == original
    await run.projected()
    events = await ticket_events_until(run.pool, rerun, 2**62)
    assert [e.event_type.name for e in events[:2]] == ["created", "rerun_requested"]

    path = f"/tickets/{original}/diff/{rerun}"
    response = await run.client.get(path, headers=run.headers(a_tenant, "auditor"))
    assert response.status_code == 200, response.text
    diff = response.json()
    assert diff["a"]["ticket_id"] == str(original)
    assert diff["b"]["rerun_of"] == str(original)
    assert diff["compared"] > 0
    assert diff["equal"] == (diff["changes"] == [])
    for change in diff["changes"]:
        assert change["change"] in {"added", "removed", "changed"}
        assert change["a"] != change["b"]
    other = await run.client.get(path, headers=run.headers(b_tenant, "user", "auditor"))
    assert other.status_code == 404
    b_ticket = next(t for t, tenant in run.tickets.items() if tenant == b_tenant)
    mixed = await run.client.get(
        f"/tickets/{original}/diff/{b_ticket}", headers=run.headers(a_tenant)
    )
    assert mixed.status_code == 404

    with pytest.raises(Exception, match="version 99 is not available"):
        run.service.rerun_ticket(RerunTicket(original, a_tenant, "auditor-1", pipeline_version=99))


@pytest.mark.timeout(120)
async def test_audit_replay_rebuilds_the_read_models_of_a_past_position(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = run.tenants[1]
    url = run.settings.database_url
    assert url is not None
    middle = sorted({c.position for c in run.captures if c.tenant == tenant})
    early = middle[len(middle) // 3]
    end = await run.projected()
    position = await replay(url, tenant, end, early, keep=False)
    assert position == end
    printed = capsys.readouterr().out
    assert f"as of position {end}" in printed
    assert "rm_tickets:" in printed
    assert "rm_subtasks" in printed
    assert "changed" in printed
    leftover = await run.pool.fetchval(
        "SELECT count(*) FROM pg_namespace WHERE starts_with(nspname, $1)", SCRATCH_SCHEMA_PREFIX
    )
    assert leftover == 0
    # Kept, the replayed tickets equal the live read models row for row.
    await replay(url, tenant, end, None, keep=True)
    schema = await run.pool.fetchval(
        "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", SCRATCH_SCHEMA_PREFIX
    )
    try:
        replayed = await run.pool.fetch(f'SELECT * FROM "{schema}".rm_tickets ORDER BY ticket_id')
        live = await run.pool.fetch(
            "SELECT * FROM rm_tickets WHERE tenant = $1 ORDER BY ticket_id", tenant
        )
        assert [dict(r) for r in replayed] == [dict(r) for r in live]
    finally:
        await run.pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
