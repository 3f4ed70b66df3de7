"""Read-model logic without a database: reports, Markdown, and the operations each event becomes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from projections import (
    ReadModelWriter,
    ReportSource,
    Statement,
    SubtaskOutcome,
    WriteReport,
    build_report,
    render_markdown,
)
from projections.report import final_subtask
from projections.writer import without_overwritten_writes
from streams import contract
from streams.contract.eventlog import RecordedEvent, UnknownEventTopic
from tests.support import small_pipeline

TICKET = uuid.UUID("6f1c0000-0000-4000-8000-000000000001")
AT = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
SHA = "a" * 64


def outcome(subtask_id: str, output: dict[str, Any] | None, *deps: str) -> SubtaskOutcome:
    return SubtaskOutcome(subtask_id, subtask_id.replace("_", " ").title(), deps, output)


def review(**overrides: Any) -> ReportSource:
    values: dict[str, Any] = {
        "ticket_id": TICKET,
        "tenant": "acme",
        "pipeline_name": "document-review",
        "pipeline_version": 2,
        "documents": [{"role": "main", "filename": "paper.pdf"}],
        "completed_at": AT,
        "subtasks": [
            outcome("summary", {"summary": "A study of bees."}),
            outcome("structure", {"sections": ["Introduction", "Methods"], "complete": True}),
            outcome(
                "verdict",
                {"verdict": "accept", "score": 91, "rationale": "Sound."},
                "summary",
                "structure",
            ),
        ],
    }
    return ReportSource(**(values | overrides))


def recorded(payload: contract.EventPayload, position: int = 7, version: int = 3) -> RecordedEvent:
    state = payload.model_dump(mode="json", exclude={"ticket_id"})
    return RecordedEvent(
        position=position,
        aggregate_id=payload.ticket_id,
        version=version,
        topic=contract.event_type_of(payload).topic,
        state={**state, "timestamp": AT.isoformat(), "traceparent": None},
    )


def created() -> contract.TicketCreated:
    pipeline = contract.PipelineDefinition.model_validate(small_pipeline())
    document = contract.DocumentRef(
        role="main", sha256=SHA, filename="a.pdf", media_type="application/pdf", size=10
    )
    return contract.TicketCreated(
        ticket_id=TICKET,
        tenant="acme",
        owner="alice",
        documents=(document,),
        pipeline=pipeline,
        prompt_hashes=pipeline.prompt_hashes,
    )


def completed(*, ignored: bool = False) -> contract.SubtaskCompleted:
    return contract.SubtaskCompleted(
        ticket_id=TICKET,
        tenant="acme",
        subtask_id="b",
        attempt=2,
        output={"x": "done"},
        model="m",
        usage=contract.TokenUsage(prompt_tokens=5, completion_tokens=2, cached_tokens=1),
        latency_ms=3.5,
        ignored=ignored,
    )


def statements(operations: list[Any]) -> list[Statement]:
    return [operation for operation in operations if isinstance(operation, Statement)]


# -- reports -----------------------------------------------------------------------------------


def test_the_verdict_is_the_output_of_the_last_subtask_nothing_depends_on() -> None:
    subtasks = [outcome("a", {}), outcome("b", {}, "a"), outcome("c", {}, "a"), outcome("d", {})]
    assert final_subtask(subtasks).subtask_id == "d"
    assert final_subtask(subtasks[:3]).subtask_id == "c"


def test_a_report_keys_every_output_by_subtask_with_its_title() -> None:
    report = build_report(review())
    assert report.final_subtask_id == "verdict"
    assert report.verdict == {"verdict": "accept", "score": 91, "rationale": "Sound."}
    assert list(report.outputs) == ["summary", "structure", "verdict"]
    assert report.outputs["summary"] == {
        "title": "Summary",
        "output": {"summary": "A study of bees."},
        "output_sha256": None,
    }


def test_the_markdown_report_has_a_title_the_pipeline_and_the_verdict_first() -> None:
    markdown = render_markdown(review())
    lines = markdown.splitlines()
    assert lines[0] == "# Document review: paper.pdf (main)"
    assert "- **Pipeline:** document-review v2" in lines
    assert f"- **Ticket:** `{TICKET}`" in lines
    assert "- **Completed:** 2025-03-04 05:06:07 UTC" in lines
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == ["## Verdict", "## Summary", "## Structure"]
    assert markdown.endswith("\n")


def test_outputs_render_as_key_value_lines_and_lists() -> None:
    markdown = render_markdown(review())
    assert "- **Score:** 91\n- **Rationale:** Sound." in markdown
    assert "- **Sections:**\n  - Introduction\n  - Methods\n- **Complete:** yes" in markdown


def test_claims_that_could_not_be_verified_are_named_plainly_after_the_answer() -> None:
    output = {
        "unverified": ["summary: the number(s) 45 are not in the document"],
        "summary": "Costs fell by 45 percent.",
    }
    markdown = render_markdown(review(subtasks=[outcome("summary", output)]))
    assert (
        "- **Summary:** Costs fell by 45 percent.\n"
        "- **Not verified against the document:**\n"
        "  - summary: the number(s) 45 are not in the document\n"
    ) in markdown
    assert "Unverified" not in markdown


def test_nested_objects_and_lists_of_objects_stay_readable() -> None:
    output = {
        "criteria": [{"name": "Python", "score": 80}, {"name": "Go", "tags": ["a"]}],
        "details": {"years": 3, "remote": False, "notes": None, "links": []},
    }
    markdown = render_markdown(review(subtasks=[outcome("screening", output)]))
    assert (
        "- **Criteria:**\n"
        "  - **Name:** Python · **Score:** 80\n"
        "  - Item 2\n"
        "    - **Name:** Go\n"
        "    - **Tags:**\n"
        "      - a\n"
        "- **Details:**\n"
        "  - **Years:** 3\n"
        "  - **Remote:** no\n"
        "  - **Notes:** —\n"
        "  - **Links:** (none)\n"
    ) in markdown


def test_text_from_a_document_cannot_inject_markup_or_break_out_of_its_bullet() -> None:
    output = {"summary": "Intro <script>alert(1)</script>\n# Not a heading\n1. not a list"}
    markdown = render_markdown(review(subtasks=[outcome("summary", output)]))
    assert "<script>" not in markdown
    assert (
        "- **Summary:** Intro &lt;script&gt;alert(1)&lt;/script&gt;\n"
        "  \\# Not a heading\n"
        "  1\\. not a list\n"
    ) in markdown


def test_an_output_stored_as_a_blob_is_named_by_its_hash() -> None:
    blob = SubtaskOutcome("summary", "Summary", (), None, SHA)
    markdown = render_markdown(review(subtasks=[blob]))
    assert f"_The output is stored separately (sha256 `{SHA}`)._" in markdown


# -- event → operations ------------------------------------------------------------------------


def test_a_created_ticket_inserts_its_row_counts_and_one_row_per_subtask() -> None:
    ticket, subtasks = statements(ReadModelWriter().operations(recorded(created())))
    assert '"public".rm_tickets' in ticket.sql
    assert "ON CONFLICT (ticket_id) DO NOTHING" in ticket.sql
    assert ticket.args[:6] == (TICKET, "acme", "alice", "tiny", 1, 4)
    assert ticket.args[7:] == (AT, 7, 3)
    assert "ON CONFLICT (ticket_id, subtask_id) DO NOTHING" in subtasks.sql
    assert '"subtask_id": "d"' in subtasks.args[-1]


def test_every_update_is_guarded_by_the_position_of_the_row_it_changes() -> None:
    writer = ReadModelWriter()
    events = [
        contract.DocumentIngested(
            ticket_id=TICKET,
            tenant="acme",
            documents=(contract.IngestedDocument(role="main", sha256=SHA, characters=1, chunks=1),),
        ),
        contract.SubtaskReady(ticket_id=TICKET, tenant="acme", subtask_id="a", attempt=1),
        contract.SubtaskStarted(
            ticket_id=TICKET, tenant="acme", subtask_id="a", attempt=1, worker="w"
        ),
        completed(),
        completed(ignored=True),
        contract.SubtaskFailed(
            ticket_id=TICKET,
            tenant="acme",
            subtask_id="a",
            attempt=1,
            reason="r",
            retryable=True,
            will_retry=True,
        ),
        contract.TicketCompleted(ticket_id=TICKET, tenant="acme", subtasks=4),
        contract.TicketFailed(ticket_id=TICKET, tenant="acme", reason="r"),
        contract.TicketCancelled(ticket_id=TICKET, tenant="acme", reason="r", cancelled_by="b"),
    ]
    for payload in events:
        for statement in statements(writer.operations(recorded(payload))):
            assert statement.sql.startswith("UPDATE ")
            assert "last_position < $" in statement.sql, statement.sql


def test_a_completion_counts_towards_the_ticket() -> None:
    subtask, ticket = statements(ReadModelWriter().operations(recorded(completed())))
    assert "status = 'completed'" in subtask.sql
    assert subtask.args[:2] == (TICKET, "b")
    assert "subtasks_completed = subtasks_completed + 1" in ticket.sql
    assert "updated_at" in ticket.sql


def test_a_completion_after_the_ticket_ended_is_recorded_on_the_subtask_only() -> None:
    subtask, ticket = statements(ReadModelWriter().operations(recorded(completed(ignored=True))))
    assert subtask.args[-1] is True  # the `ignored` column
    assert "subtasks_completed" not in ticket.sql
    assert "updated_at" not in ticket.sql
    assert "status" not in ticket.sql


def test_a_completed_ticket_moves_its_count_then_writes_its_report() -> None:
    payload = contract.TicketCompleted(ticket_id=TICKET, tenant="acme", subtasks=4)
    counts, ticket, report = ReadModelWriter().operations(recorded(payload, position=42))
    assert isinstance(counts, Statement)
    assert "rm_tenant_counts" in counts.sql
    assert counts.args[2] == "completed"
    assert isinstance(ticket, Statement)
    assert "completed_at = $4" in ticket.sql
    assert report == WriteReport(TICKET, AT, 42)


def test_a_rebuild_writes_into_the_tables_of_its_own_schema() -> None:
    writer = ReadModelWriter("rm_build_1a2b")
    for statement in statements(writer.operations(recorded(created()))):
        assert '"public"' not in statement.sql
        assert '"rm_build_1a2b".rm_' in statement.sql


def test_an_unknown_topic_is_refused() -> None:
    event = recorded(created())
    unknown = RecordedEvent(event.position, event.aggregate_id, 1, "ticketflow.nope.v1", {})
    with pytest.raises(UnknownEventTopic):
        ReadModelWriter().operations(unknown)


def test_a_batch_drops_the_writes_a_later_statement_of_the_ticket_makes_again() -> None:
    writer = ReadModelWriter()
    ready = contract.SubtaskReady(ticket_id=TICKET, tenant="acme", subtask_id="b", attempt=1)
    started = contract.SubtaskStarted(
        ticket_id=TICKET, tenant="acme", subtask_id="b", attempt=1, worker="w"
    )
    queue = [
        operation
        for position, payload in enumerate((ready, started, completed()), start=10)
        for operation in writer.operations(recorded(payload, position=position))
    ]
    kept = statements(without_overwritten_writes(queue))
    # The ready's writes are all made again; the start's `worker` is not, the completion's
    # ticket update stamps the ticket again.
    assert [(s.sql.split(" SET ")[0], s.args[2]) for s in kept] == [
        ('UPDATE "public".rm_subtasks', 11),
        ('UPDATE "public".rm_subtasks', 12),
        ('UPDATE "public".rm_tickets', 3),
    ]
    assert "subtasks_completed + 1" in kept[-1].sql
    assert kept[-1].args[1] == 12


def test_a_write_is_kept_where_something_after_it_is_not_made_again() -> None:
    writer = ReadModelWriter()
    ready = contract.SubtaskReady(ticket_id=TICKET, tenant="acme", subtask_id="b", attempt=3)
    started = contract.SubtaskStarted(
        ticket_id=TICKET, tenant="acme", subtask_id="b", attempt=1, worker="w"
    )
    assert completed().attempt == 2
    queue = [
        *writer.operations(recorded(ready, position=10)),
        *writer.operations(recorded(started, position=11)),
        *writer.operations(recorded(completed(ignored=True), position=12)),
    ]
    kept = statements(without_overwritten_writes(queue))
    # The ready names a greater attempt than anything after it: kept (its touch is not). The
    # start's `worker` is not set again, nor is the time its touch sets by the position-only
    # statement of the late completion: both kept.
    assert kept == [s for s in statements(queue) if not ("rm_tickets" in s.sql and s.args[1] == 10)]
    assert len(kept) == 5


def test_no_write_is_dropped_for_one_made_again_after_a_report() -> None:
    writer = ReadModelWriter()
    finished = contract.TicketCompleted(ticket_id=TICKET, tenant="acme", subtasks=4)
    late = completed(ignored=True)
    queue = [
        *writer.operations(recorded(completed(), position=10)),
        *writer.operations(recorded(finished, position=11)),
        *writer.operations(recorded(late, position=12)),
    ]
    assert without_overwritten_writes(queue) == queue


def test_every_subtask_write_names_the_columns_it_sets() -> None:
    writer = ReadModelWriter()
    for payload in (
        contract.SubtaskReady(ticket_id=TICKET, tenant="acme", subtask_id="b", attempt=3),
        completed(),
    ):
        subtask = statements(writer.operations(recorded(payload)))[0]
        assert subtask.writes is not None
        assigned = subtask.sql.split(" SET ", 1)[1].split(" WHERE ")[0]
        for column in subtask.writes.columns:
            assert f"{column} = " in assigned
        assert len(subtask.writes.columns) == assigned.count(" = ")
        assert subtask.writes.attempt == payload.attempt
