"""The pipeline definition format: the snapshot every `TicketCreated` carries.

A pipeline is data: a versioned DAG of subtasks, each with an instruction, optional retrieval and
an output JSON schema. The snapshot travels inside the event, so replaying a ticket never depends
on the pipeline files of the day.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SUBTASK_ID = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
PIPELINE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


class Retrieval(BaseModel):
    """Asks the inference handler to fetch the document's own chunks instead of the whole text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: str = Field(min_length=1, description="Search query used to pick the chunks.")
    top_k: int = Field(default=5, ge=1, le=50)


class SubtaskDefinition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="Stable identifier, unique within the pipeline.")
    title: str = Field(min_length=1)
    instruction: str = Field(min_length=1, description="The subtask's prompt, placed last.")
    depends_on: tuple[str, ...] = ()
    retrieval: Retrieval | None = None
    output_schema: dict[str, Any] = Field(description="JSON Schema every output must satisfy.")
    max_tokens: int = Field(default=512, ge=1, le=32768)

    @field_validator("id")
    @classmethod
    def _id_is_a_slug(cls, value: str) -> str:
        if not SUBTASK_ID.match(value):
            raise ValueError(f"subtask id {value!r} must match {SUBTASK_ID.pattern}")
        return value

    @property
    def prompt_hash(self) -> str:
        """sha256 of everything that shapes this subtask's prompt and output."""
        material = json.dumps(
            {
                "instruction": self.instruction,
                "retrieval": self.retrieval.model_dump() if self.retrieval else None,
                "output_schema": self.output_schema,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(material.encode()).hexdigest()


class PipelineDefinition(BaseModel):
    """A versioned DAG of subtasks. Validation rejects unknown dependencies and cycles."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int = Field(ge=1)
    description: str = ""
    system_prompt: str = Field(min_length=1)
    max_attempts: int = Field(default=3, ge=1, le=20, description="Attempts per subtask.")
    document_roles: tuple[str, ...] = Field(
        default=("main",), min_length=1, description="Roles of the documents the pipeline needs."
    )
    subtasks: tuple[SubtaskDefinition, ...] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name_is_a_slug(cls, value: str) -> str:
        if not PIPELINE_NAME.match(value):
            raise ValueError(f"pipeline name {value!r} must match {PIPELINE_NAME.pattern}")
        return value

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
