"""Retrying a failed subtask of a failed ticket: the ticket re-opens, the subtask is ready again."""

from __future__ import annotations

import pytest

from commands.errors import InvalidTransition, UnknownSubtask
from commands.ticket import SubtaskStatus, Ticket, TicketStatus
from tests.support import small_pipeline
from tests.unit.test_ticket import complete, event_names, ingested


def failed_on(subtask_id: str = "a", *, max_attempts: int = 1) -> Ticket:
    ticket = ingested(small_pipeline(max_attempts=max_attempts))
    for done in {"b": ["a"], "c": ["a"], "d": ["a", "b", "c"]}.get(subtask_id, []):
        complete(ticket, done)
    attempt = ticket.subtasks[subtask_id].attempt
    ticket.fail_subtask(subtask_id, attempt, "output did not match the schema", True, None)
    assert ticket.status is TicketStatus.FAILED
    ticket.collect_events()
    return ticket


def test_retrying_re_opens_the_ticket_and_readies_the_subtask_for_one_more_attempt() -> None:
    ticket = failed_on("a")
    ticket.retry_subtask("a", "admin-1", None)
    events = ticket.collect_events()
    assert [type(e).__name__ for e in events] == ["SubtaskRetried", "SubtaskReady"]
    retried, ready = (vars(event) for event in events)
    assert (retried["subtask_id"], retried["attempt"], retried["retried_by"]) == ("a", 2, "admin-1")
    assert (ready["subtask_id"], ready["attempt"]) == ("a", 2)
    assert ticket.status is TicketStatus.RUNNING
    assert ticket.failure_reason is None
    assert ticket.subtasks["a"].status is SubtaskStatus.READY
    assert ticket.subtasks["a"].attempt == 2


def test_a_retried_subtask_can_complete_the_ticket() -> None:
    ticket = failed_on("a")
    ticket.retry_subtask("a", "admin-1", None)
    ticket.start_subtask("a", 2, "worker-1", None)
    for subtask_id in ("a", "b", "c", "d"):
        complete(ticket, subtask_id)
    assert ticket.status is TicketStatus.COMPLETED


def test_a_retried_subtask_that_fails_again_fails_the_ticket_again() -> None:
    ticket = failed_on("a")
    ticket.retry_subtask("a", "admin-1", None)
    ticket.fail_subtask("a", 2, "still invalid", True, None)
    assert ticket.status is TicketStatus.FAILED
    assert ticket.failure_reason == 'Step "A" failed after 2 attempts: still invalid'
    # ... and may be retried once more.
    ticket.retry_subtask("a", "admin-1", None)
    assert ticket.subtasks["a"].attempt == 3


def test_subtasks_in_flight_when_the_ticket_failed_are_readied_again() -> None:
    ticket = ingested(small_pipeline(max_attempts=1))
    complete(ticket, "a")  # b and c become ready
    ticket.fail_subtask("b", 1, "timeout", True, None)
    ticket.collect_events()
    assert ticket.subtasks["c"].status is SubtaskStatus.READY
    ticket.retry_subtask("b", "admin-1", None)
    assert event_names(ticket) == ["SubtaskRetried", "SubtaskReady", "SubtaskReady"]
    assert ticket.subtasks["b"].attempt == 2
    assert ticket.subtasks["c"].attempt == 2
    assert ticket.subtasks["c"].status is SubtaskStatus.READY


def test_only_a_failed_ticket_can_be_retried() -> None:
    running = ingested()
    with pytest.raises(InvalidTransition, match="only a failed ticket"):
        running.retry_subtask("a", "admin-1", None)
    cancelled = ingested()
    cancelled.cancel("no longer needed", "alice", None)
    with pytest.raises(InvalidTransition, match="is cancelled"):
        cancelled.retry_subtask("a", "admin-1", None)
    completed = ingested()
    for subtask_id in ("a", "b", "c", "d"):
        complete(completed, subtask_id)
    with pytest.raises(InvalidTransition):
        completed.retry_subtask("a", "admin-1", None)


def test_only_the_failed_subtask_can_be_retried() -> None:
    ticket = failed_on("a")
    with pytest.raises(InvalidTransition, match="only a failed subtask"):
        ticket.retry_subtask("b", "admin-1", None)
    with pytest.raises(UnknownSubtask):
        ticket.retry_subtask("nope", "admin-1", None)
    assert event_names(ticket) == []
    assert ticket.status is TicketStatus.FAILED


def test_a_ticket_failed_outside_its_subtasks_cannot_be_retried() -> None:
    ticket = ingested()
    ticket.fail("the document could not be read", None)
    with pytest.raises(InvalidTransition, match="only a failed subtask"):
        ticket.retry_subtask("a", "admin-1", None)
