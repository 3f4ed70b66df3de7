"""Ticket completion times under load: a started ticket keeping its place, against queueing behind.

Run it as `python -m benchmarks.fair_order`. A discrete-event simulation drives the real
`handlers.fairness.FairQueue` the way the inference scheduler does (`candidates`, a per-tenant
bound on tickets with the model, `pop` of all a ticket's waiting subtasks as one batch, a fixed
number of batches at once), with simulated time instead of a model. The pipeline is
`document-review` read from its file: four root subtasks ready together after ingestion, the
verdict ready once they are done. A batch's duration is the sum of its subtasks' durations,
each `max_tokens / tokens_per_s` with seeded ±30 % jitter, plus a prefill per batch.

Two orders, same arrivals and durations:

- baseline: a ticket's next ready subtask queues behind every ticket of its tenant that arrived
  before it (the queue forgets a ticket once it is dispatched: `FairQueue(remember=0)`);
- ours: a ticket keeps the place it got when it was first queued (`FairQueue()`).

It prints the distribution (p50, p95, max) of ticket completion times (opened → last subtask
done), the time a ticket waits between its fourth and fifth subtask, and the ratios.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from handlers.fairness import FairQueue, Priority

PIPELINE = (
    Path(__file__).resolve().parent.parent / "inference" / "pipelines" / "document-review.json"
)


@dataclass(frozen=True)
class Subtask:
    id: str
    depends_on: tuple[str, ...]
    max_tokens: int


@dataclass
class Ticket:
    id: uuid.UUID
    tenant: str
    opened: float
    done: set[str] = field(default_factory=set)
    queued: set[str] = field(default_factory=set)
    completed_at: float | None = None
    fourth_done_at: float | None = None


@dataclass(frozen=True)
class Load:
    tickets: int = 30
    tenants: int = 4
    concurrency: int = 2
    tenant_limit: int = 2
    tokens_per_s: float = 8.0
    prefill_s: float = 3.0
    ingest_s: float = 4.0
    ingest_concurrency: int = 2
    seed: int = 7


def load_pipeline(path: Path = PIPELINE) -> list[Subtask]:
    data = json.loads(path.read_text())
    return [
        Subtask(s["id"], tuple(s.get("depends_on") or ()), int(s.get("max_tokens", 200)))
        for s in data["subtasks"]
    ]


def simulate(load: Load, pipeline: Sequence[Subtask], *, keep_place: bool) -> list[Ticket]:
    rng = random.Random(load.seed)
    durations: dict[tuple[int, str], float] = {}
    for n in range(load.tickets):
        for subtask in pipeline:
            base = subtask.max_tokens / load.tokens_per_s
            durations[(n, subtask.id)] = base * rng.uniform(0.7, 1.3)
    queue: FairQueue[str] = FairQueue() if keep_place else FairQueue(remember=0)
    tickets = [
        Ticket(uuid.UUID(int=n + 1), f"tenant-{n % load.tenants}", 0.0) for n in range(load.tickets)
    ]
    index = {t.id: n for n, t in enumerate(tickets)}
    events: list[tuple[float, int, str, uuid.UUID, tuple[str, ...]]] = []
    order = 0

    def schedule(at: float, kind: str, ticket: uuid.UUID, items: tuple[str, ...] = ()) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, ticket, items))

    # Ingestion: `ingest_concurrency` documents at once, in the order the tickets were opened.
    for n, ticket in enumerate(tickets):
        schedule(load.ingest_s * (n // load.ingest_concurrency + 1), "ingested", ticket.id)

    running = 0
    with_model: dict[str, int] = {}

    def ready(ticket: Ticket, now: float) -> None:
        for subtask in pipeline:
            if subtask.id in ticket.done or subtask.id in ticket.queued:
                continue
            if all(d in ticket.done for d in subtask.depends_on):
                ticket.queued.add(subtask.id)
                queue.push(ticket.tenant, ticket.id, Priority.BULK, subtask.id, now=now)

    def dispatch(now: float) -> None:
        nonlocal running
        while running < load.concurrency and len(queue):
            for tenant in list(queue.candidates(now=now)):
                if with_model.get(tenant, 0) < load.tenant_limit:
                    break
            else:
                return
            ticket_id, _, _, items = queue.pop(tenant, now=now)
            n = index[ticket_id]
            took = load.prefill_s + sum(durations[(n, item)] for item in items)
            with_model[tenant] = with_model.get(tenant, 0) + 1
            running += 1
            schedule(now + took, "done", ticket_id, tuple(items))

    while events:
        now, _, kind, ticket_id, items = heapq.heappop(events)
        ticket = tickets[index[ticket_id]]
        if kind == "done":
            running -= 1
            with_model[ticket.tenant] -= 1
            ticket.done.update(items)
            if len(ticket.done) == len(pipeline) - 1 and ticket.fourth_done_at is None:
                ticket.fourth_done_at = now
            if len(ticket.done) == len(pipeline):
                ticket.completed_at = now
                queue.forget(ticket.id)
        ready(ticket, now)
        dispatch(now)
    return tickets


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(tickets: Sequence[Ticket]) -> dict[str, float]:
    completion = [t.completed_at - t.opened for t in tickets if t.completed_at is not None]
    last_wait = [
        t.completed_at - t.fourth_done_at
        for t in tickets
        if t.completed_at is not None and t.fourth_done_at is not None
    ]
    assert len(completion) == len(tickets), "every ticket completes"
    return {
        "p50": statistics.median(completion),
        "p95": percentile(completion, 0.95),
        "max": max(completion),
        "mean": statistics.fmean(completion),
        "last_p50": statistics.median(last_wait),
        "last_max": max(last_wait),
        "stuck_over_5min": sum(1 for w in last_wait if w > 300),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=Load.tickets)
    parser.add_argument("--tenants", type=int, default=Load.tenants)
    parser.add_argument("--concurrency", type=int, default=Load.concurrency)
    parser.add_argument("--tenant-limit", type=int, default=Load.tenant_limit)
    parser.add_argument("--tokens-per-s", type=float, default=Load.tokens_per_s)
    parser.add_argument("--seeds", type=int, default=5, help="runs with seeds 1..N, pooled")
    args = parser.parse_args(argv)
    pipeline = load_pipeline()
    results: dict[str, list[Ticket]] = {"baseline": [], "ours": []}
    for seed in range(1, args.seeds + 1):
        load = Load(
            tickets=args.tickets,
            tenants=args.tenants,
            concurrency=args.concurrency,
            tenant_limit=args.tenant_limit,
            tokens_per_s=args.tokens_per_s,
            seed=seed,
        )
        results["baseline"] += simulate(load, pipeline, keep_place=False)
        results["ours"] += simulate(load, pipeline, keep_place=True)
    print(
        f"{args.tickets} tickets of {args.tenants} tenants, document-review "
        f"({len(pipeline)} subtasks), {args.concurrency} batches at once, "
        f"{args.tenant_limit} per tenant, {args.tokens_per_s} tokens/s, {args.seeds} seeds pooled"
    )
    header = f"{'order':<10}{'p50':>9}{'p95':>9}{'max':>9}{'mean':>9}{'4→5 p50':>10}{'4→5 max':>10}"
    print(header + f"{'4→5 > 5 min':>13}")
    rows = {name: summary(tickets) for name, tickets in results.items()}
    for name, row in rows.items():
        print(
            f"{name:<10}{row['p50'] / 60:>8.1f}m{row['p95'] / 60:>8.1f}m{row['max'] / 60:>8.1f}m"
            f"{row['mean'] / 60:>8.1f}m{row['last_p50'] / 60:>9.1f}m{row['last_max'] / 60:>9.1f}m"
            f"{row['stuck_over_5min']:>13.0f}"
        )
    base, ours = rows["baseline"], rows["ours"]
    print(
        "ours / baseline: "
        + ", ".join(f"{key} {ours[key] / base[key]:.2f}" for key in ("p50", "p95", "max", "mean"))
    )


if __name__ == "__main__":
    main()
