"""Both HTTP APIs as the processes build them (`ticketflow.bootstrap`), each served by uvicorn on
a free port in a thread of its own, on a database of their own; for the tests that walk every
route over real HTTP (tests/integration/test_auth_matrix.py, test_openapi_fuzz.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from tests.conftest import Servers, new_database
from tests.integration.conftest import settings_for
from ticketflow.bootstrap import commands_api, queries_api
from ticketflow.embedded import free_port
from ticketflow.settings import Settings


def served_settings(servers: Servers, database_url: str, **overrides: object) -> Settings:
    """Settings for the served APIs: rate limits off (these tests call far more often than a
    client may), cheap password hashing, and the test NATS authority's key for integrators.

    The APIs run in threads of the test process, so a pause of that process (a full garbage
    collection of the heap a long run has grown) stops their event loops too, and a Redis reply
    that came in time is read after a 1 s timeout has fired: these tests are not about outages
    (tests/integration/test_outages.py is, with the default waits), so they wait longer."""
    values: dict[str, object] = {
        "redis_timeout_s": 5.0,
        "db_acquire_timeout_s": 5.0,
        "rate_limits_enabled": False,
        "password_hash_time_cost": 1,
        "password_hash_memory_kib": 8 * 1024,
        "password_hash_parallelism": 1,
        "nats_integrator_seed_file": servers.nats_authority.integrator_seed_file,
        "nats_integrator_account": servers.nats_authority.integrator_account,
    }
    return settings_for(servers, database_url, **(values | overrides))


@contextlib.contextmanager
def serving(app: FastAPI, *, startup_timeout_s: float = 60) -> Iterator[str]:
    """Runs `app` (its lifespan included) with uvicorn in a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"{app.title} did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@dataclass(frozen=True)
class ServedApis:
    settings: Settings
    database_url: str
    commands_app: FastAPI
    queries_app: FastAPI
    commands_url: str
    queries_url: str

    def app(self, api: str) -> FastAPI:
        return self.commands_app if api == "commands" else self.queries_app

    def url(self, api: str) -> str:
        return self.commands_url if api == "commands" else self.queries_url


@contextlib.contextmanager
def served_apis(servers: Servers, **overrides: Any) -> Iterator[ServedApis]:
    """A new database, and the command and query APIs served on it."""
    with new_database(servers) as database_url:
        settings = served_settings(servers, database_url, **overrides)
        commands, queries = commands_api(settings), queries_api(settings)
        with serving(commands) as commands_url:
            # The console logs in and retries through the command API, wherever it was served.
            queries.state.console.commands_url = commands_url
            with serving(queries) as queries_url:
                yield ServedApis(
                    settings, database_url, commands, queries, commands_url, queries_url
                )
