"""Fixtures for tests against the real servers: settings, the command service, tenants."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from commands.service import CommandService
from inference.backends import InferenceBackend
from streams.contract import PipelineDefinition
from tests.conftest import Servers, new_database, new_nats_server
from tests.support import random_tenant, small_pipeline
from ticketflow.bootstrap import (
    command_service,
    run_inference_worker,
    run_ingest_worker,
    run_relay,
)
from ticketflow.pipelines import ShippedPipelines
from ticketflow.settings import Settings


class CatalogWithTestPipelines(ShippedPipelines):
    """The shipped pipelines plus small ones the tests use to reach every state quickly."""

    extra = {
        "tiny": small_pipeline("tiny"),
        "tiny-once": small_pipeline("tiny-once", max_attempts=1),
    }

    def get(self, name: str) -> PipelineDefinition:
        if name in self.extra:
            return PipelineDefinition.model_validate(self.extra[name])
        return super().get(name)

    def names(self) -> list[str]:
        return sorted([*super().names(), *self.extra])


def settings_for(
    servers: Servers, database_url: str | None = None, **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "env": "test",
        "data_dir": Path(servers.data_dir),
        "database_url": database_url or servers.database_url,
        "nats_url": servers.nats_url,
        "nats_credentials": servers.nats_credentials,
        "redis_url": servers.redis_url,
    }
    return Settings.model_validate(values | overrides)


def service_for(settings: Settings, database_url: str) -> CommandService:
    return command_service(settings, database_url, CatalogWithTestPipelines())


@contextlib.contextmanager
def isolated_stack_settings(
    servers: Servers, nats_store: Path, **overrides: object
) -> Iterator[Settings]:
    """Settings for a database and a NATS server of their own, so a test's streams and consumers
    hold only its own events (the PostgreSQL and Redis servers are the session's)."""
    with (
        new_database(servers) as database_url,
        new_nats_server(nats_store, servers.nats_authority) as nats_url,
    ):
        yield settings_for(
            servers, database_url, nats_url=nats_url, **({"stream_storage": "memory"} | overrides)
        )


@contextlib.asynccontextmanager
async def running_workers(
    settings: Settings, *, backend: InferenceBackend | None = None
) -> AsyncIterator[CommandService]:
    """The relay, the ingest worker and the inference worker in this process, and the command
    service to open tickets with. A worker that crashed fails the test when the block ends."""
    assert settings.database_url is not None
    service = service_for(settings, settings.database_url)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_relay(settings, stop)),
        asyncio.create_task(run_ingest_worker(settings, stop)),
        asyncio.create_task(run_inference_worker(settings, stop, backend=backend)),
    ]
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        service.close()
    for task in tasks:
        if task.exception():
            raise task.exception()  # type: ignore[misc]


@pytest.fixture(scope="session")
def settings(servers: Servers) -> Settings:
    return settings_for(servers)


@pytest.fixture(scope="session")
def service(settings: Settings, servers: Servers) -> Iterator[CommandService]:
    service = service_for(settings, servers.database_url)
    yield service
    service.close()


@pytest.fixture
def tenant() -> str:
    return random_tenant()
