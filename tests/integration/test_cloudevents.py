"""Relayed messages are CloudEvents 1.0 in binary mode, as the CloudEvents SDK reads them.

Real events (a ticket's, a user's and a tenant's) are recorded by the command and account
services, published by the real relay to a real JetStream, read back from the stream, and decoded
by the CloudEvents Python SDK (`cloudevents.core.bindings.http.from_binary`, whose header mapping
is the NATS binding's: `ce-*` attributes, `content-type` for `datacontenttype`). Each decoded
event must equal the stored one, and each message must match the AsyncAPI document.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import jsonschema
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from commands.messages import (
    AskQuestion,
    CancelTicket,
    CreateTicket,
    RecordIngestion,
    UploadedDocument,
)
from identity.accounts import RegisterUser
from streams import contract
from streams.contract.asyncapi import asyncapi_document
from streams.contract.eventlog import EventLogReader, RecordedEvent
from streams.contract.subjects import event_subject
from streams.jetstream import StreamSettings
from streams.relay import Relay, RelaySettings
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.support import random_tenant, sample
from ticketflow.bootstrap import account_service, connect_nats

STREAM = StreamSettings(storage="memory")
ENVELOPE = {"timestamp", "traceparent", "originator_topic"}


def record_events(servers: Servers, database_url: str) -> str:
    """A user who founds a tenant, and a ticket of that tenant that is ingested, asked a
    question and cancelled."""
    tenant = random_tenant()
    settings = settings_for(
        servers,
        database_url,
        password_hash_time_cost=1,
        password_hash_memory_kib=8 * 1024,
        password_hash_parallelism=1,
    )
    accounts = account_service(settings, database_url)
    service = service_for(settings, database_url)
    try:
        accounts.register(RegisterUser(tenant, "ada@example.org", "correct horse battery staple"))
        document = UploadedDocument(
            "main", "paper.pdf", "application/pdf", sample("research-paper.pdf").read_bytes()
        )
        ticket_id = service.create_ticket(
            CreateTicket(tenant, "ada", (document,), "tiny")
        ).ticket_id
        ingested = contract.IngestedDocument(role="main", sha256="0" * 64, characters=1, chunks=1)
        service.record_ingestion(RecordIngestion(ticket_id, (ingested,)))
        # A follow-up question, ended by the cancel: question_asked, its subtask_ready and
        # question_failed are relayed too.
        service.ask_question(AskQuestion(ticket_id, tenant, "ada", "What is it about?"))
        service.cancel_ticket(CancelTicket(ticket_id, tenant, "ada", "changed my mind"))
    finally:
        service.close()
        accounts.close()
    return tenant


async def relay_and_read(
    servers: Servers, database_url: str, nats_url: str, count: int
) -> list[Any]:
    """Runs the relay until the stream holds `count` messages; returns them in stream order."""
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=4)
    nc = await connect_nats(nats_url, "tests-relay", servers.nats_credentials)
    relay = Relay(pool, nc, STREAM, RelaySettings(poll_interval_s=0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 30
        while True:
            try:
                held = (await js.stream_info(STREAM.name)).state.messages
            except Exception:  # the relay has not made the stream yet
                held = 0
            if held >= count:
                break
            assert time.monotonic() < deadline, f"the stream holds {held} of {count} events"
            await asyncio.sleep(0.05)
        return [await js.get_msg(STREAM.name, seq) for seq in range(1, count + 1)]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()
        await pool.close()


async def stored_events(database_url: str) -> list[RecordedEvent]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        return await EventLogReader(pool).read_after(0, 1000)
    finally:
        await pool.close()


def decode(message: Any) -> CloudEvent:
    """The message as a CloudEvent, read by the SDK in binary content mode."""
    headers = {name: str(value) for name, value in (message.headers or {}).items()}
    event = from_binary(HTTPMessage(headers=headers, body=bytes(message.data)), JSONFormat())
    assert isinstance(event, CloudEvent)
    return event


def validator(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(
        {**schema, "components": document["components"]},
        format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER,
    )


@pytest.mark.timeout(120)
async def test_every_relayed_message_is_the_stored_event_as_a_cloudevent(
    servers: Servers, fresh_database: str, fresh_nats: str
) -> None:
    tenant = await asyncio.to_thread(record_events, servers, fresh_database)
    stored = await stored_events(fresh_database)
    assert {event.aggregate for event in stored} == {"ticket", "user", "tenant"}
    assert {"question_asked", "question_failed"} <= {e.event_type.name for e in stored}
    messages = await relay_and_read(servers, fresh_database, fresh_nats, len(stored))
    document = asyncapi_document()

    for message, event in zip(messages, stored, strict=True):
        cloud_event = decode(message)
        event_type = event.event_type
        label = f"{event.topic} at {event.position}"

        assert cloud_event.get_specversion() == "1.0", label
        assert cloud_event.get_type() == event.topic, label
        assert cloud_event.get_source() == f"/ticketflow/{tenant}", label
        assert cloud_event.get_id() == f"{event.aggregate_id}:{event.version}", label
        assert cloud_event.get_subject() == f"{event.aggregate}/{event.aggregate_id}", label
        assert cloud_event.get_time() == datetime.fromisoformat(event.timestamp), label
        assert cloud_event.get_datacontenttype() == "application/json", label

        data = cloud_event.get_data()
        assert isinstance(data, dict), label
        assert data[event_type.id_field] == str(event.aggregate_id), label
        published = {k: v for k, v in event.state.items() if k not in ENVELOPE}
        for name in event_type.private_fields:
            assert name not in data, f"{label}: private field {name} published"
            published.pop(name, None)
        for name, value in published.items():
            assert data[name] == value, f"{label}: {name}"
        assert set(data) <= set(event_type.payload.model_fields), label

        # The same message, against the AsyncAPI document integrators build on.
        spec = document["components"]["messages"][event.topic]
        validator(document, spec["headers"]).validate(dict(message.headers))
        validator(document, spec["payload"]).validate(data)
        assert message.subject == event_subject(
            tenant, event.aggregate, event.aggregate_id, event_type.name
        )
        assert message.headers["tf-position"] == str(event.position)
        assert message.headers["Nats-Msg-Id"] == cloud_event.get_id()

    assert [m.headers["tf-position"] for m in messages] == [str(e.position) for e in stored]
    assert len({uuid.UUID(m.headers["ce-id"].split(":")[0]) for m in messages}) == 3
    assert all(json.loads(m.data) for m in messages)
