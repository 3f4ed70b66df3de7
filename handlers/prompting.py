"""Assembles the prompt input of one subtask from the ticket: documents, retrieval, findings.

The aggregate is the only source of pipeline state: the ticket gives the pipeline snapshot, the
documents and the validated outputs of the subtask's dependencies. The document's text comes
from the ingest handler's store; retrieval asks the chunk store for the document's own chunks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from commands.ticket import Ticket
from handlers.ingest import DocumentTexts
from inference.embeddings import Embedder
from inference.prompts import ContextChunk, PromptInput
from inference.retrieval import ChunkStore
from streams import contract


class PromptAssembler:
    def __init__(self, chunks: ChunkStore, texts: DocumentTexts, embedder: Embedder) -> None:
        self._chunks = chunks
        self._texts = texts
        self._embedder = embedder

    async def build(self, ticket: Ticket, definition: contract.SubtaskDefinition) -> PromptInput:
        dependencies: dict[str, Any] = {
            dep: ticket.subtasks[dep].output for dep in definition.depends_on
        }
        shas = [document["sha256"] for document in ticket.documents]
        base = PromptInput(
            system_prompt=ticket.pipeline.system_prompt,
            instruction=definition.instruction,
            output_schema=definition.output_schema,
            dependency_outputs=dependencies,
        )
        if definition.retrieval is not None:
            query = definition.retrieval.query
            (vector,) = await self._embedder.embed([query])
            found = await self._chunks.search(
                ticket.tenant,
                query,
                vector,
                top_k=definition.retrieval.top_k,
                document_sha256s=shas,
            )
            # Reading order, not score order: the model follows the document better.
            found.sort(key=lambda c: (shas.index(c.document_sha256), c.ordinal))
            chunks = tuple(ContextChunk(c.text, c.page, c.heading) for c in found)
            return replace(base, chunks=chunks)
        texts = [await self._texts.get(ticket.tenant, sha) for sha in shas]
        document_text = "\n\n".join(text for text in texts if text)
        return replace(base, document_text=document_text)
