"""Aggregate events stored as they always were: topics and state, field for field, in order.

The aggregates' event classes are derived from the contract (commands/events.py). The fixture
`data/stored_events.json` holds what the hand-written classes they replaced stored for one of
every event (less the id and the timestamp); a change of a stored name, order or value breaks
the loading of history, and fails here first.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate

from commands.ticket import Ticket
from identity.users import Tenant, User
from streams import contract
from tests.support import small_pipeline

FIXTURE = Path(__file__).parent / "data" / "stored_events.json"
MAPPER = Application[uuid.UUID](env={}).mapper


def stored(aggregate: Aggregate) -> list[list[Any]]:
    recorded = []
    for event in aggregate.collect_events():
        stored_event = MAPPER.to_stored_event(event)
        state = json.loads(stored_event.state, object_pairs_hook=list)
        fields = [[k, v] for k, v in state if k not in ("timestamp", "originator_id")]
        recorded.append([stored_event.topic, fields])
    return recorded


def every_event() -> list[list[Any]]:
    pipeline = contract.PipelineDefinition.model_validate(small_pipeline(max_attempts=2))
    document = contract.DocumentRef(
        role="main", sha256="a" * 64, filename="a.pdf", media_type="application/pdf", size=3
    )
    ingested = contract.IngestedDocument(
        role="main", sha256="a" * 64, pages=1, characters=5, chunks=1
    )

    def created(number: int) -> contract.TicketCreated:
        return contract.TicketCreated(
            ticket_id=uuid.UUID(int=number), tenant="acme", owner="alice", documents=(document,),
            pipeline=pipeline, prompt_hashes=pipeline.prompt_hashes, options={"k": [1, 2]},
            idempotency_key="key",
        )  # fmt: skip

    events = []
    first = Ticket.open(uuid.UUID(int=1), created(1), "00-tp")
    first.record_ingestion([ingested], "tp")
    first.start_subtask("a", 1, "w", None)
    output = {"x": "y"}
    provenance = contract.Provenance(
        backend="fake", model="m", sampling={"t": 0}, prompt_sha256="b" * 64,
        output_sha256=contract.sha256_of(contract.canonical_json(output)),
    )  # fmt: skip
    usage = contract.TokenUsage(prompt_tokens=3)
    first.complete_subtask("a", 1, output, "m", usage, 1.5, None, provenance=provenance)
    first.fail_subtask("b", 1, "bad", True, None)
    first.fail_subtask("b", 2, "bad", True, None)
    cancelled = Ticket.open(uuid.UUID(int=3), created(3), None)
    cancelled.cancel("stop", "alice", None)
    events += stored(cancelled)
    events += stored(first)
    rerun = Ticket.open(uuid.UUID(int=2), created(2), None)
    rerun.link_rerun(first, "bob", None)
    rerun.record_ingestion([ingested], "tp")
    for subtask in "abcd":
        rerun.complete_subtask(subtask, 1, {"x": subtask}, "m", contract.TokenUsage(), 1.0, None)
    events += stored(rerun)
    user = User.register("acme", "A@x.io", {"user", "admin"}, "hash1", None, None)
    user.grant_role("auditor", "root", None)
    user.revoke_role("user", "root", "tp")
    user.change_password("hash2", "me", "changed", None)
    user.deactivate("root", None)
    events += stored(user)
    events += stored(Tenant.found("acme", "someone", None))
    return events


def test_every_event_is_stored_as_before() -> None:
    assert json.loads(json.dumps(every_event())) == json.loads(FIXTURE.read_text())


def test_every_event_of_the_fixture_is_still_recorded_by_an_aggregate() -> None:
    recorded = {
        value.TOPIC
        for aggregate in (Ticket, User, Tenant)
        for value in vars(aggregate).values()
        if isinstance(value, type) and hasattr(value, "TOPIC")
    }
    topics = {topic for topic, _ in json.loads(FIXTURE.read_text())}
    assert topics <= recorded
    assert "ticketflow.ticket.subtask_completed.v2" in topics


def test_an_event_with_the_wrong_private_fields_is_refused() -> None:
    user = User.register("acme", "b@x.io", {"user"}, "hash", None, None)
    payload = contract.UserDeactivated(user_id=user.id, tenant="acme", deactivated_by="root")
    with pytest.raises(TypeError, match="private fields"):
        user._emit(payload, None, password_hash="leaked")
