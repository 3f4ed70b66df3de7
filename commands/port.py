"""The write side's port for handlers: all a handler may know of a ticket, and all it may ask.

Handlers never hold an aggregate. They read a `TicketSnapshot` (a frozen copy of what they need:
the pipeline the ticket runs, its documents in role order, its options, each subtask's state,
attempt and output) and send commands through a `WriteSide`. The command service stays the only
writer of events; `commands.write_side.ServiceWriteSide` implements this port over it, and
`commands.write_side.InMemoryWriteSide` is the deterministic fake that unit tests of handlers
use.

A subtask costs at most one load of its ticket: `start_subtask` answers with the snapshot the
command was decided on, so the handler needs no load of its own, and the command service keeps
the ticket it appended to for the `complete_subtask` that follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol
from uuid import UUID

from commands.errors import DomainError, TicketNotFound, UnknownSubtask
from commands.messages import (
    CommandResult,
    CompleteSubtask,
    FailSubtask,
    FailTicket,
    RecordIngestion,
    StartSubtask,
)
from streams import contract

__all__ = [
    "FINISHED",
    "CommandResult",
    "CompleteSubtask",
    "DomainError",
    "FailSubtask",
    "FailTicket",
    "QuestionSnapshot",
    "RecordIngestion",
    "StartSubtask",
    "SubtaskSnapshot",
    "SubtaskStatus",
    "TicketNotFound",
    "TicketSnapshot",
    "TicketStatus",
    "UnknownSubtask",
    "WriteSide",
]


class TicketStatus(StrEnum):
    PENDING = "pending"  # created, waiting for its documents to be ingested
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({TicketStatus.COMPLETED, TicketStatus.FAILED, TicketStatus.CANCELLED})


class SubtaskStatus(StrEnum):
    PENDING = "pending"  # waiting for dependencies
    READY = "ready"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class SubtaskSnapshot:
    subtask_id: str
    status: SubtaskStatus
    attempt: int
    output: Mapping[str, Any] | None
    """The validated output once completed; None before, or when it is stored as a blob."""


@dataclass(frozen=True)
class QuestionSnapshot:
    """A follow-up question and the state of the subtask that answers it (`subtask_id`)."""

    question_id: UUID
    subtask_id: str
    question: str
    definition: contract.QuestionDefinition
    """How it is answered: the snapshot its `QuestionAsked` carries."""
    status: SubtaskStatus
    attempt: int
    output: Mapping[str, Any] | None
    finished: bool
    """Answered or failed."""

    @property
    def answer(self) -> str | None:
        """The answer's text once answered; None before, or when it got none."""
        value = (self.output or {}).get("answer")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TicketSnapshot:
    """A ticket as a handler sees it, at `version`. Read-only, and shared with nobody: its
    mappings are copies, so nothing a handler does can change the write side's state."""

    ticket_id: UUID
    tenant: str
    version: int
    status: TicketStatus
    pipeline: contract.PipelineDefinition
    """The pipeline snapshot the ticket was created with (never today's pipeline file)."""
    documents: tuple[contract.DocumentRef, ...]
    """The ticket's documents in the order of the pipeline's `document_roles`."""
    ingested: tuple[contract.IngestedDocument, ...]
    """What ingestion found in each document; empty until the documents are ingested."""
    options: Mapping[str, Any]
    subtasks: Mapping[str, SubtaskSnapshot]
    questions: Mapping[str, QuestionSnapshot] = field(default_factory=lambda: MappingProxyType({}))
    """Follow-up questions by the id of the subtask that answers each, in the order asked."""

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def is_cancelled(self) -> bool:
        return self.status is TicketStatus.CANCELLED

    def subtask(self, subtask_id: str) -> SubtaskSnapshot:
        question = self.questions.get(subtask_id)
        if question is not None:
            return SubtaskSnapshot(subtask_id, question.status, question.attempt, question.output)
        try:
            return self.subtasks[subtask_id]
        except KeyError:
            raise UnknownSubtask(f"ticket {self.ticket_id} has no subtask {subtask_id!r}") from None

    def definition(self, subtask_id: str) -> contract.SubtaskDefinition:
        """The definition of a pipeline subtask, or of the subtask answering a question."""
        question = self.questions.get(subtask_id)
        if question is not None:
            return question.definition.subtask
        try:
            return self.pipeline.subtask(subtask_id)
        except KeyError:
            raise UnknownSubtask(f"ticket {self.ticket_id} has no subtask {subtask_id!r}") from None

    def conversation_before(self, subtask_id: str) -> tuple[tuple[str, str], ...]:
        """The (question, answer) pairs of the answered questions asked before the question
        `subtask_id` answers, oldest first, at most its definition's `history_limit` latest."""
        question = self.questions[subtask_id]
        earlier: list[tuple[str, str]] = []
        for other_id, other in self.questions.items():
            if other_id == subtask_id:
                break
            if other.status is SubtaskStatus.COMPLETED and other.answer is not None:
                earlier.append((other.question, other.answer))
        limit = question.definition.history_limit
        return tuple(earlier[len(earlier) - limit :]) if limit else ()

    def dependency_outputs(self, subtask_id: str) -> dict[str, Any]:
        """The outputs of the subtasks `subtask_id` depends on, by subtask id."""
        definition = self.pipeline.subtask(subtask_id)
        return {dep: self.subtasks[dep].output for dep in definition.depends_on}

    def runs(self, subtask_id: str, attempt: int) -> bool:
        """Whether `attempt` of the subtask is the one to work on now: the ticket is not
        finished, and the subtask is neither completed nor past that attempt. False means a
        message about it is stale."""
        state = self.subtask(subtask_id)
        question = self.questions.get(subtask_id)
        # A question outlives its ticket's end; it stops only when it ended itself.
        stopped = self.is_finished if question is None else question.finished
        return not (stopped or state.status is SubtaskStatus.COMPLETED or state.attempt != attempt)

    @property
    def ingested_characters(self) -> int | None:
        """Characters of all the documents, once ingested."""
        if not self.ingested:
            return None
        return sum(document.characters for document in self.ingested)


class WriteSide(Protocol):
    """The commands handlers send, and the one read they need. Every call is one hop to the
    command service (a thread or a process away); a repeated command is a no-op."""

    async def snapshot(self, ticket_id: UUID) -> TicketSnapshot:
        """The ticket as stored now; raises `TicketNotFound`."""
        ...

    async def document(self, tenant: str, sha256: str) -> bytes | None:
        """A stored document's bytes, or None when no such blob is stored."""
        ...

    async def record_ingestion(self, command: RecordIngestion) -> CommandResult: ...

    async def start_subtask(self, command: StartSubtask) -> TicketSnapshot:
        """Starts the attempt unless it is stale, and answers with the ticket as the command
        left it: `snapshot.runs(subtask_id, attempt)` tells whether to work on it."""
        ...

    async def complete_subtask(self, command: CompleteSubtask) -> CommandResult: ...

    async def fail_subtask(self, command: FailSubtask) -> CommandResult: ...

    async def fail_ticket(self, command: FailTicket) -> CommandResult: ...
