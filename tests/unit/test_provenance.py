"""Provenance on SubtaskCompleted v2, the v1 upcaster, explanations and report diffs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from commands.ticket import Ticket
from handlers.inference import prompt_text, provenance_of
from inference.backends import Generation, GenerationRequest
from read_api.explain import InvalidAsOf, diff_reports, explain, parse_as_of
from streams import contract
from streams.contract.eventlog import RecordedEvent
from tests.support import small_pipeline

OUTPUT = {"x": "ok"}


def opened() -> Ticket:
    document = contract.DocumentRef(
        role="main", sha256="a" * 64, filename="p.pdf", media_type="application/pdf", size=3
    )
    pipeline = contract.PipelineDefinition.model_validate(small_pipeline())
    created = contract.TicketCreated(
        ticket_id=uuid.uuid4(),
        tenant="acme",
        owner="alice",
        documents=(document,),
        pipeline=pipeline,
        prompt_hashes=pipeline.prompt_hashes,
    )
    ticket = Ticket.open(created.ticket_id, created, None)
    ingested = contract.IngestedDocument(role="main", sha256="a" * 64, characters=10, chunks=1)
    ticket.record_ingestion([ingested], None)
    return ticket


def provenance(output: dict[str, Any] = OUTPUT) -> tuple[contract.Provenance, str]:
    request = GenerationRequest(({"role": "user", "content": "do a"},), {}, 24, 0.3)
    generation = Generation(
        "{}", "m", 5, 2, 1, 10.0, backend="llama-cpp", model_sha256="b" * 64,
        sampling={"temperature": 0.3, "max_tokens": 24}, seed=0,
    )  # fmt: skip
    return provenance_of(request, generation, output)


def test_the_prompt_and_output_hashes_are_of_their_canonical_bytes() -> None:
    recorded, prompt = provenance()
    assert prompt == '[{"content":"do a","role":"user"}]'
    assert recorded.prompt_sha256 == contract.sha256_of(prompt.encode())
    assert recorded.output_sha256 == contract.sha256_of(b'{"x":"ok"}')
    assert recorded.model_sha256 == "b" * 64
    assert recorded.seed == 0
    request = GenerationRequest(({"role": "user", "content": "do a"},), {"type": "object"}, 1)
    assert prompt_text(request) == prompt


def test_the_aggregate_records_v2_with_provenance_and_refuses_a_wrong_output_hash() -> None:
    ticket = opened()
    recorded, _ = provenance()
    usage = contract.TokenUsage(prompt_tokens=5)
    with pytest.raises(ValueError, match="output's sha256"):
        ticket.complete_subtask("a", 1, {"x": "other"}, "m", usage, 1.0, None, provenance=recorded)
    ticket.complete_subtask("a", 1, OUTPUT, "m", usage, 1.0, None, provenance=recorded)
    event = next(e for e in ticket.pending_events if isinstance(e, Ticket.SubtaskCompleted))
    assert type(event).TOPIC == "ticketflow.ticket.subtask_completed.v2"
    assert event.provenance == recorded.model_dump(mode="json")


def test_a_v1_payload_upcasts_to_v2_without_provenance() -> None:
    v1 = contract.SubtaskCompleted(
        ticket_id=uuid.uuid4(), tenant="acme", subtask_id="a", attempt=1, output=OUTPUT,
        model="m", usage=contract.TokenUsage(), latency_ms=1.0,
    )  # fmt: skip
    v2 = contract.upcast(v1)
    assert isinstance(v2, contract.SubtaskCompletedV2)
    assert v2.provenance is None
    assert v2.model_dump(exclude={"provenance"}) == v1.model_dump()
    assert contract.upcast(v2) is v2


def recorded_events(ticket: Ticket) -> list[RecordedEvent]:
    events = []
    for position, event in enumerate(ticket.collect_events(), start=1):
        state = {k: v for k, v in event.__dict__.items() if k not in {"originator_id"}}
        state["timestamp"] = datetime.now(UTC).isoformat()
        state.pop("originator_version", None)
        events.append(
            RecordedEvent(position, ticket.id, event.originator_version, type(event).TOPIC, state)  # type: ignore[attr-defined]
        )
    return events


def test_explain_names_subtask_positions_prompt_model_and_dependencies() -> None:
    ticket = opened()
    usage = contract.TokenUsage()
    hashes = {}
    for sid in ("a", "b", "c", "d"):
        recorded, _ = provenance()
        hashes[sid] = recorded.prompt_sha256
        ticket.complete_subtask(sid, 1, OUTPUT, "m", usage, 1.0, None, provenance=recorded)
    events = recorded_events(ticket)
    explained = explain(events)
    assert explained.final_subtask_id == "d"
    by_id = {s.subtask_id: s for s in explained.subtasks}
    completions = {
        e.state["subtask_id"]: e.position for e in events if e.topic.endswith("completed.v2")
    }
    assert by_id["d"].completed_position == completions["d"]
    assert [d.subtask_id for d in by_id["d"].dependencies] == ["b", "c"]
    assert [d.position for d in by_id["d"].dependencies] == [completions["b"], completions["c"]]
    assert by_id["d"].prompt_sha256 == hashes["d"]
    fields = {f.field: f for f in explained.fields}
    assert fields["verdict.x"].subtask_id == "d"
    assert fields["outputs.b.x"].position == completions["b"]
    assert fields["outputs.b.x"].dependencies == ["a"]


def test_report_diffs_walk_objects_and_name_each_changed_field() -> None:
    a = {
        "verdict": {"verdict": "accept", "score": 3},
        "outputs": {"s": {"output": {"items": [1, 2], "note": {"k": "v"}}}},
    }
    b = {
        "verdict": {"verdict": "revise", "score": 3, "new": True},
        "outputs": {"s": {"output": {"items": [1, 2], "note": {}}}},
    }
    compared, changes = diff_reports(a, b)
    summary = {(c.field, c.change) for c in changes}
    assert summary == {
        ("verdict.verdict", "changed"),
        ("verdict.new", "added"),
        ("outputs.s.output.note.k", "removed"),
        ("outputs.s.output.note", "added"),
    }
    assert compared == 6
    assert diff_reports(a, a) == (4, [])


@pytest.mark.parametrize("value", ["nope", "2025-01-01T00:00:00", "", "1e3", "-1"])
def test_as_of_values_that_name_no_point(value: str) -> None:
    with pytest.raises(InvalidAsOf):
        parse_as_of(value)


def test_as_of_values_that_do() -> None:
    assert parse_as_of("42") == 42
    assert parse_as_of("2025-03-01T12:00:00Z") == datetime(2025, 3, 1, 12, tzinfo=UTC)
    assert parse_as_of("2025-03-01t12:00:00z") == datetime(2025, 3, 1, 12, tzinfo=UTC)
