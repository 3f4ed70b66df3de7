"""The AsyncAPI document: generated from the contract, true to what the relay sends."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from streams import contract
from streams.contract import asyncapi
from streams.contract.asyncapi import (
    HEADERS,
    Header,
    asyncapi_document,
    asyncapi_json,
    channels,
    headers_schema,
    released_document_path,
)
from streams.contract.eventlog import RecordedEvent
from streams.contract.identity import TENANT_PATTERN
from streams.contract.subjects import event_subject
from streams.relay import message_for
from ticketflow.cli import app

TICKET_ID = uuid.UUID("6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BASELINE = released_document_path("0.1.0")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return asyncapi_document()


def validator(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    """A validator for `schema` whose `#/components/...` references resolve in `document`."""
    return jsonschema.Draft7Validator(
        {**schema, "components": document["components"]},
        format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER,
    )


def test_every_event_type_is_a_message_with_its_topic_and_payload(
    document: dict[str, Any],
) -> None:
    messages = document["components"]["messages"]
    assert set(messages) == set(contract.BY_TOPIC)
    for event_type in contract.EVENT_TYPES:
        message = messages[event_type.topic]
        assert message["headers"]["properties"]["ce-type"]["const"] == event_type.topic
        ref = message["payload"]["$ref"]
        name = ref.rsplit("/", 1)[1]
        schema = document["components"]["schemas"][name]
        assert set(schema["properties"]) == set(event_type.payload.model_fields)
        assert not set(schema["properties"]) & event_type.private_fields


def test_every_subject_pattern_is_a_channel_with_its_parameters(
    document: dict[str, Any],
) -> None:
    for event_type in contract.EVENT_TYPES:
        [channel] = [
            ch for ch in document["channels"].values() if event_type.topic in ch["messages"]
        ]
        address = channel["address"]
        assert set(channel["parameters"]) == set(re.findall(r"{(\w+)}", address))
        filled = address.replace("{tenant}", "acme")
        filled = filled.replace(f"{{{event_type.id_field}}}", str(TICKET_ID))
        assert filled == event_subject("acme", event_type.aggregate, TICKET_ID, event_type.name)
    parameters = document["components"]["parameters"]
    assert parameters["tenant"]["x-pattern"] == TENANT_PATTERN
    assert parameters["ticket_id"]["location"] == "$message.payload#/ticket_id"


def test_each_channel_has_one_receive_operation_over_its_messages(
    document: dict[str, Any],
) -> None:
    operations = document["operations"]
    assert len(operations) == len(document["channels"])
    for channel in channels():
        operation = operations[channel.operation_id]
        assert operation["action"] == "receive"
        assert operation["channel"] == {"$ref": f"#/channels/{channel.id}"}
        assert len(operation["messages"]) == len(channel.event_types)


def test_the_stream_conventions_are_stated(document: dict[str, Any]) -> None:
    conventions = document["x-ticketflow"]
    assert conventions["stream"]["name"] == "TF_EVENTS"
    assert conventions["stream"]["duplicateWindow"] == "PT2M"
    assert conventions["ordering"]["header"] == "tf-position"
    assert conventions["deduplication"]["header"] == "ce-id"
    assert document["servers"]["nats"]["protocol"] == "nats"
    assert "never crash" in document["info"]["description"]


def test_the_headers_schema_is_built_from_the_one_list() -> None:
    event_type = contract.BY_TOPIC["ticketflow.ticket.completed.v1"]
    schema = headers_schema(event_type)
    assert list(schema["properties"]) == [header.name for header in HEADERS]
    assert "traceparent" not in schema["required"]
    assert {"ce-id", "ce-type", "Nats-Msg-Id", "tf-position", "tf-version"} <= set(
        schema["required"]
    )
    # A header added later (e.g. the hash chain's) is one more entry of the list.
    extended = headers_schema(
        event_type, [*HEADERS, Header("tf-hash", "Hash.", {"pattern": "^[0-9a-f]{64}$"})]
    )
    assert extended["properties"]["tf-hash"]["pattern"] == "^[0-9a-f]{64}$"
    assert "tf-hash" in extended["required"]


def recorded(topic: str, state: dict[str, Any], *, traceparent: str | None) -> RecordedEvent:
    envelope = {"timestamp": "2026-12-01T10:00:00.123456+00:00", "originator_topic": topic}
    if traceparent:
        envelope["traceparent"] = traceparent
    return RecordedEvent(42, TICKET_ID, 3, topic, {**state, **envelope})


EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("ticketflow.ticket.completed.v1", {"tenant": "acme", "subtasks": 5}),
    ("ticketflow.ticket.failed.v1", {"tenant": "acme", "reason": "no text", "subtask_id": None}),
    (
        "ticketflow.user.registered.v1",
        {
            "tenant": "acme",
            "email": "ada@acme.example",
            "roles": ["admin"],
            "registered_by": None,
            "password_hash": "$argon2id$secret",
        },
    ),
]


@pytest.mark.parametrize("traceparent", [TRACEPARENT, None])
@pytest.mark.parametrize(("topic", "state"), EXAMPLES, ids=[t for t, _ in EXAMPLES])
def test_what_the_relay_sends_matches_the_document(
    document: dict[str, Any], topic: str, state: dict[str, Any], traceparent: str | None
) -> None:
    event = recorded(topic, state, traceparent=traceparent)
    subject, body, headers = message_for(event)
    message = document["components"]["messages"][topic]

    validator(document, message["headers"]).validate(headers)
    validator(document, message["payload"]).validate(json.loads(body))
    channel = next(ch for ch in document["channels"].values() if topic in ch["messages"])
    pattern = re.escape(channel["address"]).replace(r"\{tenant\}", "acme")
    pattern = re.sub(r"\\\{\w+_id\\\}", str(TICKET_ID), pattern)
    assert re.fullmatch(pattern, subject)
    assert set(headers) <= set(message["headers"]["properties"])


def test_a_header_the_document_does_not_allow_is_refused(document: dict[str, Any]) -> None:
    event = recorded(*EXAMPLES[0], traceparent=TRACEPARENT)
    _, _, headers = message_for(event)
    message = document["components"]["messages"][EXAMPLES[0][0]]
    check = validator(document, message["headers"])
    for name, value in [
        ("ce-type", "ticketflow.ticket.failed.v1"),
        ("ce-id", "not-an-id"),
        ("tf-position", "0"),
        ("ce-specversion", "0.3"),
    ]:
        assert not check.is_valid({**headers, name: value}), name
    assert not check.is_valid({k: v for k, v in headers.items() if k != "ce-source"})


def test_payload_objects_accept_fields_added_later(document: dict[str, Any]) -> None:
    message = document["components"]["messages"]["ticketflow.ticket.completed.v1"]
    payload = {"ticket_id": str(TICKET_ID), "tenant": "acme", "subtasks": 2, "later": True}
    validator(document, message["payload"]).validate(payload)
    with pytest.raises(jsonschema.ValidationError):
        validator(document, message["payload"]).validate({**payload, "subtasks": "two"})


def test_the_document_is_the_same_every_time() -> None:
    assert asyncapi_json() == asyncapi_json()
    assert asyncapi.asyncapi_bytes() == asyncapi_json().encode()


def test_the_cli_prints_the_document() -> None:
    result = CliRunner().invoke(app, ["contract", "asyncapi"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == asyncapi_document()


def test_todays_contract_is_compatible_with_the_last_release() -> None:
    """What CI runs: `ticketflow contract check` against the released document."""
    assert BASELINE.exists()
    result = CliRunner().invoke(app, ["contract", "check", str(BASELINE)])
    assert result.exit_code == 0, result.output
    assert "breaking:" not in result.stdout
