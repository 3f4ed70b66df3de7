"""The event contract: stable topics, payload schemas and subjects."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import ValidationError

from commands.documents import Document
from commands.ticket import Ticket
from identity.users import Tenant, User
from inference.pipelines import pipeline_definition, pipeline_names
from streams import contract
from streams.contract.eventlog import decode_state
from streams.contract.subjects import tenant_filter, ticket_subject
from tests.support import small_pipeline

AGGREGATE_EVENTS = [
    Ticket.Created,
    Ticket.DocumentIngested,
    Ticket.SubtaskReady,
    Ticket.SubtaskStarted,
    Ticket.SubtaskCompleted,
    Ticket.SubtaskCompletedV1,
    Ticket.SubtaskFailed,
    Ticket.SubtaskRetried,
    Ticket.Completed,
    Ticket.Failed,
    Ticket.Cancelled,
    Ticket.RerunRequested,
    Ticket.QuestionAsked,
    Ticket.QuestionAnswered,
    Ticket.QuestionFailed,
    User.Created,
    User.CreatedV1,
    User.RoleGranted,
    User.RoleRevoked,
    User.PasswordChanged,
    User.Deactivated,
    User.Erased,
    Tenant.Created,
    Tenant.RetentionSet,
    Document.Created,
]
ENVELOPE = {"originator_id", "originator_version", "timestamp", "traceparent", "originator_topic"}


def test_every_topic_is_versioned_and_unique() -> None:
    topics = [t.topic for t in contract.EVENT_TYPES]
    assert len(set(topics)) == len(topics)
    assert all(
        t.startswith(f"ticketflow.{event_type.aggregate}.") and t[-3:-1] == ".v"
        for event_type in contract.EVENT_TYPES
        for t in [event_type.topic]
    )


@pytest.mark.parametrize("event_class", AGGREGATE_EVENTS, ids=lambda c: c.__name__)
def test_each_aggregate_event_stores_exactly_its_contract_payload(event_class: Any) -> None:
    event_type = contract.BY_TOPIC[event_class.TOPIC]
    stored = {f.name for f in dataclasses.fields(event_class)} - ENVELOPE
    published = set(event_type.payload.model_fields) - {event_type.id_field}
    assert stored == published | event_type.private_fields
    assert not published & event_type.private_fields


def test_every_contract_event_has_an_aggregate_event() -> None:
    topics = {c.TOPIC for c in AGGREGATE_EVENTS}
    assert topics == set(contract.BY_TOPIC)


def test_json_schemas_cover_every_topic() -> None:
    schemas = contract.json_schemas()
    assert set(schemas) == set(contract.BY_TOPIC)
    assert schemas["ticketflow.ticket.created.v1"]["properties"]["pipeline"]


def test_a_subject_names_tenant_aggregate_id_and_event() -> None:
    subject = ticket_subject("acme", "6f1c", "subtask_completed")
    assert subject == "tf.evt.acme.ticket.6f1c.subtask_completed"


@pytest.mark.parametrize("tenant", ["", "ACME", "a.b", "a>b", "x" * 64, "a b"])
def test_a_tenant_that_would_break_subjects_is_refused(tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        tenant_filter(tenant)


def test_a_pipeline_with_a_cycle_is_refused() -> None:
    pipeline = small_pipeline()
    pipeline["subtasks"][0]["depends_on"] = ["d"]
    with pytest.raises(ValidationError, match="cycle"):
        contract.PipelineDefinition.model_validate(pipeline)


def test_a_pipeline_with_an_unknown_dependency_is_refused() -> None:
    pipeline = small_pipeline()
    pipeline["subtasks"][1]["depends_on"] = ["ghost"]
    with pytest.raises(ValidationError, match="unknown"):
        contract.PipelineDefinition.model_validate(pipeline)


def test_a_pipeline_with_duplicate_subtask_ids_is_refused() -> None:
    pipeline = small_pipeline()
    pipeline["subtasks"][1]["id"] = "a"
    with pytest.raises(ValidationError, match="duplicate"):
        contract.PipelineDefinition.model_validate(pipeline)


@pytest.mark.parametrize("name", pipeline_names())
def test_every_shipped_pipeline_is_a_valid_definition(name: str) -> None:
    contract.PipelineDefinition.model_validate(pipeline_definition(name))


def test_document_review_ends_in_a_verdict_that_depends_on_every_other_subtask() -> None:
    review = contract.PipelineDefinition.model_validate(pipeline_definition("document-review"))
    verdict = review.subtask("verdict")
    others = {s.id for s in review.subtasks} - {"verdict"}
    assert len(others) >= 4
    assert set(verdict.depends_on) == others


def test_prompt_hashes_change_when_an_instruction_changes() -> None:
    first = contract.PipelineDefinition.model_validate(small_pipeline())
    changed = small_pipeline()
    changed["subtasks"][0]["instruction"] = "do something else"
    second = contract.PipelineDefinition.model_validate(changed)
    assert first.prompt_hashes["a"] != second.prompt_hashes["a"]
    assert first.prompt_hashes["b"] == second.prompt_hashes["b"]


def test_decoding_a_stored_state_unwraps_library_transcodings() -> None:
    raw = (
        b'{"timestamp": {"_type_": "datetime_iso", "_data_": "2026-01-01T00:00:00+00:00"},'
        b' "tenant": "acme", "nested": [{"_type_": "uuid_hex", "_data_": "ab"}]}'
    )
    assert decode_state(raw) == {
        "timestamp": "2026-01-01T00:00:00+00:00",
        "tenant": "acme",
        "nested": ["ab"],
    }
