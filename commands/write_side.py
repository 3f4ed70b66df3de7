"""Implementations of the handlers' port (commands/port.py).

`ServiceWriteSide` is the real one: each call is one thread hop into the command service.
`InMemoryWriteSide` is a deterministic fake for unit tests of handlers: the same `Ticket`
aggregate decides every command, on tickets held in memory, with no event store; it counts the
loads a handler asks for and keeps every command it received, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from commands.errors import TicketNotFound
from commands.messages import (
    AskQuestion,
    CancelTicket,
    CommandResult,
    CompleteSubtask,
    FailSubtask,
    FailTicket,
    RecordIngestion,
    StartSubtask,
)
from commands.port import TicketSnapshot, WriteSide
from commands.questions import FOLLOW_UP, question_id_for
from commands.service import CommandService
from commands.ticket import Ticket, snapshot_of
from streams import contract


class ServiceWriteSide:
    """The port over a `CommandService` in this process: one `asyncio.to_thread` per call."""

    def __init__(self, service: CommandService) -> None:
        self._service = service

    async def snapshot(self, ticket_id: UUID) -> TicketSnapshot:
        return await asyncio.to_thread(self._service.snapshot, ticket_id)

    async def document(self, tenant: str, sha256: str) -> bytes | None:
        return await asyncio.to_thread(self._service.document, tenant, sha256)

    async def record_ingestion(self, command: RecordIngestion) -> CommandResult:
        return await asyncio.to_thread(self._service.record_ingestion, command)

    async def start_subtask(self, command: StartSubtask) -> TicketSnapshot:
        _, snapshot = await asyncio.to_thread(self._service.start_subtask_viewed, command)
        return snapshot

    async def complete_subtask(self, command: CompleteSubtask) -> CommandResult:
        return await asyncio.to_thread(self._service.complete_subtask, command)

    async def fail_subtask(self, command: FailSubtask) -> CommandResult:
        return await asyncio.to_thread(self._service.fail_subtask, command)

    async def fail_ticket(self, command: FailTicket) -> CommandResult:
        return await asyncio.to_thread(self._service.fail_ticket, command)


@dataclass
class InMemoryWriteSide:
    """A fake write side for tests: real aggregates, no store. Positions count the events."""

    tickets: dict[UUID, Ticket] = field(default_factory=dict)
    documents: dict[tuple[str, str], bytes] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    commands: list[object] = field(default_factory=list)
    """Every command received, in order."""
    loads: int = 0
    """How many times a handler asked for a snapshot on its own (`snapshot`)."""
    position: int = 0
    _events: dict[UUID, list[str]] = field(default_factory=dict)

    def open(self, created: contract.TicketCreated) -> Ticket:
        ticket = Ticket.open(created.ticket_id, created, None)
        self._collect(ticket)
        self.tickets[ticket.id] = ticket
        return ticket

    async def snapshot(self, ticket_id: UUID) -> TicketSnapshot:
        self.loads += 1
        return snapshot_of(self._ticket(ticket_id))

    async def document(self, tenant: str, sha256: str) -> bytes | None:
        return self.documents.get((tenant, sha256))

    async def record_ingestion(self, command: RecordIngestion) -> CommandResult:
        return self._run(
            command,
            command.ticket_id,
            lambda t: t.record_ingestion(list(command.documents), command.traceparent),
        )

    async def start_subtask(self, command: StartSubtask) -> TicketSnapshot:
        self._run(
            command,
            command.ticket_id,
            lambda t: t.start_subtask(
                command.subtask_id, command.attempt, command.worker, command.traceparent
            ),
        )
        return snapshot_of(self._ticket(command.ticket_id))

    async def complete_subtask(self, command: CompleteSubtask) -> CommandResult:
        if command.provenance is not None and command.prompt is not None:
            self.prompts[command.provenance.prompt_sha256] = command.prompt
        return self._run(
            command,
            command.ticket_id,
            lambda t: t.complete_subtask(
                command.subtask_id,
                command.attempt,
                command.output,
                command.model,
                command.usage,
                command.latency_ms,
                command.traceparent,
                provenance=command.provenance,
            ),
        )

    async def fail_subtask(self, command: FailSubtask) -> CommandResult:
        return self._run(
            command,
            command.ticket_id,
            lambda t: t.fail_subtask(
                command.subtask_id,
                command.attempt,
                command.reason,
                command.retryable,
                command.traceparent,
            ),
        )

    async def fail_ticket(self, command: FailTicket) -> CommandResult:
        return self._run(
            command, command.ticket_id, lambda t: t.fail(command.reason, command.traceparent)
        )

    def ask_question(self, command: AskQuestion) -> tuple[CommandResult, UUID]:
        """What `CommandService.ask_question` does (a user's command, not the handlers')."""
        question_id = question_id_for(command.ticket_id, command.asked_by, command.idempotency_key)
        ticket = self._ticket(command.ticket_id)
        if ticket.tenant != command.tenant:
            raise TicketNotFound(f"ticket {command.ticket_id} not found")
        result = self._run(
            command,
            command.ticket_id,
            lambda t: t.ask_question(
                question_id,
                command.question,
                command.asked_by,
                FOLLOW_UP,
                command.traceparent,
                idempotency_key=command.idempotency_key,
            ),
        )
        return result, question_id

    def cancel_ticket(self, command: CancelTicket) -> CommandResult:
        """What `CommandService.cancel_ticket` does (a user's command, not the handlers')."""
        return self._run(
            command,
            command.ticket_id,
            lambda t: t.cancel(command.reason, command.cancelled_by, command.traceparent),
        )

    def events(self, ticket_id: UUID) -> list[str]:
        """The topics of the events the ticket recorded, in order."""
        return list(self._events.get(ticket_id, []))

    # -- internals --------------------------------------------------------------------------

    def _ticket(self, ticket_id: UUID) -> Ticket:
        try:
            return self.tickets[ticket_id]
        except KeyError:
            raise TicketNotFound(f"ticket {ticket_id} not found") from None

    def _run(
        self, command: object, ticket_id: UUID, decide: Callable[[Ticket], None]
    ) -> CommandResult:
        self.commands.append(command)
        ticket = self._ticket(ticket_id)
        decide(ticket)
        return CommandResult(ticket_id, self.position, self._collect(ticket))

    def _collect(self, ticket: Ticket) -> int:
        events = ticket.collect_events()
        self._events.setdefault(ticket.id, []).extend(type(e).TOPIC for e in events)  # type: ignore[attr-defined]
        self.position += len(events)
        return len(events)


def _conforms(real: ServiceWriteSide, fake: InMemoryWriteSide) -> tuple[WriteSide, WriteSide]:
    return real, fake  # both implement the port (checked by mypy)
