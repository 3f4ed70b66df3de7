"""Flashcards on real PostgreSQL and pgvector: tenant-scoped similarity, idempotent writes, and
duplicate detection that survives a worker dying between storing cards and recording them."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from commands.port import TicketSnapshot
from commands.ticket import Ticket, snapshot_of
from handlers.postprocess import OutputPostprocessor
from inference.embeddings import FakeEmbedder
from inference.flashcards import FlashcardRecord, FlashcardStore, card_text
from inference.pipelines import pipeline_definition
from inference.prompts import PromptInput
from streams import contract
from tests.conftest import Servers
from tests.support import random_tenant

EMBEDDER = FakeEmbedder()
PROMPT = PromptInput(system_prompt="s", instruction="i", output_schema={})


@pytest.fixture
async def pool(servers: Servers) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(servers.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> FlashcardStore:
    return FlashcardStore(pool)


def card(front: str, back: str, difficulty: str = "easy") -> dict[str, Any]:
    return {"front": front, "back": back, "cloze": None, "difficulty": difficulty}


def record(ordinal: int, front: str, back: str) -> FlashcardRecord:
    return FlashcardRecord(
        ordinal, front, back, None, "easy", EMBEDDER.vector(card_text(front, back))
    )


def flashcards_ticket(tenant: str, attempt: int = 1) -> TicketSnapshot:
    definition = contract.PipelineDefinition.model_validate(pipeline_definition("flashcards"))
    created = contract.TicketCreated(
        ticket_id=uuid.uuid4(),
        tenant=tenant,
        owner="alice",
        documents=(
            contract.DocumentRef(
                role="main",
                sha256="c" * 64,
                filename="notes.pdf",
                media_type="application/pdf",
                size=10,
            ),
        ),
        pipeline=definition,
        prompt_hashes=definition.prompt_hashes,
        options={"count": 2},
    )
    ticket = Ticket.open(created.ticket_id, created, None)
    ticket.subtasks["cards"].attempt = attempt
    return snapshot_of(ticket)


async def run_step(
    store: FlashcardStore, ticket: TicketSnapshot, cards: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    postprocessor = OutputPostprocessor(store, EMBEDDER)
    definition = ticket.pipeline.subtask("cards")
    output = await postprocessor.apply(
        ticket, definition, PROMPT, {"language": "en", "cards": cards}
    )
    marked: list[dict[str, Any]] = output["cards"]
    return marked


HNSW = card("What is HNSW?", "A layered proximity graph for nearest-neighbour search.")
WAL = card("What does the WAL record?", "Every change before it reaches the data files.")


async def test_a_card_like_an_earlier_ticket_s_card_is_marked_as_its_duplicate(
    store: FlashcardStore,
) -> None:
    tenant = random_tenant()
    earlier = flashcards_ticket(tenant)
    await run_step(store, earlier, [HNSW])

    marked = await run_step(store, flashcards_ticket(tenant), [WAL, HNSW])

    assert marked[0]["duplicate"] is False
    assert marked[0]["duplicate_of"] is None
    assert marked[1]["duplicate"] is True
    assert marked[1]["duplicate_of"] == {
        "ticket_id": str(earlier.ticket_id),
        "front": HNSW["front"],
        "similarity": 1.0,
    }


async def test_another_tenant_s_cards_are_never_duplicates(store: FlashcardStore) -> None:
    await run_step(store, flashcards_ticket(random_tenant()), [HNSW])

    marked = await run_step(store, flashcards_ticket(random_tenant()), [HNSW])

    assert marked[0]["duplicate"] is False


async def test_a_retry_after_a_crash_does_not_see_its_own_cards_nor_store_them_twice(
    store: FlashcardStore,
) -> None:
    tenant = random_tenant()
    ticket = flashcards_ticket(tenant)
    first = await run_step(store, ticket, [HNSW, WAL])

    # The worker died after storing the cards: the redelivered message runs the step again.
    again = await run_step(store, ticket, [HNSW, WAL])

    assert again == first
    assert not any(c["duplicate"] for c in again)
    stored = await store.cards(tenant, ticket.ticket_id)
    assert [(c.ordinal, c.front) for c in stored] == [(0, HNSW["front"]), (1, WAL["front"])]


async def test_a_later_attempt_replaces_the_cards_of_an_earlier_one(store: FlashcardStore) -> None:
    tenant = random_tenant()
    ticket = flashcards_ticket(tenant, attempt=1)
    await run_step(store, ticket, [HNSW, WAL])

    cards = dataclasses.replace(ticket.subtasks["cards"], attempt=2)
    ticket = dataclasses.replace(ticket, subtasks={**ticket.subtasks, "cards": cards})
    await run_step(store, ticket, [WAL])

    stored = await store.cards(tenant, ticket.ticket_id)
    assert [(c.ordinal, c.front, c.attempt) for c in stored] == [(0, WAL["front"], 2)]


async def test_a_late_writer_of_an_older_attempt_changes_nothing(store: FlashcardStore) -> None:
    tenant, ticket_id = random_tenant(), uuid.uuid4()
    assert await store.replace(tenant, ticket_id, "cards", 2, "en", [record(0, "New", "Card")])

    written = await store.replace(tenant, ticket_id, "cards", 1, "en", [record(0, "Old", "Card")])

    assert written is False
    assert [c.front for c in await store.cards(tenant, ticket_id)] == ["New"]


async def test_similar_cards_are_looked_up_for_the_tenant_only(store: FlashcardStore) -> None:
    tenant, other_tenant, ticket_id = random_tenant(), random_tenant(), uuid.uuid4()
    await store.replace(tenant, ticket_id, "cards", 1, "en", [record(0, "Front", "Back")])
    vector = EMBEDDER.vector(card_text("Front", "Back"))

    (own,) = await store.most_similar(tenant, [vector], exclude_ticket=uuid.uuid4())
    (foreign,) = await store.most_similar(other_tenant, [vector], exclude_ticket=uuid.uuid4())
    (itself,) = await store.most_similar(tenant, [vector], exclude_ticket=ticket_id)

    assert own is not None
    assert own.ticket_id == ticket_id
    assert own.similarity == pytest.approx(1.0)
    assert foreign is None
    assert itself is None
    assert await store.cards(other_tenant, ticket_id) == []
