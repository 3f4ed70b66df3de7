"""Assembles the prompt input of one subtask from the ticket: documents, options, retrieval,
findings.

The aggregate is the only source of pipeline state: the ticket's snapshot (commands/port.py)
gives the pipeline it runs, its documents in role order, its options and the validated outputs
of the subtask's dependencies. The documents' text comes from the ingest handler's store;
retrieval asks the chunk store for the ticket's own chunks, with a fixed query or the value of
one of the options.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from commands.port import TicketSnapshot
from handlers.consumer import PermanentFailure
from handlers.ingest import DocumentTexts
from inference.embeddings import Embedder
from inference.prompts import ContextChunk, PromptInput, RoleDocument
from inference.retrieval import ChunkStore
from streams import contract

# A pipeline that declares only this role reads one unlabelled document, as before roles existed,
# so its prompts (and the prefix caches built on them) stay byte for byte the same.
DEFAULT_ROLE = "main"


class PromptAssembler:
    def __init__(self, chunks: ChunkStore, texts: DocumentTexts, embedder: Embedder) -> None:
        self._chunks = chunks
        self._texts = texts
        self._embedder = embedder

    async def build(
        self, ticket: TicketSnapshot, definition: contract.SubtaskDefinition
    ) -> PromptInput:
        dependencies: dict[str, Any] = {
            dep: ticket.subtasks[dep].output for dep in definition.depends_on
        }
        documents = ticket.documents
        shas = [document.sha256 for document in documents]
        labelled = tuple(ticket.pipeline.document_roles) != (DEFAULT_ROLE,)
        base = PromptInput(
            system_prompt=ticket.pipeline.system_prompt,
            instruction=definition.instruction,
            output_schema=definition.output_schema,
            options=model_options(ticket),
            dependency_outputs=dependencies,
        )
        if definition.retrieval is not None:
            query = retrieval_query(ticket, definition.retrieval)
            (vector,) = await self._embedder.embed([query])
            found = await self._chunks.search(
                ticket.tenant,
                query,
                vector,
                top_k=definition.retrieval.top_k,
                document_sha256s=shas,
            )
            # Reading order, not score order: the model follows the documents better.
            found.sort(key=lambda c: (shas.index(c.document_sha256), c.ordinal))
            roles = {document.sha256: document.role for document in documents}
            chunks = tuple(
                ContextChunk(
                    c.text, c.page, c.heading, roles[c.document_sha256] if labelled else None
                )
                for c in found
            )
            return replace(base, chunks=chunks)
        texts = [await self._texts.get(ticket.tenant, sha) for sha in shas]
        if not labelled:
            document_text = "\n\n".join(text for text in texts if text)
            return replace(base, document_text=document_text)
        return replace(
            base,
            documents=tuple(
                RoleDocument(document.role, text or "")
                for document, text in zip(documents, texts, strict=True)
            ),
        )

    async def build_question(self, ticket: TicketSnapshot, subtask_id: str) -> PromptInput:
        """The prompt of the subtask answering a follow-up question: excerpts retrieved for it,
        the conversation before it, the question as the one option."""
        question = ticket.questions[subtask_id]
        definition = question.definition.subtask
        conversation = ticket.conversation_before(subtask_id)
        retrieval = definition.retrieval
        top_k = retrieval.top_k if retrieval is not None else 5
        # A follow-up often refers to the question before it ("who would benefit from that?"):
        # searching with both finds the passages the conversation is about.
        query = question.question
        if conversation:
            query = f"{conversation[-1][0]}\n{query}"
        shas = [document.sha256 for document in ticket.documents]
        (vector,) = await self._embedder.embed([query])
        found = await self._chunks.search(
            ticket.tenant, query, vector, top_k=top_k, document_sha256s=shas
        )
        found.sort(key=lambda c: (shas.index(c.document_sha256), c.ordinal))
        labelled = tuple(ticket.pipeline.document_roles) != (DEFAULT_ROLE,)
        roles = {document.sha256: document.role for document in ticket.documents}
        return PromptInput(
            system_prompt=question.definition.system_prompt,
            instruction=definition.instruction,
            output_schema=definition.output_schema,
            chunks=tuple(
                ContextChunk(
                    c.text, c.page, c.heading, roles[c.document_sha256] if labelled else None
                )
                for c in found
            ),
            options={"question": question.question},
            conversation=conversation,
        )


def model_options(ticket: TicketSnapshot) -> dict[str, Any]:
    """The options the model is shown: all but those the pipeline marks personal, which are
    kept for people (prompts are stored, and outputs recorded as written, where an erasure of
    the user could not reach them)."""
    personal = ticket.pipeline.personal_options
    return {name: value for name, value in ticket.options.items() if name not in personal}


def retrieval_query(ticket: TicketSnapshot, retrieval: contract.Retrieval) -> str:
    """The search query: fixed by the pipeline, or the value of the named option."""
    if retrieval.query is not None:
        return retrieval.query
    value = ticket.options.get(retrieval.query_option or "")
    if not isinstance(value, str) or not value.strip():
        # Options were validated against the pipeline when the ticket was created, and the
        # pipeline requires this one as a string, so only a corrupted ticket lands here.
        raise PermanentFailure(
            f"ticket {ticket.ticket_id} has no usable option {retrieval.query_option!r}"
            " to search with"
        )
    return value
