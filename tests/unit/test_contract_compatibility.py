"""`ticketflow contract check`: each kind of breaking change is named; additions pass."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from streams.contract.asyncapi import asyncapi_document
from streams.contract.compatibility import compare
from ticketflow.cli import app

Doc = dict[str, Any]
CREATED = "ticketflow.ticket.created.v1"
COMPLETED = "ticketflow.ticket.completed.v1"


@pytest.fixture(scope="module")
def today() -> Doc:
    return asyncapi_document()


def schema(doc: Doc, name: str) -> Doc:
    result: Doc = doc["components"]["schemas"][name]
    return result


def remove_message(doc: Doc) -> None:
    del doc["components"]["messages"][COMPLETED]
    del doc["channels"]["ticket.completed"]["messages"][COMPLETED]
    doc["operations"]["receive.ticket.completed"]["messages"] = []


def remove_channel(doc: Doc) -> None:
    del doc["channels"]["ticket.cancelled"]
    del doc["operations"]["receive.ticket.cancelled"]


def change_address(doc: Doc) -> None:
    doc["channels"]["ticket.failed"]["address"] = "tf.evt.{tenant}.ticket.{ticket_id}.failure"


def remove_field(doc: Doc) -> None:
    del schema(doc, "TicketFailed")["properties"]["reason"]
    schema(doc, "TicketFailed")["required"].remove("reason")


def change_type(doc: Doc) -> None:
    schema(doc, "TicketCompleted")["properties"]["subtasks"]["type"] = "string"


def make_nullable(doc: Doc) -> None:
    subtasks = schema(doc, "TicketCompleted")["properties"]["subtasks"]
    schema(doc, "TicketCompleted")["properties"]["subtasks"] = {
        "anyOf": [subtasks, {"type": "null"}]
    }


def change_nested_type(doc: Doc) -> None:
    schema(doc, "DocumentRef")["properties"]["size"]["type"] = "number"


def add_required_field(doc: Doc) -> None:
    schema(doc, "TicketCancelled")["properties"]["priority"] = {"type": "integer"}
    schema(doc, "TicketCancelled")["required"].append("priority")


def require_optional_field(doc: Doc) -> None:
    schema(doc, "TicketFailed")["required"].append("subtask_id")


def make_required_field_optional(doc: Doc) -> None:
    schema(doc, "TicketCancelled")["required"].remove("cancelled_by")


def remove_enum_value(doc: Doc) -> None:
    schema(doc, "UserRoleGranted")["properties"]["role"]["enum"].remove("auditor")


def change_pattern(doc: Doc) -> None:
    schema(doc, "DocumentRef")["properties"]["sha256"]["pattern"] = "^[0-9a-f]{40}$"


def tighten_length(doc: Doc) -> None:
    schema(doc, "DocumentRef")["properties"]["filename"]["maxLength"] = 100


def remove_header(doc: Doc) -> None:
    headers = doc["components"]["messages"][CREATED]["headers"]
    del headers["properties"]["tf-position"]
    headers["required"].remove("tf-position")


def require_new_header(doc: Doc) -> None:
    headers = doc["components"]["messages"][CREATED]["headers"]
    headers["properties"]["tf-example"] = {"type": "string"}
    headers["required"].append("tf-example")


def change_ce_type(doc: Doc) -> None:
    headers = doc["components"]["messages"][CREATED]["headers"]
    headers["properties"]["ce-type"]["const"] = "ticketflow.ticket.created.v2"


def change_parameter_pattern(doc: Doc) -> None:
    doc["components"]["parameters"]["tenant"]["x-pattern"] = "^[a-z]{1,63}$"


def rename_stream(doc: Doc) -> None:
    doc["x-ticketflow"]["stream"]["name"] = "EVENTS"


BREAKING: list[tuple[str, Callable[[Doc], None], str]] = [
    ("removed message", remove_message, f"message {COMPLETED}: removed"),
    ("removed channel", remove_channel, "channel ticket.cancelled: removed"),
    ("changed address", change_address, "channel ticket.failed: address changed"),
    ("removed field", remove_field, "payload.reason: field removed"),
    ("changed type", change_type, "payload.subtasks: type changed from integer to string"),
    ("made nullable", make_nullable, "type changed from integer to integer | null"),
    ("nested type", change_nested_type, "payload.documents[].size: type changed"),
    ("new required field", add_required_field, "payload.priority: new required field"),
    ("optional made required", require_optional_field, "payload.subtask_id: now required"),
    ("required made optional", make_required_field_optional, "cancelled_by: no longer required"),
    ("removed enum value", remove_enum_value, "payload.role: enum value 'auditor' removed"),
    ("changed pattern", change_pattern, "payload.documents[].sha256: pattern changed"),
    ("tightened length", tighten_length, "filename: maxLength changed from 255 to 100"),
    ("removed header", remove_header, "headers.tf-position: field removed"),
    ("new required header", require_new_header, "headers.tf-example: new required field"),
    ("changed ce-type", change_ce_type, "headers.ce-type: constant changed"),
    ("parameter pattern", change_parameter_pattern, "parameter tenant: pattern changed"),
    ("renamed stream", rename_stream, "stream name: changed from 'TF_EVENTS' to 'EVENTS'"),
]


def add_optional_things(doc: Doc) -> None:
    """A new optional field, optional header, enum value, message (v2 on an existing channel)
    and channel: additions only."""
    schema(doc, "TicketFailed")["properties"]["hint"] = {"type": "string"}
    headers = doc["components"]["messages"][CREATED]["headers"]
    headers["properties"]["tf-example"] = {"type": "string"}
    schema(doc, "UserRoleGranted")["properties"]["role"]["enum"].append("reviewer")
    v2 = copy.deepcopy(doc["components"]["messages"][COMPLETED])
    v2["headers"]["properties"]["ce-type"]["const"] = "ticketflow.ticket.completed.v2"
    doc["components"]["messages"]["ticketflow.ticket.completed.v2"] = v2
    doc["channels"]["ticket.completed"]["messages"]["ticketflow.ticket.completed.v2"] = {
        "$ref": "#/components/messages/ticketflow.ticket.completed.v2"
    }
    channel = copy.deepcopy(doc["channels"]["ticket.failed"])
    channel["address"] = "tf.evt.{tenant}.ticket.{ticket_id}.archived"
    doc["channels"]["ticket.archived"] = channel
    doc["info"]["description"] += " Edited."


def write(tmp_path: Path, name: str, doc: Doc) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def check(old: Path, new: Path) -> Any:
    return CliRunner().invoke(app, ["contract", "check", str(old), "--new", str(new)])


def test_a_document_is_compatible_with_itself(today: Doc) -> None:
    report = compare(today, copy.deepcopy(today))
    assert report.compatible
    assert report.additions == []


@pytest.mark.parametrize(("change", "edit", "expected"), BREAKING, ids=[b[0] for b in BREAKING])
def test_each_breaking_change_fails_the_check_and_is_named(
    today: Doc, tmp_path: Path, change: str, edit: Callable[[Doc], None], expected: str
) -> None:
    edited = copy.deepcopy(today)
    edit(edited)
    result = check(write(tmp_path, "old.json", today), write(tmp_path, "new.json", edited))

    assert result.exit_code == 1, result.output
    breaking = [line for line in result.stdout.splitlines() if line.startswith("breaking: ")]
    assert any(expected in line for line in breaking), breaking


def test_additions_pass_and_are_listed(today: Doc, tmp_path: Path) -> None:
    edited = copy.deepcopy(today)
    add_optional_things(edited)
    result = check(write(tmp_path, "old.json", today), write(tmp_path, "new.json", edited))

    assert result.exit_code == 0, result.output
    added = result.stdout
    assert "payload.hint: new optional field" in added
    assert "headers.tf-example: new optional field" in added
    assert "enum value 'reviewer'" in added
    assert "new message ticketflow.ticket.completed.v2" in added
    assert "channel ticket.archived: new channel" in added
    assert "breaking:" not in added


def test_going_back_is_breaking(today: Doc) -> None:
    """The same edits, read the other way round, remove what the newer document promised."""
    edited = copy.deepcopy(today)
    add_optional_things(edited)
    report = compare(edited, today)
    assert "message ticketflow.ticket.completed.v2: removed" in report.breaking
    assert any("payload.hint: field removed" in problem for problem in report.breaking)


def test_a_file_that_is_not_an_asyncapi_document_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    result = CliRunner().invoke(app, ["contract", "check", str(bad)])
    assert result.exit_code == 2
    other = write(tmp_path, "openapi.json", {"openapi": "3.1.0"})
    result = CliRunner().invoke(app, ["contract", "check", str(other)])
    assert result.exit_code == 2
    assert "not an AsyncAPI 3 document" in result.stderr
