"""Rate limits against the real Redis: counted per user, per tenant and per client IP, shared by
every process, restored with time, and answered with 429 and Retry-After."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from security.limits import RateLimitMiddleware, RateLimitRules
from security.requests import Caller
from tests.conftest import Servers
from tests.integration.conftest import settings_for
from tests.integration.served_apis import ServedApis, served_apis
from tests.support import documented_routes, random_tenant, sample
from ticketflow.bootstrap import commands_api, jwt_codec, queries_api
from ticketflow.embedded import free_port

Rules = Mapping[str, Mapping[str, str | None]]


async def identify(token: str) -> Caller | None:
    """Test tokens are `subject@tenant`; anything else is invalid."""
    subject, at, tenant = token.partition("@")
    return (subject, tenant) if at and subject and tenant else None


def limited_app(redis: aioredis.Redis, rules: Rules, prefix: str) -> FastAPI:
    app = FastAPI()

    @app.post("/tickets", status_code=202)
    async def create() -> dict[str, bool]:
        return {"created": True}

    @app.get("/tickets/{ticket_id}")
    async def read(ticket_id: str) -> dict[str, str]:
        return {"ticket_id": ticket_id}

    @app.post("/auth/login")
    async def login() -> dict[str, str]:
        return {"token": "t"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(
        RateLimitMiddleware,
        redis=lambda: redis,
        identify=identify,
        rules=RateLimitRules.with_defaults(rules),
        prefix=prefix,
    )
    return app


def client(app: FastAPI, ip: str = "10.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://api")


def as_user(subject: str, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {subject}@{tenant}"}


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(servers.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    """Each test counts under keys of its own."""
    return f"test:rl:{secrets.token_hex(6)}:"


async def test_requests_over_the_limit_answer_429_with_retry_after(
    redis: aioredis.Redis, prefix: str
) -> None:
    app = limited_app(redis, {"POST /tickets": {"user": "3/hour"}}, prefix)
    headers = as_user("alice", random_tenant())
    async with client(app) as api:
        allowed = [await api.post("/tickets", headers=headers) for _ in range(3)]
        refused = await api.post("/tickets", headers=headers)

    assert [r.status_code for r in allowed] == [202, 202, 202]
    assert [r.headers["RateLimit-Limit"] for r in allowed] == ["3", "3", "3"]
    assert [r.headers["RateLimit-Remaining"] for r in allowed] == ["2", "1", "0"]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 1200  # one request's share of the hour
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert int(refused.headers["RateLimit-Reset"]) >= retry_after


async def test_the_tenant_limit_counts_every_user_of_the_tenant(
    redis: aioredis.Redis, prefix: str
) -> None:
    app = limited_app(redis, {"POST /tickets": {"user": "3/hour", "tenant": "4/hour"}}, prefix)
    tenant = random_tenant()
    async with client(app) as api:
        alice = [await api.post("/tickets", headers=as_user("alice", tenant)) for _ in range(3)]
        bob = [await api.post("/tickets", headers=as_user("bob", tenant)) for _ in range(2)]

    assert [r.status_code for r in alice] == [202, 202, 202]
    assert [r.status_code for r in bob] == [202, 429]
    assert bob[1].headers["RateLimit-Limit"] == "4"


async def test_another_tenant_is_not_affected_by_a_tenant_at_its_limit(
    redis: aioredis.Redis, prefix: str
) -> None:
    app = limited_app(redis, {"POST /tickets": {"tenant": "2/hour"}}, prefix)
    busy, other = random_tenant(), random_tenant()
    async with client(app) as api:
        for _ in range(2):
            await api.post("/tickets", headers=as_user("alice", busy))
        refused = await api.post("/tickets", headers=as_user("alice", busy))
        elsewhere = await api.post("/tickets", headers=as_user("alice", other))

    assert refused.status_code == 429
    assert elsewhere.status_code == 202


async def test_the_limit_is_restored_after_its_period(redis: aioredis.Redis, prefix: str) -> None:
    app = limited_app(redis, {"POST /tickets": {"user": "3/2s"}}, prefix)
    headers = as_user("alice", random_tenant())
    async with client(app) as api:
        first = [(await api.post("/tickets", headers=headers)).status_code for _ in range(4)]
        await asyncio.sleep(2.1)
        later = [(await api.post("/tickets", headers=headers)).status_code for _ in range(4)]

    assert first == [202, 202, 202, 429]
    assert later == [202, 202, 202, 429]


async def test_a_route_is_counted_by_its_template_not_its_path(
    redis: aioredis.Redis, prefix: str
) -> None:
    app = limited_app(redis, {"GET /tickets/{ticket_id}": {"user": "2/hour"}}, prefix)
    headers = as_user("alice", random_tenant())
    async with client(app) as api:
        codes = [(await api.get(f"/tickets/{n}", headers=headers)).status_code for n in range(3)]

    assert codes == [200, 200, 429]


async def test_login_is_limited_per_client_ip_token_or_not(
    redis: aioredis.Redis, prefix: str
) -> None:
    app = limited_app(redis, {"POST /auth/login": {"ip": "3/minute"}}, prefix)
    async with client(app, ip="10.0.0.7") as guesser, client(app, ip="10.0.0.8") as neighbour:
        guesses = [(await guesser.post("/auth/login")).status_code for _ in range(3)]
        with_a_token = await guesser.post("/auth/login", headers=as_user("eve", random_tenant()))
        elsewhere = await neighbour.post("/auth/login")

    assert guesses == [200, 200, 200]
    assert with_a_token.status_code == 429
    assert elsewhere.status_code == 200


async def test_requests_without_a_valid_token_are_limited_per_client_ip(
    redis: aioredis.Redis, prefix: str
) -> None:
    app = limited_app(redis, {"*": {"anonymous": "2/minute"}}, prefix)
    invalid = {"Authorization": "Bearer not-a-token"}
    async with client(app, ip="10.0.0.9") as api:
        codes = [(await api.get("/tickets/1", headers=invalid)).status_code for _ in range(3)]
        user = await api.get("/tickets/1", headers=as_user("alice", random_tenant()))

    assert codes == [200, 200, 429]
    assert user.status_code == 200


async def test_health_is_never_limited(redis: aioredis.Redis, prefix: str) -> None:
    app = limited_app(redis, {"*": {"anonymous": "1/hour", "ip": "1/hour"}}, prefix)
    async with client(app) as api:
        responses = [await api.get("/health") for _ in range(5)]

    assert {r.status_code for r in responses} == {200}
    assert all("RateLimit-Limit" not in r.headers for r in responses)


async def test_two_app_instances_share_the_limits(servers: Servers, prefix: str) -> None:
    rules = {"POST /tickets": {"user": "3/hour"}}
    first_redis = aioredis.from_url(servers.redis_url)
    second_redis = aioredis.from_url(servers.redis_url)
    headers = as_user("alice", random_tenant())
    try:
        async with (
            client(limited_app(first_redis, rules, prefix)) as first,
            client(limited_app(second_redis, rules, prefix)) as second,
        ):
            codes = [
                (await api.post("/tickets", headers=headers)).status_code
                for api in (first, second, first, second, first)
            ]
    finally:
        await first_redis.aclose()
        await second_redis.aclose()

    assert codes == [202, 202, 202, 429, 429]


async def test_requests_go_through_with_a_warning_when_redis_is_down(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    app = limited_app(nowhere, {"POST /tickets": {"user": "1/hour"}}, prefix)
    try:
        with caplog.at_level(logging.WARNING, logger="security.limits"):
            async with client(app) as api:
                codes = [
                    (await api.post("/tickets", headers=as_user("alice", "acme"))).status_code
                    for _ in range(3)
                ]
    finally:
        await nowhere.aclose()

    assert codes == [202, 202, 202]
    assert "rate limits not enforced" in caplog.text


@pytest.fixture(scope="module")
def command_api(servers: Servers) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = settings_for(
        servers,
        max_upload_bytes=64 * 1024,
        rate_limits={"POST /tickets": {"user": "2/hour"}},
    )
    token = jwt_codec(settings).mint(subject="alice", tenant=random_tenant(), roles=["user"])
    with TestClient(commands_api(settings)) as api:
        yield api, {"Authorization": f"Bearer {token}"}


def test_the_command_api_limits_opening_tickets_per_user(
    command_api: tuple[TestClient, dict[str, str]],
) -> None:
    api, headers = command_api
    pdf = sample("research-paper.pdf").read_bytes()
    codes = [
        api.post("/tickets", files={"file": ("paper.pdf", pdf, "application/pdf")}, headers=headers)
        for _ in range(3)
    ]

    assert [r.status_code for r in codes] == [202, 202, 429], codes[-1].text
    assert int(codes[-1].headers["Retry-After"]) >= 1
    assert codes[0].headers["RateLimit-Limit"] == "2"


def test_the_command_api_health_is_not_limited(
    command_api: tuple[TestClient, dict[str, str]],
) -> None:
    api, _ = command_api
    response = api.get("/health")
    assert response.status_code == 200, response.text
    assert "RateLimit-Limit" not in response.headers


# -- both APIs as served, every route counted under its own rule --------------------------------

AUTH_ROUTES = {("POST", "/auth/login"), ("POST", "/auth/register"), ("POST", "/auth/refresh")}


def every_route(servers: Servers) -> dict[str, list[tuple[str, str, str]]]:
    settings = settings_for(servers)
    return {
        "commands": documented_routes(commands_api(settings)),
        "queries": documented_routes(queries_api(settings)),
    }


def own_limits(routes: dict[str, list[tuple[str, str, str]]]) -> dict[str, int]:
    """A limit per client IP of its own for every route but the login, registration and refresh
    routes, which keep their default of 30 a minute."""
    templates = sorted(
        {(method, template) for found in routes.values() for method, template, _ in found}
        - AUTH_ROUTES
    )
    return {f"{method} {template}": 1000 + n for n, (method, template) in enumerate(templates)}


def limiter_of(app: FastAPI) -> RateLimitMiddleware:
    """The rate limiter in a started app's middleware stack."""
    layer = app.middleware_stack
    while not isinstance(layer, RateLimitMiddleware):
        assert layer is not None, "no rate limiter in the stack"
        layer = getattr(layer, "app", None)
    return layer


@pytest.fixture(scope="module")
def limited_apis(servers: Servers) -> Iterator[tuple[ServedApis, dict[str, int]]]:
    limits = own_limits(every_route(servers))
    rules: dict[str, dict[str, str | None]] = {
        "*": {"user": None, "tenant": None, "anonymous": None, "ip": None},
        **{route: {"ip": f"{limit}/hour"} for route, limit in limits.items()},
    }
    with served_apis(servers, rate_limits_enabled=True, rate_limits=rules) as apis:
        yield apis, limits


@pytest.mark.timeout(180)
def test_every_route_of_both_served_apis_is_counted_under_its_own_rule(
    limited_apis: tuple[ServedApis, dict[str, int]],
) -> None:
    apis, limits = limited_apis
    counted: dict[str, str | None] = {}
    expected: dict[str, str | None] = {}
    for api in ("commands", "queries"):
        exempt = limiter_of(apis.app(api)).exempt_paths
        with httpx.Client(base_url=apis.url(api), timeout=30) as http:
            for method, template, path in documented_routes(apis.app(api)):
                name = f"{api}: {method} {template}"
                response = http.request(method, path)
                counted[name] = response.headers.get("RateLimit-Limit")
                if path in exempt:
                    expected[name] = None
                elif (method, template) in AUTH_ROUTES:
                    expected[name] = "30"
                else:
                    expected[name] = str(limits[f"{method} {template}"])

    assert len(counted) > 25
    assert counted == expected


@pytest.mark.timeout(180)
def test_wrong_passwords_past_thirty_a_minute_answer_429_with_retry_after(
    limited_apis: tuple[ServedApis, dict[str, int]],
) -> None:
    apis, _ = limited_apis
    tenant, email = random_tenant(), "ada@example.org"
    # A client address of this test's own (any 127.x.y.z reaches the loopback server).
    guesser = f"127.{secrets.randbelow(250) + 1}.{secrets.randbelow(250)}.{secrets.randbelow(250)}"
    transport = httpx.HTTPTransport(local_address=guesser)
    with httpx.Client(base_url=apis.commands_url, transport=transport, timeout=30) as http:
        registered = http.post(
            "/auth/register",
            json={"tenant": tenant, "email": email, "password": "correct horse battery staple"},
        )
        assert registered.status_code == 201, registered.text
        wrong = {"tenant": tenant, "email": email, "password": "wrong horse battery staple"}
        answers: list[httpx.Response] = []
        started = time.monotonic()
        while len(answers) < 90 and (not answers or answers[-1].status_code != 429):
            answers.append(http.post("/auth/login", json=wrong))
        elapsed = time.monotonic() - started

    *admitted, refused = answers
    assert refused.status_code == 429, [answer.status_code for answer in answers]
    assert {answer.status_code for answer in admitted} == {401}
    # A burst of 30, then one more each 2 s (30 a minute) while the guesses went on.
    assert 30 <= len(admitted) <= 30 + math.ceil(elapsed / 2), (len(admitted), elapsed)
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert admitted[0].headers["RateLimit-Limit"] == "30"
