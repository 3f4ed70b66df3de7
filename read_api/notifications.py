"""One LISTEN connection per process, shared by every request that waits for something new.

A waiter takes the channel's current `latch` *before* it reads the database and waits on it
after: a notification that arrives in between sets that latch, so none is lost. Each
notification sets the latch and replaces it with a fresh one (a broadcast). Waiters always use a
timeout as well, because a notification can be missed while the connection is re-established.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class Notifications:
    def __init__(
        self, connect: Connect, channels: Iterable[str], *, reconnect_interval_s: float = 2.0
    ) -> None:
        self._connect = connect
        self._channels = tuple(channels)
        self._latches = {channel: asyncio.Event() for channel in self._channels}
        self._reconnect_interval_s = reconnect_interval_s
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    def latch(self, channel: str) -> asyncio.Event:
        """Set by the next notification on `channel`."""
        return self._latches[channel]

    async def wait(self, latch: asyncio.Event, seconds: float) -> bool:
        """Wait for `latch` at most `seconds`; True when it was set."""
        if seconds <= 0:
            return latch.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(latch.wait(), seconds)
        return latch.is_set()

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        """Listen now if the database answers; keep (re)connecting in the background."""
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await self._listen()
        self._task = asyncio.create_task(self._supervise())

    async def close(self) -> None:
        self._closed.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=5)
            self._conn = None

    async def _listen(self) -> None:
        conn = await self._connect()
        try:
            for channel in self._channels:
                await conn.add_listener(channel, self._on_notify)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        # Whatever happened while not listening may have been missed: wake every waiter.
        for channel in self._channels:
            self._fire(channel)

    async def _supervise(self) -> None:
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self._reconnect_interval_s)
            if self._closed.is_set() or self.listening:
                continue
            try:
                await self._listen()
                logger.info("listening for notifications again")
            except (OSError, asyncpg.PostgresError) as error:
                logger.warning("cannot listen for notifications: %s", error)

    def _on_notify(self, _conn: Any, _pid: int, channel: str, _payload: object) -> None:
        self._fire(channel)

    def _fire(self, channel: str) -> None:
        latch = self._latches[channel]
        self._latches[channel] = asyncio.Event()
        latch.set()
