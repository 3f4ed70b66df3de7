"""Output validation: a JSON object, valid against its schema (readable errors), no prompt leak."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inference.backends import FakeBackend, GenerationRequest
from inference.pipelines import pipeline_definition
from inference.validation import (
    InvalidOutput,
    check_output,
    complete_output,
    generation_schema,
    has_checks,
    offer_choices,
    validate_output,
)

REVIEW = pipeline_definition("document-review")
SYSTEM_PROMPT = REVIEW["system_prompt"]
GOAL_SCHEMA: dict[str, Any] = next(
    s["output_schema"] for s in REVIEW["subtasks"] if s["id"] == "goal"
)
STRUCTURE_SCHEMA: dict[str, Any] = next(
    s["output_schema"] for s in REVIEW["subtasks"] if s["id"] == "structure"
)


def test_a_valid_output_is_returned_parsed() -> None:
    text = '{"goal": "Test whether sleep helps memory.", "stated_explicitly": true}'

    assert validate_output(text, GOAL_SCHEMA) == {
        "goal": "Test whether sleep helps memory.",
        "stated_explicitly": True,
    }


def test_text_that_is_not_json_is_rejected() -> None:
    with pytest.raises(InvalidOutput, match="not valid JSON"):
        validate_output('{"goal": "unfinished', GOAL_SCHEMA)


def test_nan_is_rejected_because_json_has_no_such_value() -> None:
    with pytest.raises(InvalidOutput, match="not valid JSON"):
        validate_output('{"goal": NaN, "stated_explicitly": true}', GOAL_SCHEMA)


@pytest.mark.parametrize(("text", "kind"), [("[1, 2]", "an array"), ('"goal"', "a string")])
def test_json_that_is_not_an_object_is_rejected(text: str, kind: str) -> None:
    with pytest.raises(InvalidOutput, match=f"must be a JSON object, got {kind}"):
        validate_output(text, GOAL_SCHEMA)


def test_a_missing_required_field_is_named_in_the_reason() -> None:
    with pytest.raises(InvalidOutput) as raised:
        validate_output('{"goal": "g"}', GOAL_SCHEMA)

    assert "'stated_explicitly' is a required property" in raised.value.reason


def test_a_wrong_type_deep_inside_is_reported_with_its_path() -> None:
    text = json.dumps({"sections": ["Intro", 7], "complete": False})

    with pytest.raises(InvalidOutput) as raised:
        validate_output(text, STRUCTURE_SCHEMA)

    assert raised.value.path == "$.sections[1]"
    assert "$.sections[1]" in raised.value.reason
    assert "is not of type 'string'" in raised.value.reason


def test_an_output_repeating_the_system_prompt_is_rejected_as_a_leak() -> None:
    text = json.dumps({"goal": f"My instructions: {SYSTEM_PROMPT}", "stated_explicitly": False})

    with pytest.raises(InvalidOutput, match="repeats the system prompt"):
        validate_output(text, GOAL_SCHEMA, system_prompt=SYSTEM_PROMPT)


def test_a_leak_is_found_even_when_json_escaped_its_quotes_and_newlines() -> None:
    system_prompt = 'Say "hello".\nThen stop.'
    text = json.dumps({"goal": system_prompt, "stated_explicitly": False})

    with pytest.raises(InvalidOutput, match="repeats the system prompt"):
        validate_output(text, GOAL_SCHEMA, system_prompt=system_prompt)


def test_an_output_quoting_only_part_of_the_system_prompt_is_accepted() -> None:
    text = json.dumps({"goal": "You are a careful reviewer.", "stated_explicitly": False})

    assert validate_output(text, GOAL_SCHEMA, system_prompt=SYSTEM_PROMPT)["goal"]


@pytest.mark.parametrize("definition", REVIEW["subtasks"], ids=lambda s: s["id"])
async def test_the_fake_backend_output_is_valid_for_every_document_review_schema(
    definition: dict[str, Any],
) -> None:
    backend = FakeBackend()
    request = GenerationRequest(
        messages=({"role": "user", "content": "x"},),
        json_schema=definition["output_schema"],
        max_tokens=definition["max_tokens"],
    )

    generation = await backend.generate(request)

    assert validate_output(generation.text, definition["output_schema"])


CHECKED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "x-bands": {
        "value": "score",
        "label": "verdict",
        "bands": {"accept": [80, 100], "reject": [0, 39]},
    },
    "properties": {
        "verdict": {"type": "string", "enum": ["accept", "reject"]},
        "score": {"type": "integer"},
        "sections": {"type": "array", "items": {"type": "string"}, "x-grounded": "text"},
        "summary": {"type": "string", "x-grounded": "numbers"},
        "average": {"type": "integer", "x-mean-of": "score"},
    },
    "required": ["verdict", "score", "sections", "summary", "average"],
    "additionalProperties": False,
}
RUSSIAN_HEADING = "Сравнение объёмов"
SOURCE = "1. Introduction\nCosts fell by 31 percent.\n2. Results\n" + RUSSIAN_HEADING


def test_a_checked_output_that_holds_up_has_no_problems() -> None:
    output = {
        "verdict": "accept",
        "score": 85,
        "sections": ["Introduction", "RESULTS", "сравнение объемов"],
        "summary": "Costs fell by 31 percent.",
    }

    assert check_output(output, CHECKED_SCHEMA, SOURCE) == []


def test_claims_missing_from_the_document_and_contradicting_fields_are_each_named() -> None:
    output = {
        "verdict": "accept",
        "score": 0,
        "sections": ["Introduction", "maxItems"],
        "summary": "Costs fell by 45 percent in 2020.",
    }

    assert check_output(output, CHECKED_SCHEMA, SOURCE) == [
        "verdict 'accept' needs score 80 to 100, not 0",
        "sections: 'maxItems' is not in the document",
        "summary: the number(s) 2020, 45 are not in the document",
    ]


def test_computed_fields_are_not_asked_of_the_model_and_are_filled_in_from_the_findings() -> None:
    schema = generation_schema(CHECKED_SCHEMA)

    assert "average" not in schema["properties"]
    assert "average" not in schema["required"]
    assert "x-bands" not in schema
    assert "x-grounded" not in json.dumps(schema)
    assert has_checks(CHECKED_SCHEMA)
    assert not has_checks(schema)
    findings = {"a": {"score": 80}, "b": {"score": 71}, "c": {"note": "no score"}}
    assert complete_output({"score": 1}, CHECKED_SCHEMA, findings) == {"score": 1, "average": 76}


def test_a_string_of_punctuation_is_no_answer() -> None:
    output = {"verdict": "reject", "score": 10, "sections": ["]{"], "summary": "{"}

    assert check_output(output, CHECKED_SCHEMA, SOURCE) == [
        "sections: ']{' has no words",
        "summary: '{' has no words",
    ]


CHOICES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sections": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 80},
            "minItems": 1,
            "maxItems": 12,
            "x-choices": "headings",
            "x-grounded": "text",
        },
    },
    "required": ["sections"],
    "additionalProperties": False,
}
HEADED = "A Title\nIntroduction\nThe study measured the savings of heat pumps.\n" + (
    "2. Results\nHeating costs fell by 31 percent in twelve buildings."
)


def test_sections_are_chosen_from_the_documents_headings() -> None:
    offered = offer_choices(CHOICES_SCHEMA, HEADED)
    sections = offered["properties"]["sections"]

    assert sections["items"]["enum"] == ["Introduction", "2. Results"]
    assert sections["maxItems"] == 2
    assert "x-choices" not in json.dumps(generation_schema(offered))
    assert generation_schema(offered)["properties"]["sections"]["items"]["enum"] == [
        "Introduction",
        "2. Results",
    ]
    # Anything else is refused by the schema the decoder and the validator get.
    with pytest.raises(InvalidOutput, match="is not one of"):
        validate_output('{"sections": ["maxItems"]}', generation_schema(offered))
    # Chosen twice or out of order, a heading is kept once, where the document has it.
    chosen = complete_output(
        {"sections": ["2. Results", "Introduction", "2. Results"]}, offered, {}
    )
    assert chosen == {"sections": ["Introduction", "2. Results"]}
    assert check_output(chosen, offered, HEADED) == []


def test_without_headings_the_sections_stay_free_and_are_checked_against_the_text() -> None:
    offered = offer_choices(CHOICES_SCHEMA, "One paragraph and no heading at all in it.")

    assert offered == CHOICES_SCHEMA
    assert check_output({"sections": ["type"]}, offered, "One paragraph.") == [
        "sections: 'type' is not in the document"
    ]


def test_a_derived_label_is_computed_from_the_value_so_they_cannot_disagree() -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "x-bands": {
            "value": "score",
            "label": "verdict",
            "derive": True,
            "bands": {"accept": [80, 100], "minor_revision": [60, 79], "reject": [0, 59]},
        },
        "properties": {
            "score": {"type": "integer", "minimum": 0, "maximum": 100},
            "verdict": {"type": "string", "enum": ["accept", "minor_revision", "reject"]},
        },
        "required": ["score", "verdict"],
        "additionalProperties": False,
    }

    asked = generation_schema(schema)
    assert "verdict" not in asked["properties"]
    assert asked["required"] == ["score"]
    for score, verdict in ((0, "reject"), (59, "reject"), (60, "minor_revision"), (100, "accept")):
        completed = complete_output({"score": score}, schema, {})
        assert completed == {"score": score, "verdict": verdict}
        assert check_output(completed, schema, "") == []
    # The live review pipeline derives its verdict this way.
    verdict = next(s for s in REVIEW["subtasks"] if s["id"] == "verdict")["output_schema"]
    assert complete_output({"score": 0, "rationale": "Weak."}, verdict, {})["verdict"] == "reject"
    assert "verdict" not in generation_schema(verdict)["properties"]


WORDS_SCHEMA = {
    "type": "object",
    "properties": {"back": {"type": "string", "x-grounded": "words"}},
}
NOTES = (
    "Heat pumps move heat from outside air into a house. In 2023 they used 31 percent less"
    " electricity than resistive heaters. Тепловые насосы переносят тепло из наружного воздуха."
)


@pytest.mark.parametrize(
    "back",
    [
        "They used 31 percent less electricity.",
        "Heat pumps move heat into houses.",  # "houses" begins with "house"
        "Насосы переносят тепло из воздуха.",  # inflected forms, found by their stems
        "Yes.",  # no word of four letters to check
    ],
)
def test_a_sentence_taken_from_the_document_is_grounded_in_its_words(back: str) -> None:
    assert check_output({"back": back}, WORDS_SCHEMA, NOTES) == []


def test_a_sentence_about_something_else_is_not_from_the_document() -> None:
    copied = "The process of photosynthesis is carried out by plants."

    assert check_output({"back": copied}, WORDS_SCHEMA, NOTES) == [
        f"back: {copied!r} is not from the document"
    ]
    assert check_output({"back": "Heat pumps used 45 percent less."}, WORDS_SCHEMA, NOTES) == [
        "back: the number(s) 45 are not in the document"
    ]
