"""`ticketflow streams verify [--repair]`: the event store against its JetStream copy."""

from __future__ import annotations

import asyncpg

from streams import reconcile
from ticketflow.bootstrap import close_nats, connect_nats, server_urls
from ticketflow.settings import Settings


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
            report, events = await reconcile.verify(pool, js, settings.stream_name, since=since)
            if not repair or not report.missing:
                return report, None if not repair else 0
            repaired = await reconcile.repair(js, report, events)
            report, _ = await reconcile.verify(pool, js, settings.stream_name, since=since)
            return report, repaired
        finally:
            await close_nats(nc)
    finally:
        await pool.close()
