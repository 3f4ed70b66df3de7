"""A history written by an older ticketflow (v1 `subtask_completed`, no provenance) still loads.

The fixture (tests/fixtures/v1_history) is the event store's rows as that version wrote them and
the read models its projector produced. They are loaded into a fresh database through the append
function every write goes through; then today's aggregate loads every ticket, today's projector
folds the history into read models equal to the old ones column for column, and the relay
publishes the old events under their own topic with payloads valid for it.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from commands.application import open_application
from commands.ticket import Ticket, TicketStatus
from projections import Projector
from streams import contract
from streams.contract.asyncapi import asyncapi_document
from streams.contract.history import ticket_events_until
from streams.relay import message_for

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "v1_history"
TABLES = {
    "rm_tickets": "ticket_id",
    "rm_subtasks": "ticket_id, subtask_id",
    "rm_reports": "ticket_id",
    "rm_tenant_counts": "tenant",
}
V1 = "ticketflow.ticket.subtask_completed.v1"

pytestmark = pytest.mark.timeout(120)


def plain(value: Any) -> Any:
    """A column value as the fixture writes it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


async def load(database_url: str) -> list[dict[str, Any]]:
    events = json.loads((FIXTURE / "events.json").read_text())
    conn = await asyncpg.connect(database_url)
    try:
        for event in events:
            row = await conn.fetchrow(
                "SELECT * FROM ticketflow_append($1::uuid[], $2::bigint[], $3::text[],"
                " $4::bytea[])",
                [UUID(event["originator_id"])],
                [event["originator_version"]],
                [event["topic"]],
                [base64.b64decode(event["state_base64"])],
            )
            assert row is not None
            assert row["notification_id"] == event["position"]
    finally:
        await conn.close()
    return list(events)


async def test_an_old_history_loads_and_replays_into_the_read_models_it_produced(
    fresh_database: str,
) -> None:
    events = await load(fresh_database)
    assert V1 in {event["topic"] for event in events}

    # The aggregate loads every ticket, v1 results applied as before.
    expected = json.loads((FIXTURE / "read_models.json").read_text())
    statuses = {row["ticket_id"]: row["status"] for row in expected["rm_tickets"]}
    application = open_application(fresh_database)
    try:
        for ticket_id, status in statuses.items():
            ticket: object = application.repository.get(UUID(ticket_id))
            assert isinstance(ticket, Ticket)
            assert ticket.status == TicketStatus(status)
            completed = [
                row["subtask_id"]
                for row in expected["rm_subtasks"]
                if row["ticket_id"] == ticket_id and row["status"] == "completed"
            ]
            for subtask_id in completed:
                assert ticket.subtasks[subtask_id].output is not None
    finally:
        application.close()

    # Today's projector folds it into the same rows, column for column.
    pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=2)
    try:
        await Projector(pool).catch_up()
        for table, order in TABLES.items():
            rows = await pool.fetch(f"SELECT * FROM {table} ORDER BY {order}")
            assert len(rows) == len(expected[table]), table
            for row, old in zip(rows, expected[table], strict=True):
                new = json.loads(json.dumps({key: plain(row[key]) for key in old}))
                assert new == old, table

        # The relay publishes old events as they were recorded: their own topic and payload.
        recorded = []
        for ticket_id in statuses:
            recorded += await ticket_events_until(pool, UUID(ticket_id), 2**62)
    finally:
        await pool.close()
    old_results = [event for event in recorded if event.topic == V1]
    assert old_results
    messages = asyncapi_document()["components"]["messages"]
    assert V1 in messages
    for event in old_results:
        subject, body, headers = message_for(event)
        assert headers["ce-type"] == V1
        assert subject.endswith(".subtask_completed")
        payload = contract.SubtaskCompleted.model_validate_json(body)
        assert "provenance" not in json.loads(body)
        upcast = contract.upcast(payload)
        assert isinstance(upcast, contract.SubtaskCompletedV2)
        assert upcast.provenance is None
        assert upcast.output == payload.output


async def test_the_loaded_old_history_verifies(fresh_database: str) -> None:
    from read_api.audit_export import verify_live

    events = await load(fresh_database)
    tenants: dict[str, int] = {}
    for event in events:
        state = json.loads(base64.b64decode(event["state_base64"]))
        tenants[state["tenant"]] = tenants.get(state["tenant"], 0) + 1
    assert len(tenants) == 2
    pool = await asyncpg.create_pool(fresh_database, min_size=1, max_size=2)
    try:
        for tenant, count in tenants.items():
            report = await verify_live(pool, tenant)
            assert report.problems == [], report.problems
            assert report.events == count
    finally:
        await pool.close()
