"""`ticketflow streams verify [--repair]`: the event store against its JetStream copy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import nats.errors
from nats.js.errors import ServiceUnavailableError

from streams import reconcile
from streams.contract.eventlog import RecordedEvent
from ticketflow.bootstrap import close_nats, connect_nats, server_urls
from ticketflow.settings import Settings

T = TypeVar("T")

UNAVAILABLE_WAIT_S = 30.0
"""How long a check waits out a stream that does not answer: a clustered stream has no leader for
a few seconds after its leader's node went away or one came back."""


async def _when_available(
    call: Callable[[], Awaitable[T]], wait_s: float = UNAVAILABLE_WAIT_S
) -> T:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await call()
        except (ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def verify_stream(
    settings: Settings, *, repair: bool = False, since: int = 1
) -> tuple[reconcile.Report, int | None]:
    """`ticketflow streams verify`: the event store against the stream, repaired if asked
    (then the report is of the check after the repair)."""
    urls = server_urls(settings)
    pool = await asyncpg.create_pool(urls.database_url, min_size=1, max_size=2)
    try:
        nc = await connect_nats(urls.nats_url, "ticketflow-verify", urls.nats_credentials)
        try:
            js = nc.jetstream()

            def check() -> Awaitable[tuple[reconcile.Report, list[RecordedEvent]]]:
                return reconcile.verify(pool, js, settings.stream_name, since=since)

            report, events = await _when_available(check)
            if not repair or not report.missing:
                return report, None if not repair else 0
            repaired = await reconcile.repair(js, report, events)
            report, _ = await _when_available(check)
            return report, repaired
        finally:
            await close_nats(nc)
    finally:
        await pool.close()
