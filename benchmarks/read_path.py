"""Read-path benchmark: command-to-query lag, and rebuilding the read models from history.

Run it as `python -m benchmarks.read_path`. One run starts its own embedded PostgreSQL, NATS and
Redis in a temporary directory, applies the migrations and measures, with the processes laid out
as a deployment lays them out (the command API, the query API and the projector each in a process
of its own, the client in this one; `--api-processes N` runs N copies of each API on its port, as
`ticketflow serve --reuse-port` does on a machine with more cores):

1. **Lag.** This process sends `POST /tickets` (a small in-memory PDF, shipped pipeline) to the
   real command API (`ticketflow.bootstrap.commands_api`, served by uvicorn) on an open-loop
   schedule (`--rate` per second, evenly spaced) and, as soon as the 202 arrives, asks the query
   API (`read_api.wiring.query_api`, served by uvicorn) for `GET /tickets/{id}` while the real
   projector (`ticketflow.bootstrap.run_projector`) folds the log into the read models. Tickets
   alternate between two ways of reading: one `GET` with `min_position` set to the position of
   the 202 (the API waits until the projection reaches it, woken by the projector's NOTIFY), or
   plain `GET`s every `--poll-ms` until one answers 200. The lag is the time from the 202 to that
   200. The in-run baselines are the command's own round trip (send to 202) and a `GET` of a
   ticket that is already visible; the table ends with whether the `min_position` lag met the
   aim (`LAG_AIM_MS`: p50 ≤ 15 ms, p99 ≤ 60 ms).
2. **Rebuild.** The command service (as in `benchmarks.write_path`) appends whole ticket
   histories until the log holds at least `--events` events; then `projections.rebuild` replays
   the whole log into fresh tables and swaps them in, against a plain sequential read of the
   events table in batches of the same size (`SELECT … ORDER BY notification_id`, keyset paging),
   once with the rows left undecoded, once decoded with `RecordedEvent.from_row`, and once also
   planned into read-model statements by `ReadModelWriter.operations` without executing them,
   and that last read once more with the garbage-collector thresholds the rebuild's replay runs
   with (`projections.rebuild.fewer_collections`).

Rounds alternate (rebuild, raw read, decoded read, planned, rebuild, ...) and the table gives the
medians. The query API runs with `FakeEmbedder`: the routes measured here never embed anything,
and the real embedder would only add a model load at start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg
import uvicorn
import uvloop

from benchmarks.harness import run_with_servers
from benchmarks.http_client import HttpClient, multipart_form
from benchmarks.write_path import (
    Summary,
    Timing,
    environment,
    events_per_ticket,
    service_round,
    ticket_commands,
    tiny_pdf,
)
from inference.embeddings import FakeEmbedder
from projections import READ_MODELS, ReadModelWriter, rebuild
from projections.rebuild import fewer_collections
from read_api.wiring import query_api
from streams.contract import PipelineDefinition
from streams.contract.eventlog import EVENTS_TABLE, RecordedEvent
from ticketflow.bootstrap import (
    command_service,
    commands_api,
    jwt_codec,
    open_authenticator,
    run_projector,
)
from ticketflow.embedded import EmbeddedServers, free_port
from ticketflow.pipelines import ShippedPipelines
from ticketflow.settings import Settings

logger = logging.getLogger(__name__)

TENANT = "bench-read"
FILL_TENANT = "bench-history"
SUBJECT = "bench-user"
START_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 30.0
SELECT_AFTER = (
    "SELECT notification_id, originator_id, originator_version, topic, state "
    f"FROM {EVENTS_TABLE} WHERE notification_id > $1 ORDER BY notification_id LIMIT $2"
)


def bench_settings(database_url: str, nats_url: str, redis_url: str) -> Settings:
    # Hundreds of tickets from one user: the per-user rate limit would stop the benchmark.
    return Settings(
        env="test",
        database_url=database_url,
        nats_url=nats_url,
        redis_url=redis_url,
        rate_limits_enabled=False,
    )


# -- the server processes ---------------------------------------------------------------------


def server_process(
    role: str,
    urls: tuple[str, str, str],
    port: int,
    stop: multiprocessing.synchronize.Event,
    shared: bool = False,
) -> None:
    """The command API, the query API or the projector, as its own process runs it: on uvloop,
    and the APIs with uvicorn's httptools parser, as `ticketflow serve` and
    `ticketflow worker projector` run them. A `shared` port is bound with SO_REUSEPORT, as
    `ticketflow serve --reuse-port` binds it for several copies of one API."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    uvloop.run(_serve_until(role, urls, port, stop, shared))


def _shared_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def _serve_until(
    role: str,
    urls: tuple[str, str, str],
    port: int,
    stop: multiprocessing.synchronize.Event,
    shared: bool,
) -> None:
    settings = bench_settings(*urls)
    halt = asyncio.Event()
    server: uvicorn.Server | None = None
    if role == "projector":
        gc.freeze()  # as `ticketflow worker projector` does before it starts
        task = asyncio.create_task(run_projector(settings, halt))
    else:
        app = (
            commands_api(settings)
            if role == "commands"
            else query_api(
                urls[0],
                open_authenticator(settings),
                FakeEmbedder,
                pool_size=settings.db_pool_size,
            )
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        sockets = [_shared_socket(port)] if shared else None
        task = asyncio.create_task(server.serve(sockets=sockets))
    while not stop.is_set():
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            break
    halt.set()
    if server is not None:
        server.should_exit = True
    await task


@dataclass
class Processes:
    """The three server processes and the event that stops them."""

    stop: multiprocessing.synchronize.Event
    processes: Sequence[multiprocessing.process.BaseProcess]
    commands_url: str
    queries_url: str

    @classmethod
    def start(cls, urls: tuple[str, str, str], copies: int = 1) -> Processes:
        """One projector, and `copies` processes of each API sharing its port."""
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        ports = {"commands": free_port(), "queries": free_port(), "projector": 0}
        processes = []
        for role, port in ports.items():
            count = 1 if role == "projector" else copies
            for copy in range(count):
                name = f"bench-{role}" if count == 1 else f"bench-{role}-{copy + 1}"
                processes.append(
                    context.Process(
                        target=server_process,
                        args=(role, urls, port, stop, count > 1),
                        name=name,
                    )
                )
        for process in processes:
            process.start()
        return cls(
            stop,
            processes,
            f"http://127.0.0.1:{ports['commands']}",
            f"http://127.0.0.1:{ports['queries']}",
        )

    def check(self) -> None:
        for process in self.processes:
            if not process.is_alive():
                raise RuntimeError(f"{process.name} exited with {process.exitcode}")

    def close(self) -> None:
        self.stop.set()
        for process in self.processes:
            process.join(15)
            if process.is_alive():
                process.terminate()
                process.join(5)


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a process has used, in seconds (Linux), or None once gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, all processes)."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcessTrace:
    """Resident memory and CPU time of each process, sampled while tickets are sent."""

    names: list[str]
    pids: list[int]
    samples: list[tuple[float, list[float | None]]]
    cpu: list[tuple[list[float | None], float]]

    @classmethod
    def of(cls, processes: Processes) -> ProcessTrace:
        names = [p.name for p in processes.processes] + ["bench-client"]
        pids = [p.pid or 0 for p in processes.processes] + [os.getpid()]
        return cls(names, pids, [], [])

    def sample(self, at: float) -> None:
        self.samples.append((at, [rss_mb(pid) for pid in self.pids]))
        self.cpu.append(([cpu_seconds(pid) for pid in self.pids], machine_busy_seconds()))

    def cpu_lines(self, tickets: int) -> list[str]:
        """Per process, and for the rest of the machine (PostgreSQL, Redis and anything else
        running), the CPU time used while sending, in ms per ticket and in cores."""
        if len(self.cpu) < 2 or tickets <= 0:
            return []
        (first, busy_first), (last, busy_last) = self.cpu[0], self.cpu[-1]
        seconds = self.samples[-1][0] - self.samples[0][0]
        out: list[str] = []
        ours = 0.0
        for name, before, after in zip(self.names, first, last, strict=True):
            if before is None or after is None:
                continue
            used = after - before
            ours += used
            out.append(f"{name:38} {used / tickets * 1000:>10.2f} {used / seconds:>8.2f}")
        rest = busy_last - busy_first - ours
        out.append(
            f"{'rest of the machine':38} {rest / tickets * 1000:>10.2f} {rest / seconds:>8.2f}"
        )
        total = busy_last - busy_first
        out.append(f"{'whole machine':38} {total / tickets * 1000:>10.2f} {total / seconds:>8.2f}")
        return out

    async def follow(self, interval_s: float, stop: asyncio.Event) -> None:
        started = time.perf_counter()
        while not stop.is_set():
            self.sample(time.perf_counter() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
        self.sample(time.perf_counter() - started)

    def lines(self) -> list[str]:
        """Per process: RSS after warm-up, at the middle and at the end of the run, and the
        slope of a least-squares line through the second half of the samples."""
        out: list[str] = []
        if len(self.samples) < 2:
            return out
        middle = len(self.samples) // 2
        for index, name in enumerate(self.names):
            points = [
                (t, value)
                for t, values in self.samples[middle:]
                if (value := values[index]) is not None
            ]
            first, mid, last = (self.samples[i][1][index] for i in (0, middle, -1))
            slope = _slope(points) * 60 if len(points) >= 2 else math.nan
            out.append(f"{name:38} {_mb(first):>8} {_mb(mid):>8} {_mb(last):>8} {slope:>+10.2f}")
        return out


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _slope(points: Sequence[tuple[float, float]]) -> float:
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


async def wait_until_healthy(client: HttpClient, url: str, processes: Processes) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        processes.check()
        with contextlib.suppress(OSError, TimeoutError):
            if (await client.get("/health")).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become healthy in {START_TIMEOUT_S:.0f}s")
        await asyncio.sleep(0.1)


# -- 1. lag -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One ticket: its command's round trip, its lag and how it was read (ms)."""

    mode: str  # "wait" (min_position) or "poll"
    accepted_ms: float  # send to 202
    lag_ms: float  # 202 to the first 200 of the query API
    gets: int  # GET requests it took
    visible_get_ms: float | None  # a GET once it was visible ("wait" tickets only)


@dataclass
class LagRig:
    commands: HttpClient
    queries: HttpClient
    write_headers: dict[str, str]
    read_headers: dict[str, str]
    poll_s: float


@dataclass(frozen=True)
class Upload:
    """One `POST /tickets` body (multipart: the pipeline and a PDF), built before any clock."""

    body: bytes
    content_type: str

    @classmethod
    def of(cls, name: str, pdf: bytes, pipeline: str) -> Upload:
        body, content_type = multipart_form(
            {"pipeline": pipeline}, {"file": (name, pdf, "application/pdf")}, uuid.uuid4().hex
        )
        return cls(body, content_type)


async def one_ticket(rig: LagRig, upload: Upload, mode: str) -> Sample:
    headers = {**rig.write_headers, "Content-Type": upload.content_type}
    sent = time.perf_counter()
    response = await rig.commands.post("/tickets", headers=headers, body=upload.body)
    accepted = time.perf_counter()
    if response.status_code != 202:
        raise RuntimeError(f"POST /tickets answered {response.status_code}: {response.text}")
    body = response.json()
    url = f"/tickets/{body['ticket_id']}"
    gets = 0
    deadline = accepted + SETTLE_TIMEOUT_S
    params = {"min_position": body["position"]} if mode == "wait" else {}
    while True:
        gets += 1
        answer = await rig.queries.get(url, params=params, headers=rig.read_headers)
        if answer.status_code == 200:
            if answer.headers["x-projection-behind"] != "false":
                raise RuntimeError(f"{url} answered behind: {answer.headers}")
            break
        if answer.status_code != 404 or mode == "wait":
            raise RuntimeError(f"GET {url} answered {answer.status_code}: {answer.text}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{url} was not visible {SETTLE_TIMEOUT_S:.0f}s after its 202")
        await asyncio.sleep(rig.poll_s)
    visible = time.perf_counter()
    visible_get_ms = None
    if mode == "wait":
        again = await rig.queries.get(url, headers=rig.read_headers)
        visible_get_ms = (time.perf_counter() - visible) * 1000
        if again.status_code != 200:
            raise RuntimeError(f"GET {url} answered {again.status_code} once visible: {again.text}")
    return Sample(mode, (accepted - sent) * 1000, (visible - accepted) * 1000, gets, visible_get_ms)


async def lag_round(
    rig: LagRig, documents: Sequence[Upload], rate: float
) -> tuple[list[Sample], float]:
    """Every ticket on its open-loop schedule, modes alternating; returns them and the seconds.

    The schedule never waits for answers: a ticket is sent at `index / rate` seconds whether or
    not the earlier ones were answered, so a slow server shows as lag, not as a lower rate.
    """
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Sample]] = []
    started = loop.time()
    late = 0
    for index, document in enumerate(documents):
        delay = started + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.05:
            late += 1
        mode = "wait" if index % 2 == 0 else "poll"
        tasks.append(asyncio.create_task(one_ticket(rig, document, mode)))
    samples = await asyncio.gather(*tasks)
    if late:
        logger.warning("%d of %d tickets were sent over 50 ms late", late, len(documents))
    return samples, loop.time() - started


async def lag_benchmark(
    settings: Settings, urls: tuple[str, str, str], args: argparse.Namespace, pipeline: str
) -> tuple[list[Sample], float, ProcessTrace]:
    codec = jwt_codec(settings)
    token = codec.mint(subject=SUBJECT, tenant=TENANT, roles=("user",))
    headers = {"Authorization": f"Bearer {token}"}
    # Every input exists before any clock starts.
    warmup = [
        Upload.of(f"w{i}.pdf", tiny_pdf(f"read-path/warmup/{i}"), pipeline)
        for i in range(args.warmup)
    ]
    measured = [
        Upload.of(f"t{i}.pdf", tiny_pdf(f"read-path/{i}"), pipeline) for i in range(args.tickets)
    ]
    processes = Processes.start(urls, args.api_processes)
    try:
        async with (
            HttpClient(processes.commands_url, max_connections=200) as cmd,
            HttpClient(processes.queries_url, max_connections=200) as query,
        ):
            await wait_until_healthy(cmd, processes.commands_url, processes)
            await wait_until_healthy(query, processes.queries_url, processes)
            if args.api_processes > 1:
                # Connections the kernel spreads over the copies, used in turn.
                await cmd.open(4 * args.api_processes)
                await query.open(4 * args.api_processes)
            rig = LagRig(cmd, query, headers, headers, args.poll_ms / 1000)
            if warmup:
                await lag_round(rig, warmup, args.rate)
            print(f"  warm-up: {len(warmup)} tickets", flush=True)
            processes_trace = ProcessTrace.of(processes)
            stop = asyncio.Event()
            following = asyncio.create_task(processes_trace.follow(args.memory_interval_s, stop))
            try:
                samples, seconds = await lag_round(rig, measured, args.rate)
            finally:
                stop.set()
                await following
            processes.check()
            return samples, seconds, processes_trace
    finally:
        processes.close()


# -- 2. rebuild -------------------------------------------------------------------------------


async def log_size(pool: asyncpg.Pool) -> tuple[int, int]:
    """Events in the log, and its highest position."""
    row = await pool.fetchrow(
        f"SELECT count(*) AS events, coalesce(max(notification_id), 0) AS last FROM {EVENTS_TABLE}"
    )
    if row is None:
        raise RuntimeError("no answer from the events table")
    return int(row["events"]), int(row["last"])


async def sequential_read(
    pool: asyncpg.Pool,
    batch_size: int,
    decode: bool,
    plan: ReadModelWriter | None = None,
) -> tuple[int, float, int]:
    """The whole log in position order; returns events read, seconds and statements planned."""
    position, events, statements = 0, 0, 0
    started = time.perf_counter()
    while True:
        rows = await pool.fetch(SELECT_AFTER, position, batch_size)
        if not rows:
            break
        if decode:
            decoded = [RecordedEvent.from_row(row) for row in rows]
            if plan is not None:
                statements += sum(len(plan.operations(event)) for event in decoded)
        position = int(rows[-1]["notification_id"])
        events += len(rows)
        if len(rows) < batch_size:
            break
    return events, time.perf_counter() - started, statements


async def rebuild_benchmark(
    pool: asyncpg.Pool, batch_size: int, rounds: int, expected: int
) -> tuple[dict[str, Summary], float]:
    """Alternating rounds of the rebuild and the three reads; the summaries by label."""
    labels = (
        "projections.rebuild",
        "SELECT, rows undecoded",
        "SELECT + from_row",
        "SELECT + from_row + plan",
        "SELECT + from_row + plan, rebuild GC",
    )
    timings: dict[str, list[Timing]] = {label: [] for label in labels}
    statements = 0
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        result = await rebuild(pool, batch_size=batch_size)
        seconds = time.perf_counter() - started
        if result.events != expected:
            raise RuntimeError(f"the rebuild applied {result.events} of {expected} events")
        timings[labels[0]].append(Timing(batches(expected, batch_size), expected, seconds))
        # The last one reads with the collector thresholds the rebuild's replay runs with.
        variants: list[tuple[bool, ReadModelWriter | None, bool]] = [
            (False, None, False),
            (True, None, False),
            (True, ReadModelWriter("public"), False),
            (True, ReadModelWriter("public"), True),
        ]
        for label, (decode, plan, tuned) in zip(labels[1:], variants, strict=True):
            with fewer_collections() if tuned else contextlib.nullcontext():
                events, seconds, planned = await sequential_read(pool, batch_size, decode, plan)
            if events != expected:
                raise RuntimeError(f"{label} read {events} of {expected} events")
            timings[label].append(Timing(batches(expected, batch_size), events, seconds))
            statements = planned or statements
        print(
            f"  round {number}: "
            + ", ".join(f"{label} {timings[label][-1].events_per_s:.0f}" for label in labels)
            + " events/s",
            flush=True,
        )
    summaries = {label: Summary(label, tuple(rounds_)) for label, rounds_ in timings.items()}
    return summaries, statements / expected


def batches(events: int, batch_size: int) -> int:
    return math.ceil(events / batch_size)


async def fill_history(
    settings: Settings,
    database_url: str,
    pool: asyncpg.Pool,
    pipeline: PipelineDefinition,
    args: argparse.Namespace,
) -> tuple[int, float]:
    """Appends whole tickets through the command service until the log holds `--events`."""
    events, _ = await log_size(pool)
    tickets = max(0, math.ceil((args.events - events) / events_per_ticket(pipeline)))
    history = [ticket_commands(pipeline, FILL_TENANT, i, args.seed) for i in range(tickets)]
    service = await asyncio.to_thread(command_service, settings, database_url)
    try:
        timing, _ = await asyncio.to_thread(service_round, service, history, 1)
    finally:
        service.close()
    return tickets, timing.seconds if tickets else 0.0


# -- report -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    return Summary("", (Timing(len(values), 0, 1.0, list(values)),)).percentile(q)


def write_report(
    out: Callable[[str], None],
    header: Sequence[str],
    samples: Sequence[Sample],
    lag_note: str,
    poll_ms: float,
    rebuilt: dict[str, Summary] | None,
    rebuild_note: str,
    trace: ProcessTrace | None = None,
) -> None:
    for line in header:
        out(line)
    if samples:
        write_lag_table(out, samples, lag_note, poll_ms, trace)
    if rebuilt is not None:
        write_rebuild_table(out, rebuilt, rebuild_note)


LAG_AIM_MS = (15.0, 60.0)
"""The aim for command accepted to visible, read with `min_position`: p50 and p99 in ms. (The
polling reads also wait out the client's poll interval.)"""


def lag_verdict(samples: Sequence[Sample]) -> str:
    """Whether the `min_position` lag met `LAG_AIM_MS`."""
    aim_p50, aim_p99 = LAG_AIM_MS
    waited = [s.lag_ms for s in samples if s.mode == "wait"]
    p50, p99 = percentile(waited, 0.5), percentile(waited, 0.99)
    verdict = "met" if p50 <= aim_p50 and p99 <= aim_p99 else "missed"
    return f"{verdict}: p50 {p50:.2f} ms (aim {aim_p50:g}), p99 {p99:.2f} ms (aim {aim_p99:g})"


def write_lag_table(
    out: Callable[[str], None],
    samples: Sequence[Sample],
    lag_note: str,
    poll_ms: float,
    trace: ProcessTrace | None,
) -> None:
    out("")
    out(f"1. Command accepted (202) to visible in the query API (200), {lag_note}")
    columns = f"{'':38} {'count':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'GETs':>5}"
    out(columns)
    out("-" * len(columns))
    rows: list[tuple[str, list[float], float | None]] = [
        ("POST /tickets, send to 202", [s.accepted_ms for s in samples], None),
    ]
    modes = (
        ("wait", "202 to 200, GET with min_position"),
        ("poll", f"202 to 200, GET every {poll_ms:g} ms"),
    )
    for mode, label in modes:
        chosen = [s for s in samples if s.mode == mode]
        rows.append((label, [s.lag_ms for s in chosen], statistics.mean(s.gets for s in chosen)))
    visible = [s.visible_get_ms for s in samples if s.visible_get_ms is not None]
    rows.append(("GET /tickets/{id}, already visible", visible, None))
    for label, values, gets in rows:
        mean_gets = f"{gets:>5.1f}" if gets is not None else ""
        out(
            f"{label:38} {len(values):>6} {percentile(values, 0.5):>8.2f} "
            f"{percentile(values, 0.99):>8.2f} {max(values):>8.2f} {mean_gets}".rstrip()
        )
    accepted = [s.accepted_ms for s in samples]
    waited = [s.lag_ms for s in samples if s.mode == "wait"]
    out(
        f"{'ratio min_position lag / 202':38} {'':>6} "
        f"{percentile(waited, 0.5) / percentile(accepted, 0.5):>7.2f}x "
        f"{percentile(waited, 0.99) / percentile(accepted, 0.99):>7.2f}x "
        f"{max(waited) / max(accepted):>7.2f}x"
    )
    out(f"{'aim for the min_position lag':38} {'':>6} {lag_verdict(samples)}")
    if trace is not None and trace.samples:
        out("")
        seconds = trace.samples[-1][0]
        out(f"   Resident memory while sending ({len(trace.samples)} samples over {seconds:.0f}s)")
        columns = f"{'MiB':38} {'start':>8} {'middle':>8} {'end':>8} {'MiB/min':>10}"
        out("   " + columns)
        out("   " + "-" * len(columns))
        for line in trace.lines():
            out("   " + line)
        cpu = trace.cpu_lines(len(samples))
        if cpu:
            out("")
            out("   CPU time while sending (user + system)")
            columns = f"{'':38} {'ms/ticket':>10} {'cores':>8}"
            out("   " + columns)
            out("   " + "-" * len(columns))
            for line in cpu:
                out("   " + line)


def write_rebuild_table(
    out: Callable[[str], None], rebuilt: dict[str, Summary], rebuild_note: str
) -> None:
    out("")
    out(f"2. Rebuilding the read models from the whole log, {rebuild_note} (medians over rounds)")
    columns = f"{'':38} {'events/s':>10} {'events/s range':>16} {'seconds':>8}"
    out(columns)
    out("-" * len(columns))
    for summary in rebuilt.values():
        low, high = summary.events_per_s_range
        seconds = statistics.median(r.seconds for r in summary.rounds)
        out(
            f"{summary.label:38} {summary.events_per_s:>10.1f} "
            f"{f'{low:.0f}-{high:.0f}':>16} {seconds:>8.2f}"
        )
    contender, *baselines = rebuilt.values()
    for baseline in baselines:
        ratios = contender.ratios_to(baseline)
        label = f"ratio rebuild / {baseline.label.removeprefix('SELECT').strip(' ,+')}"
        out(
            f"{label[:38]:38} {contender.events_per_s / baseline.events_per_s:>9.3f}x "
            f"{f'{min(ratios):.3f}-{max(ratios):.3f}x':>16}"
        )


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.read_path",
        description="Command-to-query lag, and read-model rebuild speed against a plain read.",
    )
    parser.add_argument(
        "--tickets", type=int, default=600, help="tickets created over HTTP (default 600)"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="creates per second (default 20)")
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds to send creates for, open loop (sets --tickets to rate x duration)",
    )
    parser.add_argument(
        "--memory-interval-s",
        type=float,
        default=1.0,
        help="seconds between samples of each process's memory (default 1)",
    )
    parser.add_argument(
        "--no-rebuild", action="store_true", help="measure the lag only, skip the rebuild"
    )
    parser.add_argument(
        "--no-lag", action="store_true", help="measure the rebuild only, skip the lag"
    )
    parser.add_argument(
        "--poll-ms", type=float, default=5.0, help="pause between polling GETs (default 5)"
    )
    parser.add_argument(
        "--api-processes",
        type=int,
        default=1,
        help="processes of each API, sharing its port with SO_REUSEPORT (default 1)",
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed tickets first (default 20)")
    parser.add_argument(
        "--events", type=int, default=20_000, help="events in the log to rebuild (default 20000)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=1000, help="rebuild and read batch (default 1000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rebuild rounds (default 3)")
    parser.add_argument("--pipeline", default="document-review", help="shipped pipeline to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated history")
    parser.add_argument("--keep-data", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)
    if args.duration is not None:
        if args.duration <= 0:
            parser.error("--duration must be positive")
        args.tickets = max(2, math.ceil(args.rate * args.duration))
    for name in ("tickets", "rate", "poll_ms", "events", "batch_size", "rounds", "api_processes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.tickets < 2:
        parser.error("--tickets must be at least 2 (the two ways of reading alternate)")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


async def rebuild_part(
    settings: Settings,
    servers: EmbeddedServers,
    pipeline: PipelineDefinition,
    args: argparse.Namespace,
) -> tuple[dict[str, Summary], int, float]:
    """Fills the log to `--events`, then times rebuilds against the plain reads."""
    pool = await asyncpg.create_pool(servers.database_url, min_size=2, max_size=4)
    try:
        print("appending history", flush=True)
        tickets, fill_seconds = await fill_history(
            settings, servers.database_url, pool, pipeline, args
        )
        events, last = await log_size(pool)
        if events != last:
            raise RuntimeError(f"the log holds {events} events up to position {last}")
        print(f"  {tickets} tickets in {fill_seconds:.1f}s; the log holds {events} events")
        print("rebuilding", flush=True)
        rebuilt, statements = await rebuild_benchmark(pool, args.batch_size, args.rounds, events)
        projection = await pool.fetchval(
            "SELECT position FROM projection_positions WHERE name = $1", READ_MODELS
        )
        if projection != last:
            raise RuntimeError(f"the rebuild left the projection at {projection}, not {last}")
    finally:
        await pool.close()
    return rebuilt, events, statements


async def benchmark(
    args: argparse.Namespace, servers: EmbeddedServers, pipeline: PipelineDefinition
) -> None:
    urls = (servers.database_url, servers.nats_url, servers.redis_url)
    settings = bench_settings(*urls)
    samples: list[Sample] = []
    lag_seconds, trace = 0.0, None
    if not args.no_lag:
        print(f"lag: {args.tickets} tickets at {args.rate:g}/s", flush=True)
        samples, lag_seconds, trace = await lag_benchmark(settings, urls, args, pipeline.name)
    rebuilt: dict[str, Summary] | None = None
    events, statements = 0, 0.0
    if not args.no_rebuild:
        rebuilt, events, statements = await rebuild_part(settings, servers, pipeline, args)
    postgres, nats_version, mean_state = await environment(
        servers.database_url, servers.nats_url, servers.nats_credentials
    )
    header = [
        f"pipeline {pipeline.name} v{pipeline.version}; lag: {len(samples)} tickets "
        f"(+{args.warmup} warm-up) over HTTP in {lag_seconds:.1f}s; rebuild: {events} events, "
        f"{events_per_ticket(pipeline)} per ticket of the appended history, seed {args.seed}",
        f"event state: {mean_state:.0f} B mean",
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}, PostgreSQL {postgres}, NATS {nats_version}",
    ]
    lag_note = f"{args.rate:g} creates/s, open loop, modes alternating"
    if args.api_processes > 1:
        lag_note += f", {args.api_processes} processes of each API"
    rebuild_note = (
        f"{events} events, batch {args.batch_size}, {statements:.2f} statements planned per event"
    )
    print("")
    write_report(print, header, samples, lag_note, args.poll_ms, rebuilt, rebuild_note, trace)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pipeline = ShippedPipelines().get(args.pipeline)
    run_with_servers(
        "tf-read-path-",
        lambda servers: benchmark(args, servers, pipeline),
        keep_data=args.keep_data,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
