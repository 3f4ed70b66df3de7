"""Prompt assembly from a ticket: documents in role order, options, and the retrieval query."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from typing import Any, cast

import pytest

from commands.port import TicketSnapshot
from commands.ticket import Ticket, snapshot_of
from handlers.consumer import PermanentFailure
from handlers.ingest import DocumentTexts
from handlers.prompting import PromptAssembler
from inference.embeddings import FakeEmbedder
from inference.pipelines import pipeline_definition
from inference.prompts import ContextChunk, RoleDocument
from inference.retrieval import ChunkStore, RetrievedChunk
from streams import contract

RESUME_SHA, VACANCY_SHA, PAPER_SHA = "1" * 64, "2" * 64, "3" * 64
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


class FakeDocumentTexts:
    """Document texts by hash, in memory."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    async def get(self, tenant: str, sha256: str) -> str | None:
        return self.texts.get(sha256)


class FakeChunkStore:
    """Returns the given chunks best first, and remembers what it was asked."""

    def __init__(self, found: list[RetrievedChunk]) -> None:
        self.found = found
        self.queries: list[str] = []

    async def search(
        self,
        tenant: str,
        query_text: str,
        query_embedding: Sequence[float],
        *,
        top_k: int = 5,
        document_sha256s: Sequence[str] | None = None,
    ) -> list[RetrievedChunk]:
        self.queries.append(query_text)
        return [c for c in self.found if c.document_sha256 in (document_sha256s or ())][:top_k]


def ref(role: str, sha: str) -> contract.DocumentRef:
    return contract.DocumentRef(
        role=role, sha256=sha, filename=f"{role}.docx", media_type=DOCX, size=10
    )


def open_ticket(
    name: str, documents: tuple[contract.DocumentRef, ...], options: dict[str, Any]
) -> TicketSnapshot:
    definition = contract.PipelineDefinition.model_validate(pipeline_definition(name))
    created = contract.TicketCreated(
        ticket_id=uuid.uuid4(),
        tenant="acme",
        owner="alice",
        documents=documents,
        pipeline=definition,
        prompt_hashes=definition.prompt_hashes,
        options=options,
    )
    return snapshot_of(Ticket.open(created.ticket_id, created, None))


def assembler(texts: dict[str, str], store: FakeChunkStore | None = None) -> PromptAssembler:
    return PromptAssembler(
        cast(ChunkStore, store or FakeChunkStore([])),
        cast(DocumentTexts, FakeDocumentTexts(texts)),
        FakeEmbedder(),
    )


async def test_documents_come_in_the_pipelines_role_order_whatever_the_upload_order() -> None:
    # Uploaded vacancy first; the pipeline lists the résumé first.
    ticket = open_ticket(
        "resume-screening", (ref("vacancy", VACANCY_SHA), ref("resume", RESUME_SHA)), {}
    )
    texts = {RESUME_SHA: "Jane Marlow.", VACANCY_SHA: "Senior Python Engineer."}

    prompt = await assembler(texts).build(ticket, ticket.pipeline.subtask("technical_skills"))

    assert prompt.documents == (
        RoleDocument("resume", "Jane Marlow."),
        RoleDocument("vacancy", "Senior Python Engineer."),
    )
    assert prompt.document_text is None


async def test_a_single_main_document_is_given_unlabelled() -> None:
    ticket = open_ticket("flashcards", (ref("main", PAPER_SHA),), {"count": 2})

    prompt = await assembler({PAPER_SHA: "A paper."}).build(
        ticket, ticket.pipeline.subtask("cards")
    )

    assert prompt.document_text == "A paper."
    assert prompt.documents == ()
    assert prompt.options == {"count": 2}


async def test_retrieval_searches_with_the_option_it_names() -> None:
    question = "How many tickets per minute?"
    ticket = open_ticket("document-qa", (ref("main", PAPER_SHA),), {"question": question})
    store = FakeChunkStore(
        [
            RetrievedChunk(PAPER_SHA, 4, "41 tickets per minute.", 1, "Abstract", 0.03),
            RetrievedChunk(PAPER_SHA, 1, "Introduction.", 1, "1. Introduction", 0.02),
        ]
    )

    prompt = await assembler({}, store).build(ticket, ticket.pipeline.subtask("answer"))

    assert store.queries == [question]
    # Reading order, and no role labels for a single main document.
    assert prompt.chunks == (
        ContextChunk("Introduction.", 1, "1. Introduction"),
        ContextChunk("41 tickets per minute.", 1, "Abstract"),
    )
    assert prompt.options == {"question": question}


async def test_a_ticket_without_the_query_option_fails_for_good() -> None:
    ticket = open_ticket("document-qa", (ref("main", PAPER_SHA),), {"question": "x y z"})
    ticket = dataclasses.replace(ticket, options={})

    with pytest.raises(PermanentFailure, match="no usable option 'question'"):
        await assembler({}).build(ticket, ticket.pipeline.subtask("answer"))
