"""The `Ticket` aggregate: one document-processing job and the state machine of its pipeline.

The aggregate alone decides what happens next: which subtasks become ready, whether a failure is
retried, when the ticket completes or fails. Every decision is an event; every event payload is
validated against `streams.contract` before it is recorded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from commands.errors import (
    IdempotencyConflict,
    InvalidTransition,
    QuestionRefused,
    TicketAlreadyFinished,
    UnknownSubtask,
)
from commands.events import create, emit, event_class
from commands.pipeline import root_subtasks, unblocked_subtasks
from commands.port import (
    FINISHED,
    QuestionSnapshot,
    SubtaskSnapshot,
    SubtaskStatus,
    TicketSnapshot,
    TicketStatus,
)
from streams import contract

__all__ = ["FINISHED", "SubtaskState", "SubtaskStatus", "Ticket", "TicketStatus", "snapshot_of"]


@dataclass
class SubtaskState:
    subtask_id: str
    depends_on: tuple[str, ...]
    status: SubtaskStatus = SubtaskStatus.PENDING
    attempt: int = 0
    output: dict[str, Any] | None = None


@dataclass
class QuestionState:
    """A follow-up question and the subtask that answers it (`state`)."""

    question_id: UUID
    question: str
    asked_by: str
    definition: contract.QuestionDefinition
    state: SubtaskState
    finished: bool = False
    """Answered or failed: nothing more happens to it."""
    failure_reason: str | None = None


def _ingested(event: Any, ticket: Ticket) -> None:
    ticket.status = TicketStatus.RUNNING
    ticket.ingested_documents = list(event.documents)


def _ready(event: Any, ticket: Ticket) -> None:
    state = ticket.state_of(event.subtask_id)
    state.status = SubtaskStatus.READY
    state.attempt = event.attempt


def _started(event: Any, ticket: Ticket) -> None:
    ticket.state_of(event.subtask_id).status = SubtaskStatus.RUNNING


def _completed_subtask(event: Any, ticket: Ticket) -> None:
    state = ticket.state_of(event.subtask_id)
    state.status = SubtaskStatus.COMPLETED
    state.output = event.output


def _failed_subtask(event: Any, ticket: Ticket) -> None:
    ticket.state_of(event.subtask_id).status = SubtaskStatus.FAILED


def _retried(event: Any, ticket: Ticket) -> None:
    ticket.status = TicketStatus.RUNNING
    ticket.failure_reason = None


def _completed(event: Any, ticket: Ticket) -> None:
    ticket.status = TicketStatus.COMPLETED


def _failed(event: Any, ticket: Ticket) -> None:
    ticket.status = TicketStatus.FAILED
    ticket.failure_reason = event.reason


def _cancelled(event: Any, ticket: Ticket) -> None:
    ticket.status = TicketStatus.CANCELLED
    ticket.failure_reason = event.reason


def _rerun_requested(event: Any, ticket: Ticket) -> None:
    ticket.rerun_of = UUID(str(event.rerun_of))


def _question_asked(event: Any, ticket: Ticket) -> None:
    ticket.questions[event.subtask_id] = QuestionState(
        question_id=UUID(str(event.question_id)),
        question=event.question,
        asked_by=event.asked_by,
        definition=contract.QuestionDefinition.model_validate(event.definition),
        state=SubtaskState(subtask_id=event.subtask_id, depends_on=()),
    )


def _question_answered(event: Any, ticket: Ticket) -> None:
    ticket.questions[event.subtask_id].finished = True


def _question_failed(event: Any, ticket: Ticket) -> None:
    question = ticket.questions[event.subtask_id]
    question.finished = True
    question.failure_reason = event.reason


class Ticket(Aggregate):
    TOPIC = "ticketflow.ticket.v1"

    class Event(Aggregate.Event):
        tenant: str
        traceparent: str | None

    # Each event's fields and topic come from its contract payload (commands/events.py).
    Created = event_class(Event, contract.TicketCreated, created=True)
    DocumentIngested = event_class(Event, contract.DocumentIngested, apply=_ingested)
    SubtaskReady = event_class(Event, contract.SubtaskReady, apply=_ready)
    SubtaskStarted = event_class(Event, contract.SubtaskStarted, apply=_started)
    SubtaskCompleted = event_class(Event, contract.SubtaskCompletedV2, apply=_completed_subtask)
    # v1, recorded before provenance existed: it loads and applies as before, and reads as a v2
    # event without provenance.
    SubtaskCompletedV1 = event_class(
        Event,
        contract.SubtaskCompleted,
        apply=_completed_subtask,
        extra={"provenance": property(lambda _: None)},
    )
    SubtaskFailed = event_class(Event, contract.SubtaskFailed, apply=_failed_subtask)
    SubtaskRetried = event_class(Event, contract.SubtaskRetried, apply=_retried)
    Completed = event_class(Event, contract.TicketCompleted, apply=_completed)
    Failed = event_class(Event, contract.TicketFailed, apply=_failed)
    Cancelled = event_class(Event, contract.TicketCancelled, apply=_cancelled)
    RerunRequested = event_class(Event, contract.TicketRerunRequested, apply=_rerun_requested)
    QuestionAsked = event_class(Event, contract.QuestionAsked, apply=_question_asked)
    QuestionAnswered = event_class(Event, contract.QuestionAnswered, apply=_question_answered)
    QuestionFailed = event_class(Event, contract.QuestionFailed, apply=_question_failed)

    def __init__(
        self,
        tenant: str,
        owner: str,
        documents: list[dict[str, Any]],
        pipeline: dict[str, Any],
        prompt_hashes: dict[str, str],
        options: dict[str, Any],
        idempotency_key: str | None,
    ) -> None:
        self.tenant = tenant
        self.owner = owner
        self.documents = documents
        self.pipeline = contract.PipelineDefinition.model_validate(pipeline)
        self.prompt_hashes = prompt_hashes
        self.options = options
        self.idempotency_key = idempotency_key
        self.status = TicketStatus.PENDING
        self.failure_reason: str | None = None
        self.ingested_documents: list[dict[str, Any]] = []
        self.rerun_of: UUID | None = None
        self.subtasks: dict[str, SubtaskState] = {
            s.id: SubtaskState(subtask_id=s.id, depends_on=s.depends_on)
            for s in self.pipeline.subtasks
        }
        # Follow-up questions by the id of the subtask that answers each, in the order asked.
        self.questions: dict[str, QuestionState] = {}

    # -- commands ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls, ticket_id: UUID, created: contract.TicketCreated, traceparent: str | None
    ) -> Ticket:
        if created.ticket_id != ticket_id:
            raise ValueError(f"the created event names ticket {created.ticket_id}, not {ticket_id}")
        return create(cls, created, traceparent)

    def link_rerun(self, original: Ticket, requested_by: str, traceparent: str | None) -> None:
        """Record that this new ticket re-runs `original` (same tenant, same documents)."""
        if self.version != 1 or self.rerun_of is not None:
            raise InvalidTransition("only a ticket that was just opened can re-run another")
        if original.tenant != self.tenant:
            raise InvalidTransition("a ticket can only re-run a ticket of its own tenant")
        self._emit(
            contract.TicketRerunRequested(
                ticket_id=self.id,
                tenant=self.tenant,
                rerun_of=original.id,
                requested_by=requested_by,
                pipeline_version=self.pipeline.version,
                original_pipeline_version=original.pipeline.version,
            ),
            traceparent,
        )

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    def record_ingestion(
        self, documents: list[contract.IngestedDocument], traceparent: str | None
    ) -> None:
        """Documents are ready: the root subtasks become ready. Repeating it changes nothing."""
        if self.status is not TicketStatus.PENDING:
            return
        self._emit(
            contract.DocumentIngested(ticket_id=self.id, tenant=self.tenant, documents=documents),
            traceparent,
        )
        for subtask_id in root_subtasks(self.pipeline):
            self._make_ready(subtask_id, 1, traceparent)

    def start_subtask(
        self, subtask_id: str, attempt: int, worker: str, traceparent: str | None
    ) -> None:
        state = self._subtask(subtask_id)
        if self._stopped(subtask_id) or state.attempt > attempt:
            return  # stale: nothing left to start
        if state.status is SubtaskStatus.COMPLETED:
            return
        if state.status is SubtaskStatus.RUNNING and state.attempt == attempt:
            return
        if state.status is not SubtaskStatus.READY or state.attempt != attempt:
            raise InvalidTransition(
                f"subtask {subtask_id!r} attempt {attempt} cannot start: it is {state.status}"
            )
        self._emit(
            contract.SubtaskStarted(
                ticket_id=self.id,
                tenant=self.tenant,
                subtask_id=subtask_id,
                attempt=attempt,
                worker=worker,
            ),
            traceparent,
        )

    def complete_subtask(
        self,
        subtask_id: str,
        attempt: int,
        output: dict[str, Any] | None,
        model: str,
        usage: contract.TokenUsage,
        latency_ms: float,
        traceparent: str | None,
        output_sha256: str | None = None,
        provenance: contract.Provenance | None = None,
    ) -> None:
        """Record a subtask's output and schedule what it unblocks. A repeat is a no-op.

        `provenance.output_sha256` must be the hash of `output`'s canonical JSON.
        """
        state = self._subtask(subtask_id)
        if state.status is SubtaskStatus.COMPLETED:
            return
        question = self.questions.get(subtask_id)
        if question is not None:
            # A question lives on whatever the ticket does, unless it already ended (the
            # ticket was cancelled while it waited): then its result is recorded and ignored.
            ignored = question.finished
        else:
            ignored = self.status in (TicketStatus.FAILED, TicketStatus.CANCELLED)
        if state.status not in (SubtaskStatus.READY, SubtaskStatus.RUNNING):
            if ignored:
                return
            raise InvalidTransition(f"subtask {subtask_id!r} is {state.status}, not ready")
        if attempt > state.attempt:
            raise InvalidTransition(
                f"subtask {subtask_id!r} has no attempt {attempt} (latest is {state.attempt})"
            )
        if provenance is not None and output is not None:
            digest = contract.sha256_of(contract.canonical_json(output))
            if provenance.output_sha256 != digest:
                raise ValueError(
                    f"provenance of {subtask_id!r} names output {provenance.output_sha256},"
                    f" but the output's sha256 is {digest}"
                )
        self._emit(
            contract.SubtaskCompletedV2(
                ticket_id=self.id,
                tenant=self.tenant,
                subtask_id=subtask_id,
                attempt=attempt,
                output=output,
                output_sha256=output_sha256,
                model=model,
                usage=usage,
                latency_ms=latency_ms,
                ignored=ignored,
                provenance=provenance,
            ),
            traceparent,
        )
        if ignored:
            return
        if question is not None:
            self._emit(
                contract.QuestionAnswered(
                    ticket_id=self.id,
                    tenant=self.tenant,
                    question_id=question.question_id,
                    subtask_id=subtask_id,
                    attempt=attempt,
                ),
                traceparent,
            )
            self._ready_next_question(traceparent)
            return
        completed = {
            s.subtask_id for s in self.subtasks.values() if s.status is SubtaskStatus.COMPLETED
        }
        scheduled = {
            s.subtask_id for s in self.subtasks.values() if s.status is not SubtaskStatus.PENDING
        }
        for unblocked in unblocked_subtasks(self.pipeline, completed, scheduled):
            self._make_ready(unblocked, 1, traceparent)
        if len(completed) == len(self.subtasks):
            self._emit(
                contract.TicketCompleted(
                    ticket_id=self.id, tenant=self.tenant, subtasks=len(completed)
                ),
                traceparent,
            )

    def fail_subtask(
        self, subtask_id: str, attempt: int, reason: str, retryable: bool, traceparent: str | None
    ) -> None:
        """Record a failed attempt; retry while attempts remain, else fail the ticket."""
        state = self._subtask(subtask_id)
        if self._stopped(subtask_id) or state.status is SubtaskStatus.COMPLETED:
            return
        if state.status not in (SubtaskStatus.READY, SubtaskStatus.RUNNING):
            raise InvalidTransition(f"subtask {subtask_id!r} is {state.status}, not ready")
        if attempt != state.attempt:
            return  # a report about an attempt already superseded
        question = self.questions.get(subtask_id)
        max_attempts = (
            self.pipeline.max_attempts if question is None else question.definition.max_attempts
        )
        will_retry = retryable and attempt < max_attempts
        self._emit(
            contract.SubtaskFailed(
                ticket_id=self.id,
                tenant=self.tenant,
                subtask_id=subtask_id,
                attempt=attempt,
                reason=reason,
                retryable=retryable,
                will_retry=will_retry,
            ),
            traceparent,
        )
        if will_retry:
            self._make_ready(subtask_id, attempt + 1, traceparent)
            return
        attempts = "attempt" if attempt == 1 else "attempts"
        if question is not None:
            self._fail_question(
                question, f"No answer after {attempt} {attempts}: {reason}", traceparent
            )
            self._ready_next_question(traceparent)
            return
        title = self.pipeline.subtask(subtask_id).title
        self.fail(f'Step "{title}" failed after {attempt} {attempts}: {reason}', traceparent,
                  subtask_id=subtask_id)  # fmt: skip

    def ask_question(
        self,
        question_id: UUID,
        question: str,
        asked_by: str,
        definition: contract.QuestionDefinition,
        traceparent: str | None,
        idempotency_key: str | None = None,
    ) -> None:
        """Record a follow-up question on the ticket's documents. Asking it again is a no-op.

        Any ticket whose documents were ingested takes questions, whether it is running,
        completed or failed; the ticket's status never changes for them. A ticket still waiting
        for ingestion (or that failed before it) and a cancelled ticket refuse them. Questions
        are answered one at a time, in the order asked: the next one becomes ready once the
        one before it was answered or failed.
        """
        subtask_id = contract.question_subtask_id(question_id)
        asked = self.questions.get(subtask_id)
        if asked is not None:
            if asked.question != question:
                raise IdempotencyConflict(
                    "This Idempotency-Key was already used for a different question."
                )
            return
        if self.status is TicketStatus.CANCELLED:
            raise QuestionRefused(
                f"ticket {self.id} was cancelled: it takes no more questions",
                code="ticket_cancelled",
            )
        if not self.ingested_documents:
            raise QuestionRefused(
                f"ticket {self.id} failed before its documents were read: it takes no questions"
                if self.status is TicketStatus.FAILED
                else f"the documents of ticket {self.id} are not ingested yet; ask once they are",
                code="documents_not_ingested",
            )
        waiting = any(not q.finished for q in self.questions.values())
        self._emit(
            contract.QuestionAsked(
                ticket_id=self.id,
                tenant=self.tenant,
                question_id=question_id,
                subtask_id=subtask_id,
                question=question,
                asked_by=asked_by,
                definition=definition,
                idempotency_key=idempotency_key,
            ),
            traceparent,
        )
        if not waiting:
            self._make_ready(subtask_id, 1, traceparent)

    def retry_subtask(self, subtask_id: str, retried_by: str, traceparent: str | None) -> None:
        """Re-open a failed ticket by retrying its failed subtask.

        Only a failed subtask of a failed ticket can be retried: the ticket becomes running again
        (`SubtaskRetried`) and the subtask ready for one more attempt (`SubtaskReady`, which the
        inference handler picks up as any other), even past the pipeline's `max_attempts`; if that
        attempt fails too, the ticket fails again. Subtasks that were ready or running when the
        ticket failed (their work was dropped with it) are made ready again as well. Completed
        and cancelled tickets cannot be retried.
        """
        if subtask_id in self.questions:
            raise InvalidTransition(
                f"subtask {subtask_id!r} answers a question: ask the question again instead"
            )
        state = self._subtask(subtask_id)
        if self.status is not TicketStatus.FAILED:
            raise InvalidTransition(
                f"only a failed ticket can be retried; ticket {self.id} is {self.status}"
            )
        if state.status is not SubtaskStatus.FAILED:
            raise InvalidTransition(
                f"subtask {subtask_id!r} is {state.status}: only a failed subtask can be retried"
            )
        attempt = state.attempt + 1
        self._emit(
            contract.SubtaskRetried(
                ticket_id=self.id,
                tenant=self.tenant,
                subtask_id=subtask_id,
                attempt=attempt,
                retried_by=retried_by,
            ),
            traceparent,
        )
        self._make_ready(subtask_id, attempt, traceparent)
        for other in self.subtasks.values():
            if other.subtask_id != subtask_id and other.status in (
                SubtaskStatus.READY,
                SubtaskStatus.RUNNING,
            ):
                self._make_ready(other.subtask_id, other.attempt + 1, traceparent)

    def fail(self, reason: str, traceparent: str | None, *, subtask_id: str | None = None) -> None:
        """Fail the whole ticket with a reason meant for its user. No-op once finished."""
        if self.is_finished:
            return
        self._emit(
            contract.TicketFailed(
                ticket_id=self.id, tenant=self.tenant, reason=reason, subtask_id=subtask_id
            ),
            traceparent,
        )

    def cancel(self, reason: str, cancelled_by: str, traceparent: str | None) -> None:
        if self.status is TicketStatus.CANCELLED:
            return
        if self.is_finished:
            raise TicketAlreadyFinished(f"ticket {self.id} is already {self.status}")
        # Open questions end first, so that the ticket's final event stays its last.
        for question in self.questions.values():
            if not question.finished:
                self._fail_question(question, "The ticket was cancelled.", traceparent)
        self._emit(
            contract.TicketCancelled(
                ticket_id=self.id, tenant=self.tenant, reason=reason, cancelled_by=cancelled_by
            ),
            traceparent,
        )

    # -- helpers ----------------------------------------------------------------------------

    def _subtask(self, subtask_id: str) -> SubtaskState:
        try:
            return self.state_of(subtask_id)
        except KeyError:
            raise UnknownSubtask(
                f"pipeline {self.pipeline.name!r} has no subtask {subtask_id!r}"
            ) from None

    def state_of(self, subtask_id: str) -> SubtaskState:
        """The state of a pipeline subtask or of a question's subtask; `KeyError` if none."""
        question = self.questions.get(subtask_id)
        return question.state if question is not None else self.subtasks[subtask_id]

    def _stopped(self, subtask_id: str) -> bool:
        """Whether nothing more may happen to the subtask: its ticket (for a pipeline subtask)
        or its question ended."""
        question = self.questions.get(subtask_id)
        return self.is_finished if question is None else question.finished

    def _fail_question(self, question: QuestionState, reason: str, traceparent: str | None) -> None:
        self._emit(
            contract.QuestionFailed(
                ticket_id=self.id,
                tenant=self.tenant,
                question_id=question.question_id,
                subtask_id=question.state.subtask_id,
                reason=reason,
            ),
            traceparent,
        )

    def _ready_next_question(self, traceparent: str | None) -> None:
        """Questions run one at a time, in the order asked: each sees the answers before it."""
        for question in self.questions.values():
            if question.finished:
                continue
            if question.state.status is SubtaskStatus.PENDING:
                self._make_ready(question.state.subtask_id, 1, traceparent)
            return

    def _make_ready(self, subtask_id: str, attempt: int, traceparent: str | None) -> None:
        self._emit(
            contract.SubtaskReady(
                ticket_id=self.id, tenant=self.tenant, subtask_id=subtask_id, attempt=attempt
            ),
            traceparent,
        )

    def _emit(self, payload: contract.EventPayload, traceparent: str | None) -> None:
        emit(self, payload, traceparent)


def snapshot_of(ticket: Ticket) -> TicketSnapshot:
    """What handlers may see of `ticket` (commands/port.py), copied: the snapshot stays as it is
    whatever happens to the aggregate afterwards."""
    order = {role: index for index, role in enumerate(ticket.pipeline.document_roles)}
    documents = sorted(ticket.documents, key=lambda d: order.get(d["role"], len(order)))
    return TicketSnapshot(
        ticket_id=ticket.id,
        tenant=ticket.tenant,
        version=ticket.version,
        status=ticket.status,
        pipeline=ticket.pipeline,
        documents=tuple(contract.DocumentRef.model_validate(d) for d in documents),
        ingested=tuple(
            contract.IngestedDocument.model_validate(d) for d in ticket.ingested_documents
        ),
        options=MappingProxyType(copy.deepcopy(ticket.options)),
        subtasks=MappingProxyType(
            {
                state.subtask_id: SubtaskSnapshot(
                    subtask_id=state.subtask_id,
                    status=state.status,
                    attempt=state.attempt,
                    output=None if state.output is None else copy.deepcopy(state.output),
                )
                for state in ticket.subtasks.values()
            }
        ),
        questions=MappingProxyType(
            {
                subtask_id: QuestionSnapshot(
                    question_id=question.question_id,
                    subtask_id=subtask_id,
                    question=question.question,
                    definition=question.definition,
                    status=question.state.status,
                    attempt=question.state.attempt,
                    output=(
                        None
                        if question.state.output is None
                        else copy.deepcopy(question.state.output)
                    ),
                    finished=question.finished,
                )
                for subtask_id, question in ticket.questions.items()
            }
        ),
    )
