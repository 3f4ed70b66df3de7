"""Every event ticketflow records, with its stable topic and payload schema.

Topics are part of the public contract: they are stored with each event and sent as the
CloudEvents `ce-type`. A payload change that is not backwards compatible gets a new topic
(`….v2`) and an upcaster; old events always load.

Four aggregates record events: tickets, users, tenants and documents. A stored event may hold
fields that are not part of its payload (`EventType.private_fields`, e.g. a user's password hash):
they stay in the event store and are never published, served or shown. Fields that hold personal
data (`EventType.personal_fields`, e.g. an e-mail address) are encrypted per data subject
(`streams.contract.personal`): stored and published as ciphertext, decrypted by the readers that
need the value, unreadable once the subject is erased.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from streams.contract.identity import TENANT_PATTERN
from streams.contract.personal import EncryptedValue
from streams.contract.pipeline import PipelineDefinition
from streams.contract.questions import QuestionDefinition

DocumentRole = str
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class ContractPayload(BaseModel):
    """The payload of any event: the JSON the relay sends as the message body."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class EventPayload(ContractPayload):
    """Fields every ticket event carries."""

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
    options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "The options the ticket runs with, defaults filled in. An option that the"
            " pipeline snapshot's `options_schema` marks personal (`x-personal`) holds an"
            " encrypted value (`EncryptedValue`: personal data of `subject`, the user who"
            " opened the ticket), not the value itself; it can no longer be decrypted once"
            " that user is erased (`ticketflow.user.erased.v1`)."
        ),
    )
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


class Provenance(BaseModel):
    """Where a subtask's output came from, enough to explain it and to run it again.

    `prompt_sha256` is the sha256 of the exact prompt: the UTF-8 canonical JSON of the chat
    messages sent to the backend (`canonical_json`); the prompt itself is stored as a blob of
    the ticket's tenant under that hash. `output_sha256` is the sha256 of the canonical JSON of
    the recorded output. Token counts and latency are the event's `usage` and `latency_ms`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str = Field(
        min_length=1, description="`llama-cpp`, `sglang`, `openai`, or `fake` in tests."
    )
    model: str = Field(min_length=1, description="The model's name as the backend reports it.")
    model_sha256: str | None = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="sha256 of the model file (GGUF), for a model run in process.",
    )
    model_revision: str | None = Field(
        default=None,
        description="The model id or revision the inference server reported (HTTP backends).",
    )
    sampling: dict[str, Any] = Field(
        description="Sampling parameters as sent to the backend (temperature, max tokens, …)."
    )
    seed: int | None = Field(default=None, description="The sampling seed, when one was set.")
    prompt_sha256: str = Field(pattern=SHA256_PATTERN)
    output_sha256: str = Field(pattern=SHA256_PATTERN)


class SubtaskCompletedV2(SubtaskCompleted):
    """`subtask_completed` with the provenance of the output (`ticketflow.….v2`)."""

    provenance: Provenance | None = Field(
        description=(
            "Null only where none is known: a v1 event upcast to v2 (recorded before"
            " provenance existed), or a result recorded by a caller that reported none."
        )
    )


class TicketRerunRequested(EventPayload):
    """Recorded on a new ticket, right after it was created, when it re-runs another."""

    rerun_of: UUID = Field(description="The ticket whose documents this one runs again.")
    requested_by: str = Field(min_length=1)
    pipeline_version: int = Field(ge=1, description="The pipeline version this ticket runs.")
    original_pipeline_version: int = Field(ge=1)


class SubtaskFailed(EventPayload):
    subtask_id: str
    attempt: int = Field(ge=1)
    reason: str
    retryable: bool
    will_retry: bool


class SubtaskRetried(EventPayload):
    """An admin re-readied a failed subtask of a failed ticket: the ticket is running again."""

    subtask_id: str
    attempt: int = Field(ge=2, description="The attempt the subtask is made ready for.")
    retried_by: str = Field(min_length=1, description="The admin who asked for the retry.")


class TicketCompleted(EventPayload):
    subtasks: int = Field(ge=1)


class TicketFailed(EventPayload):
    reason: str
    subtask_id: str | None = None


class TicketCancelled(EventPayload):
    reason: str
    cancelled_by: str


QUESTION_MAX_CHARS = 1000
"""The longest follow-up question accepted, in characters."""


class QuestionAsked(EventPayload):
    """A follow-up question on the ticket's documents: a conversation with the ticket.

    Its answer is the subtask `subtask_id` (`subtask_ready`, `subtask_started`,
    `subtask_completed`, `subtask_failed` as for a pipeline's subtasks), and the question ends
    with `question_answered` or `question_failed`. Questions never change the ticket's own
    status: a completed ticket stays completed. A ticket's questions are answered one after
    another, in the order they were asked, each seeing the earlier ones and their answers.
    """

    question_id: UUID
    subtask_id: str = Field(
        pattern=r"^question_[0-9a-f]{32}$", description="The subtask that answers the question."
    )
    question: str = Field(min_length=1, max_length=QUESTION_MAX_CHARS)
    asked_by: str = Field(min_length=1, description="Subject of the user who asked.")
    definition: QuestionDefinition = Field(
        description="How the question is answered (prompt, retrieval, output schema): a snapshot."
    )
    idempotency_key: str | None = None


class QuestionAnswered(EventPayload):
    """The question's subtask completed: its `subtask_completed` holds the answer."""

    question_id: UUID
    subtask_id: str
    attempt: int = Field(ge=1, description="The attempt whose output is the answer.")


class QuestionFailed(EventPayload):
    """The question got no answer; the reason is meant for the user. The ticket is unchanged."""

    question_id: UUID
    subtask_id: str
    reason: str


# -- users and tenants --------------------------------------------------------------------------

Role = Literal["user", "admin", "auditor", "integrator"]


class UserEventPayload(ContractPayload):
    """Fields every user event carries. Never the password, nor its hash."""

    user_id: UUID
    tenant: str = Field(pattern=TENANT_PATTERN)


class UserRegistered(UserEventPayload):
    email: str = Field(min_length=3, max_length=320, description="Normalised (lower case).")
    roles: tuple[Role, ...] = Field(min_length=1)
    registered_by: str | None = Field(
        description="Subject of the admin who registered the user; null: founded the tenant."
    )


class UserRegisteredV2(UserEventPayload):
    """`registered` with the e-mail address encrypted for the user (`….v2`)."""

    email: EncryptedValue | str = Field(
        description=(
            "The normalised (lower case) address, encrypted with the user's key: always an"
            " encrypted value in events recorded as v2. A plain string only where a reader"
            " upcast a v1 event (recorded before encryption) to v2."
        )
    )
    roles: tuple[Role, ...] = Field(min_length=1)
    registered_by: str | None = Field(
        description="Subject of the admin who registered the user; null: founded the tenant."
    )


class UserErased(UserEventPayload):
    """The user's personal data was erased: their key is destroyed, their account closed."""

    erased_by: str = Field(min_length=1, description="Subject of the admin or operator.")


class UserRoleGranted(UserEventPayload):
    role: Role
    granted_by: str


class UserRoleRevoked(UserEventPayload):
    role: Role
    revoked_by: str


class UserPasswordChanged(UserEventPayload):
    changed_by: str
    reason: Literal["changed", "rehashed"] = Field(
        description="`rehashed`: the same password, hashed again with today's parameters."
    )


class UserDeactivated(UserEventPayload):
    deactivated_by: str


class TenantEventPayload(ContractPayload):
    tenant_id: UUID
    tenant: str = Field(pattern=TENANT_PATTERN)


class TenantFounded(TenantEventPayload):
    founded_by: str = Field(
        description="The first user's id, or the subject of the admin who registered them."
    )


class TenantRetentionSet(TenantEventPayload):
    """How long the tenant's documents and their extracted texts are kept."""

    days: int | None = Field(
        ge=0,
        le=36_500,
        description="Documents older than this many days are purged; null: kept for ever.",
    )
    set_by: str = Field(min_length=1)


class DocumentPurged(ContractPayload):
    """A stored document (or a prompt holding its text) was deleted, with its extracted text and
    chunks. The events that name it keep its sha256; its content is gone."""

    document_id: UUID = Field(
        description="uuid5 of the tenant, the blob's sha256 and when that copy was stored."
    )
    tenant: str = Field(pattern=TENANT_PATTERN)
    sha256: str = Field(pattern=SHA256_PATTERN, description="The purged blob's key.")
    media_type: str
    size: int = Field(ge=0)
    stored_at: str = Field(description="When the blob was stored (RFC 3339).")
    reason: Literal["retention"] = Field(description="`retention`: older than the tenant keeps.")
    retention_days: int = Field(ge=0)


@dataclass(frozen=True)
class EventType:
    """One entry of the contract: name (the last subject token), topic and payload model.

    `aggregate` is the subject token before the id (`ticket`, `user`, `tenant`, `document`); the
    payload's id field is `<aggregate>_id`. `private_fields` are stored but never published;
    `personal_fields` are published encrypted (docs/adr/0021-crypto-shredding.md).
    """

    name: str
    topic: str
    payload: type[ContractPayload]
    description: str
    aggregate: str = "ticket"
    private_fields: frozenset[str] = frozenset()
    personal_fields: frozenset[str] = frozenset()
    """Payload fields holding personal data: encrypted per subject (plain in older versions)."""

    @property
    def id_field(self) -> str:
        return f"{self.aggregate}_id"


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
    EventType("subtask_completed", "ticketflow.ticket.subtask_completed.v2", SubtaskCompletedV2,
              "A subtask produced an output that validates against its schema, with the"
              " provenance of that output (model and its hash, prompt hash, sampling, output"
              " hash)."),
    EventType("subtask_failed", "ticketflow.ticket.subtask_failed.v1", SubtaskFailed,
              "An attempt of a subtask failed; it is retried while attempts remain."),
    EventType("subtask_retried", "ticketflow.ticket.subtask_retried.v1", SubtaskRetried,
              "An admin retried a failed subtask of a failed ticket: the ticket re-opens"
              " (running) and the subtask is ready again, for one more attempt."),
    EventType("completed", "ticketflow.ticket.completed.v1", TicketCompleted,
              "Every subtask of the ticket completed."),
    EventType("failed", "ticketflow.ticket.failed.v1", TicketFailed,
              "The ticket cannot finish; the reason is meant for the user."),
    EventType("cancelled", "ticketflow.ticket.cancelled.v1", TicketCancelled,
              "The ticket was cancelled; no further subtask is dispatched."),
    EventType("rerun_requested", "ticketflow.ticket.rerun_requested.v1", TicketRerunRequested,
              "The ticket re-runs the documents of an earlier ticket, to compare the reports."),
    EventType("question_asked", "ticketflow.ticket.question_asked.v1", QuestionAsked,
              "A user asked a follow-up question on the ticket's documents; the subtask it"
              " names answers it from retrieved chunks, with the conversation so far."),
    EventType("question_answered", "ticketflow.ticket.question_answered.v1", QuestionAnswered,
              "A follow-up question was answered: the named subtask's output is the answer."),
    EventType("question_failed", "ticketflow.ticket.question_failed.v1", QuestionFailed,
              "A follow-up question could not be answered; the ticket's status is unchanged."),
    EventType("registered", "ticketflow.user.registered.v1", UserRegistered,
              "A user account was opened in a tenant (its e-mail address in plain text: recorded"
              " before personal data was encrypted).", "user", frozenset({"password_hash"}),
              frozenset({"email"})),
    EventType("registered", "ticketflow.user.registered.v2", UserRegisteredV2,
              "A user account was opened in a tenant; its e-mail address is encrypted with the"
              " user's key.", "user", frozenset({"password_hash"}), frozenset({"email"})),
    EventType("role_granted", "ticketflow.user.role_granted.v1", UserRoleGranted,
              "A tenant admin granted the user a role.", "user"),
    EventType("role_revoked", "ticketflow.user.role_revoked.v1", UserRoleRevoked,
              "A tenant admin revoked one of the user's roles.", "user"),
    EventType("password_changed", "ticketflow.user.password_changed.v1", UserPasswordChanged,
              "The user's password (or only its hash) changed.", "user",
              frozenset({"password_hash"})),
    EventType("deactivated", "ticketflow.user.deactivated.v1", UserDeactivated,
              "The user can no longer log in; their sessions were revoked.", "user"),
    EventType("erased", "ticketflow.user.erased.v1", UserErased,
              "The user's personal data was erased: their key is destroyed, so their encrypted"
              " fields in every event can no longer be read; the account is closed.", "user"),
    EventType("founded", "ticketflow.tenant.founded.v1", TenantFounded,
              "A tenant was founded by the registration of its first user.", "tenant"),
    EventType("retention_set", "ticketflow.tenant.retention_set.v1", TenantRetentionSet,
              "A tenant admin set how many days documents and their texts are kept.", "tenant"),
    EventType("purged", "ticketflow.document.purged.v1", DocumentPurged,
              "A document's content, extracted text and chunks were deleted (retention).",
              "document"),
)  # fmt: skip

BY_TOPIC: Mapping[str, EventType] = {event_type.topic: event_type for event_type in EVENT_TYPES}
BY_PAYLOAD: Mapping[type[ContractPayload], EventType] = {t.payload: t for t in EVENT_TYPES}


def event_type_of(payload: ContractPayload | type[ContractPayload]) -> EventType:
    cls = payload if isinstance(payload, type) else type(payload)
    return BY_PAYLOAD[cls]


def canonical_json(value: Any) -> bytes:
    """The bytes hashed for provenance: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _subtask_completed_v1_to_v2(payload: ContractPayload) -> ContractPayload:
    return SubtaskCompletedV2.model_validate({**payload.model_dump(), "provenance": None})


def _user_registered_v1_to_v2(payload: ContractPayload) -> ContractPayload:
    # The address stays plain: only its user's key could encrypt it, and readers hide it once
    # the user is erased (streams.contract.personal.reveal).
    return UserRegisteredV2.model_validate(payload.model_dump())


UPCASTERS: Mapping[type[ContractPayload], Callable[[ContractPayload], ContractPayload]] = {
    SubtaskCompleted: _subtask_completed_v1_to_v2,
    UserRegistered: _user_registered_v1_to_v2,
}
"""Payload class of an older topic version → the function that gives the next version."""


def upcast(payload: ContractPayload) -> ContractPayload:
    """The payload in the latest version of its event: what readers that fold events use.

    Stored events keep their topic (the relay publishes them as recorded); only readers that
    want one shape per event (projections, explanations) upcast.
    """
    while (step := UPCASTERS.get(type(payload))) is not None:
        payload = step(payload)
    return payload


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
