"""Commands: what callers ask the write model to do. Imperative names, immutable values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from streams.contract import IngestedDocument, Provenance, TokenUsage


@dataclass(frozen=True)
class UploadedDocument:
    role: str
    filename: str
    media_type: str
    content: bytes = field(repr=False)


@dataclass(frozen=True)
class CreateTicket:
    tenant: str
    owner: str
    documents: tuple[UploadedDocument, ...]
    pipeline: str
    options: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    traceparent: str | None = None


@dataclass(frozen=True)
class RecordIngestion:
    ticket_id: UUID
    documents: tuple[IngestedDocument, ...]
    traceparent: str | None = None


@dataclass(frozen=True)
class StartSubtask:
    ticket_id: UUID
    subtask_id: str
    attempt: int
    worker: str
    traceparent: str | None = None


@dataclass(frozen=True)
class CompleteSubtask:
    ticket_id: UUID
    subtask_id: str
    attempt: int
    output: dict[str, Any]
    model: str
    usage: TokenUsage
    latency_ms: float
    traceparent: str | None = None
    provenance: Provenance | None = None
    """Where the output came from; `prompt` is then the exact prompt it names by hash."""
    prompt: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RerunTicket:
    """Open a new ticket on the documents of `ticket_id`, linked to it, to compare reports.

    `pipeline_version`: the version to run; None runs today's version of the pipeline.
    """

    ticket_id: UUID
    tenant: str
    requested_by: str
    pipeline_version: int | None = None
    traceparent: str | None = None


@dataclass(frozen=True)
class FailSubtask:
    ticket_id: UUID
    subtask_id: str
    attempt: int
    reason: str
    retryable: bool
    traceparent: str | None = None


@dataclass(frozen=True)
class FailTicket:
    ticket_id: UUID
    reason: str
    traceparent: str | None = None


@dataclass(frozen=True)
class CancelTicket:
    ticket_id: UUID
    tenant: str
    cancelled_by: str
    reason: str = "cancelled by user"
    traceparent: str | None = None


@dataclass(frozen=True)
class RetrySubtask:
    """Retry a failed subtask of a failed ticket of `tenant` (an admin's decision)."""

    ticket_id: UUID
    tenant: str
    subtask_id: str
    retried_by: str
    traceparent: str | None = None


@dataclass(frozen=True)
class AskQuestion:
    """Ask a follow-up question on the documents of `ticket_id` of `tenant`.

    `idempotency_key`: the same caller's key always names the same question, so a retried
    request records it once.
    """

    ticket_id: UUID
    tenant: str
    asked_by: str
    question: str
    idempotency_key: str | None = None
    traceparent: str | None = None


@dataclass(frozen=True)
class CommandResult:
    """What a command did: the ticket, the position of its last event, how many it appended."""

    ticket_id: UUID
    position: int
    appended: int
