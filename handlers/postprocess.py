"""Steps applied to a subtask's validated output before it is recorded (declared by the subtask).

- `resolve_citations`: the excerpt numbers the model cited become {excerpt, page, heading} of the
  chunks its prompt showed; numbers that name no shown excerpt are dropped.
- `flashcard_duplicates`: each card is embedded and compared with the tenant's cards from other
  tickets; cards at or above the threshold are marked as duplicates, then the new cards are
  stored. A retried subtask leaves out its own ticket's cards (they may be stored already) and
  replaces them, so a crash between storing and recording changes nothing.

The result must match the subtask's `stored_output_schema`; a step that breaks it is a bug, and
the subtask fails for good rather than recording an output its readers cannot trust.
"""

from __future__ import annotations

import logging
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from commands.port import TicketSnapshot
from handlers.consumer import PermanentFailure
from inference.embeddings import Embedder
from inference.flashcards import FlashcardRecord, FlashcardStore, SimilarFlashcard, card_text
from inference.prompts import DEFAULT_MAX_DOCUMENT_CHARS, ContextChunk, PromptInput, shown_excerpts
from streams import contract
from streams.contract.pipeline import FlashcardDuplicates, ResolveCitations

logger = logging.getLogger(__name__)


class OutputPostprocessor:
    """Applies a subtask's `postprocess` steps in order.

    `flashcards` and `embedder` are needed only by pipelines with `flashcard_duplicates`;
    `max_document_chars` must be the limit prompts are built with, so that citations resolve
    against the excerpts the model saw.
    """

    def __init__(
        self,
        flashcards: FlashcardStore | None = None,
        embedder: Embedder | None = None,
        *,
        max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
    ) -> None:
        self._flashcards = flashcards
        self._embedder = embedder
        self._max_document_chars = max_document_chars

    async def apply(
        self,
        ticket: TicketSnapshot,
        definition: contract.SubtaskDefinition,
        prompt: PromptInput,
        output: dict[str, Any],
    ) -> dict[str, Any]:
        if not definition.postprocess:
            return output
        for step in definition.postprocess:
            if isinstance(step, ResolveCitations):
                shown = shown_excerpts(prompt.chunks, self._max_document_chars)
                output = resolve_citations(output, prompt.chunks[:shown])
            elif isinstance(step, FlashcardDuplicates):
                output = await self._flashcard_duplicates(ticket, definition, step, output)
        mismatch = best_match(
            Draft202012Validator(definition.stored_output_schema).iter_errors(output)
        )
        if mismatch is not None:
            raise PermanentFailure(
                f"post-processing of {definition.id!r} produced an invalid output at "
                f"{mismatch.json_path}: {mismatch.message}"
            )
        return output

    async def _flashcard_duplicates(
        self,
        ticket: TicketSnapshot,
        definition: contract.SubtaskDefinition,
        step: FlashcardDuplicates,
        output: dict[str, Any],
    ) -> dict[str, Any]:
        if self._flashcards is None or self._embedder is None:
            raise RuntimeError("flashcard_duplicates needs a flashcard store and an embedder")
        cards: list[dict[str, Any]] = list(output["cards"])
        embeddings = await self._embedder.embed([card_text(c["front"], c["back"]) for c in cards])
        similar = await self._flashcards.most_similar(
            ticket.tenant, embeddings, exclude_ticket=ticket.ticket_id
        )
        marked = [
            mark_duplicate(card, match, step.threshold)
            for card, match in zip(cards, similar, strict=True)
        ]
        state = ticket.subtasks.get(definition.id)
        attempt = max(state.attempt if state is not None else 1, 1)
        language = output.get("language")
        await self._flashcards.replace(
            ticket.tenant,
            ticket.ticket_id,
            definition.id,
            attempt,
            language if isinstance(language, str) else None,
            [
                FlashcardRecord(
                    ordinal=ordinal,
                    front=card["front"],
                    back=card["back"],
                    cloze=card.get("cloze"),
                    difficulty=card["difficulty"],
                    embedding=embedding,
                    duplicate=card["duplicate"],
                )
                for ordinal, (card, embedding) in enumerate(zip(marked, embeddings, strict=True))
            ],
        )
        duplicates = sum(card["duplicate"] for card in marked)
        logger.info(
            "flashcards checked: %d of %d repeat earlier cards",
            duplicates,
            len(marked),
            extra={"ticket_id": str(ticket.ticket_id), "subtask": definition.id},
        )
        return {**output, "cards": marked}


def mark_duplicate(
    card: dict[str, Any], match: SimilarFlashcard | None, threshold: float
) -> dict[str, Any]:
    """The card with `duplicate` and `duplicate_of` set from its closest earlier card."""
    if match is None or match.similarity < threshold:
        return {**card, "duplicate": False, "duplicate_of": None}
    return {
        **card,
        "duplicate": True,
        "duplicate_of": {
            "ticket_id": str(match.ticket_id),
            "front": match.front,
            "similarity": round(match.similarity, 4),
        },
    }


def resolve_citations(
    output: dict[str, Any], chunks: tuple[ContextChunk, ...] | list[ContextChunk]
) -> dict[str, Any]:
    """`output` with its cited excerpt numbers replaced by where each excerpt came from.

    Excerpts are numbered from 1 in the order the prompt showed `chunks`. Numbers that name no
    excerpt are dropped, and a number cited twice is kept once, at its first place.
    """
    resolved: list[dict[str, Any]] = []
    seen: set[int] = set()
    for number in output.get("citations", []):
        if isinstance(number, bool) or not isinstance(number, int):
            continue
        if not 1 <= number <= len(chunks) or number in seen:
            continue
        seen.add(number)
        chunk = chunks[number - 1]
        resolved.append({"excerpt": number, "page": chunk.page, "heading": chunk.heading})
    return {**output, "citations": resolved}
