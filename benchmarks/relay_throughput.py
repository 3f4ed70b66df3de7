"""Relay throughput by stream replication and JetStream sync interval, against R1 on one node.

Run it as `python -m benchmarks.relay_throughput`. One run starts, each in a temporary directory
of its own, embedded servers for every layout:

- R1: one NATS server, JetStream's default sync interval (2 minutes), a stream with 1 replica;
- R1 sync always: the same server with `sync_interval: always` (fsync before every ack);
- R3: a local 3-node JetStream cluster (`TF_NATS_CLUSTER_SIZE=3`), `sync_interval` 2m, R3;
- R3 sync always: the same cluster with `sync_interval: always` (`TF_NATS_SYNC_INTERVAL`).

It appends real `document-review` tickets once through `CommandService` into the first layout's
PostgreSQL (that append rate is printed too, as the rate the relay has to keep up with), then
times `streams.relay.Relay` publishing that whole log, from start-up until every event is
acknowledged, into a fresh `TF_EVENTS` stream of each layout. Layouts take turns within every
round (R1, R1 always, R3, R3 always, R1, ...) so drift on a shared machine hits all alike, and the
report gives medians and the per-round ratios against R1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from nats.aio.client import Client as NATS

from benchmarks.write_path import (
    TENANT,
    Summary,
    Timing,
    events_per_ticket,
    fresh_streams,
    relay_round,
    service_round,
    stream_messages,
    ticket_commands,
)
from migrations import apply_migrations
from streams.contract.eventlog import EVENTS_TABLE, EventLogReader
from streams.relay import RelaySettings
from ticketflow.bootstrap import command_service, connect_nats
from ticketflow.embedded import EmbeddedServers, free_port
from ticketflow.pipelines import ShippedPipelines
from ticketflow.settings import Settings


@dataclass(frozen=True)
class Layout:
    label: str
    nodes: int
    replicas: int
    sync_interval: str | None  # None: the server's default (2 minutes)


LAYOUTS = (
    Layout("R1, 1 node, sync 2m", 1, 1, None),
    Layout("R1, 1 node, sync always", 1, 1, "always"),
    Layout("R3, 3 nodes, sync 2m", 3, 3, "2m"),
    Layout("R3, 3 nodes, sync always", 3, 3, "always"),
)


def start_servers(root: Path, layout: Layout) -> EmbeddedServers:
    nats_port = free_port()
    cluster_port = free_port()
    if layout.nodes > 1:
        # Node i listens on port + i for clients and cluster_port + i for routes.
        while not all(free_port_at(p) for p in range(nats_port, nats_port + layout.nodes)):
            nats_port = free_port()
        while not all(free_port_at(p) for p in range(cluster_port, cluster_port + layout.nodes)):
            cluster_port = free_port()
    servers = EmbeddedServers(
        root / f"n{layout.nodes}-{layout.sync_interval or 'default'}",
        nats_port=nats_port,
        redis_port=free_port(),
        nats_cluster=layout.nodes,
        nats_cluster_port=cluster_port,
        nats_sync_interval=layout.sync_interval,
    )
    servers.start()
    return servers


def free_port_at(port: int) -> bool:
    from ticketflow.stack import port_is_free

    return port_is_free("127.0.0.1", port)


async def benchmark(args: argparse.Namespace, servers: list[EmbeddedServers]) -> None:
    pipeline = ShippedPipelines().get("document-review")
    tickets = math.ceil(args.events / events_per_ticket(pipeline))
    main = servers[0]
    settings = [
        Settings(
            env="test",
            database_url=main.database_url,
            nats_url=s.nats_url,
            redis_url=main.redis_url,
            nats_credentials=s.nats_credentials,
            stream_replicas=layout.replicas,
        )
        for layout, s in zip(LAYOUTS, servers, strict=True)
    ]
    commands = [ticket_commands(pipeline, TENANT, i, args.seed) for i in range(tickets)]
    service = command_service(settings[0], main.database_url)
    try:
        append, _ = await asyncio.to_thread(service_round, service, commands, 1)
    finally:
        service.close()
    print(
        f"appended {append.events} events through CommandService, one writer: "
        f"{append.events_per_s:.0f} events/s ({append.operations_per_s:.0f} commands/s)",
        flush=True,
    )
    relay_settings = RelaySettings(
        max_in_flight=settings[0].relay_max_in_flight, batch_size=settings[0].relay_batch_size
    )
    pool = await asyncpg.create_pool(main.database_url, min_size=2, max_size=4)
    clients: list[tuple[NATS, NATS]] = []
    try:
        for s in settings:
            assert s.nats_url
            admin = await connect_nats(s.nats_url, "bench-admin", s.nats_credentials)
            relay = await connect_nats(s.nats_url, "bench-relay", s.nats_credentials)
            clients.append((admin, relay))
        target = await EventLogReader(pool).max_position()
        events = int(await pool.fetchval(f"SELECT count(*) FROM {EVENTS_TABLE}"))
        rounds: list[list[Timing]] = [[] for _ in LAYOUTS]
        for number in range(1, args.rounds + 1):
            for index, (s, (admin, relay_nc)) in enumerate(zip(settings, clients, strict=True)):
                await fresh_streams(admin, pool, s)
                timing = await relay_round(pool, relay_nc, s, relay_settings, target)
                held = await stream_messages(admin, s.stream_name)
                if held != events:
                    raise RuntimeError(f"{LAYOUTS[index].label}: stream holds {held} of {events}")
                info = await admin.jetstream().stream_info(s.stream_name)
                if info.config.num_replicas != LAYOUTS[index].replicas:
                    raise RuntimeError(f"stream has {info.config.num_replicas} replicas")
                rounds[index].append(timing)
            print(
                f"  round {number}: "
                + ", ".join(
                    f"{layout.label} {r[-1].events_per_s:.0f}"
                    for layout, r in zip(LAYOUTS, rounds, strict=True)
                )
                + " events/s",
                flush=True,
            )
        nats_version = clients[0][0].connected_server_version
    finally:
        for pair in clients:
            for nc in pair:
                with contextlib.suppress(Exception):
                    await nc.drain()
        await pool.close()
    summaries = [Summary(layout.label, tuple(r)) for layout, r in zip(LAYOUTS, rounds, strict=True)]
    print("")
    print(
        f"document-review tickets: {tickets}, {events} events; {args.rounds} rounds; relay "
        f"max in flight {relay_settings.max_in_flight}, batch {relay_settings.batch_size}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}, NATS {nats_version.major}.{nats_version.minor}."
        f"{nats_version.patch}; all nodes on this machine"
    )
    print(
        f"append rate (CommandService, 1 writer): {append.events_per_s:.0f} events/s, "
        f"{append.operations_per_s:.0f} commands/s"
    )
    print("")
    columns = (
        f"{'relay to':28} {'events/s':>9} {'range':>13} {'seconds':>8} {'vs R1':>7} {'range':>12}"
    )
    print(columns)
    print("-" * len(columns))
    base = summaries[0]
    for summary in summaries:
        low, high = summary.events_per_s_range
        seconds = statistics.median(r.seconds for r in summary.rounds)
        ratios = summary.ratios_to(base)
        print(
            f"{summary.label:28} {summary.events_per_s:>9.0f} {f'{low:.0f}-{high:.0f}':>13} "
            f"{seconds:>8.2f} {summary.events_per_s / base.events_per_s:>6.2f}x "
            f"{f'{min(ratios):.2f}-{max(ratios):.2f}x':>12}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.relay_throughput",
        description="Relay events/s to R1 and R3 streams, sync interval 2m and always.",
    )
    parser.add_argument("--events", type=int, default=6500, help="log size (default 6500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per layout (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generated input")
    args = parser.parse_args(argv)
    if args.events < 1 or args.rounds < 1:
        parser.error("--events and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="tf-relay-throughput-"))
    started = time.perf_counter()
    servers: list[EmbeddedServers] = []
    try:
        for layout in LAYOUTS:
            servers.append(start_servers(root, layout))
        apply_migrations(servers[0].database_url)
        print(f"servers up and migrated in {time.perf_counter() - started:.1f}s", flush=True)
        asyncio.run(benchmark(args, servers))
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"whole run: {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
