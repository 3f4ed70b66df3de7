"""The per-tenant inference bound, shared by workers through the real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio
import redis.asyncio as aioredis

from handlers.fairness import TenantSlots
from tests.conftest import Servers
from tests.support import random_tenant


@pytest_asyncio.fixture
async def redis(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(servers.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_two_workers_together_never_exceed_the_tenants_bound(redis: aioredis.Redis) -> None:
    tenant, other = random_tenant(), random_tenant()
    one, two = TenantSlots(redis, limit=2), TenantSlots(redis, limit=2)
    assert await one.try_acquire(tenant, "w1:a")
    assert await two.try_acquire(tenant, "w2:a")
    assert not await one.try_acquire(tenant, "w1:b")
    assert not await two.try_acquire(tenant, "w2:b")
    assert await one.try_acquire(other, "w1:c"), "another tenant has its own bound"
    assert await two.in_use(tenant) == 2
    await one.release(tenant, "w1:a")
    assert await two.try_acquire(tenant, "w2:b")


async def test_a_holder_renews_its_own_slot_and_a_per_tenant_override_applies(
    redis: aioredis.Redis,
) -> None:
    tenant = random_tenant()
    slots = TenantSlots(redis, limit=1, limits={tenant: 3})
    for token in ("a", "b", "c"):
        assert await slots.try_acquire(tenant, token)
    assert not await slots.try_acquire(tenant, "d")
    assert await slots.try_acquire(tenant, "a"), "the holder's retry renews, it takes no new slot"
    assert await slots.renew(tenant, "b")
    assert not await slots.renew(tenant, "never-held")


async def test_a_crashed_workers_slot_expires_with_its_lease(redis: aioredis.Redis) -> None:
    tenant = random_tenant()
    slots = TenantSlots(redis, limit=1, lease_s=1.0)
    assert await slots.try_acquire(tenant, "crashed")
    assert not await slots.try_acquire(tenant, "next")
    await asyncio.sleep(1.1)
    assert await slots.try_acquire(tenant, "next")
    assert not await slots.renew(tenant, "crashed")
