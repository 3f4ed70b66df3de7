"""The Ticket aggregate's state machine, decided without any infrastructure."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from commands.errors import InvalidTransition, TicketAlreadyFinished, UnknownSubtask
from commands.ticket import SubtaskStatus, Ticket, TicketStatus
from streams import contract
from tests.support import small_pipeline

SHA = "a" * 64
NO_USAGE = contract.TokenUsage()


def open_ticket(pipeline: dict[str, Any] | None = None) -> Ticket:
    definition = contract.PipelineDefinition.model_validate(pipeline or small_pipeline())
    created = contract.TicketCreated(
        ticket_id=uuid.uuid4(),
        tenant="acme",
        owner="alice",
        documents=(
            contract.DocumentRef(
                role="main", sha256=SHA, filename="a.pdf", media_type="application/pdf", size=10
            ),
        ),
        pipeline=definition,
        prompt_hashes=definition.prompt_hashes,
    )
    return Ticket.open(created.ticket_id, created, None)


def ingested(pipeline: dict[str, Any] | None = None) -> Ticket:
    ticket = open_ticket(pipeline)
    ticket.record_ingestion(
        [contract.IngestedDocument(role="main", sha256=SHA, characters=10, chunks=1)], None
    )
    return ticket


def complete(ticket: Ticket, subtask_id: str) -> None:
    attempt = max(ticket.subtasks[subtask_id].attempt, 1)
    ticket.complete_subtask(subtask_id, attempt, {"x": subtask_id}, "m", NO_USAGE, 1.0, None)


def event_names(ticket: Ticket) -> list[str]:
    return [type(event).__name__ for event in ticket.collect_events()]


def test_a_new_ticket_waits_for_ingestion() -> None:
    ticket = open_ticket()
    assert ticket.status is TicketStatus.PENDING
    assert all(s.status is SubtaskStatus.PENDING for s in ticket.subtasks.values())


def test_ingestion_makes_only_the_root_subtasks_ready() -> None:
    ticket = open_ticket()
    ticket.collect_events()
    ticket.record_ingestion(
        [contract.IngestedDocument(role="main", sha256=SHA, characters=1, chunks=1)], None
    )
    assert event_names(ticket) == ["DocumentIngested", "SubtaskReady"]
    assert ticket.subtasks["a"].status is SubtaskStatus.READY
    assert ticket.subtasks["b"].status is SubtaskStatus.PENDING


def test_recording_ingestion_twice_changes_nothing() -> None:
    ticket = ingested()
    ticket.collect_events()
    ticket.record_ingestion(
        [contract.IngestedDocument(role="main", sha256=SHA, characters=1, chunks=1)], None
    )
    assert event_names(ticket) == []


def test_completing_a_subtask_readies_what_it_unblocks() -> None:
    ticket = ingested()
    ticket.collect_events()
    complete(ticket, "a")
    assert event_names(ticket) == ["SubtaskCompleted", "SubtaskReady", "SubtaskReady"]
    assert ticket.subtasks["d"].status is SubtaskStatus.PENDING


def test_the_last_completion_completes_the_ticket() -> None:
    ticket = ingested()
    for subtask_id in ("a", "b", "c"):
        complete(ticket, subtask_id)
    ticket.collect_events()
    complete(ticket, "d")
    assert event_names(ticket) == ["SubtaskCompleted", "Completed"]
    assert ticket.status is TicketStatus.COMPLETED


def test_completing_a_completed_subtask_changes_nothing() -> None:
    ticket = ingested()
    complete(ticket, "a")
    ticket.collect_events()
    complete(ticket, "a")
    assert event_names(ticket) == []


def test_completing_a_subtask_before_its_dependencies_is_refused() -> None:
    ticket = ingested()
    with pytest.raises(InvalidTransition):
        complete(ticket, "d")


def test_completing_an_unknown_subtask_is_refused() -> None:
    ticket = ingested()
    with pytest.raises(UnknownSubtask):
        ticket.complete_subtask("nope", 1, {}, "m", NO_USAGE, 1.0, None)


def test_completing_before_ingestion_is_refused() -> None:
    ticket = open_ticket()
    with pytest.raises(InvalidTransition):
        complete(ticket, "a")


def test_a_retryable_failure_makes_the_subtask_ready_again() -> None:
    ticket = ingested()
    ticket.collect_events()
    ticket.fail_subtask("a", 1, "invalid JSON", retryable=True, traceparent=None)
    events = ticket.collect_events()
    assert [type(e).__name__ for e in events] == ["SubtaskFailed", "SubtaskReady"]
    assert ticket.subtasks["a"].attempt == 2
    assert ticket.subtasks["a"].status is SubtaskStatus.READY


def test_failures_past_the_attempt_limit_fail_the_ticket_with_a_readable_reason() -> None:
    ticket = ingested(small_pipeline(max_attempts=2))
    ticket.fail_subtask("a", 1, "output did not match the schema", True, None)
    ticket.fail_subtask("a", 2, "output did not match the schema", True, None)
    assert ticket.status is TicketStatus.FAILED
    assert ticket.failure_reason == (
        'Step "A" failed after 2 attempts: output did not match the schema'
    )


def test_a_non_retryable_failure_fails_the_ticket_at_once() -> None:
    ticket = ingested()
    ticket.fail_subtask("a", 1, "model refused", retryable=False, traceparent=None)
    assert ticket.status is TicketStatus.FAILED


def test_a_repeated_failure_report_for_the_same_attempt_changes_nothing() -> None:
    ticket = ingested()
    ticket.fail_subtask("a", 1, "timeout", True, None)
    ticket.collect_events()
    ticket.fail_subtask("a", 1, "timeout", True, None)
    assert event_names(ticket) == []


def test_a_result_for_a_cancelled_ticket_is_recorded_and_ignored() -> None:
    ticket = ingested()
    ticket.cancel("no longer needed", "alice", None)
    ticket.collect_events()
    complete(ticket, "a")
    events = ticket.collect_events()
    assert [type(e).__name__ for e in events] == ["SubtaskCompleted"]
    assert events[0].ignored is True  # type: ignore[attr-defined]
    assert ticket.status is TicketStatus.CANCELLED


def test_cancelling_twice_changes_nothing() -> None:
    ticket = ingested()
    ticket.cancel("stop", "alice", None)
    ticket.collect_events()
    ticket.cancel("stop", "alice", None)
    assert event_names(ticket) == []


def test_cancelling_a_completed_ticket_is_refused() -> None:
    ticket = ingested()
    for subtask_id in ("a", "b", "c", "d"):
        complete(ticket, subtask_id)
    with pytest.raises(TicketAlreadyFinished):
        ticket.cancel("too late", "alice", None)


def test_starting_a_subtask_twice_records_one_start() -> None:
    ticket = ingested()
    ticket.collect_events()
    ticket.start_subtask("a", 1, "worker-1", None)
    ticket.start_subtask("a", 1, "worker-1", None)
    assert event_names(ticket) == ["SubtaskStarted"]


def test_starting_a_pending_subtask_is_refused() -> None:
    ticket = ingested()
    with pytest.raises(InvalidTransition):
        ticket.start_subtask("d", 1, "worker-1", None)


def test_every_event_carries_the_commands_traceparent() -> None:
    ticket = open_ticket()
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ticket.record_ingestion(
        [contract.IngestedDocument(role="main", sha256=SHA, characters=1, chunks=1)], trace
    )
    events = ticket.collect_events()[1:]
    assert events
    assert {e.traceparent for e in events} == {trace}  # type: ignore[attr-defined]


@st.composite
def dags(draw: st.DrawFn) -> dict[str, Any]:
    """Random DAGs: each subtask may depend on any earlier one."""
    size = draw(st.integers(min_value=1, max_value=8))
    subtasks = []
    for index in range(size):
        earlier = [f"s{i}" for i in range(index)]
        deps = draw(st.lists(st.sampled_from(earlier), unique=True)) if earlier else []
        subtasks.append(
            {
                "id": f"s{index}",
                "title": f"S{index}",
                "instruction": "do",
                "depends_on": deps,
                "output_schema": {},
            }
        )
    return {"name": "random", "version": 1, "system_prompt": "s", "subtasks": subtasks}


@settings(max_examples=150, deadline=None)
@given(pipeline=dags(), data=st.data())
def test_every_completion_order_completes_the_ticket_exactly_once(
    pipeline: dict[str, Any], data: st.DataObject
) -> None:
    ticket = ingested(pipeline)
    completed_before: dict[str, set[str]] = {}
    completed: set[str] = set()
    while ticket.status is TicketStatus.RUNNING:
        ready = sorted(
            sid
            for sid, s in ticket.subtasks.items()
            if s.status in (SubtaskStatus.READY, SubtaskStatus.RUNNING)
        )
        assert ready, "a running ticket always has something ready"
        choice = data.draw(st.sampled_from(ready))
        action = data.draw(st.sampled_from(["complete", "complete", "duplicate", "retry"]))
        if action == "retry" and ticket.subtasks[choice].attempt < 3:
            ticket.fail_subtask(choice, ticket.subtasks[choice].attempt, "flaky", True, None)
            continue
        completed_before[choice] = set(completed)
        complete(ticket, choice)
        completed.add(choice)
        if action == "duplicate":
            complete(ticket, choice)
    events = ticket.collect_events()
    names = [type(e).__name__ for e in events]
    assert names.count("Completed") == 1
    assert names[-1] == "Completed"
    assert names.count("SubtaskCompleted") == len(pipeline["subtasks"])
    for subtask in pipeline["subtasks"]:
        assert set(subtask["depends_on"]) <= completed_before[subtask["id"]]
