"""Fixtures for tests against the real servers: settings, the command service, tenants."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from commands.service import CommandService
from streams.contract import PipelineDefinition
from tests.conftest import Servers
from tests.support import random_tenant, small_pipeline
from ticketflow.bootstrap import command_service
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
