"""Event-to-handler latency: from a committed `created` event to a handler starting on it.

Run it as `python -m benchmarks.handler_latency`. One run starts its own embedded PostgreSQL, NATS
and Redis in a temporary directory, applies the migrations and measures, with the processes laid
out as a deployment lays them out (a writer, the relay, a worker):

1. **Handler path.** A producer process sends `CreateTicket` commands (a small in-memory PDF,
   shipped pipeline) through `CommandService` on an open-loop schedule (`--rate` per second, evenly
   spaced unless `--arrivals poisson`) and notes the moment each call returns, i.e. after the
   commit. The real relay
   (`ticketflow.bootstrap.run_relay`) runs in a process of its own, and a
   `handlers.consumer.JetStreamWorker` in this process consumes the `created` subject filter with
   the ingest worker's settings; its handle function only notes when it starts on each ticket.
2. **Raw baseline.** The same producer process publishes the very bodies and headers of those
   `created` events with `js.publish` on the same schedule to a scratch stream (subjects moved
   from `tf.evt.>` to `bench.lat.>`), consumed by a `JetStreamWorker` with the same settings.

Rounds alternate (handler path, raw, handler path, raw, ...) and the delays of all rounds are
pooled. Every clock is `time.monotonic()`, which all processes of one machine share; the split of
the path into parts also uses the wall clock against the stream's own storage timestamps.

With `--compare-tracing` the handler path runs with tracing off against tracing on instead of
against the raw baseline: the producer, the relay and the handler's consumer span
(`ticketflow.telemetry.traced_consumer`, as the ingest worker wraps its handler) export over
OTLP/HTTP to a receiver in a process of its own (`benchmarks.tracing`). Each mode has its own
producer process; the relay process is started anew, with the `OTEL_*` settings of its mode,
before each round and warmed up untimed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from benchmarks.harness import run_with_servers
from benchmarks.tracing import MODES, ReceiverProcess, flush_tracing, spans_note, use_tracing
from benchmarks.write_path import OWNER, Summary, Timing, environment, tiny_pdf
from commands.messages import CreateTicket, UploadedDocument
from commands.service import CommandService
from handlers.consumer import ConsumerSettings, JetStreamWorker
from streams.contract import PipelineDefinition
from streams.contract.eventlog import EVENTS_TABLE, NOTIFY_CHANNEL, EventLogReader, RecordedEvent
from streams.contract.subjects import PREFIX, event_filter
from streams.jetstream import ensure_stream
from streams.relay import message_for
from ticketflow.bootstrap import command_service, connect_nats, run_relay, stream_settings
from ticketflow.embedded import EmbeddedServers
from ticketflow.pipelines import ShippedPipelines
from ticketflow.settings import Settings
from ticketflow.telemetry import traced_consumer

TENANT = "bench"
WARMUP_TENANT = "bench-warmup"
RAW_STREAM = "BENCH_LATENCY"
RAW_PREFIX = "bench.lat"
HANDLER_DURABLE = "bench-latency-handler"
RAW_DURABLE = "bench-latency-raw"
SETTLE_TIMEOUT_S = 30.0

# One `created` message as the producer publishes it: ticket id, subject, body, headers.
RawMessage = tuple[str, str, bytes, dict[str, str]]


# -- inputs -----------------------------------------------------------------------------------


def bench_settings(database_url: str, nats_url: str, redis_url: str) -> Settings:
    return Settings(env="test", database_url=database_url, nats_url=nats_url, redis_url=redis_url)


def create_command(pipeline: PipelineDefinition, tenant: str, index: int) -> CreateTicket:
    """A `CreateTicket` with one small PDF per document role; its id follows from the key."""
    return CreateTicket(
        tenant=tenant,
        owner=OWNER,
        documents=tuple(
            UploadedDocument(
                role,
                f"{role}-{index}.pdf",
                "application/pdf",
                tiny_pdf(f"latency/{tenant}/{index}/{role}"),
            )
            for role in pipeline.document_roles
        ),
        pipeline=pipeline.name,
        idempotency_key=f"handler-latency-{index}",
    )


def schedule(count: int, rate: float, arrivals: str, rng: random.Random) -> list[float]:
    """Send offsets in seconds: evenly spaced, or a Poisson process of the same mean rate."""
    if arrivals == "fixed":
        return [i / rate for i in range(count)]
    offsets: list[float] = []
    at = 0.0
    for _ in range(count):
        offsets.append(at)
        at += rng.expovariate(rate)
    return offsets


# -- the producer process ---------------------------------------------------------------------
# One long-lived process (a pool of one) keeps its command service, event loop and NATS
# connection between rounds, so only the first warm-up round pays for connecting.


@dataclass
class _Producer:
    service: CommandService | None = None
    loop: asyncio.AbstractEventLoop | None = None
    nc: NATS | None = None


_PRODUCER = _Producer()


def append_round(
    database_url: str, commands: Sequence[CreateTicket], offsets: Sequence[float]
) -> list[tuple[str, float, float]]:
    """Runs in the producer: each command on its schedule; (ticket id, returned at, wall)."""
    if _PRODUCER.service is None:
        _PRODUCER.service = command_service(bench_settings(database_url, "", ""), database_url)
    service = _PRODUCER.service
    returned: list[tuple[str, float, float]] = []
    start = time.monotonic() + 0.02
    for command, offset in zip(commands, offsets, strict=True):
        time.sleep(max(0.0, start + offset - time.monotonic()))
        result = service.create_ticket(command)
        at, wall = time.monotonic(), time.time()
        if result.appended != 1:
            raise RuntimeError(f"CreateTicket appended {result.appended} events, expected 1")
        returned.append((str(result.ticket_id), at, wall))
    return returned


def publish_round(
    nats_url: str,
    nats_credentials: Path | None,
    messages: Sequence[RawMessage],
    offsets: Sequence[float],
) -> list[tuple[str, float, float, float]]:
    """Runs in the producer: (ticket id, publish called at, acknowledged at, wall at the call)."""
    if _PRODUCER.loop is None:
        _PRODUCER.loop = asyncio.new_event_loop()
    loop = _PRODUCER.loop
    if _PRODUCER.nc is None:
        _PRODUCER.nc = loop.run_until_complete(
            connect_nats(nats_url, "bench-latency-producer", nats_credentials)
        )
    return loop.run_until_complete(_publish(_PRODUCER.nc, messages, offsets))


async def _publish(
    nc: NATS, messages: Sequence[RawMessage], offsets: Sequence[float]
) -> list[tuple[str, float, float, float]]:
    js = nc.jetstream()
    published: list[tuple[str, float, float, float]] = []
    start = time.monotonic() + 0.02
    for (ticket, subject, body, headers), offset in zip(messages, offsets, strict=True):
        await asyncio.sleep(max(0.0, start + offset - time.monotonic()))
        sent, wall = time.monotonic(), time.time()
        ack = await js.publish(subject, body, headers=headers)
        acked = time.monotonic()
        if ack.duplicate:
            raise RuntimeError(f"raw publish for {ticket} was a duplicate")
        published.append((ticket, sent, acked, wall))
    return published


def start_producer(endpoint: str | None) -> None:
    """Initialises a producer of `--compare-tracing`: tracing exporting to `endpoint`, or off."""
    use_tracing(endpoint, "ticketflow-commands")


def close_producer() -> None:
    flush_tracing()
    if _PRODUCER.service is not None:
        _PRODUCER.service.close()
    if _PRODUCER.loop is not None:
        if _PRODUCER.nc is not None:
            _PRODUCER.loop.run_until_complete(_PRODUCER.nc.drain())
        _PRODUCER.loop.close()
    _PRODUCER.service, _PRODUCER.loop, _PRODUCER.nc = None, None, None


# -- the relay process ------------------------------------------------------------------------


def relay_process(
    database_url: str,
    nats_url: str,
    redis_url: str,
    stop: multiprocessing.synchronize.Event,
    tracing: tuple[str | None] | None = None,
) -> None:
    """The relay as its own process runs it (on uvloop, as `ticketflow worker relay` does), until
    `stop` is set. With `tracing`, the process first takes the `OTEL_*` settings of exporting to
    `tracing[0]`, or of no tracing for None, and exports what it still holds before it exits."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if tracing is not None:
        use_tracing(tracing[0], "ticketflow-relay")
    uvloop.run(_relay_until(bench_settings(database_url, nats_url, redis_url), stop))
    if not flush_tracing():
        raise RuntimeError("the relay's spans were not all exported")


async def _relay_until(settings: Settings, stop: multiprocessing.synchronize.Event) -> None:
    halt = asyncio.Event()
    task = asyncio.create_task(run_relay(settings, halt))
    while not stop.is_set():
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            break
    halt.set()
    await task


# -- the consuming side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """When a handler started on a ticket, and when the stream stored its message."""

    at: float  # time.monotonic()
    wall: float  # time.time()
    stored: float  # the stream's timestamp, seconds since the epoch


@dataclass
class Probe:
    """The handle function: notes the first start per ticket id and nothing else."""

    seen: dict[str, Seen] = field(default_factory=dict)
    redelivered: int = 0
    missing: set[str] = field(default_factory=set)
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, message: Msg) -> None:
        at, wall = time.monotonic(), time.time()
        ticket = str(json.loads(message.data)["ticket_id"])
        metadata = message.metadata
        if metadata.num_delivered > 1:
            self.redelivered += 1
        self.seen.setdefault(ticket, Seen(at, wall, metadata.timestamp.timestamp()))
        self.missing.discard(ticket)
        if not self.missing:
            self.complete.set()

    def expect(self, tickets: Sequence[str]) -> None:
        self.missing = set(tickets) - set(self.seen)
        self.complete = asyncio.Event()
        if not self.missing:
            self.complete.set()


@dataclass
class Failures:
    """The dead-letter callback: a handler that only takes the time should never get here."""

    reasons: list[str] = field(default_factory=list)

    async def __call__(self, message: Msg, reason: str) -> None:
        self.reasons.append(f"{message.subject}: {reason}")


@dataclass(eq=False)
class Notifications:
    """When this process hears the event store's NOTIFY, as the relay's listener does."""

    heard: list[tuple[float, float]] = field(default_factory=list)  # monotonic, wall

    def __call__(self, *_: Any) -> None:
        self.heard.append((time.monotonic(), time.time()))


@dataclass
class Rig:
    """Everything that runs on the consuming side for the whole benchmark."""

    pool: asyncpg.Pool
    handler: Probe
    raw: Probe
    notifications: Notifications
    failures: Failures
    tasks: list[asyncio.Task[None]]
    relay: multiprocessing.process.BaseProcess

    async def settle(self, probe: Probe, tickets: Sequence[str], what: str) -> None:
        """Wait until `probe` has seen every ticket, failing fast if a part stopped."""
        probe.expect(tickets)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not probe.complete.is_set():
            for task in self.tasks:
                if task.done():
                    await task  # raises what stopped it
                    raise RuntimeError("a worker stopped")
            if not self.relay.is_alive():
                raise RuntimeError(f"the relay process exited with {self.relay.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {len(probe.missing)} of {len(tickets)} never handled")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(probe.complete.wait(), 1.0)
        if self.failures.reasons:
            raise RuntimeError(f"dead-lettered: {self.failures.reasons[:3]}")


async def created_messages(pool: asyncpg.Pool, tickets: Sequence[str]) -> list[RawMessage]:
    """The `created` messages the relay sent for these tickets, moved to the scratch subjects."""
    rows = await pool.fetch(
        "SELECT notification_id, originator_id, originator_version, topic, state "
        f"FROM {EVENTS_TABLE} WHERE originator_id = ANY($1::uuid[]) AND originator_version = 1",
        [UUID(t) for t in tickets],
    )
    by_ticket: dict[str, RawMessage] = {}
    for row in rows:
        subject, body, headers = message_for(RecordedEvent.from_row(row))
        if not subject.endswith(".created"):
            raise RuntimeError(f"first event of {row['originator_id']} is on {subject}")
        ticket = str(row["originator_id"])
        by_ticket[ticket] = (ticket, RAW_PREFIX + subject.removeprefix(PREFIX), body, headers)
    return [by_ticket[t] for t in tickets]


async def fresh_scratch_stream(nc: NATS, settings: Settings) -> None:
    js = nc.jetstream()
    relay_stream = stream_settings(settings)
    await ensure_stream(js, relay_stream)
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(RAW_STREAM)
    await js.add_stream(
        dataclasses.replace(
            relay_stream.config(),
            name=RAW_STREAM,
            subjects=[f"{RAW_PREFIX}.>"],
            description="handler-latency benchmark scratch stream",
        )
    )


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Delays:
    """Milliseconds per measured ticket, by what they span, pooled over rounds."""

    rounds: dict[str, list[Timing]] = field(default_factory=dict)

    def add(self, label: str, seconds: float, delays_s: Sequence[float]) -> None:
        ms = [d * 1000 for d in delays_s]
        self.rounds.setdefault(label, []).append(Timing(len(ms), len(ms), seconds, ms))

    def summary(self, label: str) -> Summary | None:
        rounds = self.rounds.get(label)
        return Summary(label, tuple(rounds)) if rounds else None


HANDLER = "event -> handler, via relay"
RAW_CALL = "raw js.publish -> handler"
RAW_ACK = "raw ack -> handler"
COMMIT_NOTIFY = "handler: commit -> NOTIFY"
NOTIFY_STORED = "handler: NOTIFY -> stored"
COMMIT_STORED = "handler: commit -> stored"
HANDLER_FETCH = "handler: stored -> handler"
RAW_STORED = "raw: publish -> stored"
RAW_FETCH = "raw: stored -> handler"
PARTS = (  # key, path, what it spans
    (COMMIT_NOTIFY, "handler path", "commit returned -> NOTIFY heard"),
    (NOTIFY_STORED, "handler path", "NOTIFY heard -> stored in stream"),
    (COMMIT_STORED, "handler path", "commit returned -> stored in stream"),
    (HANDLER_FETCH, "handler path", "stored in stream -> handler"),
    (RAW_STORED, "raw path", "publish called -> stored in stream"),
    (RAW_FETCH, "raw path", "stored in stream -> handler"),
)


async def handler_round(
    rig: Rig,
    producer: ProcessPoolExecutor,
    database_url: str,
    commands: Sequence[CreateTicket],
    offsets: Sequence[float],
    delays: Delays | None,
) -> list[str]:
    """One round of the handler path; returns the tickets in send order."""
    loop = asyncio.get_running_loop()
    rig.notifications.heard.clear()
    returned = await loop.run_in_executor(producer, append_round, database_url, commands, offsets)
    tickets = [ticket for ticket, _, _ in returned]
    await rig.settle(rig.handler, tickets, "handler path")
    if delays is not None:
        seen = rig.handler.seen
        seconds = returned[-1][1] - returned[0][1]
        delays.add(HANDLER, seconds, [seen[t].at - at for t, at, _ in returned])
        delays.add(COMMIT_STORED, seconds, [seen[t].stored - wall for t, _, wall in returned])
        delays.add(HANDLER_FETCH, seconds, [seen[t].wall - seen[t].stored for t, *_ in returned])
        heard = rig.notifications.heard
        if len(heard) == len(returned):  # one NOTIFY per commit, heard in commit order
            pairs = list(zip(heard, returned, strict=True))
            delays.add(COMMIT_NOTIFY, seconds, [h - at for (h, _), (_, at, _) in pairs])
            delays.add(
                NOTIFY_STORED, seconds, [seen[t].stored - wall for (_, wall), (t, *_) in pairs]
            )
    return tickets


async def raw_round(
    rig: Rig,
    producer: ProcessPoolExecutor,
    nats_url: str,
    nats_credentials: Path | None,
    messages: Sequence[RawMessage],
    offsets: Sequence[float],
    delays: Delays | None,
) -> None:
    loop = asyncio.get_running_loop()
    published = await loop.run_in_executor(
        producer, publish_round, nats_url, nats_credentials, messages, offsets
    )
    await rig.settle(rig.raw, [ticket for ticket, *_ in published], "raw path")
    if delays is not None:
        seen = rig.raw.seen
        seconds = published[-1][1] - published[0][1]
        delays.add(RAW_CALL, seconds, [seen[t].at - sent for t, sent, _, _ in published])
        delays.add(RAW_ACK, seconds, [seen[t].at - acked for t, _, acked, _ in published])
        delays.add(RAW_STORED, seconds, [seen[t].stored - wall for t, _, _, wall in published])
        delays.add(RAW_FETCH, seconds, [seen[t].wall - seen[t].stored for t, *_ in published])


async def measure(
    settings: Settings,
    consumer: ConsumerSettings,
    warmup: Sequence[CreateTicket],
    rounds: Sequence[tuple[Sequence[CreateTicket], Sequence[float]]],
    rate: float,
) -> tuple[Delays, list[tuple[str, float]], int, float]:
    """Sets up both paths, warms them up and runs the alternating rounds.

    Returns the delays, the relay's steps timed alone, the number of redeliveries and the mean
    `created` body size.
    """
    assert settings.database_url
    assert settings.nats_url
    assert settings.redis_url
    database_url, nats_url = settings.database_url, settings.nats_url
    credentials = settings.nats_credentials
    admin = await connect_nats(nats_url, "bench-latency-admin", credentials)
    handler_nc = await connect_nats(nats_url, "bench-latency-handler", credentials)
    raw_nc = await connect_nats(nats_url, "bench-latency-raw", credentials)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    listener = await asyncpg.connect(database_url)
    context = multiprocessing.get_context("spawn")
    relay_stop = context.Event()
    relay = context.Process(
        target=relay_process,
        args=(database_url, nats_url, settings.redis_url, relay_stop),
        name="bench-relay",
    )
    stop = asyncio.Event()
    rig = Rig(pool, Probe(), Probe(), Notifications(), Failures(), [], relay)
    try:
        await fresh_scratch_stream(admin, settings)
        await listener.add_listener(NOTIFY_CHANNEL, rig.notifications)
        workers = [
            JetStreamWorker(handler_nc.jetstream(), consumer, rig.handler, rig.failures),
            JetStreamWorker(
                raw_nc.jetstream(),
                dataclasses.replace(
                    consumer,
                    durable=RAW_DURABLE,
                    filter_subject=RAW_PREFIX + consumer.filter_subject.removeprefix(PREFIX),
                    stream=RAW_STREAM,
                ),
                rig.raw,
                rig.failures,
            ),
        ]
        rig.tasks.extend(asyncio.create_task(w.run(stop)) for w in workers)
        relay.start()
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as producer:
            try:
                # Warm-up: every process connected and every path taken once, untimed.
                spaced = [i / rate for i in range(len(warmup))]
                tickets = await handler_round(rig, producer, database_url, warmup, spaced, None)
                messages = await created_messages(pool, tickets)
                await raw_round(rig, producer, nats_url, credentials, messages, spaced, None)
                print("  warm-up done", flush=True)
                delays = Delays()
                bodies: list[int] = []
                for number, (commands, offsets) in enumerate(rounds, start=1):
                    tickets = await handler_round(
                        rig, producer, database_url, commands, offsets, delays
                    )
                    messages = await created_messages(pool, tickets)
                    bodies.extend(len(body) for _, _, body, _ in messages)
                    await raw_round(rig, producer, nats_url, credentials, messages, offsets, delays)
                    handler, raw = delays.rounds[HANDLER][-1], delays.rounds[RAW_CALL][-1]
                    print(
                        f"  round {number}: {len(tickets)} events, handler path p50 "
                        f"{percentile(handler.latencies_ms, 0.5):.2f} ms, raw p50 "
                        f"{percentile(raw.latencies_ms, 0.5):.2f} ms",
                        flush=True,
                    )
            finally:
                await asyncio.get_running_loop().run_in_executor(producer, close_producer)
        steps = await relay_steps(pool)
        redelivered = rig.handler.redelivered + rig.raw.redelivered
        return delays, steps, redelivered, sum(bodies) / len(bodies)
    finally:
        stop.set()
        relay_stop.set()
        await asyncio.gather(*rig.tasks, return_exceptions=True)
        if relay.pid is not None:
            await asyncio.to_thread(relay.join, 15)
            if relay.is_alive():
                relay.terminate()
        with contextlib.suppress(Exception):
            await listener.close()
        for nc in (raw_nc, handler_nc, admin):
            with contextlib.suppress(Exception):
                await nc.drain()
        await pool.close()


# -- tracing off against on ------------------------------------------------------------------


@dataclass
class Switch:
    """The handler path's handle function under `--compare-tracing`: the probe, wrapped while
    tracing is on as the ingest worker wraps its handler (a consumer span per message)."""

    probe: Probe
    traced: Callable[[Msg], Awaitable[None]]
    on: bool = False

    async def __call__(self, message: Msg) -> None:
        await (self.traced(message) if self.on else self.probe(message))


def start_relay(
    context: multiprocessing.context.SpawnContext, settings: Settings, endpoint: str | None
) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event]:
    assert settings.database_url
    assert settings.nats_url
    assert settings.redis_url
    stop = context.Event()
    relay = context.Process(
        target=relay_process,
        args=(settings.database_url, settings.nats_url, settings.redis_url, stop, (endpoint,)),
        name="bench-relay",
    )
    relay.start()
    return relay, stop


async def stop_relay(
    relay: multiprocessing.process.BaseProcess, stop: multiprocessing.synchronize.Event
) -> None:
    stop.set()
    await asyncio.to_thread(relay.join, 30)
    if relay.is_alive():
        relay.terminate()
        raise RuntimeError("the relay process did not stop")
    if relay.exitcode != 0:
        raise RuntimeError(f"the relay process exited with {relay.exitcode}")


Schedule = tuple[Sequence[CreateTicket], Sequence[float]]


async def measure_tracing(
    settings: Settings,
    consumer: ConsumerSettings,
    warmup: dict[str, list[list[CreateTicket]]],
    rounds: dict[str, list[Schedule]],
    rate: float,
    receiver: ReceiverProcess,
) -> tuple[dict[str, Delays], str]:
    """Tracing off and on take turns, the first mode alternating from round to round; each
    round has a relay process of its own, warmed up untimed with `warmup[mode][round]`.

    Returns the delays by mode and a line on the spans received, after checking that every
    ticket sent with tracing on was traced by the producer, the relay and the consumer."""
    assert settings.database_url
    assert settings.nats_url
    database_url = settings.database_url
    credentials = settings.nats_credentials
    # This process plays the ingest worker: its consumer spans go to the receiver too.
    use_tracing(receiver.endpoint, "ticketflow-ingest")
    admin = await connect_nats(settings.nats_url, "bench-latency-admin", credentials)
    handler_nc = await connect_nats(settings.nats_url, "bench-latency-handler", credentials)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    listener = await asyncpg.connect(database_url)
    context = multiprocessing.get_context("spawn")
    endpoints = {"off": None, "on": receiver.endpoint}
    probe = Probe()
    switch = Switch(probe, traced_consumer("ingest", probe))
    stop = asyncio.Event()
    relay, relay_stop = start_relay(context, settings, endpoints[MODES[0]])
    rig = Rig(pool, probe, Probe(), Notifications(), Failures(), [], relay)
    producers = {
        mode: ProcessPoolExecutor(
            max_workers=1,
            mp_context=context,
            initializer=start_producer,
            initargs=(endpoints[mode],),
        )
        for mode in MODES
    }
    delays = {mode: Delays() for mode in MODES}
    try:
        await fresh_scratch_stream(admin, settings)
        await listener.add_listener(NOTIFY_CHANNEL, rig.notifications)
        worker = JetStreamWorker(handler_nc.jetstream(), consumer, switch, rig.failures)
        rig.tasks.append(asyncio.create_task(worker.run(stop)))
        first = True
        for number in range(len(rounds["on"])):
            for mode in MODES if number % 2 == 0 else MODES[::-1]:
                if not first:
                    relay, relay_stop = start_relay(context, settings, endpoints[mode])
                    rig.relay = relay
                first = False
                switch.on = mode == "on"
                spaced = [i / rate for i in range(len(warmup[mode][number]))]
                await handler_round(
                    rig, producers[mode], database_url, warmup[mode][number], spaced, None
                )
                commands, offsets = rounds[mode][number]
                await handler_round(
                    rig, producers[mode], database_url, commands, offsets, delays[mode]
                )
                await stop_relay(relay, relay_stop)
            off, on = (delays[mode].rounds[HANDLER][-1].latencies_ms for mode in MODES)
            print(
                f"  round {number + 1}: handler path p50 tracing off "
                f"{percentile(off, 0.5):.2f} ms, on {percentile(on, 0.5):.2f} ms",
                flush=True,
            )
        loop = asyncio.get_running_loop()
        for producer in producers.values():
            await loop.run_in_executor(producer, close_producer)
    finally:
        stop.set()
        relay_stop.set()
        await asyncio.gather(*rig.tasks, return_exceptions=True)
        if relay.pid is not None:
            await asyncio.to_thread(relay.join, 15)
            if relay.is_alive():
                relay.terminate()
        for producer in producers.values():
            producer.shutdown()
        with contextlib.suppress(Exception):
            await listener.close()
        for nc in (handler_nc, admin):
            with contextlib.suppress(Exception):
                await nc.drain()
        await pool.close()
    if not flush_tracing():
        raise RuntimeError("the consumer's spans were not all exported")
    traced = sum(len(w) for w in warmup["on"]) + sum(len(c) for c, _ in rounds["on"])
    return delays, check_spans(receiver, traced)


def check_spans(receiver: ReceiverProcess, traced: int) -> str:
    """Fails unless each of the `traced` tickets has its command, publish and consumer span,
    the consumer's a child of the command's (one trace per ticket across the processes)."""
    everything = receiver.received()
    received = everything.by_name()
    expected = {
        ("ticketflow-commands", "append CreateTicket"): traced,
        ("ticketflow-relay", "publish created"): traced,
        ("ticketflow-ingest", "process created"): traced,
    }
    missing = {key: n for key, n in expected.items() if received[key] < n}
    if missing:
        raise RuntimeError(f"too few spans: expected {missing}, received {dict(received)}")
    spans = everything.spans
    appends = {span_id for _, name, span_id, _ in spans if name == "append CreateTicket"}
    linked = sum(
        1 for _, name, _, parent in spans if name == "process created" and parent in appends
    )
    if linked < traced:
        raise RuntimeError(f"{linked} of {traced} consumer spans are children of a command span")
    return (
        f"{spans_note(received, everything.requests)}; {traced} tickets sent with tracing on, "
        f"{linked} consumer spans children of their command's span"
    )


async def relay_steps(pool: asyncpg.Pool, repetitions: int = 200) -> list[tuple[str, float]]:
    """Median cost of the relay's own steps for one new event, timed here in isolation."""
    reader = EventLogReader(pool)
    last = await reader.max_position()
    steps: dict[str, list[float]] = {
        "PostgreSQL round trip (SELECT 1)": [],
        "gap-safe read of one event (read_after)": [],
        "its message (validate, serialise, headers)": [],
    }
    trip, read, build = steps.values()
    for _ in range(repetitions):
        started = time.perf_counter()
        await pool.fetchval("SELECT 1")
        trip.append(time.perf_counter() - started)
        started = time.perf_counter()
        events = await reader.read_after(last - 1, 500)
        read.append(time.perf_counter() - started)
        started = time.perf_counter()
        message_for(events[0])
        build.append(time.perf_counter() - started)
    return [(label, statistics.median(values) * 1000) for label, values in steps.items()]


def percentile(values: Sequence[float], q: float) -> float:
    return Summary("", (Timing(len(values), len(values), 1.0, list(values)),)).percentile(q)


# -- report -----------------------------------------------------------------------------------


def write_report(
    out: Callable[[str], None],
    header: Sequence[str],
    delays: Delays,
    steps: Sequence[tuple[str, float]],
) -> None:
    for line in header:
        out(line)
    out("")
    out("1. Delay until the handler starts on the event, all rounds pooled")
    columns = (
        f"{'':34} {'events':>6} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'>10 ms':>6}"
    )
    out(columns)
    out("-" * len(columns))
    summaries: dict[str, Summary] = {}
    for label in (HANDLER, RAW_CALL, RAW_ACK):
        summary = delays.summary(label)
        if summary is None:
            continue
        summaries[label] = summary
        count = sum(r.operations for r in summary.rounds)
        slow = sum(1 for r in summary.rounds for ms in r.latencies_ms if ms > 10)
        out(
            f"{label:34} {count:>6} {summary.percentile(0.5):>7.2f} "
            f"{summary.percentile(0.9):>7.2f} {summary.percentile(0.99):>7.2f} "
            f"{summary.percentile(1.0):>7.2f} {slow:>6}"
        )
    handler = summaries[HANDLER]
    for name, label in (("raw publish", RAW_CALL), ("raw ack", RAW_ACK)):
        raw = summaries[label]
        out(
            f"{f'ratio handler path / {name}':34} {'':>6} "
            + " ".join(
                f"{handler.percentile(q) / raw.percentile(q):>6.2f}x" for q in (0.5, 0.9, 0.99, 1.0)
            )
        )
    per_round = [
        percentile(mine.latencies_ms, 0.5) / percentile(theirs.latencies_ms, 0.5)
        for mine, theirs in zip(handler.rounds, summaries[RAW_CALL].rounds, strict=True)
    ]
    out(
        f"p50 ratio to raw publish, round by round: {min(per_round):.2f}x-{max(per_round):.2f}x "
        f"over {len(per_round)} rounds"
    )
    out("")
    out("2. The same delays in parts (wall clock against the stream's storage timestamps)")
    columns = f"{'':14} {'':36} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}"
    out(columns)
    out("-" * len(columns))
    for key, path, label in PARTS:
        summary = delays.summary(key)
        if summary is None:
            out(f"{path:14} {label:36} {'(not matched)':>31}")
            continue
        out(
            f"{path:14} {label:36} {summary.percentile(0.5):>7.2f} "
            f"{summary.percentile(0.9):>7.2f} {summary.percentile(0.99):>7.2f} "
            f"{summary.percentile(1.0):>7.2f}"
        )

    out("")
    out("3. The relay's steps for one event, timed alone in this process (median of 200)")
    for label, ms in steps:
        out(f"{label:51} {ms:>7.3f} ms")


def write_tracing_report(
    out: Callable[[str], None], header: Sequence[str], delays: dict[str, Delays], spans: str
) -> None:
    for line in header:
        out(line)
    out("")
    out("1. Delay until the handler starts on the event, tracing off and on, all rounds pooled")
    columns = (
        f"{'':34} {'events':>6} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'>10 ms':>6}"
    )
    out(columns)
    out("-" * len(columns))
    summaries: dict[str, Summary] = {}
    for mode in MODES:
        summary = delays[mode].summary(HANDLER)
        assert summary is not None
        summaries[mode] = summary
        count = sum(r.operations for r in summary.rounds)
        slow = sum(1 for r in summary.rounds for ms in r.latencies_ms if ms > 10)
        out(
            f"{f'event -> handler, tracing {mode}':34} {count:>6} {summary.percentile(0.5):>7.2f} "
            f"{summary.percentile(0.9):>7.2f} {summary.percentile(0.99):>7.2f} "
            f"{summary.percentile(1.0):>7.2f} {slow:>6}"
        )
    off, on = summaries["off"], summaries["on"]
    out(
        f"{'ratio on / off':34} {'':>6} "
        + " ".join(f"{on.percentile(q) / off.percentile(q):>6.2f}x" for q in (0.5, 0.9, 0.99, 1.0))
    )
    per_round = [
        percentile(mine.latencies_ms, 0.5) / percentile(theirs.latencies_ms, 0.5)
        for mine, theirs in zip(on.rounds, off.rounds, strict=True)
    ]
    out(
        f"p50 ratio on / off, round by round: {min(per_round):.2f}x-{max(per_round):.2f}x "
        f"over {len(per_round)} rounds"
    )
    out(spans)
    out("")
    out("2. The same delays in parts (wall clock against the stream's storage timestamps)")
    columns = f"{'':14} {'':36} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}"
    out(columns)
    out("-" * len(columns))
    for key, _, label in PARTS:
        for mode in MODES:
            summary = delays[mode].summary(key)
            if summary is None:
                continue
            out(
                f"{f'tracing {mode}':14} {label:36} {summary.percentile(0.5):>7.2f} "
                f"{summary.percentile(0.9):>7.2f} {summary.percentile(0.99):>7.2f} "
                f"{summary.percentile(1.0):>7.2f}"
            )


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.handler_latency",
        description="Delay from an appended event to a handler starting on it, against raw "
        "JetStream publish-to-receive.",
    )
    parser.add_argument(
        "--tickets", type=int, default=500, help="measured tickets in all (default 500)"
    )
    parser.add_argument(
        "--rate", type=float, default=50.0, help="commands and publishes per second (default 50)"
    )
    parser.add_argument(
        "--arrivals",
        choices=("fixed", "poisson"),
        default="fixed",
        help="evenly spaced sends (default), or a Poisson process of the same mean rate",
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds per path (default 4)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed tickets first (default 20)")
    parser.add_argument(
        "--concurrency", type=int, help="worker concurrency (default: the ingest worker's)"
    )
    parser.add_argument("--pipeline", default="document-review", help="shipped pipeline to use")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson schedule")
    parser.add_argument(
        "--compare-tracing",
        action="store_true",
        help="the handler path with tracing off against tracing on (OTLP/HTTP to a receiver in "
        "a process of its own), in alternating rounds, instead of against raw JetStream",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)
    for name in ("tickets", "rounds", "warmup", "concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.rounds > args.tickets:
        parser.error(f"--rounds {args.rounds} is more than the {args.tickets} tickets")
    return args


async def benchmark(
    args: argparse.Namespace, servers: EmbeddedServers, pipeline: PipelineDefinition
) -> None:
    settings = bench_settings(servers.database_url, servers.nats_url, servers.redis_url)
    consumer = ConsumerSettings(
        durable=HANDLER_DURABLE,
        filter_subject=event_filter("created"),
        stream=settings.stream_name,
        concurrency=args.concurrency or settings.ingest_concurrency,
    )
    # Every input exists before any clock starts.
    rng = random.Random(args.seed)
    warmup = [create_command(pipeline, WARMUP_TENANT, i) for i in range(args.warmup)]
    measured = [create_command(pipeline, TENANT, i) for i in range(args.tickets)]
    per_round = math.ceil(args.tickets / args.rounds)
    rounds = [
        (chunk, schedule(len(chunk), args.rate, args.arrivals, rng))
        for chunk in (measured[i : i + per_round] for i in range(0, args.tickets, per_round))
    ]
    if args.compare_tracing:
        await compare_tracing(args, servers, pipeline, settings, consumer, rng)
        return
    print(f"measuring {len(rounds)} rounds per path at {args.rate:g}/s", flush=True)
    delays, steps, redelivered, body = await measure(settings, consumer, warmup, rounds, args.rate)
    if sum(r.operations for r in delays.rounds[HANDLER]) != args.tickets:
        raise RuntimeError("not every measured ticket was handled")
    postgres, nats_version, _ = await environment(
        servers.database_url, servers.nats_url, servers.nats_credentials
    )
    header = [
        f"{args.tickets} CreateTicket commands for {pipeline.name} v{pipeline.version} "
        f"(+{args.warmup} warm-up), {args.arrivals} arrivals at {args.rate:g}/s, "
        f"{len(rounds)} alternating rounds per path, seed {args.seed}",
        f"consumer: JetStreamWorker, concurrency {consumer.concurrency}, fetch batch "
        f"{consumer.fetch_batch}; `created` body {body:.0f} B mean; redeliveries {redelivered}",
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}, PostgreSQL {postgres}, NATS {nats_version}",
    ]
    print("")
    write_report(print, header, delays, steps)


async def compare_tracing(
    args: argparse.Namespace,
    servers: EmbeddedServers,
    pipeline: PipelineDefinition,
    settings: Settings,
    consumer: ConsumerSettings,
    rng: random.Random,
) -> None:
    """The handler path, tracing off against on: the same schedule for both modes in each round,
    each mode on tickets of its own tenant."""
    per_round = math.ceil(args.tickets / args.rounds)
    sizes = [min(per_round, args.tickets - i) for i in range(0, args.tickets, per_round)]
    schedules = [schedule(size, args.rate, args.arrivals, rng) for size in sizes]
    warmup: dict[str, list[list[CreateTicket]]] = {}
    rounds: dict[str, list[Schedule]] = {}
    for mode in MODES:
        measured = [create_command(pipeline, f"{TENANT}-{mode}", i) for i in range(args.tickets)]
        starts = [sum(sizes[:n]) for n in range(len(sizes))]
        rounds[mode] = [
            (measured[start : start + size], offsets)
            for start, size, offsets in zip(starts, sizes, schedules, strict=True)
        ]
        warmup[mode] = [
            [create_command(pipeline, f"{WARMUP_TENANT}-{mode}-{n}", i) for i in range(args.warmup)]
            for n in range(len(sizes))
        ]
    print(f"measuring {len(sizes)} rounds per tracing mode at {args.rate:g}/s", flush=True)
    receiver = ReceiverProcess()
    try:
        delays, spans = await measure_tracing(
            settings, consumer, warmup, rounds, args.rate, receiver
        )
    finally:
        receiver.stop()
    for mode in MODES:
        if sum(r.operations for r in delays[mode].rounds[HANDLER]) != args.tickets:
            raise RuntimeError(f"not every measured ticket was handled with tracing {mode}")
    postgres, nats_version, _ = await environment(
        servers.database_url, servers.nats_url, servers.nats_credentials
    )
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    header = [
        f"{args.tickets} CreateTicket commands per tracing mode for {pipeline.name} "
        f"v{pipeline.version} (+{args.warmup} warm-up per round and mode, each round with a "
        f"relay process of its own), {args.arrivals} arrivals at {args.rate:g}/s, "
        f"{len(sizes)} alternating rounds per mode, seed {args.seed}",
        f"consumer: JetStreamWorker, concurrency {consumer.concurrency}, fetch batch "
        f"{consumer.fetch_batch}, wrapped in traced_consumer while tracing is on",
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}, PostgreSQL {postgres}, NATS {nats_version}; "
        f"load average at the end {load}",
    ]
    print("")
    write_tracing_report(print, header, delays, spans)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pipeline = ShippedPipelines().get(args.pipeline)
    run_with_servers(
        "tf-handler-latency-",
        lambda servers: benchmark(args, servers, pipeline),
        keep_data=args.keep_data,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
