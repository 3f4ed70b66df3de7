"""The fair queue: tenants take turns, interactive first, bulk never starved, tickets together."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from handlers.fairness import FairQueue, Priority

BULK, INTERACTIVE = Priority.BULK, Priority.INTERACTIVE


def drain(queue: FairQueue[str], now: float = 0.0) -> list[str]:
    served: list[str] = []
    while len(queue):
        tenant = next(queue.candidates(now=now))
        _, _, _, items = queue.pop(tenant, now=now)
        served.extend(items)
    return served


def test_a_tenant_with_one_ticket_is_served_second_whatever_another_tenant_queued_first() -> None:
    queue: FairQueue[str] = FairQueue()
    for n in range(30):
        queue.push("flood", uuid.uuid4(), BULK, f"flood-{n}", now=0)
    queue.push("single", uuid.uuid4(), BULK, "single", now=1)
    assert drain(queue, now=2)[:2] == ["flood-0", "single"]


def test_a_tickets_waiting_subtasks_are_dispatched_together_in_arrival_order() -> None:
    queue: FairQueue[str] = FairQueue()
    ticket = uuid.uuid4()
    for sid in ("summary", "goal", "verdict"):
        queue.push("acme", ticket, BULK, sid, now=0)
    assert queue.pop("acme", now=0) == (ticket, BULK, 0, ["summary", "goal", "verdict"])
    assert len(queue) == 0


def test_interactive_tickets_go_before_bulk_ones_across_and_within_tenants() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", uuid.uuid4(), BULK, "a-bulk", now=0)
    queue.push("b", uuid.uuid4(), BULK, "b-bulk", now=0)
    queue.push("b", uuid.uuid4(), INTERACTIVE, "b-small", now=1)
    assert drain(queue, now=2) == ["b-small", "a-bulk", "b-bulk"]


def test_a_bulk_ticket_that_waited_long_enough_is_promoted() -> None:
    queue: FairQueue[str] = FairQueue(promote_after_s=10)
    queue.push("a", uuid.uuid4(), BULK, "old-bulk", now=0)
    queue.push("b", uuid.uuid4(), INTERACTIVE, "fresh", now=9)
    # Both count as interactive at t=10; tenants in arrival order.
    assert drain(queue, now=10) == ["old-bulk", "fresh"]


def test_requeued_work_goes_back_to_the_front_with_its_age() -> None:
    queue: FairQueue[str] = FairQueue()
    first, second = uuid.uuid4(), uuid.uuid4()
    queue.push("a", first, BULK, "first", now=0)
    queue.push("a", second, BULK, "second", now=1)
    ticket, priority, since, items = queue.pop("a", now=2)
    queue.requeue("a", ticket, priority, items, since)
    assert queue.pop("a", now=3)[3] == ["first"]


@given(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=60,
    )
)
def test_every_item_is_served_once_and_no_tenant_waits_more_than_one_round(
    pushes: list[tuple[str, int, bool]],
) -> None:
    queue: FairQueue[str] = FairQueue()
    tickets: dict[tuple[str, int], uuid.UUID] = {}
    for index, (tenant, ticket, _) in enumerate(pushes):
        ticket_id = tickets.setdefault((tenant, ticket), uuid.uuid4())
        queue.push(tenant, ticket_id, BULK, f"{tenant}{index}", now=0)
    tenants_waiting = {tenant for tenant, _, _ in pushes}
    served: list[str] = []
    turns: list[str] = []
    while len(queue):
        tenant = next(queue.candidates(now=0))
        turns.append(tenant)
        served.extend(queue.pop(tenant, now=0)[3])
    assert sorted(served) == sorted(f"{t}{i}" for i, (t, _, _) in enumerate(pushes))
    # Until a tenant's work runs out, every other waiting tenant gets a turn between two of its.
    for position, tenant in enumerate(turns):
        later = turns[position + 1 :]
        if tenant in later:
            between = later[: later.index(tenant)]
            still_waiting = {t for t in tenants_waiting if t in later}
            assert still_waiting - {tenant} <= set(between)
