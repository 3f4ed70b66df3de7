"""The retention job: every `interval_s`, purge the documents tenants no longer keep
(`identity.retention`). It runs in the relay process; one copy at a time is active, the one that
holds its PostgreSQL advisory lock, and the others stand by (docs/adr/0021-crypto-shredding.md)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable

import asyncpg

from identity.retention import RetentionService
from streams.contract.eventlog import wait_for_leadership

logger = logging.getLogger(__name__)

LOCK_KEY = int.from_bytes(hashlib.sha256(b"ticketflow.retention").digest()[:8], "big", signed=True)
BATCH = 200
_RETRY_S = 5.0


class RetentionJob:
    def __init__(
        self,
        service: RetentionService | Callable[[], RetentionService],
        pool: asyncpg.Pool,
        interval_s: float,
    ) -> None:
        """`service`: the service, or what makes it once the job is the active copy."""
        self._service = service if isinstance(service, RetentionService) else None
        self._make = service if not isinstance(service, RetentionService) else None
        self._pool = pool
        self._interval_s = interval_s

    def close(self) -> None:
        if self._make is not None and self._service is not None:
            self._service.close()

    async def run_once(self, stop: asyncio.Event | None = None) -> int:
        """Purges everything due now, in batches; returns how many blobs were purged."""
        if self._service is None:
            assert self._make is not None
            self._service = await asyncio.to_thread(self._make)
        total = 0
        while stop is None or not stop.is_set():
            purged = await asyncio.to_thread(
                self._service.purge_expired,
                limit=BATCH,
                stop=lambda: stop is not None and stop.is_set(),
            )
            total += len(purged)
            if len(purged) < BATCH:
                break
        if total:
            logger.info("retention purged %d blobs", total)
        return total

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with self._pool.acquire() as conn:
                    await wait_for_leadership(conn, LOCK_KEY, "retention job", stop)
                    try:
                        while not stop.is_set():
                            await self.run_once(stop)
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(stop.wait(), timeout=self._interval_s)
                    finally:
                        with contextlib.suppress(Exception):
                            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                logger.warning("retention job: %s; trying again in %.0f s", error, _RETRY_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=_RETRY_S)
            except Exception:
                # The write side's own errors (psycopg's) must not stop the relay process.
                logger.exception("retention job failed; trying again in %.0f s", _RETRY_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=_RETRY_S)
