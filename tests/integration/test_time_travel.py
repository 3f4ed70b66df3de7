"""`as_of` on the query API: answers from history equal what the read models said then.

Tickets of two tenants and two pipelines move step by step (commands, then the projector); after
each step the live answers of the list, every ticket and its report are captured with the
position they report. Afterwards every capture is asked again `as_of` that position: the bytes
must be the same. Plus what `as_of` refuses, and tenant isolation.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from commands.messages import FailSubtask
from tests.integration.test_read_api import World, world
from tests.support import random_tenant

__all__ = ["world"]

pytestmark = pytest.mark.timeout(180)


async def capture(world: World, path: str, tenant: str) -> tuple[int, httpx.Response]:
    response = await world.client.get(path, headers=world.headers(tenant))
    position = int(response.headers.get("X-Projection-Position", "-1"))
    return position, response


async def test_as_of_answers_byte_for_byte_what_the_read_models_answered_then(
    world: World,
) -> None:
    other = random_tenant()
    captured: list[tuple[str, str, int, httpx.Response]] = []
    tickets: list[tuple[str, uuid.UUID]] = []

    async def snapshot() -> None:
        projected = await world.project()
        for tenant in (world.tenant, other):
            paths = ["/tickets", "/tickets?limit=1", "/tickets?status=completed"]
            paths += [f"/tickets/{t}" for owner, t in tickets if owner == tenant]
            paths += [f"/tickets/{t}/report" for owner, t in tickets if owner == tenant]
            for path in paths:
                position, response = await capture(world, path, tenant)
                assert response.status_code in (200, 409), response.text
                if response.status_code == 409:
                    # Refusals carry no position: nothing moved since the projector stopped.
                    position = projected
                assert position == projected
                captured.append((tenant, path, position, response))

    first, _ = world.create()
    tickets.append((world.tenant, first))
    await snapshot()
    world.ingest(first)
    second, _ = world.create("tiny-once", tenant=other)
    tickets.append((other, second))
    await snapshot()
    world.complete(first, "a")
    world.ingest(second)
    await snapshot()
    world.complete(first, "b")
    world.service.fail_subtask(FailSubtask(first, "c", 1, "not valid", retryable=True))
    world.complete(second, "a")
    await snapshot()
    world.complete(first, "c", attempt=2)
    world.service.fail_subtask(FailSubtask(second, "b", 1, "not valid", retryable=True))
    await snapshot()
    world.complete(first, "d")
    third = world.completed_ticket(tenant=other)
    tickets.append((other, third))
    await snapshot()

    assert len({position for _, _, position, _ in captured}) == 6
    assert {response.status_code for *_, response in captured} == {200, 409}
    for tenant, path, position, live in captured:
        separator = "&" if "?" in path else "?"
        then = await world.client.get(
            f"{path}{separator}as_of={position}", headers=world.headers(tenant)
        )
        assert then.status_code == live.status_code, (path, position, then.text)
        assert then.content == live.content, (path, position)
        if live.status_code == 200:
            assert then.headers["X-Projection-Position"] == str(position)


async def test_as_of_a_time_answers_as_of_the_last_event_recorded_by_then(world: World) -> None:
    ticket_id = world.completed_ticket()
    await world.project()
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    live = await world.client.get(f"/tickets/{ticket_id}/report", headers=world.headers())
    then = await world.client.get(
        f"/tickets/{ticket_id}/report", params={"as_of": now}, headers=world.headers()
    )
    assert then.status_code == 200, then.text
    assert then.content == live.content

    before = (datetime.now(UTC) - timedelta(days=3650)).isoformat()
    response = await world.client.get(
        f"/tickets/{ticket_id}", params={"as_of": before}, headers=world.headers()
    )
    assert response.status_code == 404, response.text


async def test_as_of_refuses_what_is_not_a_point_of_the_past(world: World) -> None:
    ticket_id, created_at = world.create()
    world.ingest(ticket_id)
    await world.project()
    path = f"/tickets/{ticket_id}"
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    cases = {
        "yesterday": "invalid_as_of",
        "2025-03-01T12:00:00": "invalid_as_of",  # no zone
        "-4": "invalid_as_of",
        str(2**63): "invalid_as_of",
        "999999999": "as_of_in_future",
        future: "as_of_in_future",
    }
    for value, code in cases.items():
        response = await world.client.get(path, params={"as_of": value}, headers=world.headers())
        assert response.status_code == 422, (value, response.text)
        assert response.json()["error"]["code"] == code, value
        assert response.json()["error"]["message"]

    # Before the ticket existed it is not found; as of its creation it is pending.
    if created_at > 1:
        gone = await world.client.get(
            path, params={"as_of": created_at - 1}, headers=world.headers()
        )
        assert gone.status_code == 404
    pending = await world.client.get(path, params={"as_of": created_at}, headers=world.headers())
    assert pending.status_code == 200
    assert pending.json()["status"] == "pending"
    report = await world.client.get(
        f"{path}/report", params={"as_of": created_at}, headers=world.headers()
    )
    assert report.status_code == 409
    assert report.json()["error"]["code"] == "ticket_not_completed"


async def test_as_of_is_tenant_scoped(world: World) -> None:
    ticket_id = world.completed_ticket()
    position = await world.project()
    stranger = world.headers(random_tenant(), "user", "admin", "auditor")
    for suffix in ("", "/report", "/explain"):
        response = await world.client.get(
            f"/tickets/{ticket_id}{suffix}", params={"as_of": position}, headers=stranger
        )
        assert response.status_code == 404, (suffix, response.text)
    listed = await world.client.get("/tickets", params={"as_of": position}, headers=stranger)
    assert listed.status_code == 200
    assert listed.json()["items"] == []
    auditor = await world.client.get(
        f"/tickets/{ticket_id}", params={"as_of": position}, headers=world.headers(None, "auditor")
    )
    assert auditor.status_code == 200
