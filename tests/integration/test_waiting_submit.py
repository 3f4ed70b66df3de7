"""`POST /tickets` with `Prefer: wait=N` on the whole stack: the command API as its process builds
it, the relay, the ingest and inference workers (the real CPU model) and the projector, on a
database and NATS server of their own. The shortest shipped pipeline (document Q&A: one subtask)
on the smallest sample keeps the ticket short."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tests.conftest import Servers
from tests.integration.conftest import isolated_stack_settings, running_workers
from tests.integration.served_apis import serving
from tests.support import random_tenant, sample
from ticketflow.bootstrap import commands_api, jwt_codec, run_projector
from ticketflow.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The most a test waits for its ticket: well above what a loaded 2-core machine needs.
MAX_WAIT_S = 300
DOCUMENT = sample("research-paper.pdf").read_bytes()
OPTIONS = json.dumps({"question": "What does the paper measure?"})


@dataclass
class Stack:
    settings: Settings
    commands_url: str
    tenant: str
    app: FastAPI

    def headers(self, **more: str) -> dict[str, str]:
        token = jwt_codec(self.settings).mint(subject="alice", tenant=self.tenant, roles=("user",))
        return {"Authorization": f"Bearer {token}", **more}

    async def submit(self, **headers: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.commands_url, timeout=MAX_WAIT_S + 30) as client:
            return await client.post(
                "/tickets",
                headers=self.headers(**headers),
                files={"file": ("paper.pdf", DOCUMENT, "application/pdf")},
                data={"pipeline": "document-qa", "options": OPTIONS},
            )


@pytest.fixture(scope="module")
def stack_settings(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    with isolated_stack_settings(
        servers,
        tmp_path_factory.mktemp("nats"),
        inference_ack_wait_s=4.0,
        rate_limits_enabled=False,
        submit_max_wait_s=MAX_WAIT_S,
    ) as settings:
        yield settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(stack_settings: Settings) -> AsyncIterator[Stack]:
    stop = asyncio.Event()
    projector = asyncio.create_task(run_projector(stack_settings, stop))
    try:
        async with running_workers(stack_settings):
            app = commands_api(stack_settings)
            with serving(app) as commands_url:
                yield Stack(stack_settings, commands_url, random_tenant(), app)
    finally:
        stop.set()
        await asyncio.wait_for(projector, 60)


async def test_a_ticket_still_running_after_the_wait_answers_202_and_a_retry_waits_for_its_report(
    stack: Stack,
) -> None:
    started = time.monotonic()
    accepted = await stack.submit(**{"Prefer": "wait=1", "Idempotency-Key": "wait-twice"})
    waited = time.monotonic() - started

    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["preference-applied"] == "wait=1"
    assert waited >= 1
    assert accepted.json()["created"] is True

    # The same request again, now ready to wait longer than the server allows.
    completed = await stack.submit(**{"Prefer": "wait=100000", "Idempotency-Key": "wait-twice"})

    assert completed.status_code == 200, completed.text
    assert completed.headers["preference-applied"] == f"wait={MAX_WAIT_S}"
    body = completed.json()
    assert body["ticket_id"] == accepted.json()["ticket_id"]
    assert body["created"] is False
    assert body["status"] == "completed"
    report = body["report"]
    assert report["final_subtask_id"] == "answer"
    assert report["outputs"]["answer"]["output"]["answer"]
    assert report["markdown"].startswith("# Document qa: paper.pdf (main)")
    assert report["position"] > body["position"]

    # Without the preference the kept answer is replayed, as for any retry.
    replayed = await stack.submit(**{"Idempotency-Key": "wait-twice"})

    assert replayed.status_code == 202
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == {**accepted.json(), "created": False}


async def test_a_ticket_that_completes_within_the_wait_answers_200_with_its_report(
    stack: Stack,
) -> None:
    response = await stack.submit(Prefer=f"respond-async, wait={MAX_WAIT_S}")

    assert response.status_code == 200, response.text
    assert response.headers["preference-applied"] == f"wait={MAX_WAIT_S}"
    body = response.json()
    assert body["created"] is True
    assert body["report"]["final_subtask_id"] == "answer"
    assert "## " in body["report"]["markdown"]


async def test_without_the_preference_the_answer_is_202_at_once(stack: Stack) -> None:
    started = time.monotonic()
    response = await stack.submit()

    assert response.status_code == 202
    assert "preference-applied" not in response.headers
    assert time.monotonic() - started < 30


async def test_a_client_that_hangs_up_ends_its_wait(stack: Stack) -> None:
    outcomes = stack.app.state.deps.outcomes
    assert outcomes.waiting == 0
    async with httpx.AsyncClient(base_url=stack.commands_url) as client:
        request = client.post(
            "/tickets",
            headers=stack.headers(Prefer=f"wait={MAX_WAIT_S}", **{"Idempotency-Key": "hang-up"}),
            files={"file": ("paper.pdf", DOCUMENT, "application/pdf")},
            data={"pipeline": "document-qa", "options": OPTIONS},
            timeout=30,
        )
        sending = asyncio.ensure_future(request)
        deadline = time.monotonic() + 30
        while outcomes.waiting == 0:
            assert time.monotonic() < deadline, "the request never started waiting"
            await asyncio.sleep(0.05)
        sending.cancel()  # the client closes its connection
        with contextlib.suppress(asyncio.CancelledError):
            await sending

    # The server notices at its next look (at most a poll interval, 1 s) and stops waiting.
    deadline = time.monotonic() + 10
    while outcomes.waiting:
        assert time.monotonic() < deadline, "the wait outlived its client"
        await asyncio.sleep(0.05)
    # The ticket was opened all the same; cancelled here, so the workers skip it.
    replayed = await stack.submit(**{"Idempotency-Key": "hang-up"})
    assert replayed.status_code == 202
    async with httpx.AsyncClient(base_url=stack.commands_url, timeout=30) as client:
        ticket_id = replayed.json()["ticket_id"]
        cancelled = await client.post(f"/tickets/{ticket_id}/cancel", headers=stack.headers())
    assert cancelled.status_code == 202, cancelled.text
