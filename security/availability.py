"""What both APIs do when a server they need is away: tell the outage from a bug, answer it with
503 and `Retry-After` (`security.http`), and wait no longer than a moment for Redis.

`unavailable_dependency(error)` names the server an exception says is unreachable
(`"database"`, `"redis"`, `"nats"`) or returns None for anything else. `open_redis` makes the
Redis client every process uses: short connect and read timeouts, a timed-out command never
retried, and once a command found Redis away the next ones fail at once for a second instead of
each waiting out its own timeout (one request may call Redis four times: rate limits,
idempotency, and the token's revocation check twice).
"""

from __future__ import annotations

import time
from typing import Any

import nats.errors
import psycopg
import redis.exceptions
from nats.js.errors import ServiceUnavailableError
from psycopg_pool import PoolTimeout
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streams.contract.availability import database_unavailable

DATABASE = "database"
REDIS = "redis"
NATS = "nats"

MESSAGES = {
    DATABASE: "The database is unavailable; retry shortly.",
    REDIS: "The cache (Redis) is unavailable; retry shortly.",
    NATS: "The message broker (NATS) is unavailable; retry shortly.",
}
"""What a client is told: no addresses, no driver or SQL text."""

_NATS_AWAY: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    nats.errors.TimeoutError,
    ServiceUnavailableError,
)


class DependencyUnavailable(Exception):
    """Raised where code finds a server it needs away; answered 503 like the drivers' errors."""

    def __init__(self, dependency: str, detail: str = "") -> None:
        super().__init__(f"{dependency} unavailable{': ' + detail if detail else ''}")
        self.dependency = dependency


def unavailable_dependency(error: BaseException) -> str | None:
    """The server `error` says cannot be reached now, or None when it is not an outage.

    Wrapped errors count by their cause (the `eventsourcing` library raises its own
    `OperationalError` from psycopg's)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _classify(current)
        if found is not None:
            return found
        current = current.__cause__
    return None


def _classify(error: BaseException) -> str | None:
    if isinstance(error, DependencyUnavailable):
        return error.dependency
    for server, classes in _OUTAGES:
        if isinstance(error, classes):
            return server
    # psycopg's `the connection is closed`; its other interface errors are misuse.
    if isinstance(error, psycopg.InterfaceError) and "closed" in str(error):
        return DATABASE
    if database_unavailable(error):  # asyncpg, and a refused or reset socket
        return DATABASE
    return None


_OUTAGES: tuple[tuple[str, tuple[type[BaseException], ...]], ...] = (
    (REDIS, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)),
    (NATS, _NATS_AWAY),
    # psycopg: no connection, a lost one, a shut-down server, or no connection free in time.
    (DATABASE, (psycopg.OperationalError, PoolTimeout)),
)


class FailFastRedis(Redis):
    """A Redis client that stops waiting on a Redis that is away: after a command failed to
    connect or timed out, every command fails at once for `pause_s`, then one tries again."""

    pause_s = 1.0
    _unavailable_until = 0.0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if time.monotonic() < self._unavailable_until:
            raise redis.exceptions.ConnectionError("Redis is unavailable (it just failed)")
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self._unavailable_until = time.monotonic() + self.pause_s
            raise


def open_redis(url: str, *, timeout_s: float = 1.0, pause_s: float = 1.0) -> FailFastRedis:
    """The Redis client of a process: connects lazily, waits at most `timeout_s` for a connection
    or a reply. A refused or reset connection is retried once (a pooled connection that a Redis
    restart closed); a timed-out command is not retried."""
    client = FailFastRedis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
    )
    assert isinstance(client, FailFastRedis)  # from_url builds an instance of its class
    client.pause_s = pause_s
    return client
