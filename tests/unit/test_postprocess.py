"""Post-processing of validated outputs: citations resolved against the excerpts shown, duplicate
marks, and the check that the result matches the recorded-output schema."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from commands.port import TicketSnapshot
from commands.ticket import Ticket, snapshot_of
from handlers.consumer import PermanentFailure
from handlers.postprocess import OutputPostprocessor, mark_duplicate, resolve_citations
from inference.flashcards import SimilarFlashcard
from inference.pipelines import pipeline_definition
from inference.prompts import ContextChunk, PromptInput
from streams import contract

CHUNKS = (
    ContextChunk("41 tickets per minute.", page=1, heading="Abstract"),
    ContextChunk("Median delay 38 ms.", page=2, heading="3. Results"),
    ContextChunk("No heading here.", page=None, heading=None),
)


def open_ticket(name: str, options: dict[str, Any]) -> TicketSnapshot:
    definition = contract.PipelineDefinition.model_validate(pipeline_definition(name))
    created = contract.TicketCreated(
        ticket_id=uuid.uuid4(),
        tenant="acme",
        owner="alice",
        documents=(
            contract.DocumentRef(
                role="main",
                sha256="a" * 64,
                filename="paper.pdf",
                media_type="application/pdf",
                size=10,
            ),
        ),
        pipeline=definition,
        prompt_hashes=definition.prompt_hashes,
        options=options,
    )
    return snapshot_of(Ticket.open(created.ticket_id, created, None))


def prompt_with(chunks: tuple[ContextChunk, ...]) -> PromptInput:
    return PromptInput(system_prompt="s", instruction="i", output_schema={}, chunks=chunks)


def answer(citations: list[Any]) -> dict[str, Any]:
    return {"answerable": True, "answer": "41 tickets per minute.", "citations": citations}


def test_cited_excerpt_numbers_become_their_page_and_heading() -> None:
    resolved = resolve_citations(answer([2, 1, 3]), CHUNKS)

    assert resolved["citations"] == [
        {"excerpt": 2, "page": 2, "heading": "3. Results"},
        {"excerpt": 1, "page": 1, "heading": "Abstract"},
        {"excerpt": 3, "page": None, "heading": None},
    ]


def test_numbers_that_name_no_excerpt_are_dropped_and_repeats_kept_once() -> None:
    resolved = resolve_citations(answer([0, 4, 1, 99, 1, -2, True]), CHUNKS)

    assert resolved["citations"] == [{"excerpt": 1, "page": 1, "heading": "Abstract"}]


def test_the_rest_of_the_output_is_kept() -> None:
    resolved = resolve_citations(answer([1]), CHUNKS)

    assert resolved["answer"] == "41 tickets per minute."
    assert resolved["answerable"] is True


def test_without_excerpts_every_citation_is_dropped() -> None:
    assert resolve_citations(answer([1, 2]), ())["citations"] == []


async def test_the_postprocessor_resolves_citations_only_against_excerpts_the_prompt_showed() -> (
    None
):
    ticket = open_ticket("document-qa", {"question": "How fast is it?"})
    definition = ticket.pipeline.subtask("answer")
    # 22 + 19 characters: the third excerpt is past the budget, so the model never saw it.
    postprocessor = OutputPostprocessor(max_document_chars=41)

    output = await postprocessor.apply(ticket, definition, prompt_with(CHUNKS), answer([3, 2]))

    assert output["citations"] == [{"excerpt": 2, "page": 2, "heading": "3. Results"}]


async def test_an_output_of_a_subtask_without_steps_is_returned_as_it_is() -> None:
    ticket = open_ticket("document-review", {})
    definition = ticket.pipeline.subtask("summary")
    output = {"summary": "A paper."}

    assert await OutputPostprocessor().apply(ticket, definition, prompt_with(()), output) is output


async def test_a_step_result_that_breaks_the_recorded_schema_fails_for_good() -> None:
    ticket = open_ticket("document-qa", {"question": "How fast is it?"})
    definition = ticket.pipeline.subtask("answer")
    broken = {"answerable": True, "citations": [1]}  # no answer

    with pytest.raises(PermanentFailure, match="invalid output"):
        await OutputPostprocessor().apply(ticket, definition, prompt_with(CHUNKS), broken)


async def test_duplicate_detection_without_a_card_store_is_a_configuration_error() -> None:
    ticket = open_ticket("flashcards", {"count": 1})
    definition = ticket.pipeline.subtask("cards")
    output = {
        "language": "en",
        "cards": [{"front": "Q", "back": "A", "cloze": None, "difficulty": "easy"}],
    }

    with pytest.raises(RuntimeError, match="needs a flashcard store"):
        await OutputPostprocessor().apply(ticket, definition, prompt_with(()), output)


CARD = {"front": "What is HNSW?", "back": "A graph index.", "cloze": None, "difficulty": "easy"}


def test_a_card_at_or_above_the_threshold_is_marked_with_its_earlier_twin() -> None:
    earlier = uuid.uuid4()
    marked = mark_duplicate(CARD, SimilarFlashcard(earlier, "What's HNSW?", 0.912345), 0.9)

    assert marked["duplicate"] is True
    assert marked["duplicate_of"] == {
        "ticket_id": str(earlier),
        "front": "What's HNSW?",
        "similarity": 0.9123,
    }


@pytest.mark.parametrize("match", [None, SimilarFlashcard(uuid.uuid4(), "Other", 0.89)])
def test_a_card_without_a_close_earlier_card_is_not_a_duplicate(
    match: SimilarFlashcard | None,
) -> None:
    marked = mark_duplicate(CARD, match, 0.9)

    assert marked == {**CARD, "duplicate": False, "duplicate_of": None}
