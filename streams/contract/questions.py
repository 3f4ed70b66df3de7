"""Follow-up questions on a ticket's documents: how one is answered, and the ids of the subtasks
that answer them."""

from __future__ import annotations

import re
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streams.contract.pipeline import PIPELINE_NAME, SubtaskDefinition

QUESTION_SUBTASK_ID = re.compile(r"^question_[0-9a-f]{32}$")
"""Subtask ids of follow-up questions: `question_` and the question id's 32 hex digits, which no
pipeline's subtask id plausibly is; readers tell the two kinds apart by the id alone."""


def question_subtask_id(question_id: UUID) -> str:
    """The id of the subtask that answers question `question_id`."""
    return f"question_{question_id.hex}"


def is_question_subtask(subtask_id: str) -> bool:
    return QUESTION_SUBTASK_ID.match(subtask_id) is not None


class QuestionDefinition(BaseModel):
    """How a follow-up question on a ticket's documents is answered: the snapshot every
    `QuestionAsked` carries, so replaying a conversation never depends on the code of the day.

    The subtask retrieves the ticket's own chunks with the question (and the question before
    it, which a follow-up often refers to) and answers with citations; its prompt shows the
    `history_limit` latest earlier questions and their answers after the excerpts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int = Field(ge=1)
    system_prompt: str = Field(min_length=1)
    max_attempts: int = Field(default=3, ge=1, le=20, description="Attempts per question.")
    history_limit: int = Field(
        default=5, ge=0, le=50, description="Earlier questions and answers shown in the prompt."
    )
    subtask: SubtaskDefinition

    @field_validator("name")
    @classmethod
    def _name_is_a_slug(cls, value: str) -> str:
        if not PIPELINE_NAME.match(value):
            raise ValueError(f"name {value!r} must match {PIPELINE_NAME.pattern}")
        return value

    @model_validator(mode="after")
    def _answers_from_retrieved_chunks(self) -> QuestionDefinition:
        if self.subtask.retrieval is None or self.subtask.depends_on:
            raise ValueError("a question's subtask retrieves chunks and depends on nothing")
        properties = self.subtask.output_schema.get("properties", {})
        if not isinstance(properties.get("answer"), dict):
            raise ValueError("a question's subtask must answer with an 'answer' field")
        return self
