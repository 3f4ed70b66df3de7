"""Faults on a 3-node JetStream cluster, with tickets of several tenants in flight, lose nothing.

Everything is a real process: three NATS servers clustered (tests/nats_cluster.py), the
session's PostgreSQL and Redis, and the processes of `ticketflow up --scale relay=2,inference=2`
started as it starts them (`python -m ticketflow worker relay`, twice: one active by the leader
lock; `… worker ingest`), on an R3 stream. The two inference workers are the real worker process
with a scripted model (tests/e2e/scripted_inference_worker.py), so that tickets take seconds.

One run, one fault after another, each with tickets opened before and after it:

1. a NATS node killed (`kill -9`): tickets finish while it is away, then it rejoins and catches up;
2. the stream's leader node killed: a new leader, tickets finish, the node rejoins;
3. the active relay process killed: the standby process takes the leader lock and publishes;
4. one of the two inference worker processes killed while it holds subtasks it started: they
   are redelivered to the other, which completes them;
5. the stream purged: the relay publishes again what the stream lost;
6. a node restarted on an empty store: it catches up from its peers.

After each: every ticket ends `completed` with exactly one terminal event, every subtask has
exactly one `SubtaskCompleted`, and `ticketflow streams verify` finds every stored event in the
stream once, in order. About two minutes on two cores; five when other work loads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import nats.errors
import pytest
from nats.js.api import StreamInfo
from nats.js.errors import ServiceUnavailableError

from commands.messages import CreateTicket, UploadedDocument
from commands.service import CommandService
from handlers.consumer import DEAD_LETTER_STREAM
from streams import reconcile
from streams.contract.eventlog import EVENTS_TABLE, decode_state
from streams.contract.events import EVENT_TYPES
from tests.conftest import Servers, new_database
from tests.integration.conftest import service_for, settings_for
from tests.nats_cluster import NatsCluster, distinct_free_ports
from tests.support import random_tenant, short_docx
from ticketflow.bootstrap import close_nats, connect_nats
from ticketflow.processes import spawn
from ticketflow.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
TERMINAL = {"completed", "failed", "cancelled"}
STARTED_TOPICS = [t.topic for t in EVENT_TYPES if t.name == "subtask_started"]
COMPLETED_TOPICS = [t.topic for t in EVENT_TYPES if t.name == "subtask_completed"]
FINISH_S = 150.0
"""How long the tickets of a phase may take to finish, faults and recoveries included."""

TICKETFLOW = ("-m", "ticketflow")
SCRIPTED_INFERENCE = ("-m", "tests.e2e.scripted_inference_worker")
PROCESSES: dict[str, tuple[str, ...]] = {
    "relay-1": (*TICKETFLOW, "worker", "relay"),
    "relay-2": (*TICKETFLOW, "worker", "relay"),
    "ingest": (*TICKETFLOW, "worker", "ingest"),
    "inference-1": SCRIPTED_INFERENCE,
    "inference-2": SCRIPTED_INFERENCE,
}


@pytest.fixture
def cluster(tmp_path: Path, servers: Servers) -> Iterator[NatsCluster]:
    cluster = NatsCluster(servers.nats_authority, tmp_path / "cluster").start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_settings(servers: Servers, cluster: NatsCluster) -> Iterator[Settings]:
    with new_database(servers) as database_url:
        yield settings_for(
            servers, database_url, nats_url=cluster.url, stream_replicas=3, stream_storage="file"
        )


@dataclass
class Processes:
    """The stack's processes, each its own OS process, killed with SIGKILL when the test dies."""

    env: dict[str, str]
    logs: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    # Chosen at once, all different: a process binds its port only once it has started.
    free_ports: list[int] = field(default_factory=lambda: distinct_free_ports(8))

    def start(self, name: str, args: tuple[str, ...]) -> None:
        kind = name.split("-", maxsplit=1)[0]
        port = self.free_ports.pop()
        # Each copy its own metrics port, as `ticketflow up --scale` gives them.
        env = {**self.env, f"TF_METRICS_PORT_{kind.upper()}": str(port)}
        self.running[name] = spawn(
            [sys.executable, *args],
            self.logs / f"{name}.log",
            env,
            death_signal=signal.SIGKILL,
            cwd=REPO,
        )
        self.metrics_ports[name] = port

    def kill(self, name: str) -> None:
        """`kill -9`: no drain, no goodbye; its connections drop with it."""
        process = self.running.pop(name)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        self.metrics_ports.pop(name)

    def metrics(self, name: str) -> str | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.running.items() if p.poll() is not None}
        assert not dead, f"processes exited: {dead}\n{self.tails()}"

    def tails(self) -> str:
        return "\n".join(
            f"--- {log.stem} ---\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        for process in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def process_env(base: dict[str, str], settings: Settings) -> dict[str, str]:
    assert settings.database_url is not None
    assert settings.nats_url is not None
    assert settings.redis_url is not None
    return {
        **base,
        "TF_ENV": "test",
        "TF_DATA_DIR": str(settings.data_dir),
        "TF_DATABASE_URL": settings.database_url,
        "TF_NATS_URL": settings.nats_url,
        "TF_NATS_CREDENTIALS": str(settings.nats_credentials),
        "TF_REDIS_URL": settings.redis_url,
        "TF_STREAM_REPLICAS": "3",
        "TF_STREAM_STORAGE": "file",
        # What a killed worker held, or what was on its way to it through a killed node, comes
        # back after 3 s rather than 30 (ingest) or 60 (inference).
        "TF_INFERENCE_ACK_WAIT_S": "3",
        "TF_INGEST_ACK_WAIT_S": "3",
        "TF_INFERENCE_CONCURRENCY": "2",
        "TF_INGEST_CONCURRENCY": "2",
    }


@pytest.fixture
def processes(
    stack_env: dict[str, str], cluster_settings: Settings, tmp_path: Path
) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    running = Processes(process_env(stack_env, cluster_settings), logs)
    try:
        for name, args in PROCESSES.items():
            running.start(name, args)
        yield running
    except BaseException:
        print(running.tails())
        raise
    finally:
        running.stop()


async def eventually(
    condition: Callable[[], Awaitable[object]],
    what: str,
    timeout_s: float,
    processes: Processes,
    interval_s: float = 0.3,
) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        processes.check_alive()
        try:
            if value := await condition():
                return value
        except AssertionError:
            raise
        except Exception:  # noqa: S110 - a server away for a moment: ask again
            pass
        assert time.monotonic() < deadline, f"not {what} within {timeout_s:.0f}s"
        await asyncio.sleep(interval_s)


async def open_tickets(service: CommandService, tenants: int, per_tenant: int) -> list[uuid.UUID]:
    # One short page: one chunk to embed, so that ingestion keeps up on two cores.
    document = UploadedDocument("main", "lighthouse.docx", DOCX, short_docx())
    names = [random_tenant() for _ in range(tenants)]

    def create(tenant: str) -> uuid.UUID:
        return service.create_ticket(CreateTicket(tenant, "someone", (document,), "tiny")).ticket_id

    return [await asyncio.to_thread(create, t) for _ in range(per_tenant) for t in names]


async def unfinished(pool: asyncpg.Pool, tickets: list[uuid.UUID]) -> int:
    terminal = [t.topic for t in EVENT_TYPES if t.aggregate == "ticket" and t.name in TERMINAL]
    done = await pool.fetchval(
        f"SELECT count(DISTINCT originator_id) FROM {EVENTS_TABLE}"
        " WHERE originator_id = ANY($1::uuid[]) AND topic = ANY($2::text[])",
        tickets,
        terminal,
    )
    return len(tickets) - int(done)


async def check_outcome(
    settings: Settings, pool: asyncpg.Pool, tickets: list[uuid.UUID], env: dict[str, str]
) -> None:
    """Exactly one terminal event per ticket, all completed; one SubtaskCompleted per subtask;
    and `ticketflow streams verify` finds every stored event in the stream, once, in order."""
    events = await reconcile.events_between(pool, 1, 2**62)
    terminal: Counter[uuid.UUID] = Counter()
    completed: Counter[tuple[uuid.UUID, str]] = Counter()
    for event in events:
        name = event.event_type.name
        if name in TERMINAL and event.aggregate == "ticket":
            terminal[event.aggregate_id] += 1
            assert name == "completed", f"{event.aggregate_id} ended {name}"
        if name == "subtask_completed":
            completed[(event.aggregate_id, str(event.state["subtask_id"]))] += 1
    assert {t: terminal[t] for t in tickets} == dict.fromkeys(tickets, 1)
    assert set(completed.values()) == {1}
    assert len(completed) == 4 * len(tickets)  # the tiny pipeline: a, b, c, d

    # `streams verify` checks up to the relay's checkpoint: wait until that is the last event.
    nc = await connect_nats(settings.nats_url or "", "tests-verify", settings.nats_credentials)
    try:
        js = nc.jetstream(timeout=10)
        report = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # Right after a node came back the stream may have no leader for a moment.
            with contextlib.suppress(
                nats.errors.TimeoutError,
                TimeoutError,
                nats.errors.NoRespondersError,
                ServiceUnavailableError,
            ):
                report, _ = await reconcile.verify(pool, js, settings.stream_name)
                if report.ok and report.checked == len(events):
                    break
            await asyncio.sleep(0.5)
        assert report is not None, "the stream could not be read"
        assert report.ok, report.summary()
        assert report.checked == len(events), report.summary()
    finally:
        await close_nats(nc)
    verified = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ticketflow", "streams", "verify"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = verified.stdout + verified.stderr
    assert verified.returncode == 0, output
    assert "stream verified: every event once, in order" in output, output
    checked = re.search(r"(\d+) events checked", output)
    assert checked is not None, output
    assert int(checked[1]) >= len(events), output


async def stream_info_of(settings: Settings, stream: str | None = None) -> StreamInfo:
    nc = await connect_nats(settings.nats_url or "", "tests-info", settings.nats_credentials)
    try:
        return await nc.jetstream(timeout=5).stream_info(stream or settings.stream_name)
    finally:
        await close_nats(nc)


async def stream_leader(
    settings: Settings, cluster: NatsCluster, processes: Processes, *, not_on: int | None = None
) -> int:
    """The index of the node leading the stream (once there is one, and it is not `not_on`)."""

    async def leader() -> int | None:
        info = await stream_info_of(settings)
        name = info.cluster.leader if info.cluster else None
        index = cluster.index_of(name) if name else None
        return index + 1 if index is not None and index != not_on else None

    found = await eventually(leader, "a stream leader", 60, processes)
    assert isinstance(found, int)
    return found - 1


async def caught_up(settings: Settings, processes: Processes) -> None:
    """Every replica of the stream is current again: the node that was away has rejoined."""

    async def current() -> bool:
        info = await stream_info_of(settings)
        replicas = (info.cluster.replicas or []) if info.cluster else []
        return len(replicas) == 2 and all(r.current and not r.offline for r in replicas)

    await eventually(current, "every replica current", 60, processes)


def relay_leader(processes: Processes) -> str | None:
    """The relay process whose metrics say it holds the leader lock (only one may)."""
    leading = [
        name
        for name in processes.running
        if name.startswith("relay")
        and re.search(r"^ticketflow_relay_leader 1\.0$", processes.metrics(name) or "", re.M)
    ]
    assert len(leading) <= 1, f"two active relays: {leading}"
    return leading[0] if leading else None


@pytest.mark.timeout(480)
async def test_kills_of_nodes_relay_and_worker_a_purge_and_an_empty_store_lose_nothing(
    cluster: NatsCluster, cluster_settings: Settings, processes: Processes
) -> None:
    settings = cluster_settings
    assert settings.database_url is not None
    service = service_for(settings, settings.database_url)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    tickets: list[uuid.UUID] = []
    timings: dict[str, float] = {}
    begun = time.monotonic()

    async def run_phase(name: str, fault: Callable[[], Awaitable[None]]) -> None:
        started = time.monotonic()
        tickets.extend(await open_tickets(service, tenants=3, per_tenant=2))
        await fault()
        tickets.extend(await open_tickets(service, tenants=2, per_tenant=2))
        await finish(name)
        timings[name] = time.monotonic() - started

    async def finish(name: str) -> None:
        async def all_done() -> bool:
            return await unfinished(pool, tickets) == 0

        await eventually(all_done, f"every ticket finished ({name})", FINISH_S, processes)

    async def check(name: str) -> None:
        started = time.monotonic()
        try:
            await check_outcome(settings, pool, tickets, processes.env)
        except AssertionError as error:
            raise AssertionError(f"after {name}: {error}") from error
        processes.check_alive()
        timings[f"{name}: check"] = time.monotonic() - started

    try:
        # Every process up: each serves its metrics once its resources are open.
        async def all_serving() -> bool:
            return all(processes.metrics(name) for name in processes.running)

        await eventually(all_serving, "every process serving its metrics", 180, processes)
        timings["start"] = time.monotonic() - begun
        tickets.extend(await open_tickets(service, tenants=2, per_tenant=1))
        await finish("warm-up")
        await check("warm-up")
        # Dead letters are kept on as many nodes as the events they copy.
        for stream in (settings.stream_name, DEAD_LETTER_STREAM):
            info = await stream_info_of(settings, stream)
            assert info.config.num_replicas == 3, f"{stream}: {info.config.num_replicas} replicas"

        # 1. A node that leads nothing of the stream: work goes on without it; it rejoins.
        async def kill_a_node() -> None:
            leader = await stream_leader(settings, cluster, processes)
            victim = (leader + 1) % cluster.size
            cluster.kill(victim)
            tickets.extend(await open_tickets(service, tenants=2, per_tenant=2))
            await finish("a node away")  # finished while the node is still away
            cluster.restart(victim)

        await run_phase("a node killed", kill_a_node)
        await caught_up(settings, processes)
        await check("a node killed")

        # 2. The stream's leader: another node becomes leader; the old one rejoins.
        async def kill_the_leader() -> None:
            leader = await stream_leader(settings, cluster, processes)
            cluster.kill(leader)
            tickets.extend(await open_tickets(service, tenants=2, per_tenant=2))
            await stream_leader(settings, cluster, processes, not_on=leader)  # elected
            await finish("the leader away")
            cluster.restart(leader)

        await run_phase("the stream leader killed", kill_the_leader)
        await caught_up(settings, processes)
        await check("the stream leader killed")

        # 3. The active relay process: the standby takes the leader lock and publishes.
        async def kill_the_active_relay() -> None:
            async def active() -> str | None:
                return relay_leader(processes)

            victim = await eventually(active, "an active relay", 30, processes)
            assert isinstance(victim, str)
            processes.kill(victim)

            async def taken_over() -> bool:
                name = relay_leader(processes)
                return name is not None and name != victim

            await eventually(taken_over, "the standby relay active", 30, processes)
            processes.start("relay-3", PROCESSES["relay-1"])  # the new standby

        await run_phase("the active relay killed", kill_the_active_relay)
        await check("the active relay killed")

        # 4. An inference worker holding subtasks it started: they go to the other worker.
        victim_pid = processes.running["inference-1"].pid
        victim_id = f"{socket.gethostname()}:{victim_pid}"
        orphans: set[tuple[uuid.UUID, str]] = set()

        async def kill_a_worker() -> None:
            os.kill(victim_pid, signal.SIGUSR1)  # its model stops answering
            seen: dict[tuple[uuid.UUID, str], float] = {}

            async def holding() -> bool:
                """A subtask it started has stayed unfinished for 3 s: it is stuck in there."""
                now = time.monotonic()
                current = set(await started_not_completed(pool, victim_id))
                for key in list(seen):
                    if key not in current:
                        del seen[key]
                for key in current:
                    seen.setdefault(key, now)
                return any(now - since >= 3.0 for since in seen.values())

            await eventually(holding, "the worker holding started subtasks", 60, processes)
            processes.kill("inference-1")
            orphans.clear()
            orphans.update(await started_not_completed(pool, victim_id))
            assert orphans

        await run_phase("an inference worker killed", kill_a_worker)
        await check("an inference worker killed")
        still_open = orphans & set(await started_not_completed(pool, victim_id))
        assert not still_open, f"subtasks of the killed worker never completed: {still_open}"

        # 5. The stream purged: the relay publishes again what it lost.
        async def purge() -> None:
            await asyncio.sleep(1.0)  # some of this phase's events published first
            nc = await connect_nats(cluster.url, "tests-purge", settings.nats_credentials)
            try:
                await nc.jetstream(timeout=10).purge_stream(settings.stream_name)
            finally:
                await close_nats(nc)

        await run_phase("the stream purged", purge)
        await check("the stream purged")

        # 6. A node back on an empty store: it catches up from its peers.
        async def empty_node() -> None:
            victim = (await stream_leader(settings, cluster, processes) + 1) % cluster.size
            cluster.kill(victim)
            tickets.extend(await open_tickets(service, tenants=2, per_tenant=1))
            cluster.restart(victim, empty=True)

        await run_phase("a node back on an empty store", empty_node)
        await caught_up(settings, processes)
        await check("a node back on an empty store")
        print("phases (s):", {k: round(v, 1) for k, v in timings.items()})
    finally:
        await pool.close()
        service.close()


async def started_not_completed(pool: asyncpg.Pool, worker: str) -> list[tuple[uuid.UUID, str]]:
    """Subtasks whose attempt `worker` started and nobody completed."""
    rows = await pool.fetch(
        f"SELECT s.originator_id, s.state FROM {EVENTS_TABLE} s WHERE s.topic = ANY($1::text[])",
        STARTED_TOPICS,
    )
    completed = await pool.fetch(
        f"SELECT originator_id, state FROM {EVENTS_TABLE} WHERE topic = ANY($1::text[])",
        COMPLETED_TOPICS,
    )
    done = {(r["originator_id"], decode_state(bytes(r["state"]))["subtask_id"]) for r in completed}
    found = []
    for row in rows:
        state = decode_state(bytes(row["state"]))
        key = (row["originator_id"], state["subtask_id"])
        if state.get("worker") == worker and key not in done:
            found.append(key)
    return found
