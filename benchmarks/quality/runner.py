"""Runs the evaluation's cases through the same code the workers run, in this process.

One run starts its own embedded PostgreSQL (with pgvector; NATS and Redis start too but carry
nothing), applies the migrations and builds the real parts: the command service (the `Ticket`
aggregate decides readiness and retries), the ingest handler (extraction in a child process,
chunking, all-MiniLM-L6-v2 embeddings, pgvector) and the inference handler (prompt assembly and
retrieval, the llama.cpp backend, output validation, post-processing, recording). Only the
message transport is left out: where NATS would deliver `ticket.created` and `subtask_ready`,
this driver calls the handlers directly, with every ready subtask of a ticket in one batch as the
scheduler does. Each ticket runs under a tenant of its own, so it is ingested from scratch.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncpg
from nats.aio.msg import Msg

from benchmarks.quality import scorers
from benchmarks.quality.dataset import Case
from commands.messages import CreateTicket, UploadedDocument
from commands.service import CommandService
from commands.ticket import SubtaskStatus, Ticket, TicketStatus, snapshot_of
from commands.write_side import ServiceWriteSide
from handlers.extraction import ExtractionLimits, extract
from handlers.inference import InferenceHandler, InferenceSettings, ReadyWork
from handlers.ingest import DocumentTexts, IngestHandler, IngestSettings
from handlers.isolation import ExtractionPool
from handlers.postprocess import OutputPostprocessor
from handlers.prompting import retrieval_query
from inference.backends import Generation, GenerationRequest, InferenceBackend, LlamaCppBackend
from inference.embeddings import SentenceTransformerEmbedder
from inference.flashcards import FlashcardStore
from inference.retrieval import ChunkStore
from streams import contract
from ticketflow.bootstrap import command_service
from ticketflow.settings import Settings


class RecordingBackend:
    """Passes requests to a backend and keeps every request with what came back."""

    def __init__(self, inner: InferenceBackend) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.batch_runs_in_order = getattr(inner, "batch_runs_in_order", False)
        self.calls: list[tuple[GenerationRequest, Generation]] = []

    async def generate(self, request: GenerationRequest) -> Generation:
        generation = await self.inner.generate(request)
        self.calls.append((request, generation))
        return generation

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        generations = await self.inner.generate_batch(requests)
        self.calls.extend(zip(requests, generations, strict=True))
        return generations

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class _Message:
    """What the ingest handler reads of a JetStream message."""

    data: bytes
    headers: dict[str, str] | None = None


@dataclass
class TicketResult:
    case: str
    pipeline: str
    language: str
    model: str
    status: str
    failure: str | None
    wall_s: float
    model_s: float
    subtasks: int
    generations: int
    valid: list[bool]
    checks: dict[str, list[scorers.Check]] = field(default_factory=dict)
    retrieval: list[scorers.Check] = field(default_factory=list)
    first_rank: list[scorers.Check] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "pipeline": self.pipeline,
            "language": self.language,
            "model": self.model,
            "status": self.status,
            "failure": self.failure,
            "wall_s": round(self.wall_s, 2),
            "model_s": round(self.model_s, 2),
            "subtasks": self.subtasks,
            "generations": self.generations,
            "valid": self.valid,
            "checks": {
                kind: [{"label": c.label, "ok": c.ok} for c in checks]
                for kind, checks in self.checks.items()
            },
            "retrieval": [{"label": c.label, "ok": c.ok} for c in self.retrieval],
            "first_rank": [{"label": c.label, "ok": c.ok} for c in self.first_rank],
            "outputs": self.outputs,
        }


def result_from_json(item: dict[str, Any]) -> TicketResult:
    """A result as `TicketResult.as_json` wrote it (the first-ranked retrieval checks aside)."""

    def checks(items: list[dict[str, Any]]) -> list[scorers.Check]:
        return [scorers.Check(c["label"], bool(c["ok"])) for c in items]

    return TicketResult(
        case=item["case"],
        pipeline=item["pipeline"],
        language=item["language"],
        model=item["model"],
        status=item["status"],
        failure=item["failure"],
        wall_s=item["wall_s"],
        model_s=item["model_s"],
        subtasks=item["subtasks"],
        generations=item["generations"],
        valid=list(item["valid"]),
        checks={kind: checks(items) for kind, items in item["checks"].items()},
        retrieval=checks(item["retrieval"]),
        first_rank=checks(item.get("first_rank", [])),
        outputs=item["outputs"],
    )


def source_of(uploads: Sequence[UploadedDocument]) -> scorers.Source:
    """The documents' text as the extractor reads it, whole, by page and by section heading."""
    texts: list[str] = []
    pages: dict[int, str] = {}
    sections: dict[str, str] = {}
    for upload in uploads:
        document = extract(upload.content, upload.media_type, ExtractionLimits())
        texts.append(document.text)
        for block in document.blocks:
            if block.page is not None:
                pages[block.page] = pages.get(block.page, "") + "\n" + block.text
            for heading in block.heading_path:
                sections[heading] = sections.get(heading, "") + "\n" + block.text
    return scorers.Source("\n\n".join(texts), pages, sections)


class Evaluation:
    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.database_url = database_url
        self.service: CommandService | None = None
        self.pool: asyncpg.Pool | None = None
        self.embedder = SentenceTransformerEmbedder()

    async def __aenter__(self) -> Evaluation:
        self.service = await asyncio.to_thread(command_service, self.settings, self.database_url)
        self.pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=4)
        await asyncio.to_thread(self.embedder.load)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.service is not None:
            self.service.close()
        await self.embedder.aclose()

    def _parts(self) -> tuple[CommandService, asyncpg.Pool]:
        if self.service is None or self.pool is None:
            raise RuntimeError("use `async with`")
        return self.service, self.pool

    async def run_model(
        self,
        model_path: Path,
        cases: Sequence[Case],
        *,
        progress: bool = True,
        on_result: Callable[[TicketResult], None] | None = None,
    ) -> list[TicketResult]:
        service, pool = self._parts()
        backend = RecordingBackend(
            LlamaCppBackend(model_path, n_threads=self.settings.inference_threads)
        )
        limit = self.settings.max_prompt_document_chars
        chunks, texts = ChunkStore(pool), DocumentTexts(pool)
        ingest = IngestHandler(
            ServiceWriteSide(service),
            chunks,
            texts,
            self.embedder,
            ExtractionPool(workers=1, timeout_s=self.settings.ingest_timeout_s),
            IngestSettings(limits=ExtractionLimits()),
        )
        handler = InferenceHandler(
            ServiceWriteSide(service),
            backend,
            chunks,
            texts,
            self.embedder,
            InferenceSettings(max_document_chars=limit),
            postprocessor=OutputPostprocessor(
                FlashcardStore(pool), self.embedder, max_document_chars=limit
            ),
        )
        results: list[TicketResult] = []
        try:
            await asyncio.to_thread(backend.inner.load)  # type: ignore[attr-defined]
            for case in cases:
                questions: list[dict[str, Any] | None] = [*case.questions] or [None]
                for question in questions:
                    result = await self._run_ticket(
                        case, question, service, ingest, handler, backend, chunks
                    )
                    results.append(result)
                    if progress:
                        print(_progress_line(result), flush=True)
                    if on_result is not None:
                        on_result(result)
        finally:
            await backend.aclose()
        return results

    async def _run_ticket(
        self,
        case: Case,
        question: dict[str, Any] | None,
        service: CommandService,
        ingest: IngestHandler,
        handler: InferenceHandler,
        backend: RecordingBackend,
        chunks: ChunkStore,
    ) -> TicketResult:
        uploads = tuple(
            UploadedDocument(u.role, u.filename, u.media_type, u.content) for u in case.uploads()
        )
        options = dict(case.options)
        if question is not None:
            options["question"] = question["question"]
        tenant = f"eval-{uuid.uuid4().hex[:12]}"
        calls_before = len(backend.calls)
        started = time.perf_counter()
        command = CreateTicket(tenant, "evaluator", uploads, case.pipeline, options)
        ticket_id = (await asyncio.to_thread(service.create_ticket, command)).ticket_id
        ticket = await asyncio.to_thread(service.get_ticket, ticket_id)
        created = contract.TicketCreated(
            ticket_id=ticket.id,
            tenant=ticket.tenant,
            owner=ticket.owner,
            documents=tuple(contract.DocumentRef.model_validate(d) for d in ticket.documents),
            pipeline=ticket.pipeline,
            prompt_hashes=ticket.prompt_hashes,
            options=ticket.options,
        )
        await ingest(cast(Msg, _Message(created.model_dump_json().encode())))
        ticket = await self._drive(service, handler, ticket_id)
        wall_s = time.perf_counter() - started
        calls = backend.calls[calls_before:]
        valid = [scorers.schema_valid(_parse(g.text), r.json_schema) for r, g in calls]
        result = TicketResult(
            case=case.id,
            pipeline=case.pipeline,
            language=case.language,
            model=backend.model_name,
            status=str(ticket.status),
            failure=ticket.failure_reason,
            wall_s=wall_s,
            model_s=sum(g.latency_ms for _, g in calls) / 1000.0,
            subtasks=len(ticket.subtasks),
            generations=len(calls),
            valid=valid,
        )
        outputs = {sid: state.output for sid, state in ticket.subtasks.items() if state.output}
        result.outputs = outputs
        source = source_of(uploads)
        prompts = [ticket.pipeline.system_prompt] + [
            s.instruction for s in ticket.pipeline.subtasks
        ]
        result.checks = {
            "consistent": scorers.consistency(case.pipeline, outputs, ticket.options),
            "grounded": scorers.grounding(case.pipeline, outputs, source),
            "covered": scorers.coverage(case.spec, outputs, question),
            "clean": [scorers.clean(output, prompts) for output in outputs.values()],
        }
        result.retrieval, result.first_rank = await self._retrieval(ticket, case, question, chunks)
        return result

    async def _drive(
        self, service: CommandService, handler: InferenceHandler, ticket_id: uuid.UUID
    ) -> Ticket:
        """Hands each batch of ready subtasks to the handler until the ticket ends."""
        while True:
            ticket = await asyncio.to_thread(service.get_ticket, ticket_id)
            if ticket.is_finished:
                return ticket
            ready = [
                ReadyWork(
                    contract.SubtaskReady(
                        ticket_id=ticket.id,
                        tenant=ticket.tenant,
                        subtask_id=state.subtask_id,
                        attempt=state.attempt,
                    )
                )
                for state in ticket.subtasks.values()
                if state.status is SubtaskStatus.READY
            ]
            if not ready:
                raise RuntimeError(f"ticket {ticket_id} is {ticket.status} with nothing ready")
            for outcome in await handler.run(ticket_id, ready):
                if outcome is not None:
                    raise outcome

    async def _retrieval(
        self,
        ticket: Ticket,
        case: Case,
        question: dict[str, Any] | None,
        chunks: ChunkStore,
    ) -> tuple[list[scorers.Check], list[scorers.Check]]:
        """Whether the reference locations are among the chunks each retrieving subtask gets
        (the same query, embedder and search the prompt assembler uses), and whether the best
        ranked chunk is at one of them."""
        wanted: dict[str, list[dict[str, Any]]] = dict(case.spec.get("retrieval", {}))
        if question is not None:
            wanted = {s.id: [question["where"]] for s in ticket.pipeline.subtasks if s.retrieval}
        snapshot = snapshot_of(ticket)
        shas = [document.sha256 for document in snapshot.documents]
        found_checks: list[scorers.Check] = []
        first_checks: list[scorers.Check] = []
        for subtask_id, locations in wanted.items():
            definition = ticket.pipeline.subtask(subtask_id)
            if definition.retrieval is None:
                continue
            query = retrieval_query(snapshot, definition.retrieval)
            (vector,) = await self.embedder.embed([query])
            found = await chunks.search(
                ticket.tenant,
                query,
                vector,
                top_k=definition.retrieval.top_k,
                document_sha256s=shas,
            )
            for where in locations:
                hit = any(scorers.at_location(c.page, c.heading, where) for c in found)
                found_checks.append(scorers.Check(f"{subtask_id} finds {where}", hit))
            first = bool(found) and any(
                scorers.at_location(found[0].page, found[0].heading, where) for where in locations
            )
            first_checks.append(scorers.Check(f"{subtask_id} ranks a reference first", first))
        return found_checks, first_checks


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _progress_line(result: TicketResult) -> str:
    failed = [
        f"{kind}: {check.label}"
        for kind, checks in result.checks.items()
        for check in checks
        if not check.ok
    ]
    status = "" if result.status == TicketStatus.COMPLETED else f" {result.status.upper()}"
    return (
        f"  {result.case:<32} {result.wall_s:6.1f}s {result.generations:2d} generations{status}"
        f"  {len(failed)} failed checks"
    )
