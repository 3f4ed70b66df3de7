"""Output validation: a JSON object, valid against its schema (readable errors), no prompt leak."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inference.backends import FakeBackend, GenerationRequest
from inference.pipelines import pipeline_definition
from inference.validation import InvalidOutput, validate_output

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
