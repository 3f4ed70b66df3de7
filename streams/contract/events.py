"""Every event ticketflow records, with its stable topic and payload schema.

Topics are part of the public contract: they are stored with each event and sent as the
CloudEvents `ce-type`. A payload change that is not backwards compatible gets a new topic
(`….v2`) and an upcaster; old events always load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from streams.contract.identity import TENANT_PATTERN
from streams.contract.pipeline import PipelineDefinition

DocumentRole = str
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class EventPayload(BaseModel):
    """Fields every ticket event carries; the relay sends this JSON as the message body."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ticket_id: UUID
    tenant: str = Field(pattern=TENANT_PATTERN)


class DocumentRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: DocumentRole = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    sha256: str = Field(pattern=SHA256_PATTERN)
    filename: str = Field(min_length=1, max_length=255)
    media_type: Literal[
        "application/pdf",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ]
    size: int = Field(ge=1)


class IngestedDocument(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: DocumentRole
    sha256: str = Field(pattern=SHA256_PATTERN)
    pages: int | None = Field(default=None, ge=0)
    characters: int = Field(ge=0)
    chunks: int = Field(ge=0)


class TokenUsage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0, description="Prompt tokens served from cache.")


class TicketCreated(EventPayload):
    owner: str = Field(min_length=1)
    documents: tuple[DocumentRef, ...] = Field(min_length=1)
    pipeline: PipelineDefinition
    prompt_hashes: dict[str, str]
    options: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = None


class DocumentIngested(EventPayload):
    documents: tuple[IngestedDocument, ...] = Field(min_length=1)


class SubtaskReady(EventPayload):
    subtask_id: str
    attempt: int = Field(ge=1)


class SubtaskStarted(EventPayload):
    subtask_id: str
    attempt: int = Field(ge=1)
    worker: str


class SubtaskCompleted(EventPayload):
    subtask_id: str
    attempt: int = Field(ge=1)
    output: dict[str, Any] | None = Field(
        description="The validated output, or null when it is stored as a blob."
    )
    output_sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="Blob key of a large output."
    )
    model: str
    usage: TokenUsage
    latency_ms: float = Field(ge=0)
    ignored: bool = Field(
        default=False, description="True when the ticket had already ended; recorded only."
    )


class SubtaskFailed(EventPayload):
    subtask_id: str
    attempt: int = Field(ge=1)
    reason: str
    retryable: bool
    will_retry: bool


class TicketCompleted(EventPayload):
    subtasks: int = Field(ge=1)


class TicketFailed(EventPayload):
    reason: str
    subtask_id: str | None = None


class TicketCancelled(EventPayload):
    reason: str
    cancelled_by: str


@dataclass(frozen=True)
class EventType:
    """One entry of the contract: name (the last subject token), topic and payload model."""

    name: str
    topic: str
    payload: type[EventPayload]
    description: str


EVENT_TYPES: tuple[EventType, ...] = (
    EventType("created", "ticketflow.ticket.created.v1", TicketCreated,
              "A ticket was opened for one or more stored documents and a pipeline snapshot."),
    EventType("document_ingested", "ticketflow.ticket.document_ingested.v1", DocumentIngested,
              "The ticket's documents were extracted, chunked and embedded."),
    EventType("subtask_ready", "ticketflow.ticket.subtask_ready.v1", SubtaskReady,
              "A subtask's dependencies are complete; it waits for inference."),
    EventType("subtask_started", "ticketflow.ticket.subtask_started.v1", SubtaskStarted,
              "A worker began an attempt of a subtask."),
    EventType("subtask_completed", "ticketflow.ticket.subtask_completed.v1", SubtaskCompleted,
              "A subtask produced an output that validates against its schema."),
    EventType("subtask_failed", "ticketflow.ticket.subtask_failed.v1", SubtaskFailed,
              "An attempt of a subtask failed; it is retried while attempts remain."),
    EventType("completed", "ticketflow.ticket.completed.v1", TicketCompleted,
              "Every subtask of the ticket completed."),
    EventType("failed", "ticketflow.ticket.failed.v1", TicketFailed,
              "The ticket cannot finish; the reason is meant for the user."),
    EventType("cancelled", "ticketflow.ticket.cancelled.v1", TicketCancelled,
              "The ticket was cancelled; no further subtask is dispatched."),
)  # fmt: skip

BY_TOPIC: Mapping[str, EventType] = {event_type.topic: event_type for event_type in EVENT_TYPES}
BY_PAYLOAD: Mapping[type[EventPayload], EventType] = {t.payload: t for t in EVENT_TYPES}


def event_type_of(payload: EventPayload | type[EventPayload]) -> EventType:
    cls = payload if isinstance(payload, type) else type(payload)
    return BY_PAYLOAD[cls]


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every event payload, keyed by topic."""
    return {
        t.topic: {
            **t.payload.model_json_schema(),
            "title": t.payload.__name__,
            "description": t.description,
        }
        for t in EVENT_TYPES
    }
