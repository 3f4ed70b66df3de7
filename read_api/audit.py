"""The tenant-wide event history auditors page through: every event of one tenant (tickets,
users, the tenant itself) in global order, read-only, straight from the event store.

Personal fields (an e-mail address, a ticket's options its pipeline marks `x-personal`) are
answered decrypted with their subject's key, or `[erased]` once the subject was erased
(docs/adr/0021-crypto-shredding.md).

Pages follow the gap-safe reader (`EventLogReader`), so a position is never passed over while a
transaction could still fill it, and each request scans a bounded window of the global log: a
page can be short (even empty) while the log goes on, and `next_after` says where to continue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
from pydantic import BaseModel, Field

from streams.contract.eventlog import EventLogReader, RecordedEvent, UnknownEventTopic
from streams.contract.personal import (
    OPTIONS_EVENT,
    load_keys,
    option_subjects,
    reveal,
    reveal_options,
    subject_of,
)
from streams.contract.pipeline import personal_options_of

SCAN_WINDOW = 2000
"""The most events of all tenants one request reads."""

_BATCH = 500


@dataclass(frozen=True)
class AuditPage:
    events: list[RecordedEvent]
    next_after: int
    caught_up: bool


async def tenant_events(
    pool: asyncpg.Pool, tenant: str, *, after: int, limit: int, scan: int = SCAN_WINDOW
) -> AuditPage:
    """Up to `limit` events of `tenant` after global position `after`."""
    reader = EventLogReader(pool)
    found: list[RecordedEvent] = []
    position = after
    scanned = 0
    while scanned < scan:
        batch = await reader.read_after(position, min(_BATCH, scan - scanned))
        if not batch:
            return AuditPage(found, position, caught_up=True)
        for event in batch:
            position = event.position
            if event.tenant == tenant:
                found.append(event)
                if len(found) == limit:
                    return AuditPage(found, position, caught_up=False)
        scanned += len(batch)
    return AuditPage(found, position, caught_up=False)


class AuditEvent(BaseModel):
    position: int = Field(examples=[41], description="Global position in the event log.")
    aggregate: str = Field(examples=["ticket"], description="`ticket`, `user` or `tenant`.")
    aggregate_id: UUID = Field(examples=["6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f"])
    version: int = Field(examples=[1], description="The event's version within its aggregate.")
    topic: str = Field(examples=["ticketflow.ticket.created.v1"])
    type: str = Field(examples=["created"], description="The event name (last subject token).")
    time: str = Field(examples=["2025-03-01T12:00:00.000000+00:00"])
    traceparent: str | None = Field(
        examples=["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]
    )
    payload: dict[str, Any] = Field(
        examples=[{"ticket_id": "6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f", "tenant": "acme"}],
        description="The event's contract payload, as integrators receive it.",
    )


class AuditLog(BaseModel):
    events: list[AuditEvent]
    next_after: int = Field(
        examples=[57], description="Pass as `after` for the next page: where this one stopped."
    )
    caught_up: bool = Field(
        examples=[False],
        description=(
            "True when nothing more can be read safely right now (the end of the log, or a"
            " transaction still writing before it); ask again later from `next_after`."
        ),
    )


async def revealed_events(
    pool: asyncpg.Pool, tenant: str, events: list[RecordedEvent]
) -> list[AuditEvent]:
    """`audit_event` of each event, with its personal fields decrypted (or `[erased]`)."""
    answered = [audit_event(event) for event in events]
    subjects: set[UUID] = set()
    for event, answer in zip(events, answered, strict=True):
        if answer.aggregate == "unknown":
            continue
        for name in event.event_type.personal_fields:
            subject = subject_of(answer.payload.get(name), event.aggregate_id, answer.aggregate)
            if subject is not None:
                subjects.add(subject)
        subjects |= option_subjects(_options(answer), _personal_options(answer))
    if not subjects:
        return answered
    keys = await load_keys(pool, tenant, subjects)
    for event, answer in zip(events, answered, strict=True):
        personal_options = _personal_options(answer)
        if personal_options:
            answer.payload = {
                **answer.payload,
                "options": reveal_options(
                    _options(answer),
                    personal_options,
                    keys,
                    tenant=tenant,
                    ticket_id=event.aggregate_id,
                ),
            }
        if answer.aggregate == "unknown" or not event.event_type.personal_fields:
            continue
        answer.payload = reveal(
            answer.payload,
            event.event_type.personal_fields,
            keys,
            tenant=tenant,
            aggregate_id=event.aggregate_id,
            aggregate=answer.aggregate,
            event=event.event_type.name,
        )
    return answered


def _personal_options(answer: AuditEvent) -> frozenset[str]:
    return personal_options_in(answer.aggregate, answer.type, answer.payload)


def personal_options_in(aggregate: str, name: str, payload: dict[str, Any]) -> frozenset[str]:
    """The options a ticket's `created` event records encrypted: those its snapshot marks."""
    if aggregate != "ticket" or name != OPTIONS_EVENT:
        return frozenset()
    pipeline = payload.get("pipeline")
    return personal_options_of(
        pipeline.get("options_schema") if isinstance(pipeline, dict) else None
    )


def _options(answer: AuditEvent) -> dict[str, Any]:
    return _options_of(answer.payload)


def _options_of(payload: dict[str, Any]) -> dict[str, Any]:
    options = payload.get("options")
    return options if isinstance(options, dict) else {}


async def revealed_ticket_payload(
    pool: asyncpg.Pool, aggregate: str, name: str, ticket_id: UUID, payload: dict[str, Any]
) -> dict[str, Any]:
    """A ticket event's payload for the people who may read the ticket: personal options
    decrypted with their subject's key, or `[erased]`."""
    personal = personal_options_in(aggregate, name, payload)
    subjects = option_subjects(_options_of(payload), personal)
    if not subjects:
        return payload
    tenant = str(payload.get("tenant"))
    keys = await load_keys(pool, tenant, subjects)
    options = reveal_options(
        _options_of(payload), personal, keys, tenant=tenant, ticket_id=ticket_id
    )
    return {**payload, "options": options}


def audit_event(event: RecordedEvent) -> AuditEvent:
    try:
        aggregate, name = event.aggregate, event.event_type.name
        payload = event.payload().model_dump(mode="json")
    except UnknownEventTopic:
        # A topic newer than this contract: shown by its topic, its payload withheld.
        aggregate, name, payload = "unknown", event.topic, {}
    return AuditEvent(
        position=event.position,
        aggregate=aggregate,
        aggregate_id=event.aggregate_id,
        version=event.version,
        topic=event.topic,
        type=name,
        time=event.timestamp,
        traceparent=event.traceparent,
        payload=payload,
    )
