"""Both APIs while a server they need is away: PostgreSQL killed, Redis killed or hung (SIGSTOP),
NATS killed. Each answers 503 with `Retry-After` within about a second (never a 500, never a
long hang, never the driver's words), `/health` names what is missing, and everything carries
on by itself once the server is back on the same port (or socket).

The APIs are built by `ticketflow.bootstrap` and served by uvicorn, on servers of this module's
own (tests/outage_servers.py), which the tests break and bring back one at a time.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from migrations import apply_migrations
from tests.conftest import Servers
from tests.integration.conftest import settings_for
from tests.integration.served_apis import serving
from tests.outage_servers import NatsServer, PostgresTestServer, RedisServer
from tests.support import random_tenant, sample
from ticketflow.bootstrap import commands_api, jwt_codec, queries_api
from ticketflow.settings import Settings

PDF = sample("research-paper.pdf").read_bytes()
# What a client is told instead; never the driver's text.
DRIVER_WORDS = ("psycopg", "asyncpg", "redis://", "nats://", "Errno", "socket", "127.0.0.1", "SQL")
# "About a second", with room for a loaded two-core machine.
PROMPT_S = 2.0


@dataclass
class Stack:
    settings: Settings
    postgres: PostgresTestServer
    nats: NatsServer
    redis: RedisServer
    commands: httpx.Client
    queries: httpx.Client
    tenant: str
    user_token: str
    admin_token: str

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.user_token}"}

    def open_ticket(self, **headers: str) -> httpx.Response:
        return self.commands.post(
            "/tickets",
            files={"file": ("paper.pdf", PDF, "application/pdf")},
            headers={**self.auth(), **headers},
        )

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_until(lambda: all(api.get("/health").status_code == 200 for api in self.apis), timeout)

    @property
    def apis(self) -> tuple[httpx.Client, httpx.Client]:
        return self.commands, self.queries


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout}s")
        time.sleep(0.2)


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def assert_unavailable(response: httpx.Response, code: str = "dependency_unavailable") -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == code
    assert int(response.headers["Retry-After"]) >= 1
    for word in DRIVER_WORDS:
        assert word not in response.text


@pytest.fixture(scope="module")
def stack(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("outages")
    postgres = PostgresTestServer(root / "postgres")
    nats = NatsServer(root / "nats", servers.nats_authority)
    redis = RedisServer(root / "redis")
    try:
        for server in (postgres, nats, redis):
            server.start()
        settings = settings_for(
            servers,
            postgres.url,
            nats_url=nats.url,
            redis_url=redis.url,
            password_hash_time_cost=1,
            password_hash_memory_kib=8 * 1024,
            password_hash_parallelism=1,
        )
        tenant = random_tenant()
        codec = jwt_codec(settings)
        user = codec.mint(subject="alice", tenant=tenant, roles=["user"])
        admin = codec.mint(subject="ada", tenant=tenant, roles=["admin"])
        with (
            serving(commands_api(settings)) as commands_url,
            serving(queries_api(settings)) as queries_url,
            httpx.Client(base_url=commands_url, timeout=30) as commands,
            httpx.Client(base_url=queries_url, timeout=30) as queries,
        ):
            yield Stack(settings, postgres, nats, redis, commands, queries, tenant, user, admin)
    finally:
        for server in (redis, nats, postgres):
            server.stop()


@pytest.fixture
def healthy(stack: Stack) -> Stack:
    """The stack with every server up, as the previous test should have left it."""
    if stack.postgres.process is None or stack.postgres.process.poll() is not None:
        stack.postgres.restart()
    for server in (stack.nats, stack.redis):
        if server.process is None or server.process.poll() is not None:
            server.start()
    for running in (stack.postgres, stack.nats, stack.redis):
        running.resume()
    stack.wait_healthy()
    return stack


@pytest.mark.timeout(60)
def test_health_routes_answer_when_every_server_is_up(healthy: Stack) -> None:
    for api in healthy.apis:
        live = api.get("/health/live")
        ready = api.get("/health")
        anonymous = api.get("/health/details")
        user = api.get("/health/details", headers=healthy.auth())
        admin = api.get("/health/details", headers=healthy.auth(healthy.admin_token))

        assert live.json() == {"status": "ok"}
        assert ready.status_code == 200
        assert ready.json()["status"] == "ok"
        assert set(ready.json()["checks"].values()) == {"ok"}
        assert anonymous.status_code == 401
        assert user.status_code == 403
        assert admin.status_code == 200
        assert admin.json() == {**ready.json(), "details": {}}
    assert set(healthy.commands.get("/health").json()["checks"]) == {"database", "nats", "redis"}
    assert set(healthy.queries.get("/health").json()["checks"]) == {"database", "redis"}


@pytest.mark.timeout(90)
def test_postgres_killed_both_apis_answer_503_at_once_and_recover(healthy: Stack) -> None:
    opened = healthy.open_ticket()  # the pools hold connections now
    assert opened.status_code == 202
    assert healthy.queries.get("/tickets", headers=healthy.auth()).status_code == 200
    cancel_path = f"/tickets/{opened.json()['ticket_id']}/cancel"

    healthy.postgres.kill()
    created, create_s = timed(healthy.open_ticket)
    cancelled, cancel_s = timed(lambda: healthy.commands.post(cancel_path, headers=healthy.auth()))
    # A ticket this process has not loaded yet: read from the event store.
    other, other_s = timed(
        lambda: healthy.commands.post(f"/tickets/{uuid.uuid4()}/cancel", headers=healthy.auth())
    )
    listed, list_s = timed(lambda: healthy.queries.get("/tickets", headers=healthy.auth()))
    health = [timed(functools.partial(api.get, "/health")) for api in healthy.apis]

    assert_unavailable(created)
    assert created.json()["error"]["message"] == "The database is unavailable; retry shortly."
    assert_unavailable(listed)
    assert_unavailable(cancelled)
    assert create_s < PROMPT_S
    assert cancel_s < PROMPT_S
    assert_unavailable(other)
    assert other_s < PROMPT_S
    assert list_s < PROMPT_S
    for response, seconds in health:
        assert response.status_code == 503
        assert response.json()["status"] == "degraded"
        assert response.json()["checks"]["database"] == "unavailable"
        assert response.json()["checks"]["redis"] == "ok"
        assert seconds < PROMPT_S

    healthy.postgres.restart()
    # The same processes carry on: their pools replace the connections the restart closed.
    wait_until(lambda: healthy.open_ticket().status_code == 202, 30)
    wait_until(
        lambda: healthy.queries.get("/tickets", headers=healthy.auth()).status_code == 200, 30
    )
    healthy.wait_healthy()


@pytest.mark.timeout(60)
def test_redis_hung_both_apis_answer_503_within_a_second(healthy: Stack) -> None:
    healthy.redis.pause()
    try:
        created, create_s = timed(lambda: healthy.open_ticket(**{"Idempotency-Key": "hung"}))
        listed, list_s = timed(lambda: healthy.queries.get("/tickets", headers=healthy.auth()))
        health = [timed(functools.partial(api.get, "/health")) for api in healthy.apis]
    finally:
        healthy.redis.resume()

    # Tokens cannot be checked against the revocation list: 503, never a token let through.
    assert_unavailable(created, "authentication_unavailable")
    assert_unavailable(listed, "authentication_unavailable")
    assert create_s < PROMPT_S
    assert list_s < PROMPT_S
    for response, seconds in health:
        assert response.status_code == 503
        assert response.json()["checks"]["redis"] == "unavailable"
        assert response.json()["checks"]["database"] == "ok"
        assert seconds < PROMPT_S
    healthy.wait_healthy(10)
    assert healthy.open_ticket(**{"Idempotency-Key": "hung"}).status_code == 202


@pytest.mark.timeout(60)
def test_redis_killed_the_query_api_reports_it_and_both_recover_on_restart(
    healthy: Stack,
) -> None:
    healthy.redis.kill()
    health, seconds = timed(lambda: healthy.queries.get("/health"))
    live = healthy.queries.get("/health/live")
    listed = healthy.queries.get("/tickets", headers=healthy.auth())
    created = healthy.open_ticket()

    assert health.status_code == 503
    assert health.json() == {
        "status": "degraded",
        "checks": {"database": "ok", "redis": "unavailable"},
    }
    assert int(health.headers["Retry-After"]) >= 1
    assert seconds < PROMPT_S
    assert live.status_code == 200
    assert_unavailable(listed, "authentication_unavailable")
    assert_unavailable(created, "authentication_unavailable")

    healthy.redis.start()  # the same port, an empty store
    healthy.wait_healthy(15)
    assert healthy.open_ticket().status_code == 202
    assert healthy.queries.get("/tickets", headers=healthy.auth()).status_code == 200


@pytest.mark.timeout(60)
def test_nats_killed_the_command_api_reports_it_and_reconnects(healthy: Stack) -> None:
    healthy.nats.kill()
    health, seconds = timed(lambda: healthy.commands.get("/health"))
    details = healthy.commands.get("/health/details", headers=healthy.auth(healthy.admin_token))
    # Opening a ticket needs PostgreSQL (the relay publishes later), so it goes on.
    created = healthy.open_ticket()

    assert health.status_code == 503
    assert health.json() == {
        "status": "degraded",
        "checks": {"database": "ok", "nats": "unavailable", "redis": "ok"},
    }
    assert int(health.headers["Retry-After"]) >= 1
    assert seconds < PROMPT_S
    assert details.status_code == 503
    assert set(details.json()["details"]) == {"nats"}
    assert details.json()["details"]["nats"]  # the client's own words, for operators
    assert created.status_code == 202

    healthy.nats.start()  # the same port and store
    healthy.wait_healthy(20)


@pytest.mark.timeout(60)
def test_the_command_api_closes_its_pools_even_when_nats_is_gone_at_shutdown(
    stack: Stack, healthy: Stack
) -> None:
    name = f"tf_shutdown_{random_tenant().replace('-', '_')}"
    with psycopg.connect(stack.postgres.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    url = stack.postgres.url.replace("/ticketflow?", f"/{name}?")
    apply_migrations(url)

    def connections() -> int:
        with psycopg.connect(stack.postgres.admin_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
            ).fetchone()
        return int(row[0]) if row else 0

    settings = stack.settings.model_copy(update={"database_url": url})
    try:
        with serving(commands_api(settings)) as commands_url:
            assert httpx.get(f"{commands_url}/health", timeout=10).status_code == 200
            assert connections() > 0
            stack.nats.kill()
            wait_until(lambda: httpx.get(f"{commands_url}/health").status_code == 503, 10)
        wait_until(lambda: connections() == 0, 10)
    finally:
        stack.nats.start()
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(stack.postgres.admin_url, autocommit=True) as conn,
        ):
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())


@pytest.mark.timeout(90)
def test_the_command_api_starts_while_nats_is_away_and_connects_when_it_comes(
    servers: Servers, stack: Stack, healthy: Stack, tmp_path: Path
) -> None:
    later = NatsServer(tmp_path / "nats", servers.nats_authority)  # not started yet
    settings = stack.settings.model_copy(update={"nats_url": later.url})
    try:
        with serving(commands_api(settings)) as commands_url:
            health = httpx.get(f"{commands_url}/health", timeout=10)
            created = httpx.post(
                f"{commands_url}/tickets",
                files={"file": ("paper.pdf", PDF, "application/pdf")},
                headers=stack.auth(),
                timeout=30,
            )
            later.start()
            wait_until(lambda: httpx.get(f"{commands_url}/health").status_code == 200, 20)
    finally:
        later.stop()

    assert health.status_code == 503
    assert health.json()["checks"] == {"database": "ok", "nats": "unavailable", "redis": "ok"}
    assert created.status_code == 202
