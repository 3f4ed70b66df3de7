"""What the audit hash chain costs, and how fast bundles verify (docs/adr/0020-audit-chain.md).

Run it as `python -m benchmarks.audit_chain`. One run starts its own embedded servers (see
`benchmarks.harness`), applies the migrations and measures, in the same process:

1. The write path of `benchmarks.write_path`: commands of real tickets appended through
   `CommandService`, with the chain (the append of migrations/0009_audit_chain.sql and its row
   trigger) against without it (the append of migrations/0008_partitioned_events.sql, the trigger
   disabled), in alternating rounds on fresh tickets, `--workers` concurrent writers whose tickets
   belong to `--tenants` tenants (one tenant: every append waits for the same chain head).
2. A 100,000-event history of one tenant (`--verify-events`; real states, appended in batches
   of 1,000 through `ticketflow_append`), exported to a bundle, and `verify_bundle` on it:
   events per second for the export and for the verification, and for `verify --live`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from benchmarks.harness import run_with_servers
from benchmarks.write_path import (
    OWNER,
    Command,
    Summary,
    Timing,
    events_per_ticket,
    service_round,
    ticket_commands,
)
from migrations import discover
from read_api.audit_export import export_bundle, verify_live
from streams.contract.audit_bundle import verify_bundle
from ticketflow.bootstrap import command_service
from ticketflow.embedded import EmbeddedServers
from ticketflow.pipelines import ShippedPipelines
from ticketflow.settings import Settings

_ = OWNER


def append_function(migration_name: str) -> str:
    """The `ticketflow_append` definition of a migration, as CREATE OR REPLACE."""
    sql = next(m.sql for m in discover() if m.name == migration_name)
    start = sql.index("FUNCTION ticketflow_append(")
    end = sql.index("$$;", sql.index("$$", start) + 2) + 3
    return "CREATE OR REPLACE " + sql[start:end]


async def set_chain(pool: asyncpg.Pool, on: bool) -> None:
    if on:
        await pool.execute(append_function("0009_audit_chain.sql"))
        await pool.execute("ALTER TABLE ticketflow_events ENABLE TRIGGER ticketflow_events_chain")
    else:
        await pool.execute(append_function("0008_partitioned_events.sql"))
        await pool.execute("ALTER TABLE ticketflow_events DISABLE TRIGGER ticketflow_events_chain")


async def write_benchmark(
    args: argparse.Namespace, servers: EmbeddedServers, settings: Settings
) -> tuple[Summary, Summary]:
    pipeline = ShippedPipelines().get(args.pipeline)
    service = command_service(settings, servers.database_url)
    pool = await asyncpg.create_pool(servers.database_url, min_size=1, max_size=2)
    chained: list[Timing] = []
    plain: list[Timing] = []
    try:
        per_round = math.ceil(args.tickets / args.rounds)

        def tickets(label: str, number: int) -> list[list[Command]]:
            return [
                ticket_commands(
                    pipeline, f"bench-{label}-{number}-t{i % args.tenants}", i, args.seed
                )
                for i in range(per_round)
            ]

        # Warm-up, untimed, both ways.
        for on in (True, False):
            await set_chain(pool, on)
            await asyncio.to_thread(
                service_round, service, tickets(f"warm{int(on)}", 0)[:10], args.workers
            )
        for number in range(1, args.rounds + 1):
            for on in (True, False):
                await set_chain(pool, on)
                work = tickets("chain" if on else "plain", number)
                timing, _ = await asyncio.to_thread(service_round, service, work, args.workers)
                (chained if on else plain).append(timing)
            print(
                f"  round {number}: with chain {chained[-1].events_per_s:.0f} events/s, "
                f"without {plain[-1].events_per_s:.0f} events/s",
                flush=True,
            )
        await set_chain(pool, True)
    finally:
        await pool.close()
        service.close()
    expected = args.rounds * per_round * events_per_ticket(pipeline)
    if sum(t.events for t in chained) != expected:
        raise RuntimeError("the chained rounds appended an unexpected number of events")
    return Summary("with the chain", tuple(chained)), Summary("without", tuple(plain))


async def verify_benchmark(args: argparse.Namespace, servers: EmbeddedServers) -> dict[str, float]:
    """Appends `--verify-events` events of one tenant (real states of the write benchmark,
    under new aggregate ids), exports them, and verifies the bundle and the stored chain."""
    tenant = "bench-verify"
    pool = await asyncpg.create_pool(servers.database_url, min_size=1, max_size=4)
    try:
        sample = await pool.fetch(
            "SELECT topic, convert_from(state, 'UTF8') AS state FROM ticketflow_events"
            " WHERE tenant LIKE 'bench-chain-%' ORDER BY notification_id LIMIT 500"
        )
        if not sample:
            raise RuntimeError("no events to copy from")
        started = time.perf_counter()
        written = 0
        ids = [uuid.uuid4() for _ in range(1000)]
        versions = dict.fromkeys(ids, 0)
        while written < args.verify_events:
            size = min(1000, args.verify_events - written)
            batch_ids, batch_versions, topics, states = [], [], [], []
            for offset in range(size):
                row = sample[(written + offset) % len(sample)]
                aggregate = ids[offset]
                versions[aggregate] += 1
                batch_ids.append(aggregate)
                batch_versions.append(versions[aggregate])
                topics.append(row["topic"])
                state = row["state"].replace('"tenant":"', f'"tenant":"{tenant}","was":"', 1)
                states.append(state.encode())
            await pool.execute(
                "SELECT count(*) FROM ticketflow_append($1::uuid[], $2::bigint[], $3::text[],"
                " $4::bytea[])",
                batch_ids,
                batch_versions,
                topics,
                states,
            )
            written += size
        appended_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "bundle.tar.gz"
            started = time.perf_counter()
            manifest = await export_bundle(pool, tenant, out)
            export_s = time.perf_counter() - started
            events = manifest["counts"]["events"]
            if events != args.verify_events:
                raise RuntimeError(f"exported {events} of {args.verify_events} events")
            size_mb = out.stat().st_size / 1e6
            started = time.perf_counter()
            report = await asyncio.to_thread(verify_bundle, out)
            verify_s = time.perf_counter() - started
            if not report.ok:
                raise RuntimeError(f"the bundle does not verify: {report.problems[:3]}")
        started = time.perf_counter()
        live = await verify_live(pool, tenant)
        live_s = time.perf_counter() - started
        if not live.ok:
            raise RuntimeError(f"the stored chain does not verify: {live.problems[:3]}")
    finally:
        await pool.close()
    return {
        "events": float(events),
        "append_events_per_s": events / appended_s,
        "export_events_per_s": events / export_s,
        "verify_events_per_s": events / verify_s,
        "verify_s": verify_s,
        "live_events_per_s": events / live_s,
        "bundle_mb": size_mb,
    }


def report(
    args: argparse.Namespace,
    write: tuple[Summary, Summary] | None,
    verify: dict[str, float] | None,
) -> None:
    print("")
    if write is not None:
        chained, plain = write
        print(
            f"1. Appending through CommandService, {args.workers} writer(s), {args.tenants} "
            f"tenant(s), {args.tickets} tickets per side in {args.rounds} rounds"
        )
        for summary in write:
            low, high = summary.events_per_s_range
            print(
                f"   {summary.label:18} {summary.events_per_s:>8.0f} events/s "
                f"({low:.0f}-{high:.0f}), p50 {summary.percentile(0.5):.2f} ms, "
                f"p99 {summary.percentile(0.99):.2f} ms per command"
            )
        ratios = chained.ratios_to(plain)
        print(
            f"   ratio with / without: {chained.events_per_s / plain.events_per_s:.2f}x "
            f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x, median "
            f"{statistics.median(ratios):.2f}x)"
        )
    if verify is not None:
        print(
            f"2. One tenant, {verify['events']:.0f} events: appended in batches of 1000 at "
            f"{verify['append_events_per_s']:.0f} events/s; exported at "
            f"{verify['export_events_per_s']:.0f} events/s ({verify['bundle_mb']:.1f} MB .tar.gz); "
            f"verify_bundle {verify['verify_events_per_s']:.0f} events/s "
            f"({verify['verify_s']:.1f} s); "
            f"verify --live {verify['live_events_per_s']:.0f} events/s"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audit_chain")
    parser.add_argument("--tickets", type=int, default=300, help="tickets per side (300)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="concurrent writers (1)")
    parser.add_argument("--tenants", type=int, default=1, help="tenants the tickets belong to")
    parser.add_argument("--pipeline", default="document-review")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify-events", type=int, default=100_000)
    parser.add_argument("--skip-write", action="store_true", help="only the verify benchmark")
    parser.add_argument("--keep-data", action="store_true")
    args = parser.parse_args(argv)
    for name in ("tickets", "rounds", "workers", "tenants", "verify_events"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    async def body(servers: EmbeddedServers) -> None:
        settings = Settings(
            env="test",
            database_url=servers.database_url,
            nats_url=servers.nats_url,
            nats_credentials=servers.nats_credentials,
            redis_url=servers.redis_url,
            db_pool_size=max(5, args.workers),
        )
        write = None
        if not args.skip_write:
            print("appending with and without the chain", flush=True)
            write = await write_benchmark(args, servers, settings)
        else:
            await write_benchmark(
                argparse.Namespace(**{**vars(args), "tickets": 10, "rounds": 1}),
                servers,
                settings,
            )
        print(f"verifying {args.verify_events} events", flush=True)
        verify = await verify_benchmark(args, servers)
        report(args, write, verify)

    run_with_servers("tf-audit-chain-", body, keep_data=args.keep_data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
