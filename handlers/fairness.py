"""Fair inference scheduling: which ticket's ready subtasks go to the model next.

Two parts:

- `FairQueue` (pure, in one worker): ready subtasks grouped by tenant and by ticket. Tenants take
  turns (round-robin), so one tenant's flood of tickets never starves another tenant's single
  ticket. Within the turns, *interactive* tickets (small documents) go before *bulk* ones; a bulk
  ticket that has waited longer than `promote_after_s` counts as interactive, so bulk work is
  delayed, never starved. A turn dispatches all of one ticket's waiting subtasks together.
  Within a tenant, tickets are ordered by when the queue *first* saw them, not by when their
  latest subtask became ready: a started ticket keeps its place, so its next subtask goes
  before the tenant's tickets that have not started yet (the tenant finishes tickets one after
  another instead of advancing all of them one subtask at a time).
- `TenantSlots` (Redis, across every worker): at most `limit` tickets of one tenant are with the
  model at any time. A slot is a lease in a sorted set scored by its expiry on the Redis server's
  clock; a crashed worker's slots expire by themselves.
"""

from __future__ import annotations

import enum
import itertools
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import redis.asyncio as aioredis

T = TypeVar("T")


class Priority(enum.IntEnum):
    INTERACTIVE = 0
    BULK = 1


@dataclass
class _TicketWork(Generic[T]):
    ticket_id: uuid.UUID
    priority: Priority
    since: float
    """When its oldest waiting item arrived (monotonic seconds)."""
    seq: int
    items: list[T] = field(default_factory=list)


class FairQueue(Generic[T]):
    """Ready work by tenant and ticket; `pop` picks the next ticket fairly."""

    def __init__(self, *, promote_after_s: float = 60.0, remember: int = 10_000) -> None:
        self.promote_after_s = promote_after_s
        self._tenants: OrderedDict[str, OrderedDict[uuid.UUID, _TicketWork[T]]] = OrderedDict()
        self._seq = itertools.count()
        self._size = 0
        self._remember = remember
        self._started: OrderedDict[uuid.UUID, tuple[int, float]] = OrderedDict()
        """Tickets popped before, with their first sequence number and arrival: their place."""

    def __len__(self) -> int:
        return self._size

    def push(
        self,
        tenant: str,
        ticket_id: uuid.UUID,
        priority: Priority,
        item: T,
        *,
        now: float | None = None,
    ) -> None:
        tickets = self._tenants.setdefault(tenant, OrderedDict())
        work = tickets.get(ticket_id)
        if work is None:
            place = self._started.get(ticket_id)
            if place is None:
                now = time.monotonic() if now is None else now
                place = (next(self._seq), now)
            work = _TicketWork(ticket_id, priority, place[1], place[0])
            tickets[ticket_id] = work
        work.items.append(item)
        self._size += 1

    def forget(self, ticket_id: uuid.UUID) -> None:
        """Drops a finished ticket's place (the oldest places are also dropped past `remember`)."""
        self._started.pop(ticket_id, None)

    def requeue(
        self,
        tenant: str,
        ticket_id: uuid.UUID,
        priority: Priority,
        items: list[T],
        since: float,
    ) -> None:
        """Puts a dispatched ticket's items back with their original age (e.g. after a pause)."""
        tickets = self._tenants.setdefault(tenant, OrderedDict())
        work = tickets.get(ticket_id)
        if work is None:
            work = _TicketWork(ticket_id, priority, since, -1 - next(self._seq))
            tickets[ticket_id] = work
            tickets.move_to_end(ticket_id, last=False)
        work.items[:0] = items
        work.since = min(work.since, since)
        self._size += len(items)

    def candidates(self, *, now: float | None = None) -> Iterator[str]:
        """Tenants in the order they should be offered a turn.

        Tenants with interactive (or long-waiting) work first, then the rest; each group in
        round-robin order (the tenant served last comes last).
        """
        now = time.monotonic() if now is None else now
        urgent: list[str] = []
        rest: list[str] = []
        for tenant, tickets in self._tenants.items():
            if any(self._effective(work, now) is Priority.INTERACTIVE for work in tickets.values()):
                urgent.append(tenant)
            else:
                rest.append(tenant)
        yield from urgent
        yield from rest

    def pop(
        self, tenant: str, *, now: float | None = None
    ) -> tuple[uuid.UUID, Priority, float, list[T]]:
        """The tenant's next ticket with all its waiting items; the tenant goes to the back."""
        now = time.monotonic() if now is None else now
        tickets = self._tenants[tenant]
        work = min(tickets.values(), key=lambda w: (self._effective(w, now), w.seq))
        del tickets[work.ticket_id]
        self._started[work.ticket_id] = (work.seq, work.since)
        self._started.move_to_end(work.ticket_id)
        while len(self._started) > self._remember:
            self._started.popitem(last=False)
        self._tenants.move_to_end(tenant)
        if not tickets:
            del self._tenants[tenant]
        self._size -= len(work.items)
        return work.ticket_id, work.priority, work.since, work.items

    def depths(self) -> dict[str, int]:
        """Work items waiting, per tenant that has any."""
        return {tenant: self.waiting(tenant) for tenant in list(self._tenants)}

    def waiting(self, tenant: str) -> int:
        return sum(len(w.items) for w in self._tenants.get(tenant, {}).values())

    def _effective(self, work: _TicketWork[T], now: float) -> Priority:
        if work.priority is Priority.BULK and now - work.since >= self.promote_after_s:
            return Priority.INTERACTIVE
        return work.priority


# KEYS[1]: the tenant's lease set. ARGV: token, lease ms, limit.
# Expired leases are dropped first; a token that already holds a slot renews it.
_ACQUIRE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now_ms + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return 1
end
return 0
"""

# Renews only a lease that is still held (an expired one may already belong to someone else).
_RENEW = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lease = tonumber(ARGV[2])
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expires and tonumber(expires) > now_ms then
  redis.call('ZADD', KEYS[1], now_ms + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return 1
end
return 0
"""


class TenantSlots:
    """A per-tenant concurrency bound shared by every inference worker through Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        limit: int,
        lease_s: float = 60.0,
        limits: dict[str, int] | None = None,
        prefix: str = "tf:inference:slots",
    ) -> None:
        if limit < 1:
            raise ValueError("the per-tenant limit must be at least 1")
        self._redis = redis
        self.limit = limit
        self.limits = dict(limits or {})
        self.lease_ms = max(1000, int(lease_s * 1000))
        self._prefix = prefix
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)

    def limit_for(self, tenant: str) -> int:
        return self.limits.get(tenant, self.limit)

    def key(self, tenant: str) -> str:
        return f"{self._prefix}:{tenant}"

    async def try_acquire(self, tenant: str, token: str) -> bool:
        granted = await self._acquire(
            keys=[self.key(tenant)], args=[token, self.lease_ms, self.limit_for(tenant)]
        )
        return bool(granted)

    async def renew(self, tenant: str, token: str) -> bool:
        return bool(await self._renew(keys=[self.key(tenant)], args=[token, self.lease_ms]))

    async def release(self, tenant: str, token: str) -> None:
        await self._redis.zrem(self.key(tenant), token)

    async def in_use(self, tenant: str) -> int:
        """Live leases (expired ones are not counted)."""
        seconds, micros = await self._redis.time()
        now_ms = seconds * 1000 + micros // 1000
        return int(await self._redis.zcount(self.key(tenant), f"({now_ms}", "+inf"))


def new_lease_token(worker: str) -> str:
    return f"{worker}:{uuid.uuid4().hex}"
