"""The relay against real PostgreSQL and NATS JetStream: order, headers, crashes, late commits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import psycopg
import pytest
from nats.js import JetStreamContext

from commands.messages import CreateTicket, RecordIngestion, UploadedDocument
from commands.service import CommandService
from streams import contract
from streams.contract.eventlog import EventLogReader
from streams.jetstream import StreamSettings
from streams.relay import Relay, RelaySettings
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.support import random_tenant, sample
from ticketflow.bootstrap import connect_nats

PDF = sample("research-paper.pdf").read_bytes()
STREAM = StreamSettings(storage="memory")


@dataclass
class Harness:
    service: CommandService
    database_url: str
    nats_url: str
    nats_credentials: Path


@pytest.fixture
def harness(servers: Servers, fresh_database: str, fresh_nats: str) -> Iterator[Harness]:
    service = service_for(settings_for(servers, fresh_database), fresh_database)
    yield Harness(service, fresh_database, fresh_nats, servers.nats_credentials)
    service.close()


def append_tickets(service: CommandService, count: int, *, ingest: bool = True) -> None:
    tenant = random_tenant()
    document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
    for _ in range(count):
        ticket_id = service.create_ticket(
            CreateTicket(tenant, "alice", (document,), "tiny")
        ).ticket_id
        if ingest:
            ingested = contract.IngestedDocument(
                role="main", sha256="0" * 64, characters=1, chunks=1
            )
            service.record_ingestion(RecordIngestion(ticket_id, (ingested,)))


def all_events(database_url: str) -> list[tuple[int, uuid.UUID, int]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT notification_id, originator_id, originator_version FROM ticketflow_events "
            "ORDER BY notification_id"
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


@contextlib.asynccontextmanager
async def jetstream(harness: Harness) -> AsyncIterator[JetStreamContext]:
    nc = await connect_nats(harness.nats_url, "tests", harness.nats_credentials)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def stream_messages(js: JetStreamContext) -> list[Any]:
    info = await js.stream_info(STREAM.name)
    return [await js.get_msg(STREAM.name, seq) for seq in range(1, info.state.last_seq + 1)]


async def message_count(js: JetStreamContext) -> int:
    try:
        return int((await js.stream_info(STREAM.name)).state.messages)
    except nats.js.errors.NotFoundError:
        return 0


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not reached")


@contextlib.asynccontextmanager
async def running_relay(harness: Harness, **settings: Any) -> AsyncIterator[Relay]:
    pool = await asyncpg.create_pool(harness.database_url, min_size=2, max_size=4)
    nc = await connect_nats(harness.nats_url, "tests-relay", harness.nats_credentials)
    relay = Relay(pool, nc, STREAM, RelaySettings(poll_interval_s=0.2, **settings))
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()
        await pool.close()


async def test_every_event_is_published_once_in_order_with_its_headers(harness: Harness) -> None:
    append_tickets(harness.service, 5)
    events = all_events(harness.database_url)
    async with running_relay(harness), jetstream(harness) as js:
        await wait_for(lambda: _has(js, len(events)))
        messages = await stream_messages(js)

    assert [int(m.headers["tf-position"]) for m in messages] == [p for p, _, _ in events]
    for message, (_, ticket_id, version) in zip(messages, events, strict=True):
        headers = message.headers
        assert headers["Nats-Msg-Id"] == f"{ticket_id}:{version}"
        assert headers["ce-specversion"] == "1.0"
        assert headers["ce-id"] == f"{ticket_id}:{version}"
        assert headers["ce-type"] in contract.BY_TOPIC
        assert headers["ce-subject"] == f"ticket/{ticket_id}"
        assert headers["ce-source"].startswith("/ticketflow/t-")
        assert headers["ce-time"].endswith("+00:00")
        assert headers["tf-version"] == str(version)
        assert headers["traceparent"].startswith("00-")
        event_type = contract.BY_TOPIC[headers["ce-type"]]
        assert message.subject.endswith(f".ticket.{ticket_id}.{event_type.name}")
        body = event_type.payload.model_validate(json.loads(message.data))
        assert isinstance(body, contract.EventPayload)
        assert body.ticket_id == ticket_id


async def _has(js: JetStreamContext, count: int) -> bool:
    return await message_count(js) >= count


async def test_events_appended_while_running_are_published(harness: Harness) -> None:
    async with running_relay(harness), jetstream(harness) as js:
        await asyncio.to_thread(append_tickets, harness.service, 3)
        expected = len(all_events(harness.database_url))
        await wait_for(lambda: _has(js, expected))
        await asyncio.sleep(0.3)
        assert await message_count(js) == expected


async def test_a_restarted_relay_publishes_nothing_twice(harness: Harness) -> None:
    append_tickets(harness.service, 4)
    expected = len(all_events(harness.database_url))
    async with running_relay(harness), jetstream(harness) as js:
        await wait_for(lambda: _has(js, expected))
    async with running_relay(harness) as relay, jetstream(harness) as js:
        await asyncio.sleep(0.5)
        assert relay.position == all_events(harness.database_url)[-1][0]
        assert await message_count(js) == expected


async def test_a_relay_killed_mid_stream_leaves_exactly_one_message_per_event(
    harness: Harness,
) -> None:
    await asyncio.to_thread(append_tickets, harness.service, 700)
    appended_before_start = len(all_events(harness.database_url))
    env = {
        **os.environ,
        "TF_DATABASE_URL": harness.database_url,
        "TF_NATS_URL": harness.nats_url,
        "TF_NATS_CREDENTIALS": str(harness.nats_credentials),
        "TF_REDIS_URL": "redis://127.0.0.1:1/0",
        "TF_STREAM_STORAGE": "memory",
        "TF_RELAY_MAX_IN_FLIGHT": "64",
        "TF_RELAY_BATCH_SIZE": "100",
    }
    command = [sys.executable, "-m", "ticketflow", "worker", "relay"]
    async with jetstream(harness) as js:
        relay = subprocess.Popen(command, env=env)
        try:
            await wait_for(lambda: _has(js, 200), timeout=60)
            relay.send_signal(signal.SIGKILL)
            relay.wait(10)
            published_before_kill = await message_count(js)
            assert published_before_kill < appended_before_start, "the kill must land mid-stream"
            await asyncio.to_thread(append_tickets, harness.service, 50)
            expected = all_events(harness.database_url)
            relay = subprocess.Popen(command, env=env)
            await wait_for(lambda: _has(js, len(expected)), timeout=60)
            await asyncio.sleep(1.0)
            messages = await stream_messages(js)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(15)
    ids = [m.headers["Nats-Msg-Id"] for m in messages]
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == {f"{ticket_id}:{version}" for _, ticket_id, version in expected}


def _raw_insert(conn: psycopg.Connection[Any], tenant_prefix: str = "") -> int:
    """Appends a copy of the first event under a new ticket id, as another writer would; with
    `tenant_prefix`, in another tenant. (Two transactions in flight at once must append to
    different tenants: one tenant's appends take turns on its chain head, ADR 20.)"""
    row = conn.execute(
        "INSERT INTO ticketflow_events (originator_id, originator_version, topic, state) "
        "SELECT gen_random_uuid(), 1, topic, convert_to(replace(convert_from(state, 'UTF8'),"
        " '\"tenant\":\"', '\"tenant\":\"' || %s), 'UTF8') FROM ticketflow_events "
        "ORDER BY notification_id LIMIT 1 RETURNING notification_id",
        (tenant_prefix,),
    ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_transaction_that_commits_after_a_later_one_is_not_skipped(
    harness: Harness,
) -> None:
    append_tickets(harness.service, 1, ingest=False)
    async with running_relay(harness) as relay, jetstream(harness) as js:
        await wait_for(lambda: _has(js, 1))
        with (
            psycopg.connect(harness.database_url) as slow,
            psycopg.connect(harness.database_url, autocommit=True) as fast,
        ):
            early = _raw_insert(slow, "a")  # takes its position first, commits last
            late = _raw_insert(fast, "b")
            assert early < late
            await asyncio.sleep(1.0)
            assert await message_count(js) == 1, "the later commit must wait for the earlier"
            slow.commit()
        await wait_for(lambda: _has(js, 3))
        messages = await stream_messages(js)
        assert relay.position == late
    assert [int(m.headers["tf-position"]) for m in messages] == [1, early, late]


async def test_a_rolled_back_position_is_passed_over_once_nothing_can_fill_it(
    harness: Harness,
) -> None:
    append_tickets(harness.service, 1, ingest=False)
    with psycopg.connect(harness.database_url) as conn:
        _raw_insert(conn)
        conn.rollback()
    with psycopg.connect(harness.database_url, autocommit=True) as conn:
        after_hole = _raw_insert(conn)
    async with running_relay(harness), jetstream(harness) as js:
        await wait_for(lambda: _has(js, 2))
        messages = await stream_messages(js)
    assert [int(m.headers["tf-position"]) for m in messages] == [1, after_hole]


async def test_the_reader_waits_while_a_hole_may_still_fill(harness: Harness) -> None:
    append_tickets(harness.service, 1, ingest=False)
    pool = await asyncpg.create_pool(harness.database_url, min_size=1, max_size=3)
    try:
        reader = EventLogReader(pool, lock_timeout_s=0.3)
        with (
            psycopg.connect(harness.database_url) as slow,
            psycopg.connect(harness.database_url, autocommit=True) as fast,
        ):
            _raw_insert(slow, "a")
            _raw_insert(fast, "b")
            assert await reader.read_after(1) == []
            slow.commit()
        assert len(await reader.read_after(1)) == 2
    finally:
        await pool.close()
