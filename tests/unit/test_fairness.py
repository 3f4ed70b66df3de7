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


def test_a_started_ticket_keeps_its_place_before_the_tenants_tickets_not_started() -> None:
    queue: FairQueue[str] = FairQueue()
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    queue.push("a", first, BULK, "first-summary", now=0)
    queue.push("a", second, BULK, "second-summary", now=1)
    assert queue.pop("a", now=2)[0] == first
    queue.push("a", third, BULK, "third-summary", now=3)
    # The first ticket's next subtask became ready after the others were queued.
    queue.push("a", first, BULK, "first-goal", now=4)
    assert drain(queue, now=5) == ["first-goal", "second-summary", "third-summary"]


def test_a_started_ticket_keeps_its_age_for_promotion() -> None:
    queue: FairQueue[str] = FairQueue(promote_after_s=10)
    started = uuid.uuid4()
    queue.push("a", started, BULK, "started-summary", now=0)
    queue.pop("a", now=0)
    queue.push("a", started, BULK, "started-goal", now=9)
    queue.push("b", uuid.uuid4(), INTERACTIVE, "b-small", now=9)
    # Waiting since t=0, the started bulk ticket counts as interactive at t=10.
    assert queue.pop("a", now=10)[2] == 0
    assert next(queue.candidates(now=10)) == "b"


def test_tenants_still_take_turns_while_started_tickets_keep_their_place() -> None:
    queue: FairQueue[str] = FairQueue()
    a_tickets = [uuid.uuid4() for _ in range(3)]
    b_ticket = uuid.uuid4()
    for n, ticket in enumerate(a_tickets):
        queue.push("a", ticket, BULK, f"a{n}-1", now=0)
    queue.push("b", b_ticket, BULK, "b0-1", now=0)
    turns: list[str] = []
    steps = {ticket: 1 for ticket in [*a_tickets, b_ticket]}
    while len(queue):
        tenant = next(queue.candidates(now=0))
        ticket, _, _, items = queue.pop(tenant, now=0)
        turns.extend(items)
        if steps[ticket] < 2:  # each ticket has two subtasks, the second ready after the first
            steps[ticket] += 1
            name = items[0].split("-")[0]
            queue.push(tenant, ticket, BULK, f"{name}-2", now=0)
    assert turns == ["a0-1", "b0-1", "a0-2", "b0-2", "a1-1", "a1-2", "a2-1", "a2-2"]


def test_a_forgotten_ticket_queues_at_the_back_again() -> None:
    queue: FairQueue[str] = FairQueue()
    first, second = uuid.uuid4(), uuid.uuid4()
    queue.push("a", first, BULK, "first-1", now=0)
    queue.pop("a", now=0)
    queue.push("a", second, BULK, "second-1", now=1)
    queue.forget(first)
    queue.push("a", first, BULK, "first-2", now=2)
    assert drain(queue, now=3) == ["second-1", "first-2"]


def test_places_are_remembered_for_a_bounded_number_of_tickets() -> None:
    queue: FairQueue[str] = FairQueue(remember=2)
    tickets = [uuid.uuid4() for _ in range(3)]
    for n, ticket in enumerate(tickets):
        queue.push("a", ticket, BULK, f"t{n}-1", now=n)
        queue.pop("a", now=n)
    waiting = uuid.uuid4()
    queue.push("a", waiting, BULK, "waiting", now=3)
    for n, ticket in enumerate(tickets):
        queue.push("a", ticket, BULK, f"t{n}-2", now=4)
    # The oldest place was dropped: that ticket queues behind the one waiting.
    assert drain(queue, now=5) == ["t1-2", "t2-2", "waiting", "t0-2"]


def test_under_load_no_started_ticket_waits_behind_its_tenants_backlog() -> None:
    from benchmarks.fair_order import Load, load_pipeline, simulate, summary

    pipeline = load_pipeline()
    load = Load(tickets=30, tenants=4, seed=3)
    baseline = summary(simulate(load, pipeline, keep_place=False))
    ours = summary(simulate(load, pipeline, keep_place=True))
    # The verdict of a started ticket waits for at most a few batches, not the tenant's backlog.
    assert ours["last_max"] < 5 * 60 < baseline["last_max"]
    assert ours["p50"] < baseline["p50"]
    assert ours["max"] <= baseline["max"] * 1.05
