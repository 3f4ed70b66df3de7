"""Checks a model's raw output before it becomes an event: JSON object, schema, no prompt leak."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s+")


class InvalidOutput(Exception):
    """The output cannot be accepted; `reason` says why in a sentence fit for an event."""

    def __init__(self, reason: str, *, path: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


def validate_output(
    text: str, schema: Mapping[str, Any], *, system_prompt: str | None = None
) -> dict[str, Any]:
    """The parsed output if it is a JSON object valid against `schema` (Draft 2020-12).

    With `system_prompt`, an output that repeats it verbatim (ignoring whitespace differences)
    is rejected as a leak. A schema that is itself invalid raises `SchemaError`: that is a bug
    in the pipeline, not in the output.
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as error:
        raise InvalidOutput(f"output is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise InvalidOutput(f"output must be a JSON object, got {_json_type(value)}")
    mismatch = best_match(_validator(_schema_key(schema)).iter_errors(value))
    if mismatch is not None:
        where = mismatch.json_path
        raise InvalidOutput(
            f"output does not match the schema at {where}: {mismatch.message}", path=where
        )
    if system_prompt is not None and _leaks(system_prompt, text, value):
        raise InvalidOutput("output repeats the system prompt")
    return value


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and every consumer downstream) does not.
    raise ValueError(f"{name} is not a JSON value")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _schema_key(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True)


@lru_cache(maxsize=256)
def _validator(schema_key: str) -> Draft202012Validator:
    # Schemas are few (one per subtask) and reused for every output, so checking and building
    # each validator once pays off; the serialised schema is the cache key as dicts don't hash.
    schema = json.loads(schema_key)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _normalise(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _leaks(system_prompt: str, text: str, value: Any) -> bool:
    needle = _normalise(system_prompt)
    if not needle:
        return False
    # The raw text catches a prompt written across JSON syntax; the decoded strings catch one
    # whose quotes or newlines JSON escaped.
    return needle in _normalise(text) or any(needle in _normalise(s) for s in _strings(value))
