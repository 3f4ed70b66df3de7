"""Write-path benchmark: the command service and the relay, each against a raw baseline.

Run it as `python -m benchmarks.write_path`. One run starts its own embedded PostgreSQL, NATS and
Redis in a temporary directory, applies the migrations and measures, in the same process:

1. Commands and events per second appended through `CommandService` for real tickets of a shipped
   pipeline (create with a small in-memory PDF, record ingestion, complete every subtask), against
   plain asyncpg INSERTs of the very same rows (same state bytes, grouped into one transaction per
   command, as the service committed them) into a scratch table shaped like `ticketflow_events`.
2. Events per second relayed to JetStream by `streams.relay.Relay` over that log, against raw
   `publish_async` of the same subjects (re-prefixed), bodies and headers into a scratch stream,
   with the same bound on unacknowledged publishes.

Each comparison runs in alternating rounds (contender, baseline, contender, baseline, ...) and
reports the median of the rounds, so drift on a shared machine hits both sides alike. Inputs are
generated from `--seed` before any timing starts; ticket ids come from idempotency keys,
so every run writes the same tickets. Only trace and span ids and timestamps differ between runs.

With `--compare-tracing` the appends run instead with tracing off against tracing on and
exporting over OTLP/HTTP to a receiver process (`benchmarks.tracing`): two writer
processes, one per mode, take turns on the same kind of tickets, and the relay is not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from benchmarks.harness import run_with_servers
from benchmarks.tracing import MODES, ReceiverProcess, flush_tracing, spans_note, use_tracing
from commands.messages import (
    CommandResult,
    CompleteSubtask,
    CreateTicket,
    RecordIngestion,
    UploadedDocument,
)
from commands.pipeline import topological_order
from commands.service import CommandService, ticket_id_for
from streams.contract import IngestedDocument, PipelineDefinition, TokenUsage
from streams.contract.eventlog import EVENTS_TABLE, EventLogReader
from streams.contract.subjects import PREFIX
from streams.jetstream import ensure_stream
from streams.relay import RELAY_NAME, Relay, RelaySettings, message_for
from ticketflow.bootstrap import command_service, connect_nats, stream_settings
from ticketflow.embedded import EmbeddedServers
from ticketflow.pipelines import ShippedPipelines
from ticketflow.settings import Settings

TENANT = "bench"
WARMUP_TENANT = "bench-warmup"
OWNER = "bench-user"
MODEL = "smollm2-360m-instruct-q8_0"
SCRATCH_TABLE = "bench_raw_events"
RAW_STREAM = "BENCH_RAW"
RAW_PREFIX = "bench.raw"
WORDS = (
    "the", "method", "results", "conclusion", "data", "model", "table", "section", "review",
    "evidence", "sample", "study", "measure", "effect", "analysis", "document", "argument",
    "claim", "figure", "error", "baseline", "proposed",
)  # fmt: skip

Command = CreateTicket | RecordIngestion | CompleteSubtask


# -- inputs -----------------------------------------------------------------------------------


def tiny_pdf(label: str) -> bytes:
    """A small, well-formed one-page PDF whose text (and so whose sha256) names `label`."""
    text = f"ticketflow write-path benchmark, document {label}".encode()
    content = b"BT /F1 12 Tf 72 720 Td (" + text + b") Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def sample_value(schema: dict[str, Any], rng: random.Random) -> Any:
    """A plausible value for the small JSON Schemas the shipped pipelines use."""
    kind = "enum" if "enum" in schema else schema.get("type", "string")
    value: Any
    if kind == "enum":
        value = rng.choice(schema["enum"])
    elif kind == "object":
        properties: dict[str, Any] = schema.get("properties", {})
        value = {name: sample_value(sub, rng) for name, sub in properties.items()}
    elif kind == "array":
        low = int(schema.get("minItems", 1))
        high = max(low, min(int(schema.get("maxItems", 6)), 6))
        value = [sample_value(schema.get("items", {}), rng) for _ in range(rng.randint(low, high))]
    elif kind == "boolean":
        value = rng.random() < 0.5
    elif kind == "integer":
        value = rng.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 100)))
    elif kind == "number":
        value = round(rng.uniform(0, 100), 2)
    else:
        limit = min(int(schema.get("maxLength", 240)), 240)
        target = rng.randint(max(int(schema.get("minLength", 1)), limit // 3), limit)
        words: list[str] = []
        while len(" ".join(words)) < target:
            words.append(rng.choice(WORDS))
        value = " ".join(words)[:limit].strip() or "x"
    return value


def ticket_commands(
    pipeline: PipelineDefinition, tenant: str, index: int, seed: int
) -> list[Command]:
    """Every command of one ticket's happy path, in the order a deployment would send them."""
    rng = random.Random(f"{seed}:{tenant}:{index}")
    key = f"write-path-{index}"
    ticket_id = ticket_id_for(tenant, OWNER, key)
    trace = f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"
    documents = {role: tiny_pdf(f"{tenant}/{index}/{role}") for role in pipeline.document_roles}
    commands: list[Command] = [
        CreateTicket(
            tenant=tenant,
            owner=OWNER,
            documents=tuple(
                UploadedDocument(role, f"{role}-{index}.pdf", "application/pdf", content)
                for role, content in documents.items()
            ),
            pipeline=pipeline.name,
            idempotency_key=key,
            traceparent=trace,
        ),
        RecordIngestion(
            ticket_id=ticket_id,
            documents=tuple(
                IngestedDocument(
                    role=role,
                    sha256=hashlib.sha256(content).hexdigest(),
                    pages=1,
                    characters=rng.randint(20_000, 60_000),
                    chunks=rng.randint(20, 60),
                )
                for role, content in documents.items()
            ),
            traceparent=trace,
        ),
    ]
    for subtask_id in topological_order(pipeline):
        schema = pipeline.subtask(subtask_id).output_schema
        commands.append(
            CompleteSubtask(
                ticket_id=ticket_id,
                subtask_id=subtask_id,
                attempt=1,
                output=sample_value(schema, rng),
                model=MODEL,
                usage=TokenUsage(
                    prompt_tokens=rng.randint(1500, 4000),
                    completion_tokens=rng.randint(40, 200),
                    cached_tokens=rng.randint(0, 1500),
                ),
                latency_ms=round(rng.uniform(800, 6000), 1),
                traceparent=trace,
            )
        )
    return commands


def events_per_ticket(pipeline: PipelineDefinition) -> int:
    """Created, DocumentIngested, one SubtaskReady and one SubtaskCompleted each, Completed."""
    return 2 * len(pipeline.subtasks) + 3


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Timing:
    """One timed round of one contender."""

    operations: int  # commands, transactions or messages
    events: int
    seconds: float
    latencies_ms: list[float] = dataclasses.field(default_factory=list)

    @property
    def operations_per_s(self) -> float:
        return self.operations / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


@dataclass(frozen=True)
class Summary:
    """Every round of one contender: medians of the rates, latencies pooled."""

    label: str
    rounds: tuple[Timing, ...]

    @property
    def operations_per_s(self) -> float:
        return statistics.median(r.operations_per_s for r in self.rounds)

    @property
    def events_per_s(self) -> float:
        return statistics.median(r.events_per_s for r in self.rounds)

    @property
    def events_per_s_range(self) -> tuple[float, float]:
        rates = [r.events_per_s for r in self.rounds]
        return min(rates), max(rates)

    def percentile(self, q: float) -> float:
        ordered = sorted(ms for r in self.rounds for ms in r.latencies_ms)
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def ratios_to(self, other: Summary) -> list[float]:
        """Per-round ratios of events per second, each round against the same round of `other`."""
        return [
            mine.events_per_s / theirs.events_per_s
            for mine, theirs in zip(self.rounds, other.rounds, strict=True)
        ]


@dataclass(frozen=True)
class Batch:
    """The versions of one ticket that one command appended, i.e. one transaction in the event
    store. (Their positions need not be consecutive: concurrent appends interleave.)"""

    ticket_id: UUID
    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1


def execute(service: CommandService, command: Command) -> CommandResult:
    if isinstance(command, CreateTicket):
        return service.create_ticket(command)
    if isinstance(command, RecordIngestion):
        return service.record_ingestion(command)
    return service.complete_subtask(command)


def split(tickets: Sequence[list[Command]], workers: int) -> list[list[Command]]:
    """Deals whole tickets round-robin to `workers` lanes; a lane keeps its tickets' order."""
    lanes: list[list[Command]] = [[] for _ in range(workers)]
    for index, ticket in enumerate(tickets):
        lanes[index % workers].extend(ticket)
    return [lane for lane in lanes if lane]


def service_round(
    service: CommandService, tickets: Sequence[list[Command]], workers: int
) -> tuple[Timing, list[list[Batch]]]:
    """Runs each lane on its own thread; returns the timing and what each command appended."""

    def run_lane(lane: Sequence[Command]) -> tuple[list[Batch], list[float]]:
        batches: list[Batch] = []
        latencies: list[float] = []
        versions: dict[UUID, int] = {}  # a lane runs all the commands of its tickets
        for command in lane:
            started = time.perf_counter()
            result = execute(service, command)
            latencies.append((time.perf_counter() - started) * 1000)
            if result.appended < 1:
                raise RuntimeError(f"{type(command).__name__} appended nothing: {result}")
            first = versions.get(result.ticket_id, 0) + 1
            versions[result.ticket_id] = first + result.appended - 1
            batches.append(Batch(result.ticket_id, first, first + result.appended - 1))
        return batches, latencies

    lanes = split(tickets, workers)
    if not lanes:
        return Timing(0, 0, math.inf), []
    with ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="bench") as pool:
        started = time.perf_counter()
        outcomes = list(pool.map(run_lane, lanes))
        seconds = time.perf_counter() - started
    batches = [lane_batches for lane_batches, _ in outcomes]
    timing = Timing(
        operations=sum(len(lane) for lane in lanes),
        events=sum(b.size for lane in batches for b in lane),
        seconds=seconds,
        latencies_ms=[ms for _, latencies in outcomes for ms in latencies],
    )
    return timing, batches


# -- baseline: plain INSERTs ------------------------------------------------------------------

INSERT = (
    f"INSERT INTO {SCRATCH_TABLE} (originator_id, originator_version, topic, state) "
    "VALUES ($1, $2, $3, $4)"
)
Row = tuple[UUID, int, str, bytes]


async def create_scratch_table(pool: asyncpg.Pool) -> None:
    """Same columns, key and indexes as the event store (no table lock, no notify)."""
    await pool.execute(f"DROP TABLE IF EXISTS {SCRATCH_TABLE}")
    await pool.execute(
        f"CREATE TABLE {SCRATCH_TABLE} ("
        " originator_id uuid NOT NULL,"
        " originator_version bigint NOT NULL,"
        " topic text,"
        " state bytea,"
        " notification_id bigserial,"
        " PRIMARY KEY (originator_id, originator_version))"
    )
    await pool.execute(
        f"CREATE UNIQUE INDEX {SCRATCH_TABLE}_notification_id_idx "
        f"ON {SCRATCH_TABLE} (notification_id ASC)"
    )


async def load_rows(
    pool: asyncpg.Pool, lanes: Sequence[Sequence[Batch]]
) -> dict[tuple[UUID, int], Row]:
    """The rows the service stored for these batches, by ticket id and version."""
    tickets = list({b.ticket_id for lane in lanes for b in lane})
    expected = sum(b.size for lane in lanes for b in lane)
    records = await pool.fetch(
        "SELECT originator_id, originator_version, topic, state "
        f"FROM {EVENTS_TABLE} WHERE originator_id = ANY($1::uuid[])",
        tickets,
    )
    if len(records) != expected:
        raise RuntimeError(f"found {len(records)} of {expected} appended events")
    return {
        (r["originator_id"], r["originator_version"]): (
            r["originator_id"],
            r["originator_version"],
            r["topic"],
            bytes(r["state"]),
        )
        for r in records
    }


async def baseline_round(pool: asyncpg.Pool, lanes: Sequence[Sequence[Batch]]) -> Timing:
    """The service's rows again, one transaction per command, lane by lane as it wrote them."""
    rows = await load_rows(pool, lanes)
    latencies: list[float] = []

    async def run_lane(lane: Sequence[Batch]) -> None:
        async with pool.acquire() as conn:
            for batch in lane:
                values = [rows[batch.ticket_id, v] for v in range(batch.first, batch.last + 1)]
                started = time.perf_counter()
                async with conn.transaction():
                    await conn.executemany(INSERT, values)
                latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(run_lane(lane) for lane in lanes))
    seconds = time.perf_counter() - started
    return Timing(
        operations=sum(len(lane) for lane in lanes),
        events=sum(b.size for lane in lanes for b in lane),
        seconds=seconds,
        latencies_ms=latencies,
    )


async def write_benchmark(
    settings: Settings,
    database_url: str,
    warmup: Sequence[list[Command]],
    rounds: Sequence[Sequence[list[Command]]],
    workers: int,
) -> tuple[Summary, Summary]:
    """Service and baseline take turns: round k of the service, then round k of the baseline."""
    service = command_service(settings, database_url)
    pool = await asyncpg.create_pool(database_url, min_size=workers, max_size=workers)
    try:
        await create_scratch_table(pool)
        before = await pool.fetchval(f"SELECT count(*) FROM {EVENTS_TABLE}")
        _, batches = await asyncio.to_thread(service_round, service, warmup, workers)
        await baseline_round(pool, batches)
        service_rounds: list[Timing] = []
        baseline_rounds: list[Timing] = []
        for number, tickets in enumerate(rounds, start=1):
            timing, batches = await asyncio.to_thread(service_round, service, tickets, workers)
            service_rounds.append(timing)
            baseline_rounds.append(await baseline_round(pool, batches))
            print(
                f"  round {number}: service {timing.events_per_s:.0f} events/s, "
                f"baseline {baseline_rounds[-1].events_per_s:.0f} events/s",
                flush=True,
            )
        stored = await pool.fetchval(f"SELECT count(*) FROM {SCRATCH_TABLE}")
        appended = await pool.fetchval(f"SELECT count(*) FROM {EVENTS_TABLE}") - before
        if stored != appended:
            raise RuntimeError(f"baseline stored {stored} rows, the service {appended}")
    finally:
        await pool.close()
        service.close()
    return (
        Summary("CommandService", tuple(service_rounds)),
        Summary("plain asyncpg INSERT", tuple(baseline_rounds)),
    )


# -- tracing off against on ------------------------------------------------------------------
# One writer process per mode (the SDK is installed once per process), each keeping its command
# service between rounds; the benchmark process hands them their tickets in turn.


@dataclass
class _Writer:
    service: CommandService | None = None


_WRITER = _Writer()


def start_writer(endpoint: str | None) -> None:
    """Initialises a writer process: tracing exporting to `endpoint`, or off when None."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    use_tracing(endpoint, "ticketflow-commands")


def writer_round(
    settings: Settings, database_url: str, tickets: Sequence[list[Command]], workers: int
) -> tuple[Timing, float, float]:
    """Runs in a writer: one round, timed until its spans have been exported too, so that a
    round pays for the export work it caused (no-op with tracing off). Also returns the
    seconds that final export took and the CPU seconds of the whole process (every thread, the
    span processor's included) during the round."""
    if _WRITER.service is None:
        _WRITER.service = command_service(settings, database_url)
    cpu = time.process_time()
    timing, _ = service_round(_WRITER.service, tickets, workers)
    started = time.perf_counter()
    if not flush_tracing():
        raise RuntimeError("the spans of the round were not all exported")
    flushed = time.perf_counter() - started
    timing.seconds += flushed
    return timing, flushed, time.process_time() - cpu


def close_writer() -> None:
    if _WRITER.service is not None:
        _WRITER.service.close()
        _WRITER.service = None
    flush_tracing()


def expected_spans(tickets: Sequence[list[Command]]) -> Counter[str]:
    """One `append <Command>` span per command (`commands.tracing.traced_command`)."""
    return Counter(f"append {type(command).__name__}" for ticket in tickets for command in ticket)


def cpu_note(cpu: dict[str, float], timings: dict[str, list[Timing]], receiver_s: float) -> str:
    """CPU time per command of each writer process, and what the receiver spent decoding."""
    per_command = {
        mode: cpu[mode] / sum(t.operations for t in timings[mode]) * 1000 for mode in MODES
    }
    return (
        f"writer process CPU per command (all threads): off {per_command['off']:.3f} ms, "
        f"on {per_command['on']:.3f} ms ({per_command['on'] / per_command['off']:.2f}x); "
        f"receiver process CPU: {receiver_s:.2f} s"
    )


async def tracing_benchmark(
    settings: Settings,
    database_url: str,
    warmup: dict[str, list[list[Command]]],
    rounds: dict[str, list[list[list[Command]]]],
    workers: int,
    receiver: ReceiverProcess,
) -> tuple[Summary, Summary, str]:
    """Tracing off and on take turns, the first mode alternating from round to round."""
    context = multiprocessing.get_context("spawn")
    endpoints = {"off": None, "on": receiver.endpoint}
    writers = {
        mode: ProcessPoolExecutor(
            max_workers=1,
            mp_context=context,
            initializer=start_writer,
            initargs=(endpoints[mode],),
        )
        for mode in MODES
    }
    loop = asyncio.get_running_loop()
    before = receiver.received()
    timings: dict[str, list[Timing]] = {mode: [] for mode in MODES}
    flushed = {mode: 0.0 for mode in MODES}
    cpu = {mode: 0.0 for mode in MODES}
    try:
        for mode in MODES:
            await loop.run_in_executor(
                writers[mode], writer_round, settings, database_url, warmup[mode], workers
            )
        for number in range(len(rounds["on"])):
            for mode in MODES if number % 2 == 0 else MODES[::-1]:
                timing, flush_s, cpu_s = await loop.run_in_executor(
                    writers[mode],
                    writer_round,
                    settings,
                    database_url,
                    rounds[mode][number],
                    workers,
                )
                timings[mode].append(timing)
                flushed[mode] += flush_s
                cpu[mode] += cpu_s
            off, on = timings["off"][-1], timings["on"][-1]
            print(
                f"  round {number + 1}: tracing off {off.events_per_s:.0f} events/s, "
                f"on {on.events_per_s:.0f} events/s",
                flush=True,
            )
        for mode in MODES:
            await loop.run_in_executor(writers[mode], close_writer)
    finally:
        for writer in writers.values():
            writer.shutdown()
    after = receiver.received()
    received = after.by_name() - before.by_name()
    appends = Counter({name: n for (_, name), n in received.items() if name.startswith("append ")})
    sent_on = [ticket for round_ in rounds["on"] for ticket in round_] + warmup["on"]
    if appends != expected_spans(sent_on):
        raise RuntimeError(
            f"received append spans {dict(appends)}, expected {dict(expected_spans(sent_on))}"
        )
    if sum(received.values()) != sum(appends.values()):
        raise RuntimeError(f"unexpected spans received: {dict(received)}")
    return (
        Summary("tracing off", tuple(timings["off"])),
        Summary("tracing on, OTLP/HTTP", tuple(timings["on"])),
        spans_note(received, after.requests - before.requests)
        + f"; exporting what was left at each round's end took {flushed['on']:.2f} of "
        f"{sum(t.seconds for t in timings['on']):.1f} s with tracing on\n"
        + cpu_note(cpu, timings, after.cpu_s - before.cpu_s),
    )


# -- relay and its baseline -------------------------------------------------------------------

Message = tuple[str, bytes, dict[str, str]]


async def stream_messages(nc: NATS, name: str) -> int:
    info = await nc.jetstream().stream_info(name)
    return int(info.state.messages)


async def fresh_streams(nc: NATS, pool: asyncpg.Pool, settings: Settings) -> None:
    """Empty relay and scratch streams, and no relay checkpoint: the relay starts at 0."""
    js = nc.jetstream()
    relay_stream = stream_settings(settings)
    for name in (relay_stream.name, RAW_STREAM):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)
    await pool.execute("DELETE FROM relay_checkpoints WHERE name = $1", RELAY_NAME)
    await ensure_stream(js, relay_stream)
    await js.add_stream(
        dataclasses.replace(
            relay_stream.config(),
            name=RAW_STREAM,
            subjects=[f"{RAW_PREFIX}.>"],
            description="write-path benchmark scratch stream",
        )
    )


async def relay_round(
    pool: asyncpg.Pool, nc: NATS, settings: Settings, relay_settings: RelaySettings, target: int
) -> Timing:
    """From start-up (leader lock, stream check, resume) until the last position is acked."""
    relay = Relay(pool, nc, stream_settings(settings), relay_settings)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(relay.run(stop))
    while relay.position < target:
        if task.done():
            await task  # raises what stopped it
            raise RuntimeError(f"the relay stopped at position {relay.position} of {target}")
        await asyncio.sleep(0.0005)
    seconds = time.perf_counter() - started
    stop.set()
    await asyncio.wait_for(task, timeout=relay_settings.poll_interval_s + 10)
    return Timing(relay.published, relay.published, seconds)


async def raw_round(nc: NATS, messages: Sequence[Message], max_in_flight: int) -> Timing:
    js = nc.jetstream(publish_async_max_pending=max_in_flight)
    started = time.perf_counter()
    futures = [
        await js.publish_async(subject, body, headers=headers)
        for subject, body, headers in messages
    ]
    acks = await asyncio.gather(*futures)
    seconds = time.perf_counter() - started
    duplicates = sum(1 for ack in acks if ack.duplicate)
    if duplicates:
        raise RuntimeError(f"{duplicates} raw publishes were duplicates")
    return Timing(len(messages), len(messages), seconds)


async def relay_benchmark(
    settings: Settings, database_url: str, relay_settings: RelaySettings, rounds: int
) -> tuple[Summary, Summary, int, int]:
    """Relay and raw publishing take turns, each round on fresh streams."""
    assert settings.nats_url
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=4)
    admin = await connect_nats(settings.nats_url, "bench-admin", settings.nats_credentials)
    relay_nc = await connect_nats(settings.nats_url, "bench-relay", settings.nats_credentials)
    raw_nc = await connect_nats(settings.nats_url, "bench-raw", settings.nats_credentials)
    try:
        reader = EventLogReader(pool)
        target = await reader.max_position()
        events = int(await pool.fetchval(f"SELECT count(*) FROM {EVENTS_TABLE}"))
        # The raw input, built untimed: exactly what the relay sends, on re-prefixed subjects.
        messages: list[Message] = []
        position = 0
        while batch := await reader.read_after(position, 5000):
            for event in batch:
                subject, body, headers = message_for(event)
                messages.append((RAW_PREFIX + subject.removeprefix(PREFIX), body, headers))
            position = batch[-1].position
        if len(messages) != events:
            raise RuntimeError(f"read {len(messages)} of {events} events")
        relay_rounds: list[Timing] = []
        raw_rounds: list[Timing] = []
        for number in range(1, rounds + 1):
            await fresh_streams(admin, pool, settings)
            relay_rounds.append(await relay_round(pool, relay_nc, settings, relay_settings, target))
            raw_rounds.append(await raw_round(raw_nc, messages, relay_settings.max_in_flight))
            for name in (settings.stream_name, RAW_STREAM):
                held = await stream_messages(admin, name)
                if held != events:
                    raise RuntimeError(f"stream {name} holds {held} of {events} events")
            print(
                f"  round {number}: relay {relay_rounds[-1].events_per_s:.0f} events/s, "
                f"raw {raw_rounds[-1].events_per_s:.0f} events/s",
                flush=True,
            )
        return (
            Summary("streams.relay.Relay", tuple(relay_rounds)),
            Summary("raw js.publish_async", tuple(raw_rounds)),
            events,
            sum(len(body) for _, body, _ in messages),
        )
    finally:
        for nc in (raw_nc, relay_nc, admin):
            with contextlib.suppress(Exception):
                await nc.drain()
        await pool.close()


async def environment(
    database_url: str, nats_url: str, nats_credentials: Path | None
) -> tuple[str, str, float]:
    """Server versions and settings that shape the figures, and the mean stored state size."""
    conn = await asyncpg.connect(database_url)
    try:
        postgres = str(await conn.fetchval("SHOW server_version"))
        for setting in ("fsync", "synchronous_commit"):
            postgres += f", {setting} {await conn.fetchval(f'SHOW {setting}')}"
        mean_state = await conn.fetchval(
            f"SELECT coalesce(avg(length(state)), 0)::float8 FROM {EVENTS_TABLE}"
        )
    finally:
        await conn.close()
    nc = await connect_nats(nats_url, "bench-version", nats_credentials)
    try:
        version = nc.connected_server_version
        nats_version = f"{version.major}.{version.minor}.{version.patch}"
    finally:
        await nc.close()
    return postgres, nats_version, float(mean_state)


# -- report -----------------------------------------------------------------------------------


def write_report(
    out: Callable[[str], None],
    header: Sequence[str],
    sweep: Sequence[tuple[int, tuple[Summary, Summary]]],
    relay: tuple[Summary, Summary],
    relay_note: str,
) -> None:
    for line in header:
        out(line)
    for workers, write in sweep:
        out("")
        write_table(out, workers, write)
    if len(sweep) > 1:
        out("")
        first_workers, (first_service, first_baseline) = sweep[0]
        out(f"   Scaling with concurrent writers (events/s against {first_workers} writer(s))")
        for workers, (service, baseline) in sweep[1:]:
            service_scale = service.events_per_s / first_service.events_per_s
            baseline_scale = baseline.events_per_s / first_baseline.events_per_s
            out(
                f"   {workers} writers: service {service_scale:.2f}x,"
                f" baseline {baseline_scale:.2f}x"
            )
    out("")
    write_relay_table(out, relay, relay_note)


def write_table(out: Callable[[str], None], workers: int, write: tuple[Summary, Summary]) -> None:
    service, baseline = write
    out(
        f"1. Appending events, one transaction per command, {workers} writer(s)"
        " (medians over rounds)"
    )
    columns = (
        f"{'':28} {'commands/s':>10} {'events/s':>9} {'events/s range':>16} "
        f"{'p50 ms':>7} {'p99 ms':>7}"
    )
    out(columns)
    out("-" * len(columns))
    for summary in write:
        low, high = summary.events_per_s_range
        out(
            f"{summary.label:28} {summary.operations_per_s:>10.1f} {summary.events_per_s:>9.1f} "
            f"{f'{low:.0f}-{high:.0f}':>16} {summary.percentile(0.5):>7.2f} "
            f"{summary.percentile(0.99):>7.2f}"
        )
    ratios = service.ratios_to(baseline)
    out(
        f"{'ratio service / baseline':28} "
        f"{service.operations_per_s / baseline.operations_per_s:>9.2f}x "
        f"{service.events_per_s / baseline.events_per_s:>8.2f}x "
        f"{f'{min(ratios):.2f}-{max(ratios):.2f}x':>16}"
    )


def write_tracing_table(
    out: Callable[[str], None], workers: int, write: tuple[Summary, Summary], spans: str
) -> None:
    off, on = write
    out(
        f"1. Appending events with tracing off and on, one transaction per command, {workers} "
        "writer(s) (medians over rounds)"
    )
    columns = (
        f"{'':28} {'commands/s':>10} {'events/s':>9} {'events/s range':>16} "
        f"{'p50 ms':>7} {'p99 ms':>7}"
    )
    out(columns)
    out("-" * len(columns))
    for summary in write:
        low, high = summary.events_per_s_range
        out(
            f"{summary.label:28} {summary.operations_per_s:>10.1f} {summary.events_per_s:>9.1f} "
            f"{f'{low:.0f}-{high:.0f}':>16} {summary.percentile(0.5):>7.2f} "
            f"{summary.percentile(0.99):>7.2f}"
        )
    ratios = on.ratios_to(off)
    out(
        f"{'ratio on / off':28} {on.operations_per_s / off.operations_per_s:>9.2f}x "
        f"{on.events_per_s / off.events_per_s:>8.2f}x "
        f"{f'{min(ratios):.2f}-{max(ratios):.2f}x':>16} "
        f"{on.percentile(0.5) / off.percentile(0.5):>6.2f}x "
        f"{on.percentile(0.99) / off.percentile(0.99):>6.2f}x"
    )
    out(spans)


def write_relay_table(
    out: Callable[[str], None], relay: tuple[Summary, Summary], relay_note: str
) -> None:
    relayed, raw = relay
    out(f"2. Relaying the log to JetStream, {relay_note} (medians over rounds)")
    columns = f"{'':28} {'events/s':>10} {'events/s range':>16} {'seconds':>8}"
    out(columns)
    out("-" * len(columns))
    for summary in relay:
        low, high = summary.events_per_s_range
        seconds = statistics.median(r.seconds for r in summary.rounds)
        out(
            f"{summary.label:28} {summary.events_per_s:>10.1f} "
            f"{f'{low:.0f}-{high:.0f}':>16} {seconds:>8.2f}"
        )
    ratios = relayed.ratios_to(raw)
    out(
        f"{'ratio relay / baseline':28} {relayed.events_per_s / raw.events_per_s:>9.2f}x "
        f"{f'{min(ratios):.2f}-{max(ratios):.2f}x':>16}"
    )


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.write_path",
        description="Command service and relay throughput against raw PostgreSQL and JetStream.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tickets", type=int, help="tickets to write in all (default 1000)")
    size.add_argument(
        "--events", type=int, help="events to append at least (rounded up to whole tickets)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds per comparison (default 3)"
    )
    parser.add_argument("--pipeline", default="document-review", help="shipped pipeline to run")
    parser.add_argument(
        "--workers",
        default="1",
        help="concurrent writers (threads and connections); a comma-separated list such as "
        "1,2,4 runs the write comparison once per count (default 1)",
    )
    parser.add_argument(
        "--tenants",
        type=int,
        default=1,
        help="tenants the tickets are dealt to, round-robin like the lanes (default 1)",
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed tickets first (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generated input")
    parser.add_argument(
        "--max-in-flight", type=int, help="unacknowledged publishes (default: the relay setting)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="relay read batch size (default: the relay setting)"
    )
    parser.add_argument(
        "--compare-tracing",
        action="store_true",
        help="append with tracing off against tracing on (OTLP/HTTP to a receiver in a "
        "process of its own), in alternating rounds, instead of against plain INSERTs; "
        "skips the relay",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(count) for count in str(args.workers).split(",") if count]
    except ValueError:
        parser.error("--workers takes a count or a comma-separated list of counts")
    if not args.workers or min(args.workers) < 1:
        parser.error("--workers must be at least 1")
    for name in ("tickets", "events", "rounds", "tenants", "max_in_flight", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


async def benchmark(
    args: argparse.Namespace, servers: EmbeddedServers, pipeline: PipelineDefinition, tickets: int
) -> None:
    settings = Settings(
        env="test",
        database_url=servers.database_url,
        nats_url=servers.nats_url,
        nats_credentials=servers.nats_credentials,
        redis_url=servers.redis_url,
        db_pool_size=max(5, *args.workers),
    )
    relay_settings = RelaySettings(
        max_in_flight=args.max_in_flight or settings.relay_max_in_flight,
        batch_size=args.batch_size or settings.relay_batch_size,
    )
    if args.compare_tracing:
        await compare_tracing(args, servers, pipeline, tickets, settings)
        return
    sweep: list[tuple[int, tuple[Summary, Summary]]] = []
    per_round = math.ceil(tickets / args.rounds)
    for workers in args.workers:
        # The same tickets for every count, under a tenant of its own (ids come from the
        # tenant and the key); every input exists before any clock starts.
        suffix = "" if len(args.workers) == 1 else f"-w{workers}"
        warmup = tenant_tickets(args, pipeline, WARMUP_TENANT + suffix, args.warmup)
        measured = tenant_tickets(args, pipeline, TENANT + suffix, tickets)
        rounds = [measured[i : i + per_round] for i in range(0, tickets, per_round)]
        print(f"appending events, {workers} writer(s)", flush=True)
        write = await write_benchmark(settings, servers.database_url, warmup, rounds, workers)
        expected = tickets * events_per_ticket(pipeline)
        appended = sum(r.events for r in write[0].rounds)
        if appended != expected:
            raise RuntimeError(f"appended {appended} events, expected {expected}")
        sweep.append((workers, write))
    print("relaying events", flush=True)
    relayed, raw, events, body_bytes = await relay_benchmark(
        settings, servers.database_url, relay_settings, args.rounds
    )
    header = await report_header(args, servers, pipeline, tickets)
    relay_note = (
        f"{events} events of {body_bytes / events:.0f} B mean body, "
        f"max in flight {relay_settings.max_in_flight}, batch {relay_settings.batch_size}"
    )
    print("")
    write_report(print, header, sweep, (relayed, raw), relay_note)


def tenant_tickets(
    args: argparse.Namespace, pipeline: PipelineDefinition, base: str, count: int
) -> list[list[Command]]:
    """`count` tickets of `base` tenants: ticket i goes to lane i % workers; with as many
    tenants as writers, each writer appends to a tenant of its own (a tenant's appends take
    turns: ADR 20)."""

    def tenant_of(index: int) -> str:
        return base + (f"-t{index % args.tenants}" if args.tenants > 1 else "")

    return [ticket_commands(pipeline, tenant_of(i), i, args.seed) for i in range(count)]


async def report_header(
    args: argparse.Namespace, servers: EmbeddedServers, pipeline: PipelineDefinition, tickets: int
) -> list[str]:
    postgres, nats_version, mean_state = await environment(
        servers.database_url, servers.nats_url, servers.nats_credentials
    )
    commands = len(ticket_commands(pipeline, TENANT, 0, args.seed))
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"pipeline {pipeline.name} v{pipeline.version}: {tickets} tickets in {args.rounds} "
        f"rounds (+{args.warmup} warm-up) per writer count"
        + (" and tracing mode" if args.compare_tracing else "")
        + f", {commands} commands and {events_per_ticket(pipeline)} events per ticket, "
        f"{','.join(map(str, args.workers))} writer(s), {args.tenants} tenant(s), "
        f"seed {args.seed}",
        f"event state: {mean_state:.0f} B mean"
        + ("" if args.compare_tracing else "; the baseline inserts the very same rows"),
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}, PostgreSQL {postgres}, NATS {nats_version}; "
        f"load average at the end {load}",
    ]


async def compare_tracing(
    args: argparse.Namespace,
    servers: EmbeddedServers,
    pipeline: PipelineDefinition,
    tickets: int,
    settings: Settings,
) -> None:
    """Every writer count: tracing off against on, each mode on tickets of its own tenants."""
    receiver = ReceiverProcess()
    try:
        sweep: list[tuple[int, tuple[Summary, Summary], str]] = []
        per_round = math.ceil(tickets / args.rounds)
        for workers in args.workers:
            suffix = "" if len(args.workers) == 1 else f"-w{workers}"
            warmup = {
                mode: tenant_tickets(args, pipeline, f"{WARMUP_TENANT}{suffix}-{mode}", args.warmup)
                for mode in MODES
            }
            rounds = {}
            for mode in MODES:
                measured = tenant_tickets(args, pipeline, f"{TENANT}{suffix}-{mode}", tickets)
                rounds[mode] = [measured[i : i + per_round] for i in range(0, tickets, per_round)]
            print(f"appending events with tracing off and on, {workers} writer(s)", flush=True)
            off, on, spans = await tracing_benchmark(
                settings, servers.database_url, warmup, rounds, workers, receiver
            )
            expected = tickets * events_per_ticket(pipeline)
            for summary in (off, on):
                appended = sum(r.events for r in summary.rounds)
                if appended != expected:
                    raise RuntimeError(f"{summary.label}: appended {appended} of {expected} events")
            sweep.append((workers, (off, on), spans))
    finally:
        receiver.stop()
    header = await report_header(args, servers, pipeline, tickets)
    print("")
    for line in header:
        print(line)
    for workers, write, spans in sweep:
        print("")
        write_tracing_table(print, workers, write, spans)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pipeline = ShippedPipelines().get(args.pipeline)
    if args.events is not None:
        tickets = math.ceil(args.events / events_per_ticket(pipeline))
    else:
        tickets = args.tickets if args.tickets is not None else 1000
    if args.rounds > tickets:
        raise SystemExit(f"--rounds {args.rounds} is more than the {tickets} tickets")

    run_with_servers(
        "tf-write-path-",
        lambda servers: benchmark(args, servers, pipeline, tickets),
        keep_data=args.keep_data,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
