"""Domain errors. Entry points map them to HTTP status codes; nothing else catches them."""

from __future__ import annotations


class DomainError(Exception):
    """A command that the current state does not allow."""

    code = "domain_error"


class TicketNotFound(DomainError):
    code = "ticket_not_found"


class UnknownPipeline(DomainError):
    code = "unknown_pipeline"


class UnknownSubtask(DomainError):
    code = "unknown_subtask"


class InvalidTransition(DomainError):
    """The ticket or subtask is not in a state that allows the command."""

    code = "invalid_transition"


class TicketAlreadyFinished(InvalidTransition):
    code = "ticket_already_finished"


class IdempotencyConflict(DomainError):
    """An idempotency key reused for a different request."""

    code = "idempotency_conflict"


class InvalidDocument(DomainError):
    """An upload that is not a document ticketflow accepts."""

    code = "invalid_document"

    def __init__(self, message: str, *, code: str = "invalid_document", status: int = 422):
        super().__init__(message)
        self.code = code
        self.status = status


class InvalidOptions(DomainError):
    """A ticket's options that do not match its pipeline's `options_schema`.

    `option` names the offending option when there is one.
    """

    code = "invalid_options"

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class ConcurrencyConflict(DomainError):
    """Optimistic concurrency kept failing after every retry."""

    code = "concurrency_conflict"


class QuestionRefused(InvalidTransition):
    """A follow-up question the ticket cannot take now (`code` says why)."""

    code = "question_refused"

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code
