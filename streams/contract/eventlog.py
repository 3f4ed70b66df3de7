"""The event store's global log as readers see it: its table, its row format, and a gap-safe reader.

The write side appends through the `eventsourcing` library into `ticketflow_events`; every row has
a `notification_id` from a sequence, which is the event's global *position*. A sequence hands out
numbers in call order, not commit order, and a rolled-back insert leaves a hole. A reader that
simply follows `notification_id` can therefore pass over a position that a slower transaction
fills a moment later. `EventLogReader` never does: it returns positions past a hole only after
every transaction that could still fill it has ended (see docs/adr/0002-gap-safe-event-log.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from streams.contract.events import BY_TOPIC, ContractPayload, EventType

logger = logging.getLogger(__name__)

EVENTS_TABLE = "ticketflow_events"
NOTIFY_CHANNEL = "ticketflow_events"
_SELECT = (
    "SELECT notification_id, originator_id, originator_version, topic, state, prev_hash, hash "
    f"FROM {EVENTS_TABLE}"
)


class UnknownEventTopic(LookupError):
    """A stored event whose topic this version of the contract does not know."""


def decode_state(raw: bytes) -> dict[str, Any]:
    """Decode an event's stored JSON state into plain JSON values.

    The library's transcoder wraps non-JSON values as `{"_type_": name, "_data_": value}`; the
    ones our events use (timestamps, UUIDs, decimals) all have a plain string form.
    """

    def unwrap(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"_type_", "_data_"}:
                return unwrap(value["_data_"])
            return {key: unwrap(item) for key, item in value.items()}
        if isinstance(value, list):
            return [unwrap(item) for item in value]
        return value

    decoded = unwrap(json.loads(raw))
    if not isinstance(decoded, dict):
        raise ValueError("event state is not a JSON object")
    return decoded


@dataclass(frozen=True)
class RecordedEvent:
    """One row of the global log, decoded."""

    position: int
    aggregate_id: UUID
    version: int
    topic: str
    state: dict[str, Any]
    prev_hash: bytes | None = None
    """The hash of the tenant's event before this one (docs/adr/0020-audit-chain.md)."""
    hash: bytes | None = None
    """sha256 over the previous hash and this event's canonical bytes."""

    @property
    def event_type(self) -> EventType:
        try:
            return BY_TOPIC[self.topic]
        except KeyError:
            raise UnknownEventTopic(self.topic) from None

    @property
    def timestamp(self) -> str:
        return str(self.state["timestamp"])

    @property
    def tenant(self) -> str:
        return str(self.state["tenant"])

    @property
    def traceparent(self) -> str | None:
        value = self.state.get("traceparent")
        return str(value) if value else None

    @property
    def aggregate(self) -> str:
        """The kind of aggregate that recorded the event: `ticket`, `user` or `tenant`."""
        return self.event_type.aggregate

    def payload(self) -> ContractPayload:
        """The contract payload of this event (the message body integrators receive).

        Fields the contract keeps private (a password hash) are left out here, so nothing that
        publishes or serves payloads can leak them.
        """
        event_type = self.event_type
        hidden = {"timestamp", "traceparent", "originator_topic", *event_type.private_fields}
        fields = {key: value for key, value in self.state.items() if key not in hidden}
        return event_type.payload.model_validate({event_type.id_field: self.aggregate_id, **fields})

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> RecordedEvent:
        return cls(
            position=row["notification_id"],
            aggregate_id=row["originator_id"],
            version=row["originator_version"],
            topic=row["topic"],
            state=decode_state(bytes(row["state"])),
            prev_hash=_bytes_or_none(row.get("prev_hash")),
            hash=_bytes_or_none(row.get("hash")),
        )


def _bytes_or_none(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


class EventLogReader:
    """Reads the global log in position order and never skips a position that may still fill."""

    def __init__(self, pool: asyncpg.Pool, *, lock_timeout_s: float = 2.0) -> None:
        self._pool = pool
        self._lock_timeout_ms = int(lock_timeout_s * 1000)

    async def read_after(self, position: int, limit: int = 500) -> list[RecordedEvent]:
        """Events after `position`, in order, that no in-flight transaction can precede.

        Returns an empty list when nothing is safe to read yet; call again after a notification.
        """
        rows = await self._pool.fetch(
            f"{_SELECT} WHERE notification_id > $1 ORDER BY notification_id LIMIT $2",
            position,
            limit,
        )
        contiguous: list[asyncpg.Record] = []
        expected = position + 1
        for row in rows:
            if row["notification_id"] != expected:
                break
            contiguous.append(row)
            expected += 1
        if contiguous or not rows:
            return [RecordedEvent.from_row(row) for row in contiguous]
        # A hole right after `position`: wait until nothing in flight can fill it.
        high_water_mark = await self.high_water_mark()
        if high_water_mark is None or high_water_mark <= position:
            return []
        rows = await self._pool.fetch(
            f"{_SELECT} WHERE notification_id > $1 AND notification_id <= $2 "
            "ORDER BY notification_id LIMIT $3",
            position,
            high_water_mark,
            limit,
        )
        return [RecordedEvent.from_row(row) for row in rows]

    async def high_water_mark(self) -> int | None:
        """The highest position below which no hole can still be filled, or None if busy.

        Taking a SHARE lock waits for every transaction that is inserting into the log (they hold
        ROW EXCLUSIVE or EXCLUSIVE until they end), so once it is granted every position handed
        out so far is either committed or gone for good.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
            try:
                await conn.execute(f"LOCK TABLE {EVENTS_TABLE} IN SHARE MODE")
            except asyncpg.exceptions.LockNotAvailableError:
                logger.info("event log writers still in flight; retrying later")
                return None
            value = await conn.fetchval(
                f"SELECT coalesce(max(notification_id), 0) FROM {EVENTS_TABLE}"
            )
            return int(value)

    async def max_position(self) -> int:
        value = await self._pool.fetchval(
            f"SELECT coalesce(max(notification_id), 0) FROM {EVENTS_TABLE}"
        )
        return int(value)


@contextlib.asynccontextmanager
async def leading(
    pool: asyncpg.Pool, lock_key: int, role: str, stop: asyncio.Event
) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[asyncpg.Record] | None]:
    """A connection of `pool` that holds `role`'s advisory lock (`wait_for_leadership`), or None
    when `stop` was set first; its lock and LISTEN are given back when the block ends
    (`release_leadership`), however it ends."""
    async with pool.acquire() as conn:
        try:
            await wait_for_leadership(conn, lock_key, role, stop)
            yield None if stop.is_set() else conn
        finally:
            await release_leadership(conn)


async def release_leadership(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
) -> None:
    """Give back what leading left on `conn`'s session (the advisory lock of
    `wait_for_leadership`, the LISTEN) before it returns to a pool that does not reset its
    connections (`reset_nothing`). A session that cannot is ended: that frees them too."""
    try:
        await conn.execute("SELECT pg_advisory_unlock_all(); UNLISTEN *", timeout=5)
    except Exception as error:
        # Lost already (the pool has dropped it), or failing now: ending it frees the lock.
        logger.info("closing a leader's connection that could not be reset: %s", error)
        with contextlib.suppress(Exception):
            conn.terminate()
    except BaseException:
        with contextlib.suppress(Exception):
            conn.terminate()  # cancelled mid-way: the lock must not go back to the pool
        raise


async def reset_nothing(connection: asyncpg.Connection) -> None:
    """A pool's reset for connections given back as they were lent. asyncpg rolls back an open
    transaction and drops listeners itself first; its default reset then sends one more query
    (unlock advisory locks, close cursors, UNLISTEN, RESET ALL) on every release. A pool whose
    users set nothing outside transactions, open cursors only inside them, and give back their
    leader's lock and LISTEN themselves (`release_leadership`) has nothing for it to do."""


async def wait_for_leadership(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
    lock_key: int,
    role: str,
    stop: asyncio.Event,
) -> None:
    """Take the session advisory lock that makes `conn` the one active `role`; stand by until
    it is free or `stop` is set. The lock lives as long as the connection."""
    waiting_logged = False
    while not stop.is_set():
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key):
            return
        if not waiting_logged:
            logger.info("another %s is active; standing by", role)
            waiting_logged = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=2.0)
