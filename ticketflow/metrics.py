"""Prometheus metrics of the workers: an endpoint per process and the samplers behind it.

Each worker (relay, ingest, inference, projector) serves `GET /metrics` on a port of its own
when one is configured: `TF_METRICS_PORT_<NAME>` (`TF_METRICS_PORT_RELAY`, …), or
`TF_METRICS_PORT` as a base (relay +0, ingest +1, inference +2, projector +3). These ports
answer without a token: bind them (`TF_HOST`) where only the scraper reaches. The APIs serve
`GET /metrics` on their own port to admins (security/metrics.py). See
docs/adr/0023-observability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import REGISTRY, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from streams.contract.eventlog import EVENTS_TABLE
from ticketflow.settings import Settings

logger = logging.getLogger(__name__)

WORKER_OFFSETS = {"relay": 0, "ingest": 1, "inference": 2, "projector": 3}

RELAY_LAG_POSITIONS = Gauge(
    "ticketflow_relay_lag_positions", "Events in the store that the relay has not published yet"
)
RELAY_LAG_SECONDS = Gauge(
    "ticketflow_relay_lag_seconds",
    "How long the relay has been behind the store (0 when caught up)",
)
RELAY_LEADER = Gauge(
    "ticketflow_relay_leader",
    "1 while this relay holds the leader lock (the active relay), 0 while it stands by",
)
PROJECTION_LAG_POSITIONS = Gauge(
    "ticketflow_projection_lag_positions", "Events in the store the projector has not applied yet"
)
PROJECTION_LAG_SECONDS = Gauge(
    "ticketflow_projection_lag_seconds",
    "How long the projector has been behind the store (0 when caught up)",
)
CONSUMER_PENDING = Gauge(
    "ticketflow_consumer_pending_messages",
    "Messages of the durable consumer not delivered yet (JetStream num_pending)",
    ["consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "ticketflow_consumer_ack_pending_messages",
    "Messages delivered and not acknowledged yet (JetStream num_ack_pending)",
    ["consumer"],
)
CONSUMER_REDELIVERED = Gauge(
    "ticketflow_consumer_redelivered_messages",
    "Messages delivered more than once and not acknowledged yet (JetStream num_redelivered)",
    ["consumer"],
)
DEAD_LETTERS = Counter(
    "ticketflow_dead_letters",
    "Messages this process gave up on after their last delivery",
    ["consumer"],
)
DEAD_LETTERS_STORED = Gauge(
    "ticketflow_dead_letters_stored_messages",
    "Messages in the dead-letter stream (TF_DEAD_LETTERS)",
)


def metrics_port(settings: Settings, name: str) -> int | None:
    """The port worker `name` serves its metrics on, if any."""
    own = getattr(settings, f"metrics_port_{name}", None)
    if own is not None:
        return int(own)
    if settings.metrics_port is None:
        return None
    return settings.metrics_port + WORKER_OFFSETS[name]


def serve_worker_metrics(settings: Settings, name: str) -> int | None:
    """Start the worker's metrics endpoint (a thread of this process) when it has a port."""
    port = metrics_port(settings, name)
    if port is None:
        return None
    start_http_server(port, addr=settings.host)
    logger.info("metrics on http://%s:%d/metrics", settings.host, port)
    return port


class _Behind:
    """Lag in positions and in seconds since the follower was last caught up."""

    def __init__(self, positions: Gauge, seconds: Gauge) -> None:
        self._positions = positions
        self._seconds = seconds
        self._caught_up_at = time.monotonic()

    def observe(self, head: int, position: int) -> None:
        behind = max(0, head - position)
        now = time.monotonic()
        if behind == 0:
            self._caught_up_at = now
        self._positions.set(behind)
        self._seconds.set(0 if behind == 0 else now - self._caught_up_at)


async def sample_lag(
    pool: asyncpg.Pool,
    kind: str,
    position: Callable[[], int],
    stop: asyncio.Event,
    *,
    interval_s: float = 2.0,
) -> None:
    """Every `interval_s`, how far `position` (the relay's or projector's) is behind the store."""
    behind = (
        _Behind(RELAY_LAG_POSITIONS, RELAY_LAG_SECONDS)
        if kind == "relay"
        else _Behind(PROJECTION_LAG_POSITIONS, PROJECTION_LAG_SECONDS)
    )
    while not stop.is_set():
        try:
            head = await pool.fetchval(
                f"SELECT coalesce(max(notification_id), 0) FROM {EVENTS_TABLE}"
            )
            behind.observe(int(head), position())
        except Exception as error:  # the database away: the gauges keep their last value
            logger.debug("lag sample failed: %s", error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def sample_consumer(
    js: JetStreamContext,
    stream: str,
    durable: str,
    stop: asyncio.Event,
    *,
    interval_s: float = 2.0,
) -> None:
    """Every `interval_s`, the durable consumer's pending and redelivered counts, and how many
    messages the dead-letter stream holds."""
    from handlers.consumer import DEAD_LETTER_STREAM

    while not stop.is_set():
        try:
            info = await js.consumer_info(stream, durable)
            CONSUMER_PENDING.labels(durable).set(info.num_pending or 0)
            CONSUMER_ACK_PENDING.labels(durable).set(info.num_ack_pending or 0)
            CONSUMER_REDELIVERED.labels(durable).set(info.num_redelivered or 0)
            dead = await js.stream_info(DEAD_LETTER_STREAM)
            DEAD_LETTERS_STORED.set(dead.state.messages)
        except Exception as error:  # not created yet, or NATS away
            logger.debug("consumer sample failed: %s", error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def counted_dead_letters(
    consumer: str, dead_letter: Callable[[Msg, str], Awaitable[None]]
) -> Callable[[Msg, str], Awaitable[None]]:
    """`dead_letter`, counting each message given up on."""

    async def counted(message: Msg, reason: str) -> None:
        DEAD_LETTERS.labels(consumer).inc()
        await dead_letter(message, reason)

    return counted


class TenantQueueCollector(Collector):
    """The inference scheduler's fair queue: subtasks waiting per tenant in this worker."""

    def __init__(self, depths: Callable[[], Mapping[str, int]]) -> None:
        self._depths = depths

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ticketflow_inference_queue_subtasks",
            "Ready subtasks this inference worker holds, waiting for the model, per tenant",
            labels=["tenant"],
        )
        for tenant, depth in sorted(self._depths().items()):
            family.add_metric([tenant], depth)
        yield family


_queue_sources: list[Callable[[], Mapping[str, int]]] = []


def _all_depths() -> dict[str, int]:
    total: dict[str, int] = {}
    for depths in list(_queue_sources):
        for tenant, depth in depths().items():
            total[tenant] = total.get(tenant, 0) + depth
    return total


def register_tenant_queue(depths: Callable[[], Mapping[str, int]]) -> None:
    """Count `depths` (a scheduler's queue) in the per-tenant queue gauge of this process
    (collected once, whatever the number of schedulers a process runs)."""
    if not _queue_sources:
        REGISTRY.register(TenantQueueCollector(_all_depths))
    _queue_sources.append(depths)


TICKETS = Gauge(
    "ticketflow_tickets",
    "Tickets by state and pipeline, as the read model holds them",
    ["state", "pipeline"],
)


async def refresh_ticket_counts(pool: asyncpg.Pool) -> None:
    """Set `TICKETS` from the read model (the query API, at each scrape)."""
    rows = await pool.fetch(
        "SELECT status, pipeline_name, count(*) AS n FROM rm_tickets GROUP BY 1, 2"
    )
    TICKETS.clear()
    for row in rows:
        TICKETS.labels(row["status"], row["pipeline_name"]).set(row["n"])
