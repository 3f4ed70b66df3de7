"""Waiting for a ticket to finish in the read models (what `Prefer: wait` on `POST /tickets`
uses), on real PostgreSQL with the projector's own notifications."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from commands.messages import FailSubtask
from projections.outcomes import ReadModelOutcomes
from read_api import queries
from read_api.app import QuerySettings
from tests.conftest import Servers
from tests.integration.test_read_api import World, world_for
from tests.support import random_tenant


@pytest.fixture
async def world(servers: Servers, fresh_database: str) -> AsyncIterator[World]:
    async with world_for(servers, fresh_database, QuerySettings(max_wait_s=3)) as world:
        yield world


@pytest.fixture
async def outcomes(world: World) -> AsyncIterator[ReadModelOutcomes]:
    # Polls rarely, so a quick answer proves the projector's notification woke the waiter.
    waiter = ReadModelOutcomes(
        world.pool, lambda: asyncpg.connect(world.database_url), poll_interval_s=30
    )
    yield waiter
    await waiter.close()


async def test_a_waiter_wakes_with_the_report_once_the_projector_writes_it(
    world: World, outcomes: ReadModelOutcomes
) -> None:
    ticket_id, _ = world.create()
    world.ingest(ticket_id)
    await world.project()

    async def complete_later() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(world.finish, ticket_id)
        await world.project()

    started = time.monotonic()
    completing = asyncio.create_task(complete_later())
    outcome = await outcomes.wait(world.tenant, ticket_id, timeout_s=20)
    await completing

    assert time.monotonic() - started < 10
    assert outcome is not None
    assert outcome.status == "completed"
    assert outcome.report is not None
    async with world.pool.acquire() as conn:
        served = await queries.report(conn, world.tenant, ticket_id)
    assert served is not None
    assert outcome.report == {key: served[key] for key in outcome.report}
    assert set(outcome.report) == set(served) - {"ticket_id"}


async def test_a_running_ticket_is_not_an_outcome_when_the_wait_ends(
    world: World, outcomes: ReadModelOutcomes
) -> None:
    ticket_id, _ = world.create()
    await world.project()

    started = time.monotonic()
    outcome = await outcomes.wait(world.tenant, ticket_id, timeout_s=1)

    assert outcome is None
    assert time.monotonic() - started >= 1


async def test_a_failed_ticket_finishes_without_a_report(
    world: World, outcomes: ReadModelOutcomes
) -> None:
    ticket_id, _ = world.create("tiny-once")
    world.ingest(ticket_id)
    world.service.fail_subtask(FailSubtask(ticket_id, "a", 1, "not valid", retryable=False))
    await world.project()

    outcome = await outcomes.wait(world.tenant, ticket_id, timeout_s=5)

    assert outcome is not None
    assert (outcome.status, outcome.report) == ("failed", None)


async def test_another_tenant_s_ticket_never_finishes_for_the_caller(
    world: World, outcomes: ReadModelOutcomes
) -> None:
    ticket_id = world.completed_ticket()
    await world.project()

    assert await outcomes.wait(world.tenant, ticket_id, timeout_s=5) is not None
    assert await outcomes.wait(random_tenant(), ticket_id, timeout_s=0.5) is None
    assert await outcomes.wait(world.tenant, uuid.uuid4(), timeout_s=0.5) is None
