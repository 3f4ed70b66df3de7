"""Checks a model's raw output before it becomes an event: JSON object, schema, no prompt leak."""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from inference.headings import heading_candidates

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


# -- checks beyond the schema -----------------------------------------------------------------
#
# A pipeline asks for them with keywords of its own in the output schema (JSON Schema ignores
# keywords it does not know; `generation_schema` removes them before the schema reaches a
# backend). They catch what a schema cannot: claims the document does not support, and fields
# that contradict each other.
#
# - `"x-grounded": "text"` on a string, or an array of strings: each value occurs in the text the
#   prompt showed (documents or excerpts, options, findings), compared case-folded with
#   punctuation and runs of spaces made one space.
# - `"x-grounded": "numbers"` on a string: every number in it occurs in that text.
# - `"x-grounded": "words"` on a string: as `numbers`, and at least two thirds of its words of
#   four letters or more begin a word of that text with their first five letters (so "plants"
#   finds "plant", and an inflected Russian word its stem): a sentence taken from the document,
#   not one about something else (a small model copies the example of its instruction).
# - `"x-bands": {"value": V, "label": L, "bands": {label: [low, high], ...}}` on an object: the
#   integer field V lies in the band of the label in field L. With `"derive": true` the label is
#   not asked of the model but computed from V (the band V lies in), so the two cannot disagree.
# - `"x-choices": "headings"` on an array of strings: the items are chosen from the lines of the
#   document that look like section headings (inference/headings.py). `offer_choices` turns the
#   candidates into the items' `enum` before the prompt is built, so a constrained decoder can
#   write nothing else; the chosen items are kept once each, in the document's order. A
#   document without such lines leaves the items free, and `x-grounded` checks them.
# - Any string of the answer that is not empty has a letter or a digit (a small model sometimes
#   writes JSON punctuation inside a string, "{").
# - `"x-mean-of": F` on an integer property: the value is computed, not asked for: the mean of
#   the field F of the findings (outputs of the subtask's dependencies), rounded.

CHECK_KEYWORDS = ("x-grounded", "x-bands", "x-mean-of", "x-choices")
_NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)?")
_NOT_WORD = re.compile(r"[\W_]+")


def generation_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`schema` without the check keywords and the computed fields, as the model must answer:
    what a backend's constrained decoder gets and the model's raw answer is validated against."""
    stripped: dict[str, Any] = _strip_checks(schema)
    return stripped


def _strip_checks(value: Any) -> Any:
    if isinstance(value, Mapping):
        stripped = {k: _strip_checks(v) for k, v in value.items() if k not in CHECK_KEYWORDS}
        properties = value.get("properties")
        if isinstance(properties, Mapping):
            # Computed fields are not asked of the model.
            computed = {
                n for n, p in properties.items() if isinstance(p, Mapping) and "x-mean-of" in p
            }
            derived = _derived_label(value)
            if derived is not None:
                computed.add(derived)
            if computed:
                stripped["properties"] = {
                    n: p for n, p in stripped["properties"].items() if n not in computed
                }
                if isinstance(value.get("required"), list):
                    stripped["required"] = [n for n in value["required"] if n not in computed]
        return stripped
    if isinstance(value, list):
        return [_strip_checks(item) for item in value]
    return value


def _derived_label(schema: Mapping[str, Any]) -> str | None:
    """The field an object's `x-bands` computes from its value, if it says `derive`."""
    bands = schema.get("x-bands")
    if isinstance(bands, Mapping) and bands.get("derive") is True:
        label = bands.get("label")
        return label if isinstance(label, str) else None
    return None


def has_checks(schema: Mapping[str, Any]) -> bool:
    return generation_schema(schema) != schema


_YO, _IE = "\N{CYRILLIC SMALL LETTER IO}", "\N{CYRILLIC SMALL LETTER IE}"


def _fold(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.casefold().replace(_YO, _IE)).split())


def _numbers(text: str) -> set[str]:
    return {n.replace(",", ".") for n in _NUMBER.findall(text)}


def offer_choices(schema: Mapping[str, Any], document: str) -> dict[str, Any]:
    """`schema` with the candidates of each `x-choices` array, found in `document`, as the
    `enum` of its items (and `maxItems` no more than there are candidates); unchanged where the
    document has none."""
    offered: dict[str, Any] = copy.deepcopy(dict(schema))
    _offer(offered, document)
    return offered


def _offer(node: Any, document: str) -> None:
    if isinstance(node, dict):
        items = node.get("items")
        if node.get("x-choices") == "headings" and isinstance(items, dict):
            candidates = heading_candidates(document)
            if candidates:
                items["enum"] = candidates
                for length in ("minLength", "maxLength"):
                    items.pop(length, None)
                if isinstance(node.get("maxItems"), int):
                    node["maxItems"] = min(node["maxItems"], len(candidates))
                if isinstance(node.get("minItems"), int):
                    node["minItems"] = min(node["minItems"], node.get("maxItems", 1))
        for value in node.values():
            _offer(value, document)
    elif isinstance(node, list):
        for value in node:
            _offer(value, document)


def complete_output(
    value: dict[str, Any], schema: Mapping[str, Any], findings: Mapping[str, Any]
) -> dict[str, Any]:
    """`value` with the fields the schema computes filled in: `x-mean-of` from `findings`, a
    derived `x-bands` label from its value; the items of an `x-choices` array that has its
    candidates are kept once each, in the candidates' (the document's) order. Fields come in
    the schema's order."""
    properties = schema.get("properties", {})
    completed = dict(value)
    derived = _derived_label(schema)
    if derived is not None:
        bands = schema["x-bands"]
        number = completed.get(bands.get("value", ""))
        if isinstance(number, int) and not isinstance(number, bool):
            for label, band in bands.get("bands", {}).items():
                if isinstance(band, list) and len(band) == 2 and band[0] <= number <= band[1]:
                    completed[derived] = label
                    break
    for name, prop in properties.items():
        if not isinstance(prop, Mapping) or not prop.get("x-choices"):
            continue
        items = prop.get("items")
        choices = items.get("enum") if isinstance(items, Mapping) else None
        if isinstance(choices, list) and isinstance(value.get(name), list):
            chosen = set(value[name])
            completed[name] = [choice for choice in choices if choice in chosen]
    for name, prop in properties.items():
        field_name = prop.get("x-mean-of") if isinstance(prop, Mapping) else None
        if not isinstance(field_name, str):
            continue
        scores = [
            output[field_name]
            for output in findings.values()
            if isinstance(output, Mapping) and isinstance(output.get(field_name), int | float)
        ]
        if scores:
            completed[name] = round(sum(scores) / len(scores))
    order = list(properties)
    return dict(
        sorted(
            completed.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)
        )
    )


def check_output(value: Mapping[str, Any], schema: Mapping[str, Any], source: str) -> list[str]:
    """What the schema's checks find wrong with a schema-valid `value`, one sentence each.

    `source` is the text the model was shown: documents or excerpts, options and findings.
    """
    problems: list[str] = []
    folded = _fold(source)
    numbers = _numbers(source)
    _check_node(value, schema, folded, numbers, "", problems)
    return problems


def _check_node(
    value: Any,
    schema: Mapping[str, Any],
    folded: str,
    numbers: set[str],
    where: str,
    problems: list[str],
) -> None:
    grounded = schema.get("x-grounded")
    label = where or "the answer"
    if isinstance(value, str) and value and not any(c.isalnum() for c in value):
        # A small model sometimes starts the JSON over inside a string ("{"); that says nothing.
        problems.append(f"{label}: {value!r} has no words")
    if grounded == "text":
        _check_text(value, folded, label, problems)
    elif grounded in ("numbers", "words") and isinstance(value, str):
        missing = sorted(_numbers(value) - numbers)
        if missing:
            problems.append(f"{label}: the number(s) {', '.join(missing)} are not in the document")
        if grounded == "words" and not _mostly_from(value, folded):
            problems.append(f"{label}: {_quote(value)} is not from the document")
    bands = schema.get("x-bands")
    if isinstance(bands, Mapping) and isinstance(value, Mapping):
        _check_bands(value, bands, problems)
    if isinstance(value, Mapping):
        for name, prop in schema.get("properties", {}).items():
            if name in value and isinstance(prop, Mapping):
                _check_node(value[name], prop, folded, numbers, name, problems)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping) and not grounded:
        for index, item in enumerate(value):
            _check_node(item, schema["items"], folded, numbers, f"{label}[{index}]", problems)


def _mostly_from(value: str, folded: str) -> bool:
    """Whether at least two thirds of the words of four letters or more in `value` begin a word
    of the folded text `folded` with their first five letters; True without such words."""
    words = [word for word in _fold(value).split() if len(word) >= 4 and word.isalpha()]
    found = sum(1 for word in words if f" {word[:5]}" in f" {folded}")
    return 3 * found >= 2 * len(words)


def _check_text(value: Any, folded: str, label: str, problems: list[str]) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str) or not item:
            continue
        if not _fold(item):
            if isinstance(value, list):  # a lone string is reported as having no words
                problems.append(f"{label}: {item!r} has no words")
        elif _fold(item) not in folded:
            problems.append(f"{label}: {_quote(item)} is not in the document")


def _check_bands(value: Mapping[str, Any], bands: Mapping[str, Any], problems: list[str]) -> None:
    number, label = value.get(bands.get("value", "")), value.get(bands.get("label", ""))
    band = bands.get("bands", {}).get(label)
    if not isinstance(number, int) or not isinstance(band, list) or len(band) != 2:
        return
    low, high = band
    if not low <= number <= high:
        problems.append(
            f"{bands['label']} {label!r} needs {bands['value']} {low} to {high}, not {number}"
        )


def _quote(text: str) -> str:
    short = _normalise(text)
    return repr(short if len(short) <= 60 else short[:57] + "...")
