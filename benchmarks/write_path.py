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

Inputs are generated from `--seed` before any timing starts; ticket ids come from idempotency keys,
so every run writes the same tickets. Only trace and span ids and timestamps differ between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from commands.messages import (
    CommandResult,
    CompleteSubtask,
    CreateTicket,
    RecordIngestion,
    UploadedDocument,
)
from commands.pipeline import topological_order
from commands.service import CommandService, ticket_id_for
from migrations import apply_migrations
from streams.contract import IngestedDocument, PipelineDefinition, TokenUsage
from streams.contract.eventlog import EVENTS_TABLE, EventLogReader
from streams.contract.subjects import PREFIX
from streams.jetstream import ensure_stream
from streams.relay import Relay, RelaySettings, message_for
from ticketflow.bootstrap import command_service, connect_nats, stream_settings
from ticketflow.embedded import EmbeddedServers, free_port
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
    ticket_id = ticket_id_for(tenant, key)
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
            options={"language": "en"},
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
    label: str
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

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Batch:
    """The positions one command appended, i.e. one transaction in the event store."""

    first: int
    last: int


def execute(service: CommandService, command: Command) -> CommandResult:
    if isinstance(command, CreateTicket):
        return service.create_ticket(command)
    if isinstance(command, RecordIngestion):
        return service.record_ingestion(command)
    return service.complete_subtask(command)


def run_service(
    service: CommandService, lanes: Sequence[Sequence[Command]], latencies: list[float]
) -> list[list[Batch]]:
    """Runs each lane (one worker's commands, in order) on its own thread."""

    def run_lane(lane: Sequence[Command]) -> tuple[list[Batch], list[float]]:
        batches: list[Batch] = []
        lane_latencies: list[float] = []
        for command in lane:
            started = time.perf_counter()
            result = execute(service, command)
            lane_latencies.append((time.perf_counter() - started) * 1000)
            if result.appended < 1:
                raise RuntimeError(f"{type(command).__name__} appended nothing: {result}")
            batches.append(Batch(result.position - result.appended + 1, result.position))
        return batches, lane_latencies

    if not lanes:
        return []
    with ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="bench") as pool:
        outcomes = list(pool.map(run_lane, lanes))
    for _, lane_latencies in outcomes:
        latencies.extend(lane_latencies)
    return [batches for batches, _ in outcomes]


def split(items: Sequence[list[Command]], workers: int) -> list[list[Command]]:
    """Deals whole tickets round-robin to `workers` lanes."""
    lanes: list[list[Command]] = [[] for _ in range(workers)]
    for index, ticket in enumerate(items):
        lanes[index % workers].extend(ticket)
    return [lane for lane in lanes if lane]


def timed_service_run(
    service: CommandService, label: str, tickets: Sequence[list[Command]], workers: int
) -> tuple[Timing, list[list[Batch]]]:
    lanes = split(tickets, workers)
    latencies: list[float] = []
    started = time.perf_counter()
    batches = run_service(service, lanes, latencies)
    seconds = time.perf_counter() - started
    events = sum(b.last - b.first + 1 for lane in batches for b in lane)
    return Timing(label, sum(len(lane) for lane in lanes), events, seconds, latencies), batches


# -- baseline: plain INSERTs ------------------------------------------------------------------

INSERT = (
    f"INSERT INTO {SCRATCH_TABLE} (originator_id, originator_version, topic, state) "
    "VALUES ($1, $2, $3, $4)"
)
Row = tuple[UUID, int, str, bytes]


async def create_scratch_table(pool: asyncpg.Pool) -> None:
    """Same columns, key and indexes as the event store (no lock, no notify, no trigger)."""
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


async def load_rows(pool: asyncpg.Pool) -> dict[int, Row]:
    records = await pool.fetch(
        "SELECT notification_id, originator_id, originator_version, topic, state "
        f"FROM {EVENTS_TABLE} ORDER BY notification_id"
    )
    return {
        r["notification_id"]: (
            r["originator_id"],
            r["originator_version"],
            r["topic"],
            bytes(r["state"]),
        )
        for r in records
    }


async def insert_batches(
    pool: asyncpg.Pool,
    lanes: Sequence[Sequence[Batch]],
    rows: dict[int, Row],
    latencies: list[float],
) -> None:
    async def run_lane(lane: Sequence[Batch]) -> None:
        async with pool.acquire() as conn:
            for batch in lane:
                values = [rows[p] for p in range(batch.first, batch.last + 1)]
                started = time.perf_counter()
                async with conn.transaction():
                    await conn.executemany(INSERT, values)
                latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(run_lane(lane) for lane in lanes))


async def baseline_inserts(
    database_url: str, warmup: Sequence[Sequence[Batch]], measured: Sequence[Sequence[Batch]]
) -> Timing:
    pool = await asyncpg.create_pool(
        database_url, min_size=len(measured), max_size=max(len(measured), len(warmup), 1)
    )
    try:
        await create_scratch_table(pool)
        rows = await load_rows(pool)
        await insert_batches(pool, warmup, rows, [])
        latencies: list[float] = []
        started = time.perf_counter()
        await insert_batches(pool, measured, rows, latencies)
        seconds = time.perf_counter() - started
        events = sum(b.last - b.first + 1 for lane in measured for b in lane)
        stored = await pool.fetchval(f"SELECT count(*) FROM {SCRATCH_TABLE}")
        expected = events + sum(b.last - b.first + 1 for lane in warmup for b in lane)
        if stored != expected:
            raise RuntimeError(f"baseline stored {stored} rows, expected {expected}")
        return Timing(
            "plain asyncpg INSERT", sum(len(lane) for lane in measured), events, seconds, latencies
        )
    finally:
        await pool.close()


# -- relay and its baseline -------------------------------------------------------------------


@dataclass(frozen=True)
class RelayFigures:
    relay: Timing
    raw: Timing
    events: int
    body_bytes: int
    max_in_flight: int


async def delete_stream(nc: NATS, name: str) -> None:
    with contextlib.suppress(NotFoundError):
        await nc.jetstream().delete_stream(name)


async def stream_messages(nc: NATS, name: str) -> int:
    info = await nc.jetstream().stream_info(name)
    return int(info.state.messages)


async def run_relay(
    pool: asyncpg.Pool, nc: NATS, settings: Settings, relay_settings: RelaySettings, target: int
) -> Timing:
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
    return Timing("streams.relay.Relay", relay.published, relay.published, seconds)


async def raw_publish(
    nc: NATS, messages: Sequence[tuple[str, bytes, dict[str, str]]], max_in_flight: int
) -> Timing:
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
    return Timing("raw js.publish_async", len(messages), len(messages), seconds)


async def relay_benchmark(
    settings: Settings, database_url: str, nats_url: str, relay_settings: RelaySettings
) -> RelayFigures:
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=4)
    admin = await connect_nats(nats_url, "bench-admin")
    relay_nc = await connect_nats(nats_url, "bench-relay")
    raw_nc = await connect_nats(nats_url, "bench-raw")
    try:
        reader = EventLogReader(pool)
        target = await reader.max_position()
        events = int(await pool.fetchval(f"SELECT count(*) FROM {EVENTS_TABLE}"))
        # Fresh, empty streams, both created before their clocks start.
        relay_stream = stream_settings(settings)
        raw_config = dataclasses.replace(
            relay_stream.config(),
            name=RAW_STREAM,
            subjects=[f"{RAW_PREFIX}.>"],
            description="write-path benchmark scratch stream",
        )
        for name in (relay_stream.name, RAW_STREAM):
            await delete_stream(admin, name)
        await ensure_stream(admin.jetstream(), relay_stream)
        await admin.jetstream().add_stream(raw_config)

        relay = await run_relay(pool, relay_nc, settings, relay_settings, target)
        in_stream = await stream_messages(admin, relay_stream.name)
        if relay.events != events or in_stream != events:
            raise RuntimeError(f"relay published {relay.events}, stream holds {in_stream}/{events}")

        # The raw baseline's input, built untimed: exactly what the relay sent, re-prefixed.
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        position = 0
        while batch := await reader.read_after(position, 2000):
            for event in batch:
                subject, body, headers = message_for(event)
                messages.append((RAW_PREFIX + subject.removeprefix(PREFIX), body, headers))
            position = batch[-1].position
        raw = await raw_publish(raw_nc, messages, relay_settings.max_in_flight)
        in_raw = await stream_messages(admin, RAW_STREAM)
        if in_raw != events:
            raise RuntimeError(f"raw stream holds {in_raw} of {events}")
        return RelayFigures(
            relay, raw, events, sum(len(m[1]) for m in messages), relay_settings.max_in_flight
        )
    finally:
        for nc in (raw_nc, relay_nc, admin):
            with contextlib.suppress(Exception):
                await nc.drain()
        await pool.close()


async def server_versions(database_url: str, nats_url: str) -> tuple[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        postgres = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    nc = await connect_nats(nats_url, "bench-version")
    try:
        version = nc.connected_server_version
        nats_version = f"{version.major}.{version.minor}.{version.patch}"
    finally:
        await nc.close()
    return postgres, nats_version


async def state_sizes(database_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            f"SELECT count(*) AS n, coalesce(sum(length(state)), 0) AS bytes FROM {EVENTS_TABLE}"
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["n"]), int(row["bytes"])


# -- report -----------------------------------------------------------------------------------


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


def write_report(
    out: Callable[[str], None],
    header: Sequence[str],
    write: tuple[Timing, Timing],
    relay: RelayFigures,
) -> None:
    service, baseline = write
    for line in header:
        out(line)
    out("")
    out("1. Appending events (one transaction per command)")
    columns = (
        f"{'':34} {'commands/s':>11} {'events/s':>10} {'seconds':>8} {'p50 ms':>8} {'p99 ms':>8}"
    )
    out(columns)
    out("-" * len(columns))
    for timing in (service, baseline):
        out(
            f"{timing.label:34} {timing.operations_per_s:>11.1f} {timing.events_per_s:>10.1f} "
            f"{timing.seconds:>8.2f} {timing.percentile(0.5):>8.2f} {timing.percentile(0.99):>8.2f}"
        )
    out(
        f"{'ratio service / baseline':34} "
        f"{ratio(service.operations_per_s, baseline.operations_per_s):>11} "
        f"{ratio(service.events_per_s, baseline.events_per_s):>10}"
    )
    out("")
    out(
        f"2. Relaying the log to JetStream ({relay.events} events, "
        f"{relay.body_bytes / relay.events:.0f} B mean body, max in flight {relay.max_in_flight})"
    )
    columns = f"{'':34} {'events/s':>11} {'seconds':>10}"
    out(columns)
    out("-" * len(columns))
    for timing in (relay.relay, relay.raw):
        out(f"{timing.label:34} {timing.events_per_s:>11.1f} {timing.seconds:>10.2f}")
    out(
        f"{'ratio relay / baseline':34} "
        f"{ratio(relay.relay.events_per_s, relay.raw.events_per_s):>11}"
    )


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.write_path",
        description="Command service and relay throughput against raw PostgreSQL and JetStream.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tickets", type=int, help="tickets to process (default 1000)")
    size.add_argument(
        "--events", type=int, help="events to append at least (rounded up to whole tickets)"
    )
    parser.add_argument("--pipeline", default="document-review", help="shipped pipeline to run")
    parser.add_argument(
        "--workers", type=int, default=1, help="concurrent writers (threads / connections)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed tickets first (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generated input")
    parser.add_argument(
        "--max-in-flight", type=int, help="unacknowledged publishes (default: the relay setting)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="relay read batch size (default: the relay setting)"
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)
    for name in ("tickets", "events", "workers", "max_in_flight", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pipeline = ShippedPipelines().get(args.pipeline)
    per_ticket = events_per_ticket(pipeline)
    if args.events is not None:
        tickets = math.ceil(args.events / per_ticket)
    else:
        tickets = args.tickets if args.tickets is not None else 1000

    # Every input exists before any clock starts.
    warmup = [ticket_commands(pipeline, WARMUP_TENANT, i, args.seed) for i in range(args.warmup)]
    measured = [ticket_commands(pipeline, TENANT, i, args.seed) for i in range(tickets)]

    data_dir = Path(tempfile.mkdtemp(prefix="tf-write-path-"))
    servers = EmbeddedServers(data_dir, nats_port=free_port(), redis_port=free_port())
    started = time.perf_counter()
    try:
        servers.start()
        apply_migrations(servers.database_url)
        print(f"servers up and migrated in {time.perf_counter() - started:.1f}s", flush=True)
        settings = Settings(
            env="test",
            database_url=servers.database_url,
            nats_url=servers.nats_url,
            redis_url=servers.redis_url,
            db_pool_size=max(5, args.workers),
        )
        relay_settings = RelaySettings(
            max_in_flight=args.max_in_flight or settings.relay_max_in_flight,
            batch_size=args.batch_size or settings.relay_batch_size,
        )
        service, db_pool = command_service(settings, servers.database_url)
        try:
            _, warmup_batches = timed_service_run(service, "warm-up", warmup, args.workers)
            service_timing, batches = timed_service_run(
                service, "CommandService", measured, args.workers
            )
        finally:
            db_pool.close()
            service._app.close()  # the library's own connection pool
        expected = tickets * per_ticket
        if service_timing.events != expected:
            raise RuntimeError(f"appended {service_timing.events} events, expected {expected}")
        print(f"command service done in {service_timing.seconds:.1f}s", flush=True)

        baseline = asyncio.run(baseline_inserts(servers.database_url, warmup_batches, batches))
        stored, state_bytes = asyncio.run(state_sizes(servers.database_url))
        print(f"baseline inserts done in {baseline.seconds:.1f}s", flush=True)
        relay = asyncio.run(
            relay_benchmark(settings, servers.database_url, servers.nats_url, relay_settings)
        )
        postgres_version, nats_version = asyncio.run(
            server_versions(servers.database_url, servers.nats_url)
        )
        print("", flush=True)
        header = [
            f"write path: pipeline {pipeline.name} v{pipeline.version}, {tickets} tickets "
            f"(+{args.warmup} warm-up), {len(measured[0])} commands and {per_ticket} events "
            f"per ticket, {args.workers} worker(s), seed {args.seed}",
            f"event state: {state_bytes / stored:.0f} B mean over {stored} rows "
            "(baseline inserts the same rows)",
            f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python "
            f"{platform.python_version()}, PostgreSQL {postgres_version}, NATS {nats_version}",
        ]
        write_report(print, header, (service_timing, baseline), relay)
    finally:
        servers.stop()
        if args.keep_data:
            print(f"data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
