"""The pipeline definition format: the snapshot every `TicketCreated` carries.

A pipeline is data: a versioned DAG of subtasks, each with an instruction, optional retrieval,
an output JSON schema and optional post-processing steps, plus the JSON schema of the options a
ticket may pass. The snapshot travels inside the event, so replaying a ticket never depends on
the pipeline files of the day. Every field added since the first version has a default, so older
snapshots still load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SUBTASK_ID = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
PIPELINE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
DOCUMENT_ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
OPTION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

PERSONAL_KEYWORD = "x-personal"
"""Marks a property of `options_schema` as personal data: its value is recorded encrypted for
the user who opened the ticket and reads `[erased]` once they are erased
(docs/adr/0021-crypto-shredding.md)."""

# What a pipeline without `options_schema` accepts: an empty object.
NO_OPTIONS_SCHEMA: dict[str, Any] = {"type": "object", "additionalProperties": False}


class Retrieval(BaseModel):
    """Asks the inference handler to fetch the documents' own chunks instead of the whole text.

    The search query is either fixed (`query`) or the value of one of the ticket's options
    (`query_option`, e.g. the user's question); exactly one of them is given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: str | None = Field(
        default=None, min_length=1, description="Fixed search query used to pick the chunks."
    )
    query_option: str | None = Field(
        default=None, description="Name of the ticket option whose value is the search query."
    )
    top_k: int = Field(default=5, ge=1, le=50)

    @model_validator(mode="after")
    def _one_query_source(self) -> Retrieval:
        if (self.query is None) == (self.query_option is None):
            raise ValueError("retrieval needs exactly one of 'query' and 'query_option'")
        if self.query_option is not None and not OPTION_NAME.match(self.query_option):
            raise ValueError(f"query_option {self.query_option!r} must match {OPTION_NAME.pattern}")
        return self

    def hash_material(self) -> dict[str, Any]:
        # Unset fields are left out so that hashes taken before `query_option` existed stay valid.
        return {key: value for key, value in self.model_dump().items() if value is not None}


def _array_items(schema: dict[str, Any], field: str) -> dict[str, Any] | None:
    """The `items` schema of the top-level array property `field`, or None if there is none."""
    prop = schema.get("properties", {}).get(field)
    if not isinstance(prop, dict) or prop.get("type") != "array":
        return None
    items = prop.get("items")
    return items if isinstance(items, dict) else None


class FlashcardDuplicates(BaseModel):
    """Marks each card of the output's `cards` that resembles one of the tenant's earlier cards,
    then stores the new cards for later tickets to compare with.

    Every card gains `duplicate` (bool) and `duplicate_of` ({ticket_id, front, similarity} or
    null); `similarity` is the cosine similarity of the cards' front-and-back embeddings.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: Literal["flashcard_duplicates"]
    threshold: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Cosine similarity from which a card repeats."
    )

    def check(self, output_schema: dict[str, Any]) -> None:
        items = _array_items(output_schema, "cards")
        properties = (items or {}).get("properties", {})
        if "front" not in properties or "back" not in properties:
            raise ValueError(
                "flashcard_duplicates needs an output with an array 'cards' of objects "
                "with 'front' and 'back'"
            )
        if {"duplicate", "duplicate_of"} & set(properties):
            raise ValueError("the model must not be asked for 'duplicate' or 'duplicate_of'")

    def stored_schema(self, output_schema: dict[str, Any]) -> dict[str, Any]:
        schema = copy.deepcopy(output_schema)
        items = schema["properties"]["cards"]["items"]
        items["properties"]["duplicate"] = {"type": "boolean"}
        items["properties"]["duplicate_of"] = {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "properties": {
                        "ticket_id": {"type": "string", "format": "uuid"},
                        "front": {"type": "string"},
                        "similarity": {"type": "number", "minimum": -1, "maximum": 1},
                    },
                    "required": ["ticket_id", "front", "similarity"],
                    "additionalProperties": False,
                },
            ]
        }
        items["required"] = [*items.get("required", []), "duplicate", "duplicate_of"]
        return schema


class ResolveCitations(BaseModel):
    """Turns the excerpt numbers the model cites in `citations` into {excerpt, page, heading}
    of the chunks its prompt showed; numbers that name no excerpt are dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: Literal["resolve_citations"]

    def check(self, output_schema: dict[str, Any]) -> None:
        items = _array_items(output_schema, "citations")
        if items is None or items.get("type") != "integer":
            raise ValueError(
                "resolve_citations needs an output with an array 'citations' of integers"
            )

    def stored_schema(self, output_schema: dict[str, Any]) -> dict[str, Any]:
        schema = copy.deepcopy(output_schema)
        schema["properties"]["citations"]["items"] = {
            "type": "object",
            "properties": {
                "excerpt": {"type": "integer", "minimum": 1},
                "page": {"type": ["integer", "null"]},
                "heading": {"type": ["string", "null"]},
            },
            "required": ["excerpt", "page", "heading"],
            "additionalProperties": False,
        }
        return schema


PostprocessStep = Annotated[FlashcardDuplicates | ResolveCitations, Field(discriminator="step")]


class SubtaskDefinition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="Stable identifier, unique within the pipeline.")
    title: str = Field(min_length=1)
    instruction: str = Field(min_length=1, description="The subtask's prompt, placed last.")
    depends_on: tuple[str, ...] = ()
    retrieval: Retrieval | None = None
    output_schema: dict[str, Any] = Field(
        description="JSON Schema every output of the model must satisfy."
    )
    max_tokens: int = Field(default=512, ge=1, le=32768)
    postprocess: tuple[PostprocessStep, ...] = Field(
        default=(),
        description="Steps applied, in order, to the validated output before it is recorded.",
    )
    option_limits: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Numbers in `output_schema` set by the ticket's options: a JSON Pointer into the "
            'schema → an integer option, e.g. {"/properties/cards/maxItems": "count"}.'
        ),
    )

    @field_validator("id")
    @classmethod
    def _id_is_a_slug(cls, value: str) -> str:
        if not SUBTASK_ID.match(value):
            raise ValueError(f"subtask id {value!r} must match {SUBTASK_ID.pattern}")
        return value

    @model_validator(mode="after")
    def _steps_fit_the_output(self) -> SubtaskDefinition:
        for step in self.postprocess:
            step.check(self.output_schema)
        for pointer in self.option_limits:
            parent, key = _schema_slot(self.output_schema, pointer)
            if not isinstance(parent.get(key), int):
                raise ValueError(f"option limit {pointer!r} must point at an integer keyword")
        return self

    def output_schema_for(self, options: dict[str, Any]) -> dict[str, Any]:
        """The output schema with the limits the ticket's options set (the others as written)."""
        if not self.option_limits:
            return self.output_schema
        schema = copy.deepcopy(self.output_schema)
        for pointer, option in self.option_limits.items():
            value = options.get(option)
            if isinstance(value, int) and not isinstance(value, bool):
                parent, key = _schema_slot(schema, pointer)
                parent[key] = value
        return schema

    @property
    def stored_output_schema(self) -> dict[str, Any]:
        """The schema of the output as recorded: the model's schema changed by each step."""
        schema = self.output_schema
        for step in self.postprocess:
            schema = step.stored_schema(schema)
        if _has_output_checks(schema) and isinstance(schema.get("properties"), dict):
            # An answer whose checks still failed on the last attempt is kept, with a sentence
            # per failed check (inference/validation.py describes the checks).
            schema = copy.deepcopy(schema)
            schema["properties"]["unverified"] = {
                "type": "array",
                "items": {"type": "string"},
                "description": "What the output claims that could not be verified.",
            }
        return schema

    @property
    def prompt_hash(self) -> str:
        """sha256 of everything that shapes this subtask's prompt and recorded output."""
        material: dict[str, Any] = {
            "instruction": self.instruction,
            "retrieval": self.retrieval.hash_material() if self.retrieval else None,
            "output_schema": self.output_schema,
        }
        # Post-processing is part of the material: the recorded output depends on it (a
        # threshold decides which cards are duplicates, citations become objects), and the hash
        # names what produced a recorded output. It is left out when empty so that the hashes of
        # subtasks without steps are the same as before steps existed.
        if self.postprocess:
            material["postprocess"] = [step.model_dump() for step in self.postprocess]
        if self.option_limits:
            material["option_limits"] = self.option_limits
        encoded = json.dumps(material, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(encoded.encode()).hexdigest()


# The output checks a schema may ask for with keywords of its own (inference/validation.py).
OUTPUT_CHECK_KEYWORDS = frozenset({"x-grounded", "x-bands", "x-mean-of", "x-choices"})


def _has_output_checks(schema: Any) -> bool:
    if isinstance(schema, dict):
        return bool(OUTPUT_CHECK_KEYWORDS & schema.keys()) or any(
            _has_output_checks(value) for value in schema.values()
        )
    if isinstance(schema, list):
        return any(_has_output_checks(item) for item in schema)
    return False


def personal_options_of(options_schema: Any) -> frozenset[str]:
    """The properties of an options schema (as recorded in a pipeline snapshot) marked personal."""
    properties = options_schema.get("properties") if isinstance(options_schema, dict) else None
    if not isinstance(properties, dict):
        return frozenset()
    return frozenset(
        name
        for name, spec in properties.items()
        if isinstance(spec, dict) and spec.get(PERSONAL_KEYWORD) is True
    )


def _keyword_uses(
    schema: Any, keyword: str, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Any]]:
    """Where `keyword` occurs in `schema` as a key: its path (the keyword left out) and value."""
    found: list[tuple[tuple[str, ...], Any]] = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == keyword:
                found.append((path, value))
            else:
                found.extend(_keyword_uses(value, keyword, (*path, str(key))))
    elif isinstance(schema, list):
        for index, item in enumerate(schema):
            found.extend(_keyword_uses(item, keyword, (*path, str(index))))
    return found


def _schema_slot(schema: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
    """The object holding the keyword a JSON Pointer names, and the keyword."""
    if not pointer.startswith("/"):
        raise ValueError(f"{pointer!r} is not a JSON Pointer")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]
    node: Any = schema
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{pointer!r} does not exist in the output schema")
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ValueError(f"{pointer!r} does not exist in the output schema")
    return node, parts[-1]


class PipelineDefinition(BaseModel):
    """A versioned DAG of subtasks. Validation rejects unknown dependencies and cycles."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int = Field(ge=1)
    description: str = ""
    system_prompt: str = Field(min_length=1)
    max_attempts: int = Field(default=3, ge=1, le=20, description="Attempts per subtask.")
    document_roles: tuple[str, ...] = Field(
        default=("main",),
        min_length=1,
        description="Roles of the documents the pipeline needs, in the order prompts show them.",
    )
    options_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON Schema (Draft 2020-12) of a ticket's options; none: no options.",
    )
    subtasks: tuple[SubtaskDefinition, ...] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name_is_a_slug(cls, value: str) -> str:
        if not PIPELINE_NAME.match(value):
            raise ValueError(f"pipeline name {value!r} must match {PIPELINE_NAME.pattern}")
        return value

    @field_validator("document_roles")
    @classmethod
    def _roles_are_distinct_slugs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for role in value:
            if not DOCUMENT_ROLE.match(role):
                raise ValueError(f"document role {role!r} must match {DOCUMENT_ROLE.pattern}")
        if len(set(value)) != len(value):
            raise ValueError("document roles must be distinct")
        return value

    @field_validator("options_schema")
    @classmethod
    def _options_schema_describes_an_object(
        cls, value: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            Draft202012Validator.check_schema(value)
        except SchemaError as error:
            raise ValueError(
                f"options_schema is not a valid JSON Schema: {error.message}"
            ) from None
        if value.get("type") != "object":
            raise ValueError("options_schema must describe an object ('type': 'object')")
        return value

    @property
    def accepted_options_schema(self) -> dict[str, Any]:
        """The schema a ticket's options must satisfy: `options_schema` or an empty object."""
        return self.options_schema if self.options_schema is not None else NO_OPTIONS_SCHEMA

    @model_validator(mode="after")
    def _query_options_are_required_strings(self) -> PipelineDefinition:
        schema = self.accepted_options_schema
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        for subtask in self.subtasks:
            option = subtask.retrieval.query_option if subtask.retrieval else None
            if option is None:
                continue
            spec = properties.get(option)
            if option not in required or not isinstance(spec, dict) or spec.get("type") != "string":
                raise ValueError(
                    f"subtask {subtask.id!r} takes its query from option {option!r}, "
                    "which options_schema must declare as a required string"
                )
        return self

    @property
    def personal_options(self) -> frozenset[str]:
        """The options the pipeline marks personal: recorded encrypted, never shown to the model."""
        return personal_options_of(self.options_schema)

    @model_validator(mode="after")
    def _personal_options_stay_with_people(self) -> PipelineDefinition:
        # The mark is read on the top-level properties only; one anywhere else would promise an
        # encryption that never happens.
        properties = self.accepted_options_schema.get("properties", {})
        for path, value in _keyword_uses(self.accepted_options_schema, PERSONAL_KEYWORD):
            top_level = len(path) == 2 and path[0] == "properties"
            if not top_level or not isinstance(properties.get(path[1]), dict):
                raise ValueError(
                    f"{PERSONAL_KEYWORD!r} may only mark a property of options_schema"
                    f" (found at /{'/'.join(path)})"
                )
            if not isinstance(value, bool):
                raise ValueError(
                    f"{PERSONAL_KEYWORD!r} of option {path[1]!r} must be true or false"
                )
        # Personal options never reach the model: its prompts are stored (by hash, for
        # explanations and re-runs) and its outputs recorded as written, where an erasure
        # could not reach a value shown to it.
        personal = self.personal_options
        for subtask in self.subtasks:
            query = subtask.retrieval.query_option if subtask.retrieval else None
            used = {*subtask.option_limits.values(), *([query] if query else [])}
            shown = sorted(used & personal)
            if shown:
                raise ValueError(
                    f"subtask {subtask.id!r} uses personal option {shown[0]!r}; personal options"
                    " are never shown to the model"
                )
        return self

    @model_validator(mode="after")
    def _is_a_dag(self) -> PipelineDefinition:
        ids = [subtask.id for subtask in self.subtasks]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate subtask ids: {', '.join(duplicates)}")
        known = set(ids)
        for subtask in self.subtasks:
            unknown = [d for d in subtask.depends_on if d not in known]
            if unknown:
                raise ValueError(f"subtask {subtask.id!r} depends on unknown {unknown}")
            if subtask.id in subtask.depends_on:
                raise ValueError(f"subtask {subtask.id!r} depends on itself")
        # Kahn's algorithm: whatever cannot be ordered sits on a cycle.
        remaining = {s.id: set(s.depends_on) for s in self.subtasks}
        while True:
            roots = [sid for sid, deps in remaining.items() if not deps]
            if not roots:
                break
            for sid in roots:
                del remaining[sid]
            for deps in remaining.values():
                deps.difference_update(roots)
        if remaining:
            raise ValueError(f"dependency cycle among subtasks: {sorted(remaining)}")
        return self

    def subtask(self, subtask_id: str) -> SubtaskDefinition:
        for subtask in self.subtasks:
            if subtask.id == subtask_id:
                return subtask
        raise KeyError(subtask_id)

    @property
    def prompt_hashes(self) -> dict[str, str]:
        return {subtask.id: subtask.prompt_hash for subtask in self.subtasks}
