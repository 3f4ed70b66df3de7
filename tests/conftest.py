"""Real servers for the integration and end-to-end suites, started once per test session."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from migrations import apply_migrations
from ticketflow.embedded import EmbeddedServers, free_port


@dataclass(frozen=True)
class Servers:
    database_url: str
    nats_url: str
    redis_url: str
    admin_url: str
    data_dir: Path


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    data_dir = tmp_path_factory.mktemp("stack")
    embedded = EmbeddedServers(data_dir, nats_port=free_port(), redis_port=free_port())
    embedded.start()
    try:
        apply_migrations(embedded.database_url)
        admin_url = embedded.database_url.replace("/ticketflow?", "/postgres?")
        yield Servers(
            embedded.database_url, embedded.nats_url, embedded.redis_url, admin_url, data_dir
        )
    finally:
        embedded.stop()


@pytest.fixture
def fresh_database(servers: Servers) -> Iterator[str]:
    """A new, migrated database for tests that need the whole event log to themselves."""
    name = f"tf_{secrets.token_hex(6)}"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = servers.database_url.replace("/ticketflow?", f"/{name}?")
    apply_migrations(url)
    yield url
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[str]:
    """A NATS server of the test's own, so its stream holds only what the test published."""
    from ticketflow.embedded import _binary, _stop, _wait_for_port, spawn

    port = free_port()
    log_path = tmp_path / "nats.log"
    process = spawn(
        [_binary("nats-server"), "--jetstream", "--store_dir", str(tmp_path / "js"),
         "--addr", "127.0.0.1", "--port", str(port)],
        log_path,
    )  # fmt: skip
    try:
        _wait_for_port(port, process, log_path)
        yield f"nats://127.0.0.1:{port}"
    finally:
        _stop(process)
