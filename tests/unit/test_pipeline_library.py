"""The shipped pipelines and the pipeline model: options, retrieval queries, post-processing."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from commands.pipeline import root_subtasks
from inference.pipelines import pipeline_definition, pipeline_names
from streams.contract import PipelineDefinition, SubtaskDefinition
from streams.contract.pipeline import NO_OPTIONS_SCHEMA
from tests.support import small_pipeline

SHIPPED = pipeline_names()
# Longer bounded strings make llama.cpp's grammar too large to parse (it gives up above about a
# thousand nested repetitions), which the CPU model reports only when it is asked to generate.
MAX_STRING_LENGTH = 800


def shipped(name: str) -> PipelineDefinition:
    return PipelineDefinition.model_validate(pipeline_definition(name))


def subschemas(schema: Any, path: str = "$") -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key, value in schema.get("properties", {}).items():
        yield from subschemas(value, f"{path}.{key}")
    if "items" in schema:
        yield from subschemas(schema["items"], f"{path}[]")
    for keyword in ("anyOf", "oneOf", "allOf"):
        for index, option in enumerate(schema.get(keyword, [])):
            yield from subschemas(option, f"{path}<{keyword}{index}>")


def types_of(schema: dict[str, Any]) -> set[str]:
    declared = schema.get("type", [])
    return {declared} if isinstance(declared, str) else set(declared)


def test_the_library_ships_the_four_pipelines() -> None:
    assert {"document-review", "resume-screening", "flashcards", "document-qa"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_pipeline_loads_as_a_dag_with_roots(name: str) -> None:
    pipeline = shipped(name)

    assert pipeline.name == name
    assert root_subtasks(pipeline)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    pipeline = shipped(name)

    Draft202012Validator.check_schema(pipeline.accepted_options_schema)
    for subtask in pipeline.subtasks:
        Draft202012Validator.check_schema(subtask.output_schema)
        Draft202012Validator.check_schema(subtask.stored_output_schema)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_output_object_is_closed_and_every_string_and_array_bounded(name: str) -> None:
    for subtask in shipped(name).subtasks:
        for path, schema in subschemas(subtask.output_schema):
            where = f"{name}.{subtask.id} {path}"
            if "object" in types_of(schema):
                assert schema.get("additionalProperties") is False, where
            if "string" in types_of(schema) and "enum" not in schema and "pattern" not in schema:
                assert 0 < schema.get("maxLength", 0) <= MAX_STRING_LENGTH, where
            if "array" in types_of(schema):
                assert schema.get("maxItems", 0) > 0, where


@pytest.mark.parametrize("name", SHIPPED)
def test_every_system_prompt_calls_its_inputs_untrusted(name: str) -> None:
    pipeline = shipped(name)

    assert "untrusted" in pipeline.system_prompt
    # Personal options are never shown to the model; the others are, in an <options> fence.
    shown = set(pipeline.accepted_options_schema.get("properties", {})) - pipeline.personal_options
    if shown:
        assert "<options>" in pipeline.system_prompt


def test_resume_screening_reads_a_resume_and_a_vacancy_and_scores_five_criteria() -> None:
    pipeline = shipped("resume-screening")
    criteria = [
        "technical_skills",
        "relevant_experience",
        "communication",
        "problem_solving",
        "fit",
    ]

    assert pipeline.document_roles == ("resume", "vacancy")
    for criterion in criteria:
        score = pipeline.subtask(criterion).output_schema["properties"]["score"]
        assert score == {"type": "integer", "minimum": 0, "maximum": 100}
    recommendation = pipeline.subtask("recommendation")
    assert set(recommendation.depends_on) == set(criteria)
    assert recommendation.output_schema["properties"]["recommendation"]["enum"] == [
        "strongly_recommend",
        "recommend",
        "consider",
        "reject",
    ]


def test_the_flashcards_model_is_never_asked_for_duplicates_but_the_recorded_cards_have_them() -> (
    None
):
    cards = shipped("flashcards").subtask("cards")
    asked = cards.output_schema["properties"]["cards"]["items"]
    recorded = cards.stored_output_schema["properties"]["cards"]["items"]

    assert "duplicate" not in asked["properties"]
    assert {"duplicate", "duplicate_of"} <= set(recorded["required"])


def test_document_qa_searches_with_the_question_and_records_resolved_citations() -> None:
    answer = shipped("document-qa").subtask("answer")

    assert answer.retrieval is not None
    assert answer.retrieval.query_option == "question"
    assert answer.retrieval.query is None
    recorded = answer.stored_output_schema["properties"]["citations"]["items"]
    assert recorded["required"] == ["excerpt", "page", "heading"]


def test_document_review_prompt_hashes_are_those_of_before_options_and_steps_existed() -> None:
    # Pinned: new definition fields must not change the hash of a subtask that does not use them.
    # Version 1 of the pipeline, as tickets of that time carry it in their snapshots.
    v1 = json.loads((Path(__file__).parent / "data" / "document-review-v1.json").read_text())
    assert PipelineDefinition.model_validate(v1).prompt_hashes == {
        "summary": "1b1d71587962a86c678244a17b2a99476b66383cd7ed191a6f4efc4488068b99",
        "goal": "e706ef616765c59e88eb71a7dda144df88acddaf3c7279806e71f815c407472d",
        "structure": "3e81adffbad2515e292ca8dc1574620c87c8fd8be72e5c646842279b7993588d",
        "results_vs_conclusions": (
            "9df3fd23250e37373a5e846696da6e01a03cf2aece78e1ec36d39d20bd083e3c"
        ),
        "verdict": "bf6deb7e15cff1e8686995b7cce2b55a39666aa2ec66a60ddf565a942c2f8972",
    }


def test_a_snapshot_from_before_options_and_steps_still_loads_with_defaults() -> None:
    old = small_pipeline()
    old["subtasks"][0]["retrieval"] = {"query": "methods", "top_k": 3}

    pipeline = PipelineDefinition.model_validate(old)

    assert pipeline.options_schema is None
    assert pipeline.accepted_options_schema == NO_OPTIONS_SCHEMA
    assert all(subtask.postprocess == () for subtask in pipeline.subtasks)
    assert pipeline.subtasks[0].retrieval is not None
    assert pipeline.subtasks[0].retrieval.query_option is None


def test_a_snapshot_round_trips_through_json() -> None:
    pipeline = shipped("document-qa")

    assert PipelineDefinition.model_validate_json(pipeline.model_dump_json()) == pipeline


def with_question_option(definition: dict[str, Any]) -> dict[str, Any]:
    definition["options_schema"] = {
        "type": "object",
        "properties": {"question": {"type": "string", "minLength": 3}},
        "required": ["question"],
        "additionalProperties": False,
    }
    return definition


@pytest.mark.parametrize(
    "retrieval",
    [{"top_k": 3}, {"query": "methods", "query_option": "question"}],
    ids=["neither", "both"],
)
def test_retrieval_needs_exactly_one_of_query_and_query_option(retrieval: dict[str, Any]) -> None:
    definition = with_question_option(small_pipeline())
    definition["subtasks"][0]["retrieval"] = retrieval

    with pytest.raises(ValidationError, match="exactly one of 'query' and 'query_option'"):
        PipelineDefinition.model_validate(definition)


def test_retrieval_may_take_its_query_from_a_required_string_option() -> None:
    definition = with_question_option(small_pipeline())
    definition["subtasks"][0]["retrieval"] = {"query_option": "question"}

    pipeline = PipelineDefinition.model_validate(definition)

    assert pipeline.subtasks[0].retrieval is not None
    assert pipeline.subtasks[0].retrieval.query_option == "question"


@pytest.mark.parametrize(
    "options_schema",
    [
        None,
        {"type": "object", "properties": {"question": {"type": "string"}}},
        {
            "type": "object",
            "properties": {"question": {"type": "integer"}},
            "required": ["question"],
        },
    ],
    ids=["no-options", "optional", "not-a-string"],
)
def test_a_query_option_must_be_declared_as_a_required_string(
    options_schema: dict[str, Any] | None,
) -> None:
    definition = small_pipeline()
    definition["options_schema"] = options_schema
    definition["subtasks"][0]["retrieval"] = {"query_option": "question"}

    with pytest.raises(ValidationError, match="must declare as a required string"):
        PipelineDefinition.model_validate(definition)


@pytest.mark.parametrize(
    ("options_schema", "words"),
    [
        ({"type": "array"}, "must describe an object"),
        (
            {"type": "object", "properties": {"count": {"type": "integr"}}},
            "not a valid JSON Schema",
        ),
    ],
)
def test_an_options_schema_must_be_a_valid_object_schema(
    options_schema: dict[str, Any], words: str
) -> None:
    definition = small_pipeline()
    definition["options_schema"] = options_schema

    with pytest.raises(ValidationError, match=words):
        PipelineDefinition.model_validate(definition)


def flashcards_subtask(**changes: Any) -> dict[str, Any]:
    definition: dict[str, Any] = copy.deepcopy(pipeline_definition("flashcards")["subtasks"][0])
    definition.update(changes)
    return definition


def test_an_unknown_postprocessing_step_is_refused() -> None:
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        SubtaskDefinition.model_validate(flashcards_subtask(postprocess=[{"step": "translate"}]))


def test_a_step_refuses_an_output_it_cannot_work_on() -> None:
    with pytest.raises(ValidationError, match="array 'citations' of integers"):
        SubtaskDefinition.model_validate(
            flashcards_subtask(postprocess=[{"step": "resolve_citations"}])
        )


def test_the_model_must_not_be_asked_for_the_fields_duplicate_detection_adds() -> None:
    definition = flashcards_subtask()
    card = definition["output_schema"]["properties"]["cards"]["items"]
    card["properties"]["duplicate"] = {"type": "boolean"}

    with pytest.raises(ValidationError, match="must not be asked"):
        SubtaskDefinition.model_validate(definition)


def test_steps_are_part_of_the_prompt_hash() -> None:
    default = SubtaskDefinition.model_validate(flashcards_subtask())
    stricter = SubtaskDefinition.model_validate(
        flashcards_subtask(postprocess=[{"step": "flashcard_duplicates", "threshold": 0.95}])
    )
    without = SubtaskDefinition.model_validate(flashcards_subtask(postprocess=[]))

    assert len({default.prompt_hash, stricter.prompt_hash, without.prompt_hash}) == 3


def test_document_roles_must_be_distinct() -> None:
    definition = small_pipeline()
    definition["document_roles"] = ["resume", "resume"]

    with pytest.raises(ValidationError, match="distinct"):
        PipelineDefinition.model_validate(definition)
