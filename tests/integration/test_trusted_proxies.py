"""Which address per-IP rate limits count, over real HTTP (uvicorn with the options
`ticketflow serve` gives it) and the real Redis: `X-Forwarded-For` is believed only from the
proxies listed in TF_TRUSTED_PROXIES, and from no one, 127.0.0.1 included, by default."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Request

from security.limits import RateLimitMiddleware, RateLimitRules
from security.requests import Caller, client_ip
from tests.conftest import Servers
from ticketflow.cli import uvicorn_proxy_options
from ticketflow.embedded import free_port
from ticketflow.settings import Settings


async def nobody(token: str) -> Caller | None:
    return None


def login_app(redis_url: str, prefix: str) -> FastAPI:
    """One route, limited to one request a minute per client IP, that says whose IP it counted.
    Its Redis client is opened on the server's event loop."""
    clients: list[aioredis.Redis] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        clients.append(aioredis.from_url(redis_url))
        yield
        await clients.pop().aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/auth/login")
    async def login(request: Request) -> dict[str, str]:
        return {"client_ip": client_ip(request.scope)}

    app.add_middleware(
        RateLimitMiddleware,
        redis=lambda: clients[0] if clients else None,
        identify=nobody,
        rules=RateLimitRules.with_defaults({"POST /auth/login": {"ip": "1/minute"}}),
        prefix=prefix,
    )
    return app


@contextlib.contextmanager
def served(app: FastAPI, settings: Settings) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, **uvicorn_proxy_options(settings)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def prefix() -> str:
    return f"test:proxies:{secrets.token_hex(6)}:"


def logins(url: str, forwarded_for: list[str]) -> list[tuple[int, str]]:
    answers = []
    with httpx.Client(base_url=url) as client:
        for address in forwarded_for:
            response = client.post("/auth/login", headers={"X-Forwarded-For": address})
            answers.append((response.status_code, response.json().get("client_ip", "")))
    return answers


@pytest.mark.timeout(60)
def test_forwarded_for_from_an_untrusted_local_caller_is_ignored(
    servers: Servers, prefix: str
) -> None:
    settings = Settings(trusted_proxies="")

    with served(login_app(servers.redis_url, prefix), settings) as url:
        answers = logins(url, ["1.2.3.4", "5.6.7.8"])

    # Both counted as 127.0.0.1, the real peer: a new header does not buy a new counter.
    assert answers == [(200, "127.0.0.1"), (429, "")]


@pytest.mark.timeout(60)
def test_forwarded_for_from_a_trusted_proxy_names_the_client(servers: Servers, prefix: str) -> None:
    settings = Settings(trusted_proxies="10.9.8.7, 127.0.0.1/32")

    with served(login_app(servers.redis_url, prefix), settings) as url:
        answers = logins(url, ["1.2.3.4", "5.6.7.8", "1.2.3.4"])

    assert answers == [(200, "1.2.3.4"), (200, "5.6.7.8"), (429, "")]


def test_trusted_proxies_are_checked_and_normalised() -> None:
    assert Settings(trusted_proxies=" 10.1.2.3/8 ,::1, 192.168.0.1").trusted_proxy_list == [
        "10.0.0.0/8",
        "::1",
        "192.168.0.1",
    ]
    assert uvicorn_proxy_options(Settings()) == {
        "proxy_headers": False,
        "forwarded_allow_ips": None,
    }
    with pytest.raises(ValueError, match=r"'proxy\.example' is not an IP address"):
        Settings(trusted_proxies="proxy.example")
