"""Options a pipeline marks `x-personal`: the mark, encryption for the user who opens the ticket,
decryption while their key exists, `[erased]` after (docs/adr/0021-crypto-shredding.md)."""

from __future__ import annotations

import copy
import json
import uuid
from types import MappingProxyType
from typing import Any

import pytest
from pydantic import ValidationError

from commands.port import TicketSnapshot, TicketStatus
from handlers.prompting import model_options
from streams.contract.asyncapi import asyncapi_document
from streams.contract.personal import (
    ERASED,
    is_encrypted,
    new_key,
    option_subjects,
    reveal_options,
    seal_options,
)
from streams.contract.pipeline import PipelineDefinition
from tests.support import small_pipeline
from ticketflow.pipelines import ShippedPipelines

TENANT = "acme"
OWNER = uuid.uuid4()
TICKET = uuid.uuid4()


def with_options(schema: dict[str, Any], **changes: Any) -> dict[str, Any]:
    pipeline = small_pipeline()
    pipeline["options_schema"] = schema
    pipeline.update(changes)
    return pipeline


def named_schema(**extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "candidate_name": {"type": "string", "x-personal": True, **extra},
            "count": {"type": "integer"},
        },
        "additionalProperties": False,
    }


def test_a_pipeline_names_the_options_it_marks_personal() -> None:
    pipeline = PipelineDefinition.model_validate(with_options(named_schema()))
    assert pipeline.personal_options == frozenset({"candidate_name"})


def test_an_option_marked_false_or_unmarked_is_not_personal() -> None:
    schema = named_schema()
    schema["properties"]["candidate_name"]["x-personal"] = False
    assert PipelineDefinition.model_validate(with_options(schema)).personal_options == frozenset()
    assert PipelineDefinition.model_validate(small_pipeline()).personal_options == frozenset()


def test_the_shipped_resume_screening_marks_the_candidate_s_name_personal() -> None:
    pipeline = ShippedPipelines().get("resume-screening")
    assert pipeline.personal_options == frozenset({"candidate_name"})


def test_a_mark_that_is_not_a_boolean_is_refused() -> None:
    schema = named_schema()
    schema["properties"]["candidate_name"]["x-personal"] = "yes"
    with pytest.raises(ValidationError, match="must be true or false"):
        PipelineDefinition.model_validate(with_options(schema))


def test_a_mark_below_the_top_level_properties_is_refused() -> None:
    schema = {
        "type": "object",
        "properties": {
            "candidate": {
                "type": "object",
                "properties": {"name": {"type": "string", "x-personal": True}},
            }
        },
    }
    with pytest.raises(ValidationError, match="may only mark a property of options_schema"):
        PipelineDefinition.model_validate(with_options(schema))


def test_a_personal_option_may_not_be_a_retrieval_query() -> None:
    schema = named_schema()
    schema["required"] = ["candidate_name"]
    pipeline = with_options(schema)
    pipeline["subtasks"][0]["retrieval"] = {"query_option": "candidate_name"}
    with pytest.raises(ValidationError, match="never shown to the model"):
        PipelineDefinition.model_validate(pipeline)


def test_a_personal_option_may_not_set_an_output_limit() -> None:
    schema = named_schema()
    schema["properties"]["count"]["x-personal"] = True
    pipeline = with_options(schema)
    pipeline["subtasks"][0]["output_schema"] = {
        "type": "object",
        "properties": {"cards": {"type": "array", "maxItems": 5}},
    }
    pipeline["subtasks"][0]["option_limits"] = {"/properties/cards/maxItems": "count"}
    with pytest.raises(ValidationError, match="never shown to the model"):
        PipelineDefinition.model_validate(pipeline)


def sealed(options: dict[str, Any], key: bytes, ticket_id: uuid.UUID = TICKET) -> dict[str, Any]:
    return seal_options(
        options, {"candidate_name"}, key, tenant=TENANT, subject=OWNER, ticket_id=ticket_id
    )


def test_sealing_encrypts_only_the_personal_options() -> None:
    options = {"candidate_name": "Ada Lovelace", "count": 3}
    recorded = sealed(options, new_key())
    assert recorded["count"] == 3
    assert is_encrypted(recorded["candidate_name"])
    assert recorded["candidate_name"]["subject"] == str(OWNER)
    assert "Ada" not in json.dumps(recorded)
    assert option_subjects(recorded, {"candidate_name"}) == {OWNER}


def test_an_absent_or_null_personal_option_stays_as_it_is() -> None:
    key = new_key()
    assert sealed({"count": 3}, key) == {"count": 3}
    assert sealed({"candidate_name": None}, key) == {"candidate_name": None}


def test_a_sealed_option_reads_back_with_its_subject_s_key() -> None:
    key = new_key()
    recorded = sealed({"candidate_name": "Ada Lovelace", "count": 3}, key)
    revealed = reveal_options(
        recorded, {"candidate_name"}, {OWNER: key}, tenant=TENANT, ticket_id=TICKET
    )
    assert revealed == {"candidate_name": "Ada Lovelace", "count": 3}


def test_a_sealed_option_reads_erased_once_its_subject_s_key_is_gone() -> None:
    recorded = sealed({"candidate_name": "Ada Lovelace"}, new_key())
    for keys in ({OWNER: None}, {}):
        revealed = reveal_options(
            recorded, {"candidate_name"}, keys, tenant=TENANT, ticket_id=TICKET
        )
        assert revealed == {"candidate_name": ERASED}


def test_a_sealed_option_copied_into_another_ticket_does_not_decrypt() -> None:
    key = new_key()
    recorded = sealed({"candidate_name": "Ada Lovelace"}, key)
    elsewhere = reveal_options(
        recorded, {"candidate_name"}, {OWNER: key}, tenant=TENANT, ticket_id=uuid.uuid4()
    )
    assert elsewhere == {"candidate_name": ERASED}


def test_a_sealed_option_does_not_decrypt_as_another_option() -> None:
    key = new_key()
    recorded = sealed({"candidate_name": "Ada Lovelace"}, key)
    moved = {"reviewer": recorded["candidate_name"]}
    revealed = reveal_options(moved, {"reviewer"}, {OWNER: key}, tenant=TENANT, ticket_id=TICKET)
    assert revealed == {"reviewer": ERASED}


def test_a_plain_value_of_an_option_marked_later_is_left_as_recorded() -> None:
    revealed = reveal_options(
        {"candidate_name": "Ada"}, {"candidate_name"}, {}, tenant=TENANT, ticket_id=TICKET
    )
    assert revealed == {"candidate_name": "Ada"}


def snapshot(pipeline: PipelineDefinition, options: dict[str, Any]) -> TicketSnapshot:
    return TicketSnapshot(
        ticket_id=TICKET,
        tenant=TENANT,
        version=1,
        status=TicketStatus.RUNNING,
        pipeline=pipeline,
        documents=(),
        ingested=(),
        options=MappingProxyType(copy.deepcopy(options)),
        subtasks=MappingProxyType({}),
    )


def test_the_model_is_never_shown_a_personal_option() -> None:
    pipeline = PipelineDefinition.model_validate(with_options(named_schema()))
    recorded = sealed({"candidate_name": "Ada Lovelace", "count": 3}, new_key())
    assert model_options(snapshot(pipeline, recorded)) == {"count": 3}


def test_the_asyncapi_document_says_personal_options_carry_ciphertext() -> None:
    schemas = asyncapi_document()["components"]["schemas"]
    description = schemas["TicketCreated"]["properties"]["options"]["description"]
    assert "x-personal" in description
    assert "encrypted" in description
