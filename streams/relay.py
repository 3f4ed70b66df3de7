"""The relay: publishes every recorded event to JetStream, in the event store's global order.

It never publishes straight after a commit (no dual write); it follows the committed log with a
gap-safe reader, so a transaction that took a position early and committed late is never passed
over. Publishes are pipelined with `publish_async` and a bound on unacknowledged messages.

After a crash the relay resumes from what the stream holds: the newest `tf-position` there, minus
anything in the last window of in-flight publishes that did not land. `Nats-Msg-Id` lets the
stream's duplicate window absorb any overlap. A PostgreSQL advisory lock keeps one relay active.

When PostgreSQL or NATS goes away, the relay waits and tries again with backoff, and resumes the
same way as after a crash once both answer; it never exits for an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats.errors
from asyncpg.pool import PoolConnectionProxy
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError
from opentelemetry.trace import SpanKind

from streams import reconcile
from streams.contract.availability import Backoff, database_unavailable
from streams.contract.eventlog import (
    NOTIFY_CHANNEL,
    EventLogReader,
    RecordedEvent,
    leading,
)
from streams.contract.subjects import event_subject
from streams.contract.tracing import record_span
from streams.jetstream import StreamSettings, ensure_stream

logger = logging.getLogger(__name__)

RELAY_NAME = "jetstream"
LEADER_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"ticketflow.relay").digest()[:8], "big", signed=True
)
CE_SOURCE = "/ticketflow"

# What a NATS connection that is reconnecting, closed, or talking to a server whose JetStream is
# not up yet raises; and what a publish's ack is while the stream has no leader (a node of the
# cluster died and the others have not elected a new one yet): no responders, a 503.
_NATS_AWAY: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    nats.errors.TimeoutError,
    NoStreamResponseError,
    ServiceUnavailableError,
)


def dependency_unavailable(error: BaseException) -> bool:
    """Whether `error` means PostgreSQL or NATS is away (wait and retry), not a bug."""
    return isinstance(error, _NATS_AWAY) or database_unavailable(error)


@dataclass(frozen=True)
class RelaySettings:
    max_in_flight: int = 256
    batch_size: int = 500
    poll_interval_s: float = 1.0
    checkpoint_interval_s: float = 1.0
    ack_timeout_s: float = 10.0
    """How long a publish may wait for its ack; past it the relay starts again from the stream
    (a publish the server got as it died is never acknowledged: this bounds that stall)."""
    stream_check_interval_s: float = 5.0
    """How often an idle relay checks that the stream still holds what it published (also at
    start and after NATS reconnects); what it lost is published again (streams/reconcile.py)."""


def message_headers(event: RecordedEvent) -> dict[str, str]:
    """CloudEvents 1.0 binary-mode attributes plus ticketflow's own headers."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": f"{event.aggregate_id}:{event.version}",
        "ce-type": event.topic,
        "ce-source": f"{CE_SOURCE}/{event.tenant}",
        "ce-subject": f"{event.aggregate}/{event.aggregate_id}",
        "ce-time": event.timestamp,
        "content-type": "application/json",
        "Nats-Msg-Id": f"{event.aggregate_id}:{event.version}",
        "tf-position": str(event.position),
        "tf-version": str(event.version),
    }
    if event.traceparent:
        headers["traceparent"] = event.traceparent
    if event.hash is not None and event.prev_hash is not None:
        headers["tf-hash"] = event.hash.hex()
        headers["tf-prev-hash"] = event.prev_hash.hex()
    return headers


def message_for(event: RecordedEvent) -> tuple[str, bytes, dict[str, str]]:
    """Subject, body and headers of the message that carries `event`."""
    subject = event_subject(
        event.tenant, event.aggregate, event.aggregate_id, event.event_type.name
    )
    body = event.payload().model_dump_json().encode()
    return subject, body, message_headers(event)


class Relay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        nc: NATS,
        stream: StreamSettings,
        settings: RelaySettings | None = None,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._stream = stream
        self._settings = settings or RelaySettings()
        self._js: JetStreamContext = nc.jetstream(
            publish_async_max_pending=self._settings.max_in_flight
        )
        self._reader = EventLogReader(pool)
        self._wakeup = asyncio.Event()
        self.position = 0
        self.leading = False
        """Whether this relay holds the leader lock (it is the active one)."""
        self.published = 0
        self.republished = 0
        self._checked_at = 0.0
        self._reconnects = 0
        self._floor = 1
        """The oldest position the stream should still hold (older ones expired by max age)."""

    async def run(self, stop: asyncio.Event, backoff: Backoff | None = None) -> None:
        """Relay until `stop` is set.

        While PostgreSQL or NATS is away it waits (`backoff`) and starts again: leadership, then
        the position found in the stream. Any other error is raised.
        """
        backoff = backoff or Backoff()
        while not stop.is_set():
            try:
                await self._run(stop, backoff)
                return
            except Exception as error:
                if not dependency_unavailable(error):
                    raise
                logger.warning(
                    "relay paused, a server is unavailable (attempt %d): %s",
                    backoff.attempts + 1,
                    _describe(error),
                )
            await backoff.wait(stop)

    async def _run(self, stop: asyncio.Event, backoff: Backoff) -> None:
        async with leading(self._pool, LEADER_LOCK_KEY, "relay", stop) as leader:
            if leader is None:
                return
            self.leading = True
            try:
                await ensure_stream(self._js, self._stream)
                self.position = await self.resume_position()
                backoff.reset()
                logger.info("relay resuming after position %d", self.position)
                await self.check_stream()
                await leader.add_listener(NOTIFY_CHANNEL, self._on_notify)
                try:
                    await self._loop(leader, stop)
                finally:
                    with contextlib.suppress(Exception):
                        await leader.remove_listener(NOTIFY_CHANNEL, self._on_notify)
            finally:
                self.leading = False

    def _on_notify(self, *_: Any) -> None:
        self._wakeup.set()

    async def _loop(self, leader: PoolConnectionProxy[asyncpg.Record], stop: asyncio.Event) -> None:
        last_checkpoint = time.monotonic()
        while not stop.is_set():
            # Cleared before reading: a notification that arrives while we read, checkpoint
            # or ping must wake the wait below, not be wiped out after it was missed.
            self._wakeup.clear()
            events = await self._reader.read_after(self.position, self._settings.batch_size)
            if events:
                await self.publish(events)
                if time.monotonic() - last_checkpoint >= self._settings.checkpoint_interval_s:
                    await self._checkpoint()
                    last_checkpoint = time.monotonic()
                continue
            await self._checkpoint()
            last_checkpoint = time.monotonic()
            if self._stream_check_due():
                await self.check_stream()
            # Proves the leader connection (and with it the advisory lock) is still alive.
            await leader.fetchval("SELECT 1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._settings.poll_interval_s)

    async def publish(self, events: list[RecordedEvent]) -> None:
        """Publish in order with at most `max_in_flight` unacknowledged; advance on acks."""
        pending: deque[tuple[int, asyncio.Future[PubAck]]] = deque()
        try:
            for event in events:
                subject, body, headers = message_for(event)
                started = time.time_ns()
                future = await self._js.publish_async(subject, body, headers=headers)
                # The publish, as a child of the span that appended the event.
                record_span(
                    "ticketflow.relay",
                    f"publish {event.event_type.name}",
                    event.traceparent,
                    start_ns=started,
                    end_ns=time.time_ns(),
                    kind=SpanKind.PRODUCER,
                    attributes={
                        "messaging.system": "nats",
                        "messaging.operation.type": "publish",
                        "messaging.destination.name": subject,
                        "messaging.message.id": headers["Nats-Msg-Id"],
                        "ticketflow.position": event.position,
                    },
                )
                pending.append((event.position, future))
                while pending and (
                    pending[0][1].done() or len(pending) >= self._settings.max_in_flight
                ):
                    await self._settle(pending.popleft())
            while pending:
                await self._settle(pending.popleft())
        finally:
            # After a failure the acks still awaited are given up (each holds one of the
            # client's in-flight slots); the next start resumes from what the stream holds.
            for _, future in pending:
                future.cancel()

    async def _settle(self, entry: tuple[int, asyncio.Future[PubAck]]) -> None:
        position, future = entry
        ack = await asyncio.wait_for(future, timeout=self._settings.ack_timeout_s)
        if not ack.duplicate:
            self.published += 1
        self.position = position

    def _stream_check_due(self) -> bool:
        reconnects = int(self._nc.stats.get("reconnects", 0))
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            return True
        return time.monotonic() - self._checked_at >= self._settings.stream_check_interval_s

    async def check_stream(self) -> int:
        """Publishes again what the stream lost of what this relay had published (the stream
        deleted or purged, a message deleted, a node back on an empty store with no replica
        left); returns how many. Cheap when nothing is lost: the stream's message count
        against the store's count of events up to `position`."""
        self._checked_at = time.monotonic()
        try:
            info = await self._js.stream_info(self._stream.name)
            held = info.state.messages
        except NotFoundError:
            logger.warning("stream %s is gone; creating it again", self._stream.name)
            await ensure_stream(self._js, self._stream)
            held = 0
        if self.position < self._floor:
            return 0
        if held >= await reconcile.count_events(self._pool, self._floor, self.position):
            return 0
        report, events = await reconcile.verify(
            self._pool, self._js, self._stream.name, since=self._floor
        )
        self._floor = report.first_live or self._floor
        if not report.missing:
            return 0
        logger.warning(
            "the stream lacks %d events the relay had published (positions %d..%d); "
            "publishing them again from the event store",
            len(report.missing),
            report.missing[0],
            report.missing[-1],
        )
        landed = await reconcile.repair(self._js, report, events)
        self.republished += landed
        return landed

    async def _checkpoint(self) -> None:
        await self._pool.execute(
            "INSERT INTO relay_checkpoints (name, position) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now() "
            "WHERE relay_checkpoints.position < excluded.position",
            RELAY_NAME,
            self.position,
        )

    async def resume_position(self) -> int:
        """Where to continue: after the newest position in the stream, once the tail is whole.

        Publishes are pipelined, so the newest message in the stream may have landed while an
        earlier one was lost. Any event among the last in-flight window before the newest
        position that the stream lacks is published again here, before anything newer.
        """
        jsm = self._js
        info = await jsm.stream_info(self._stream.name)
        if not info.state.messages:
            return await self._checkpoint_position()
        window = self._settings.max_in_flight
        first = max(info.state.first_seq, info.state.last_seq - 4 * window + 1)
        in_stream = await self._positions_in_stream(first, info.state.last_seq)
        if not in_stream:
            return await self._checkpoint_position()
        newest = max(in_stream)
        rows = await self._pool.fetch(
            "SELECT notification_id FROM ticketflow_events WHERE notification_id <= $1 "
            "ORDER BY notification_id DESC LIMIT $2",
            newest,
            2 * window,
        )
        missing = sorted(
            row["notification_id"] for row in rows if row["notification_id"] not in in_stream
        )
        if missing:
            logger.warning("republishing %d events missing from the stream's tail", len(missing))
            events = await self._events_at(missing)
            await self.publish(events)
        return newest

    async def _positions_in_stream(self, first_seq: int, last_seq: int) -> set[int]:
        async def position_at(seq: int) -> int | None:
            try:
                message = await self._js.get_msg(self._stream.name, seq)
            except NotFoundError:
                return None
            value = (message.headers or {}).get("tf-position")
            return int(value) if value else None

        positions: set[int] = set()
        seqs = list(range(first_seq, last_seq + 1))
        for start in range(0, len(seqs), 64):
            found = await asyncio.gather(*(position_at(s) for s in seqs[start : start + 64]))
            positions.update(p for p in found if p is not None)
        return positions

    async def _events_at(self, positions: list[int]) -> list[RecordedEvent]:
        rows = await self._pool.fetch(
            "SELECT notification_id, originator_id, originator_version, topic, state, "
            "prev_hash, hash FROM ticketflow_events WHERE notification_id = ANY($1::bigint[]) "
            "ORDER BY notification_id",
            positions,
        )
        return [RecordedEvent.from_row(row) for row in rows]

    async def _checkpoint_position(self) -> int:
        value = await self._pool.fetchval(
            "SELECT position FROM relay_checkpoints WHERE name = $1", RELAY_NAME
        )
        return int(value or 0)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
