"""The inference handler against the in-memory write side: what it sends, and what it loads.

The write side is the deterministic fake of the handlers' port (real `Ticket` aggregates, no
event store), the backend the deterministic `FakeBackend`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import cast

import pytest

from commands.port import (
    CompleteSubtask,
    FailSubtask,
    RecordIngestion,
    StartSubtask,
    SubtaskStatus,
    TicketSnapshot,
    TicketStatus,
)
from commands.ticket import snapshot_of
from commands.write_side import InMemoryWriteSide
from handlers.consumer import PermanentFailure
from handlers.fairness import Priority
from handlers.inference import InferenceHandler, ReadyWork
from handlers.ingest import DocumentTexts
from handlers.scheduler import classify
from inference.backends import FakeBackend
from inference.embeddings import FakeEmbedder
from inference.retrieval import ChunkStore, RetrievedChunk
from streams import contract
from tests.support import small_pipeline

SHA = "a" * 64


class Texts:
    async def get(self, tenant: str, sha256: str) -> str | None:
        return "The document says forty-one." if sha256 == SHA else None


class NoChunks:
    async def search(self, *args: object, **kwargs: object) -> Sequence[RetrievedChunk]:
        return []


def opened(write: InMemoryWriteSide, *, max_attempts: int = 3) -> uuid.UUID:
    pipeline = contract.PipelineDefinition.model_validate(small_pipeline(max_attempts=max_attempts))
    created = contract.TicketCreated(
        ticket_id=uuid.uuid4(),
        tenant="acme",
        owner="alice",
        documents=(
            contract.DocumentRef(
                role="main", sha256=SHA, filename="a.pdf", media_type="application/pdf", size=9
            ),
        ),
        pipeline=pipeline,
        prompt_hashes=pipeline.prompt_hashes,
    )
    write.open(created)
    return created.ticket_id


async def ingested(write: InMemoryWriteSide, ticket_id: uuid.UUID, characters: int = 30) -> None:
    document = contract.IngestedDocument(
        role="main", sha256=SHA, pages=1, characters=characters, chunks=1
    )
    await write.record_ingestion(RecordIngestion(ticket_id, (document,)))


def ready(ticket: TicketSnapshot) -> list[ReadyWork]:
    return [
        ReadyWork(
            contract.SubtaskReady(
                ticket_id=ticket.ticket_id,
                tenant=ticket.tenant,
                subtask_id=state.subtask_id,
                attempt=state.attempt,
            )
        )
        for state in ticket.subtasks.values()
        if state.status is SubtaskStatus.READY
    ]


def handler(write: InMemoryWriteSide, backend: FakeBackend) -> InferenceHandler:
    return InferenceHandler(
        write,
        backend,
        cast(ChunkStore, NoChunks()),
        cast(DocumentTexts, Texts()),
        FakeEmbedder(),
    )


async def test_a_ticket_runs_to_the_end_with_no_load_of_its_own_by_the_handler() -> None:
    answers = [{"x": word} for word in ("alpha", "bravo", "charlie", "delta")]
    write, backend = InMemoryWriteSide(), FakeBackend(answers)
    ticket_id = opened(write)
    await ingested(write, ticket_id)
    run = handler(write, backend)

    waves = []
    while not (ticket := snapshot_now(write, ticket_id)).is_finished:
        batch = ready(ticket)
        waves.append(sorted(w.ready.subtask_id for w in batch))
        assert await run.run(ticket_id, batch) == [None] * len(batch)

    assert waves == [["a"], ["b", "c"], ["d"]]
    assert ticket.status is TicketStatus.COMPLETED
    assert write.loads == 0
    sent = [(type(c).__name__, getattr(c, "subtask_id", None)) for c in write.commands]
    assert sent == [
        ("RecordIngestion", None),
        ("StartSubtask", "a"),
        ("CompleteSubtask", "a"),
        ("StartSubtask", "b"),
        ("StartSubtask", "c"),
        ("CompleteSubtask", "b"),
        ("CompleteSubtask", "c"),
        ("StartSubtask", "d"),
        ("CompleteSubtask", "d"),
    ]
    # d's prompt shows the outputs of b and c, taken from the snapshot its start answered with.
    last_prompt = backend.requests[-1].messages[-1]["content"]
    assert "bravo" in last_prompt
    assert "charlie" in last_prompt
    assert "alpha" not in last_prompt
    completed = [c for c in write.commands if isinstance(c, CompleteSubtask)]
    assert all(c.provenance is not None and c.prompt for c in completed)
    assert set(write.prompts) == {c.provenance.prompt_sha256 for c in completed if c.provenance}


async def test_a_stale_message_starts_and_records_nothing() -> None:
    write, backend = InMemoryWriteSide(), FakeBackend()
    ticket_id = opened(write)
    await ingested(write, ticket_id)
    run = handler(write, backend)
    first = ready(snapshot_now(write, ticket_id))
    await run.run(ticket_id, first)
    sent = len(write.commands)

    # The same message again (a redelivery after its work was recorded).
    assert await run.run(ticket_id, first) == [None]

    assert backend.calls == 1
    assert [type(c) for c in write.commands[sent:]] == [StartSubtask]
    assert write.events(ticket_id).count("ticketflow.ticket.subtask_started.v1") == 1


async def test_an_answer_that_does_not_validate_is_a_retryable_failure() -> None:
    write, backend = InMemoryWriteSide(), FakeBackend(["not json at all"])
    ticket_id = opened(write)
    await ingested(write, ticket_id)

    await handler(write, backend).run(ticket_id, ready(snapshot_now(write, ticket_id)))

    (failed,) = [c for c in write.commands if isinstance(c, FailSubtask)]
    assert failed.retryable
    assert "not valid" in failed.reason
    assert snapshot_now(write, ticket_id).subtask("a").attempt == 2


async def test_a_message_about_a_ticket_that_does_not_exist_is_dead_lettered() -> None:
    write = InMemoryWriteSide()
    work = ReadyWork(
        contract.SubtaskReady(ticket_id=uuid.uuid4(), tenant="acme", subtask_id="a", attempt=1)
    )

    (outcome,) = await handler(write, FakeBackend()).run(work.ready.ticket_id, [work])

    assert isinstance(outcome, PermanentFailure)


async def test_the_scheduler_classifies_a_ticket_from_its_snapshot() -> None:
    write = InMemoryWriteSide()
    small, large = opened(write), opened(write)
    await ingested(write, small, characters=100)
    await ingested(write, large, characters=50_000)

    assert classify(snapshot_now(write, small), 20_000) is Priority.INTERACTIVE
    assert classify(snapshot_now(write, large), 20_000) is Priority.BULK
    assert classify(snapshot_now(write, opened(write)), 20_000) is Priority.BULK


async def test_a_snapshot_is_a_read_only_copy() -> None:
    write = InMemoryWriteSide()
    ticket_id = opened(write)
    await ingested(write, ticket_id)
    before = snapshot_now(write, ticket_id)

    with pytest.raises(TypeError):
        before.options["count"] = 3  # type: ignore[index]
    await handler(write, FakeBackend()).run(ticket_id, ready(before))

    assert before.subtask("a").status is SubtaskStatus.READY
    assert snapshot_now(write, ticket_id).subtask("a").status is SubtaskStatus.COMPLETED


def snapshot_now(write: InMemoryWriteSide, ticket_id: uuid.UUID) -> TicketSnapshot:
    """The ticket as the test sees it (not counted as a handler's load)."""
    return snapshot_of(write.tickets[ticket_id])
