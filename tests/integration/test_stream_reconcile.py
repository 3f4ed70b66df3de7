"""Durable from the database to the consumer: the relay republishes what the stream lost, and
`ticketflow streams verify [--repair]` finds and fixes what is missing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from nats.js import JetStreamContext

from streams import reconcile
from streams.relay import RELAY_NAME
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.integration.test_relay import (
    STREAM,
    Harness,
    all_events,
    append_tickets,
    jetstream,
    message_count,
    running_relay,
    wait_for,
)


@pytest.fixture
def harness(servers: Servers, fresh_database: str, fresh_nats: str) -> Iterator[Harness]:
    service = service_for(settings_for(servers, fresh_database), fresh_database)
    yield Harness(service, fresh_database, fresh_nats, servers.nats_credentials)
    service.close()


async def verify(harness: Harness) -> reconcile.Report:
    pool = await asyncpg.create_pool(harness.database_url, min_size=1, max_size=2)
    try:
        async with jetstream(harness) as js:
            report, _ = await reconcile.verify(pool, js, STREAM.name)
            return report
    finally:
        await pool.close()


@pytest.mark.timeout(90)
async def test_a_purged_stream_is_filled_again_by_the_relay_and_verifies(
    harness: Harness,
) -> None:
    append_tickets(harness.service, 4)
    events = all_events(harness.database_url)
    async with (
        running_relay(harness, stream_check_interval_s=0.5) as relay,
        jetstream(harness) as js,
    ):
        await wait_for(lambda: _relayed(js, harness, events))
        await js.purge_stream(STREAM.name)
        assert await message_count(js) == 0
        await wait_for(lambda: _relayed(js, harness, events), timeout=30)
        assert relay.republished == len(events)
        # New events after the repair follow as usual.
        append_tickets(harness.service, 1)
        events = all_events(harness.database_url)
        await wait_for(lambda: _relayed(js, harness, events), timeout=30)
    report = await verify(harness)
    assert report.ok, report.summary()
    assert report.checked == len(events)
    assert report.missing == []
    assert report.duplicates == {}


@pytest.mark.timeout(90)
async def test_a_deleted_stream_is_created_again_and_filled(harness: Harness) -> None:
    append_tickets(harness.service, 3)
    events = all_events(harness.database_url)
    async with running_relay(harness, stream_check_interval_s=0.5), jetstream(harness) as js:
        await wait_for(lambda: _relayed(js, harness, events))
        await js.delete_stream(STREAM.name)
        await wait_for(lambda: _relayed(js, harness, events), timeout=30)
    assert (await verify(harness)).ok


@pytest.mark.timeout(90)
async def test_verify_reports_a_deleted_message_and_repair_puts_it_back(
    harness: Harness,
) -> None:
    append_tickets(harness.service, 3)
    events = all_events(harness.database_url)
    async with running_relay(harness), jetstream(harness) as js:
        await wait_for(lambda: _relayed(js, harness, events))
    async with jetstream(harness) as js:
        lost = await js.get_msg(STREAM.name, 3)
        await js.delete_msg(STREAM.name, 3)
        pool = await asyncpg.create_pool(harness.database_url, min_size=1, max_size=2)
        try:
            report, checked = await reconcile.verify(pool, js, STREAM.name)
            assert not report.ok
            assert report.missing == [int((lost.headers or {})["tf-position"])]
            assert "missing: " in report.summary()
            # Within the duplicate window: JetStream still remembers the id of the deleted one.
            assert await reconcile.repair(js, report, checked) == 1
            report, _ = await reconcile.verify(pool, js, STREAM.name)
        finally:
            await pool.close()
    assert report.ok, report.summary()
    assert report.republished == [int((lost.headers or {})["tf-position"])]
    assert report.out_of_order == []


@pytest.mark.timeout(60)
async def test_verify_reports_duplicates_and_altered_bodies(harness: Harness) -> None:
    append_tickets(harness.service, 2)
    events = all_events(harness.database_url)
    async with running_relay(harness), jetstream(harness) as js:
        await wait_for(lambda: _relayed(js, harness, events))
    async with jetstream(harness) as js:
        first = await js.get_msg(STREAM.name, 1)
        second = await js.get_msg(STREAM.name, 2)
        headers = dict(first.headers or {})
        del headers["Nats-Msg-Id"]
        assert first.subject is not None
        assert second.subject is not None
        await js.publish(first.subject, first.data or b"", headers=headers)
        altered = dict(second.headers or {})
        await js.delete_msg(STREAM.name, 2)
        altered.pop("Nats-Msg-Id")
        await js.publish(second.subject, b'{"altered": true}', headers=altered)
    report = await verify(harness)
    assert not report.ok
    position_1 = int((first.headers or {})["tf-position"])
    position_2 = int((second.headers or {})["tf-position"])
    assert list(report.duplicates) == [position_1]
    assert position_2 in report.different
    assert position_2 in report.out_of_order


async def _count_is(js: JetStreamContext, count: int) -> bool:
    return await message_count(js) == count


async def _relayed(js: JetStreamContext, harness: Harness, events: list[tuple[Any, ...]]) -> bool:
    """The stream holds `events` and the relay's checkpoint, which `streams verify` checks up
    to, has reached the last of them (the relay writes it once it is idle)."""
    if not await _count_is(js, len(events)):
        return False
    connection = await asyncpg.connect(harness.database_url)
    try:
        position = await connection.fetchval(
            "SELECT position FROM relay_checkpoints WHERE name = $1", RELAY_NAME
        )
    finally:
        await connection.close()
    return position is not None and position >= max(event[0] for event in events)


@pytest.mark.timeout(90)
async def test_the_streams_verify_command_exits_1_on_a_gap_and_repairs_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from ticketflow.cli import app

    append_tickets(harness.service, 2)
    events = all_events(harness.database_url)
    async with running_relay(harness), jetstream(harness) as js:
        await wait_for(lambda: _relayed(js, harness, events))
        await js.delete_msg(STREAM.name, 2)
    for variable, value in {
        "TF_DATABASE_URL": harness.database_url,
        "TF_NATS_URL": harness.nats_url,
        "TF_NATS_CREDENTIALS": str(harness.nats_credentials),
        "TF_REDIS_URL": "redis://127.0.0.1:1/0",
    }.items():
        monkeypatch.setenv(variable, value)

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["streams", "verify", *args])
        return result.exit_code, result.output

    code, output = await asyncio.to_thread(run)
    assert code == 1, output
    assert "missing: " in output
    code, output = await asyncio.to_thread(run, "--repair")
    assert code == 0, output
    assert "republished 1 missing events" in output
    assert "every event once, in order" in output
