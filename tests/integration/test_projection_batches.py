"""Statements applied in batched waves give the very tables that one event at a time gives."""

from __future__ import annotations

import pytest

from projections import Projector, ProjectorSettings, rebuild
from tests.integration.test_projections import Harness, database_pool, harness, snapshot

__all__ = ["harness"]  # the fixture, used by name


@pytest.mark.timeout(180)
async def test_one_event_per_batch_and_the_whole_log_in_one_batch_give_the_same_tables(
    harness: Harness,
) -> None:
    url = harness.database_url
    tenants = [harness.tenant, f"{harness.tenant}-b"]
    # Tickets of two tenants in flight together, so one batch holds many tickets at every step.
    created = {}
    for tenant in tenants:
        harness.tenant = tenant
        created[tenant] = [harness.create() for _ in range(3)]
    for tenant in tenants:
        harness.tenant = tenant
        for ticket_id in created[tenant]:
            harness.ingest(ticket_id)
    for tenant in tenants:
        harness.tenant = tenant
        first, second, third = created[tenant]
        harness.complete(first, "a")
        harness.fail(second, "a")
        harness.complete(second, "a", attempt=2)
        harness.complete(first, "b")
        harness.complete(first, "c")
        harness.complete(third, "a")
        harness.complete(first, "d")
        harness.every_lifecycle()

    async with database_pool(url) as pool:
        one_at_a_time = Projector(pool, ProjectorSettings(batch_size=1))
        await one_at_a_time.catch_up()
        assert one_at_a_time.applied > 50
        stepwise = snapshot(url)
        await rebuild(pool, batch_size=10_000)
    assert snapshot(url) == stepwise
