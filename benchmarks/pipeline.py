"""Wall time of a whole `document-review` ticket on this machine's CPU backend.

Run it as `python -m benchmarks.pipeline`. One run starts its own embedded PostgreSQL, NATS and
Redis, runs the relay, the ingest worker and the inference worker in this process (the same
code `ticketflow up` runs), and submits `research-paper.pdf` several times, each under a new
tenant so that every ticket is ingested from scratch. For each ticket it reports the wall time
from the accepted command to `TicketCompleted`, split into ingestion and inference, against the
baseline of the same run: the time the model itself spent generating (the `latency_ms` of every
`SubtaskCompleted`). The ratio is what the event machinery costs on top of the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from commands.messages import CreateTicket, UploadedDocument
from commands.service import CommandService
from migrations import apply_migrations
from ticketflow.bootstrap import (
    command_service,
    run_inference_worker,
    run_ingest_worker,
    run_relay,
)
from ticketflow.embedded import EmbeddedServers, free_port
from ticketflow.settings import Settings

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"


@dataclass(frozen=True)
class TicketRun:
    wall_s: float
    ingest_s: float
    model_s: float
    prompt_tokens: int
    cached_tokens: int
    status: str


def events_of(database_url: str, ticket_id: UUID) -> list[tuple[str, dict[str, Any], float]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT topic, state FROM ticketflow_events WHERE originator_id = %s "
            "ORDER BY originator_version",
            (ticket_id,),
        ).fetchall()
    result = []
    for topic, state in rows:
        decoded = json.loads(bytes(state))
        stamp = decoded["timestamp"]["_data_"]
        result.append((str(topic).rsplit(".", 2)[-2], decoded, _epoch(stamp)))
    return result


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def run_ticket(
    service: CommandService, database_url: str, upload: UploadedDocument, tenant: str
) -> TicketRun:
    started = time.time()
    ticket_id = service.create_ticket(
        CreateTicket(tenant, "bench", (upload,), "document-review")
    ).ticket_id
    # The write model has no wake-up to wait on; polling every 50 ms bounds the error.
    while not (ticket := service.get_ticket(ticket_id)).is_finished:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    events = events_of(database_url, ticket_id)
    finished = events[-1][2]
    ingested = next(stamp for name, _, stamp in events if name == "document_ingested")
    completions = [state for name, state, _ in events if name == "subtask_completed"]
    return TicketRun(
        wall_s=finished - started,
        ingest_s=ingested - started,
        model_s=sum(c["latency_ms"] for c in completions) / 1000,
        prompt_tokens=sum(c["usage"]["prompt_tokens"] for c in completions),
        cached_tokens=sum(c["usage"]["cached_tokens"] for c in completions),
        status=str(ticket.status),
    )


async def benchmark(tickets: int, upload: UploadedDocument) -> list[TicketRun]:
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as data:
        servers = EmbeddedServers(Path(data), nats_port=free_port(), redis_port=free_port())
        servers.start()
        try:
            apply_migrations(servers.database_url)
            settings = Settings(
                env="test",
                data_dir=Path(data),
                database_url=servers.database_url,
                nats_url=servers.nats_url,
                nats_credentials=servers.nats_credentials,
                redis_url=servers.redis_url,
            )
            service = command_service(settings, servers.database_url)
            stop = asyncio.Event()
            workers = [
                asyncio.create_task(run(settings, stop))
                for run in (run_relay, run_ingest_worker, run_inference_worker)
            ]
            try:
                await asyncio.sleep(3)  # models load before the clock starts
                runs = []
                for index in range(tickets + 1):
                    run = await run_ticket(service, servers.database_url, upload, f"b{index}")
                    if index:  # the first ticket warms caches and connections
                        runs.append(run)
                return runs
            finally:
                stop.set()
                await asyncio.gather(*workers, return_exceptions=True)
                service.close()
        finally:
            servers.stop()


def report(runs: Sequence[TicketRun], document: Path) -> str:
    def median(values: Sequence[float]) -> float:
        return statistics.median(values)

    wall = median([r.wall_s for r in runs])
    model = median([r.model_s for r in runs])
    lines = [
        f"document-review on {document.name}: {len(runs)} tickets after one warm-up ticket",
        f"machine: {platform.machine()}, Python {platform.python_version()}, CPU backend",
        "",
        f"{'':34}{'median':>10}{'min':>10}{'max':>10}",
    ]
    for label, values in (
        ("wall time, accepted → completed s", [r.wall_s for r in runs]),
        ("  of which ingestion s", [r.ingest_s for r in runs]),
        ("model generation (baseline) s", [r.model_s for r in runs]),
    ):
        lines.append(f"{label:34}{median(values):>10.2f}{min(values):>10.2f}{max(values):>10.2f}")
    cached = sum(r.cached_tokens for r in runs) / max(1, sum(r.prompt_tokens for r in runs))
    lines += [
        f"ratio wall / model                {wall / model:>10.2f}x",
        f"prompt tokens served from cache   {cached:>10.0%}",
        f"statuses: {', '.join(sorted({r.status for r in runs}))}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tickets", type=int, default=3, help="measured tickets (default 3)")
    parser.add_argument("--document", type=Path, default=SAMPLES / "research-paper.pdf")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    document: Path = args.document
    upload = UploadedDocument("main", document.name, "application/pdf", document.read_bytes())
    runs = asyncio.run(benchmark(args.tickets, upload))
    print(report(runs, args.document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
