"""A ticket's options checked against its pipeline's options schema, defaults filled in."""

from __future__ import annotations

from typing import Any

import pytest

from commands.errors import InvalidOptions
from commands.service import checked_options
from inference.pipelines import pipeline_definition
from streams.contract import PipelineDefinition


def pipeline(name: str) -> PipelineDefinition:
    return PipelineDefinition.model_validate(pipeline_definition(name))


def refusal(options: dict[str, Any], name: str) -> InvalidOptions:
    with pytest.raises(InvalidOptions) as caught:
        checked_options(options, pipeline(name))
    return caught.value


def test_valid_options_are_kept_and_missing_ones_get_their_default() -> None:
    assert checked_options({"difficulty": "hard"}, pipeline("flashcards")) == {
        "count": 10,
        "difficulty": "hard",
    }


def test_a_given_option_wins_over_its_default() -> None:
    assert checked_options({"count": 3}, pipeline("flashcards")) == {"count": 3}


def test_a_pipeline_without_an_options_schema_takes_an_empty_object() -> None:
    assert checked_options({}, pipeline("document-review")) == {}


def test_a_pipeline_without_an_options_schema_refuses_any_option() -> None:
    error = refusal({"count": 3}, "document-review")

    assert error.code == "invalid_options"
    assert error.option == "count"
    assert str(error) == "Pipeline 'document-review' has no option 'count'; it takes no options."


def test_an_unknown_option_is_named_with_those_the_pipeline_takes() -> None:
    error = refusal({"cuont": 3}, "flashcards")

    assert error.option == "cuont"
    assert "no option 'cuont'; it takes count, difficulty" in str(error)


def test_a_missing_required_option_is_named() -> None:
    error = refusal({}, "document-qa")

    assert error.option == "question"
    assert str(error) == "Pipeline 'document-qa' needs the option 'question'."


@pytest.mark.parametrize(
    ("options", "option", "words"),
    [
        ({"count": 31}, "count", "31 is greater than the maximum of 30"),
        ({"count": 0}, "count", "0 is less than the minimum of 1"),
        ({"count": "ten"}, "count", "'ten' is not of type 'integer'"),
        ({"difficulty": "brutal"}, "difficulty", "'brutal' is not one of"),
    ],
)
def test_an_option_out_of_its_bounds_is_named_with_the_reason(
    options: dict[str, Any], option: str, words: str
) -> None:
    error = refusal(options, "flashcards")

    assert error.option == option
    assert str(error).startswith(f"Option {option!r} is invalid: ")
    assert words in str(error)


def test_a_question_too_short_to_search_with_is_refused() -> None:
    error = refusal({"question": "?"}, "document-qa")

    assert error.option == "question"
    assert "is too short" in str(error)


def test_option_limits_set_the_schema_numbers_from_the_tickets_options() -> None:
    cards = PipelineDefinition.model_validate(pipeline_definition("flashcards")).subtask("cards")
    schema = cards.output_schema_for({"count": 3})
    assert schema["properties"]["cards"]["minItems"] == 3
    assert schema["properties"]["cards"]["maxItems"] == 3
    assert cards.output_schema["properties"]["cards"]["maxItems"] == 30, "the definition is intact"
    assert cards.output_schema_for({}) == cards.output_schema


def test_an_option_limit_must_point_at_an_integer_keyword_of_the_schema() -> None:
    base = {
        "id": "a",
        "title": "A",
        "instruction": "do a",
        "output_schema": {"type": "object", "properties": {"xs": {"type": "array"}}},
    }

    def pipeline(limits: dict[str, str]) -> dict[str, Any]:
        subtask = {**base, "option_limits": limits}
        return {"name": "p", "version": 1, "system_prompt": "s", "subtasks": [subtask]}

    with pytest.raises(ValueError, match="does not exist"):
        PipelineDefinition.model_validate(pipeline({"/properties/ys/maxItems": "n"}))
    with pytest.raises(ValueError, match="integer keyword"):
        PipelineDefinition.model_validate(pipeline({"/properties/xs/type": "n"}))
