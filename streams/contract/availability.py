"""Telling an outage from a bug: which errors mean that PostgreSQL is away, and how long a
process that follows the event log waits before it tries again.

A lost, refused or shut-down connection is an outage: the server is restarting, or the network
is. A process that reads the log waits and retries on those (`Backoff`); any other error is a
bug and is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import asyncpg

# No connection (08xxx), or the server closed or refused the session: shut down (57P01),
# crashed (57P02), still starting (57P03), or out of connection slots (53300).
_SERVER_AWAY: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` (from asyncpg) says the database cannot be reached right now.

    Also true for the operating system's connection errors (refused, reset, broken pipe) and a
    connect or acquire that timed out.
    """
    if isinstance(error, _SERVER_AWAY):
        return True
    if isinstance(error, asyncpg.InterfaceError):
        # `connection is closed`, `connection was closed in the middle of operation`; other
        # interface errors are misuse, not an outage.
        return "closed" in str(error)
    return isinstance(error, ConnectionError | TimeoutError)


class Backoff:
    """Delays between attempts: from `initial_s`, doubling up to `max_s`, with some jitter so
    that processes restarted together do not knock together. `reset()` after a success."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 10.0) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError("need 0 < initial_s <= max_s")
        self.initial_s = initial_s
        self.max_s = max_s
        self._next_s = initial_s
        self.attempts = 0

    def reset(self) -> None:
        self._next_s = self.initial_s
        self.attempts = 0

    def next_delay(self) -> float:
        delay = self._next_s * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not secrets
        self._next_s = min(self.max_s, self._next_s * 2)
        self.attempts += 1
        return min(delay, self.max_s)

    async def wait(self, stop: asyncio.Event) -> None:
        """Sleep the next delay, or less when `stop` is set meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.next_delay())
