"""Idempotent retries against the real Redis: the first answer is replayed, a reused key is
refused, a duplicate in flight is told to wait, and keys belong to their caller."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI, File, Form, Response, UploadFile
from fastapi.testclient import TestClient

from commands.messages import CreateTicket, UploadedDocument
from commands.service import ticket_id_for
from security.idempotency import IdempotencyMiddleware, IdempotencyStore, request_fingerprint
from security.requests import Caller, RequestSizeLimit
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.support import random_tenant, sample
from ticketflow.bootstrap import commands_api, jwt_codec
from ticketflow.settings import Settings

CAP = 64 * 1024
PDF = b"%PDF-1.7 a small document"


async def identify(token: str) -> Caller | None:
    """Test tokens are `subject@tenant`; anything else is invalid."""
    subject, at, tenant = token.partition("@")
    return (subject, tenant) if at and subject and tenant else None


class TicketsApp:
    """A small stand-in for the command API that counts the requests its routes run."""

    def __init__(self, redis: aioredis.Redis, prefix: str, *, lease_s: float = 5.0) -> None:
        self.runs = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.cancel_failures = 0
        self.app = FastAPI()

        @self.app.post("/tickets", status_code=202)
        async def create(
            response: Response,
            file: Annotated[UploadFile, File()],
            pipeline: Annotated[str, Form()] = "document-review",
        ) -> dict[str, object]:
            self.runs += 1
            self.entered.set()
            await self.release.wait()
            response.headers["Location"] = "/tickets/1"
            return {
                "ticket_id": str(uuid.uuid4()),
                "pipeline": pipeline,
                "run": self.runs,
                "created": True,
            }

        @self.app.post("/tickets/{ticket_id}/cancel", status_code=202)
        async def cancel(ticket_id: str, response: Response) -> dict[str, object]:
            self.runs += 1
            if self.cancel_failures:
                self.cancel_failures -= 1
                response.status_code = 503
                return {"error": {"code": "unavailable", "message": "try again"}}
            return {"ticket_id": ticket_id, "run": self.runs}

        self.app.add_middleware(
            IdempotencyMiddleware,
            redis=lambda: redis,
            identify=identify,
            max_body_bytes=CAP,
            lease_s=lease_s,
            prefix=prefix,
        )
        self.app.add_middleware(RequestSizeLimit, max_bytes=CAP)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://api")


def headers(key: str, subject: str = "alice", tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {subject}@{tenant}", "Idempotency-Key": key}


def document(content: bytes = PDF) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("paper.pdf", content, "application/pdf")}


def multipart(boundary: str, content: bytes) -> bytes:
    return (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="paper.pdf"\r\n'
            "Content-Type: application/pdf\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(servers.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test:idem:{secrets.token_hex(6)}:"


@pytest.fixture
def tickets(redis: aioredis.Redis, prefix: str) -> TicketsApp:
    return TicketsApp(redis, prefix)


@pytest.fixture
def key() -> str:
    return f"key-{secrets.token_hex(6)}"


async def test_a_retry_replays_the_first_answer(tickets: TicketsApp, key: str) -> None:
    async with tickets.client() as api:
        first = await api.post("/tickets", files=document(), headers=headers(key))
        again = await api.post("/tickets", files=document(), headers=headers(key))

    assert first.status_code == again.status_code == 202
    # The same answer, except that the retry created nothing.
    assert first.json()["created"] is True
    assert again.json() == {**first.json(), "created": False}
    assert int(again.headers["Content-Length"]) == len(again.content)
    assert again.headers["Location"] == "/tickets/1"
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert tickets.runs == 1


async def test_a_retry_that_prefers_to_wait_runs_again_after_an_accepted_answer(
    tickets: TicketsApp, key: str
) -> None:
    waiting = {**headers(key), "Prefer": "wait=10"}
    async with tickets.client() as api:
        first = await api.post("/tickets", files=document(), headers=headers(key))
        waited = await api.post("/tickets", files=document(), headers=waiting)
        plain = await api.post("/tickets", files=document(), headers=headers(key))

    assert tickets.runs == 2
    assert waited.json()["run"] == 2
    assert "Idempotent-Replayed" not in waited.headers
    # The first answer stays the kept one (a replay created nothing).
    assert plain.json() == {**first.json(), "created": False}
    assert plain.headers["Idempotent-Replayed"] == "true"


async def test_a_retry_that_prefers_to_wait_with_another_request_is_still_refused(
    tickets: TicketsApp, key: str
) -> None:
    async with tickets.client() as api:
        await api.post("/tickets", files=document(), headers=headers(key))
        other = await api.post(
            "/tickets", files=document(b"%PDF other"), headers={**headers(key), "Prefer": "wait=5"}
        )

    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert tickets.runs == 1


async def test_the_same_key_with_another_request_is_refused(tickets: TicketsApp, key: str) -> None:
    async with tickets.client() as api:
        await api.post("/tickets", files=document(), headers=headers(key))
        other = await api.post("/tickets", files=document(b"%PDF other"), headers=headers(key))

    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert tickets.runs == 1


async def test_the_same_form_sent_with_another_boundary_is_a_replay(
    tickets: TicketsApp, key: str
) -> None:
    async with tickets.client() as api:
        answers = [
            await api.post(
                "/tickets",
                content=multipart(boundary, PDF),
                headers={
                    **headers(key),
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                },
            )
            for boundary in ("----first4a1b", "----second9z8y")
        ]

    assert [a.status_code for a in answers] == [202, 202]
    assert answers[1].headers["Idempotent-Replayed"] == "true"
    assert answers[1].json() == {**answers[0].json(), "created": False}


async def test_a_duplicate_while_the_first_runs_is_told_it_is_in_progress(
    tickets: TicketsApp, key: str
) -> None:
    tickets.release.clear()
    async with tickets.client() as api:
        first = asyncio.create_task(api.post("/tickets", files=document(), headers=headers(key)))
        await asyncio.wait_for(tickets.entered.wait(), 5)
        duplicate = await api.post("/tickets", files=document(), headers=headers(key))
        tickets.release.set()
        answered = await first
        later = await api.post("/tickets", files=document(), headers=headers(key))

    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["code"] == "idempotency_key_in_progress"
    assert int(duplicate.headers["Retry-After"]) >= 1
    assert answered.status_code == 202
    assert later.headers["Idempotent-Replayed"] == "true"
    assert later.json() == {**answered.json(), "created": False}
    assert tickets.runs == 1


@pytest.mark.timeout(30)
async def test_a_claim_left_by_a_crashed_request_is_freed_within_its_lease(
    redis: aioredis.Redis, prefix: str, key: str
) -> None:
    # A request that died with its process: claimed with a lease, and never renewed.
    tickets = TicketsApp(redis, prefix, lease_s=1.0)
    store = IdempotencyStore(lambda: redis, prefix=prefix, lease_s=1.0)
    cancel = {"type": "http", "method": "POST", "path": "/tickets/t1/cancel", "headers": []}
    fingerprint = await request_fingerprint(cancel, b"")
    crashed = {"state": "in_progress", "fingerprint": fingerprint, "owner": "gone"}
    await store.claim(store.key_for(("alice", "acme"), key), json.dumps(crashed).encode())
    async with tickets.client() as api:
        blocked = await api.post("/tickets/t1/cancel", headers=headers(key))
        started = time.monotonic()
        while (
            retried := await api.post("/tickets/t1/cancel", headers=headers(key))
        ).status_code == 409:
            assert time.monotonic() - started < 5, "the claim outlived its lease"
            await asyncio.sleep(0.1)

    assert blocked.status_code == 409
    assert blocked.json()["error"]["code"] == "idempotency_key_in_progress"
    assert retried.status_code == 202
    assert 0.5 < time.monotonic() - started < 2.5
    assert tickets.runs == 1


@pytest.mark.timeout(30)
async def test_a_request_running_past_its_lease_keeps_its_claim(
    redis: aioredis.Redis, prefix: str, key: str
) -> None:
    tickets = TicketsApp(redis, prefix, lease_s=0.6)
    tickets.release.clear()
    async with tickets.client() as api:
        first = asyncio.create_task(api.post("/tickets", files=document(), headers=headers(key)))
        await asyncio.wait_for(tickets.entered.wait(), 5)
        await asyncio.sleep(2.0)  # more than three leases
        duplicate = await api.post("/tickets", files=document(), headers=headers(key))
        tickets.release.set()
        answered = await asyncio.wait_for(first, 10)
        replayed = await api.post("/tickets", files=document(), headers=headers(key))

    assert duplicate.status_code == 409
    assert answered.status_code == 202
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert tickets.runs == 1


async def test_keys_belong_to_one_user_of_one_tenant(tickets: TicketsApp, key: str) -> None:
    async with tickets.client() as api:
        answers = [
            await api.post("/tickets", files=document(), headers=headers(key, subject, tenant))
            for subject, tenant in [("alice", "acme"), ("bob", "acme"), ("alice", "globex")]
        ]

    assert [a.status_code for a in answers] == [202, 202, 202]
    assert not any("Idempotent-Replayed" in a.headers for a in answers)
    assert len({a.json()["ticket_id"] for a in answers}) == 3
    assert tickets.runs == 3


async def test_an_answer_is_kept_for_24_hours(
    tickets: TicketsApp, redis: aioredis.Redis, prefix: str, key: str
) -> None:
    async with tickets.client() as api:
        await api.post("/tickets", files=document(), headers=headers(key, "alice", "acme"))

    stored = IdempotencyStore(lambda: redis, prefix=prefix).key_for(("alice", "acme"), key)
    ttl = await redis.ttl(stored)
    assert 24 * 3600 - 60 < ttl <= 24 * 3600


async def test_a_claim_in_flight_expires_on_its_own(
    tickets: TicketsApp, redis: aioredis.Redis, prefix: str, key: str
) -> None:
    tickets.release.clear()
    async with tickets.client() as api:
        first = asyncio.create_task(api.post("/tickets", files=document(), headers=headers(key)))
        await asyncio.wait_for(tickets.entered.wait(), 5)
        stored = IdempotencyStore(lambda: redis, prefix=prefix).key_for(("alice", "acme"), key)
        ttl = await redis.ttl(stored)
        tickets.release.set()
        await first

    assert 0 < ttl <= 5


async def test_a_server_error_is_not_kept_so_a_retry_runs_again(
    tickets: TicketsApp, key: str
) -> None:
    tickets.cancel_failures = 1
    async with tickets.client() as api:
        failed = await api.post("/tickets/t1/cancel", headers=headers(key))
        retried = await api.post("/tickets/t1/cancel", headers=headers(key))
        replayed = await api.post("/tickets/t1/cancel", headers=headers(key))

    assert failed.status_code == 503
    assert retried.status_code == 202
    assert "Idempotent-Replayed" not in retried.headers
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert tickets.runs == 2


async def test_cancelling_another_ticket_with_the_same_key_is_refused(
    tickets: TicketsApp, key: str
) -> None:
    async with tickets.client() as api:
        await api.post("/tickets/t1/cancel", headers=headers(key))
        other = await api.post("/tickets/t2/cancel", headers=headers(key))

    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


async def test_requests_without_a_key_or_a_caller_are_not_kept(
    tickets: TicketsApp, key: str
) -> None:
    async with tickets.client() as api:
        for _ in range(2):
            await api.post("/tickets/t1/cancel", headers={"Authorization": "Bearer alice@acme"})
        for _ in range(2):
            await api.post("/tickets/t1/cancel", headers={"Idempotency-Key": key})

    assert tickets.runs == 4


@pytest.mark.parametrize("bad_key", ["clé".encode("latin-1"), b"k" * 201])
async def test_a_key_that_is_not_1_to_200_printable_ascii_is_refused(
    tickets: TicketsApp, bad_key: bytes
) -> None:
    async with tickets.client() as api:
        response = await api.post(
            "/tickets/t1/cancel",
            headers={b"Authorization": b"Bearer alice@acme", b"Idempotency-Key": bad_key},
        )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert tickets.runs == 0


async def test_a_body_over_the_cap_is_refused_before_it_is_buffered(
    tickets: TicketsApp, key: str
) -> None:
    async def stream() -> AsyncIterator[bytes]:
        for _ in range(CAP // 1024 + 10):
            yield b"x" * 1024

    async with tickets.client() as api:
        response = await api.post(
            "/tickets",
            content=stream(),
            headers={**headers(key), "Content-Type": "multipart/form-data; boundary=b"},
        )

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert tickets.runs == 0


@dataclass(frozen=True)
class CommandApi:
    client: TestClient
    settings: Settings
    tenant: str

    def token(self, subject: str = "alice") -> str:
        return jwt_codec(self.settings).mint(subject=subject, tenant=self.tenant, roles=["user"])


@pytest.fixture(scope="module")
def real_api(servers: Servers) -> Iterator[CommandApi]:
    settings = settings_for(servers, max_upload_bytes=64 * 1024, idempotency_lease_s=1.0)
    with TestClient(commands_api(settings)) as api:
        yield CommandApi(api, settings, random_tenant())


@pytest.fixture(scope="module")
def command_api(real_api: CommandApi) -> tuple[TestClient, str]:
    return real_api.client, real_api.token()


def test_the_command_api_replays_a_repeated_upload(command_api: tuple[TestClient, str]) -> None:
    api, token = command_api
    pdf = sample("research-paper.pdf").read_bytes()
    key_headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": secrets.token_hex(8)}
    files = {"file": ("paper.pdf", pdf, "application/pdf")}
    first = api.post("/tickets", files=files, headers=key_headers)
    again = api.post("/tickets", files=files, headers=key_headers)
    other = api.post(
        "/tickets",
        files={"file": ("paper.pdf", pdf + b"\n", "application/pdf")},
        headers=key_headers,
    )

    assert first.status_code == 202, first.text
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert first.json()["created"] is True
    assert again.json() == {**first.json(), "created": False}
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def _upload(api: CommandApi, key: str, subject: str = "alice") -> Any:
    """POST /tickets with the sample paper, by the test client (its response type)."""
    pdf = sample("research-paper.pdf").read_bytes()
    return api.client.post(
        "/tickets",
        content=multipart("crash-test", pdf),
        headers={
            "Authorization": f"Bearer {api.token(subject)}",
            "Idempotency-Key": key,
            "Content-Type": "multipart/form-data; boundary=crash-test",
        },
    )


@pytest.mark.timeout(60)
def test_a_retry_after_a_crash_answers_with_the_ticket_the_crashed_request_created(
    real_api: CommandApi, servers: Servers
) -> None:
    """The API process died after the ticket was stored and before it answered: the ticket
    exists, and the request's claim is left in Redis, never renewed again."""
    key = secrets.token_hex(8)
    pdf = sample("research-paper.pdf").read_bytes()
    body = multipart("crash-test", pdf)
    service = service_for(real_api.settings, servers.database_url)
    try:
        created = service.create_ticket(
            CreateTicket(
                real_api.tenant,
                "alice",
                (UploadedDocument("main", "paper.pdf", "application/pdf", pdf),),
                "document-review",
                idempotency_key=key,
            )
        )
    finally:
        service.close()

    async def leave_a_claim() -> None:
        client = aioredis.from_url(servers.redis_url)
        try:
            store = IdempotencyStore(lambda: client, lease_s=1.0)
            scope = {
                "type": "http",
                "method": "POST",
                "path": "/tickets",
                "headers": [(b"content-type", b"multipart/form-data; boundary=crash-test")],
            }
            fingerprint = await request_fingerprint(scope, body)
            claim = {"state": "in_progress", "fingerprint": fingerprint, "owner": "died"}
            redis_key = store.key_for(("alice", real_api.tenant), key)
            assert await store.claim(redis_key, json.dumps(claim).encode()) is None
        finally:
            await client.aclose()

    asyncio.run(leave_a_claim())
    blocked = _upload(real_api, key)
    started = time.monotonic()
    while (retried := _upload(real_api, key)).status_code == 409:
        assert time.monotonic() - started < 10, "the dead request's claim was not freed"
        time.sleep(0.2)

    assert blocked.status_code == 409
    assert blocked.json()["error"]["code"] == "idempotency_key_in_progress"
    assert retried.status_code == 202, retried.text
    assert retried.json() == {
        "ticket_id": str(created.ticket_id),
        "position": created.position,
        "created": False,
    }


@pytest.mark.timeout(60)
def test_two_users_of_one_tenant_sending_one_key_get_their_own_tickets(
    real_api: CommandApi,
) -> None:
    key = secrets.token_hex(8)
    alice = _upload(real_api, key, "alice")
    bob = _upload(real_api, key, "bob")
    alice_again = _upload(real_api, key, "alice")

    assert alice.status_code == bob.status_code == 202
    assert alice.json()["created"] is bob.json()["created"] is True
    assert alice.json()["ticket_id"] != bob.json()["ticket_id"]
    assert alice.json()["ticket_id"] == str(ticket_id_for(real_api.tenant, "alice", key))
    assert bob.json()["ticket_id"] == str(ticket_id_for(real_api.tenant, "bob", key))
    assert alice_again.json() == {**alice.json(), "created": False}
