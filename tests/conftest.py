"""Real servers for the integration and end-to-end suites, started once per test session."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from migrations import apply_migrations
from ticketflow.embedded import (
    EmbeddedServers,
    bundled_binary,
    free_port,
    spawn,
    stop_process,
    wait_for_port,
)


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


@contextlib.contextmanager
def new_database(servers: Servers) -> Iterator[str]:
    """A new, migrated database, dropped afterwards."""
    name = f"tf_{secrets.token_hex(6)}"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    url = servers.database_url.replace("/ticketflow?", f"/{name}?")
    apply_migrations(url)
    try:
        yield url
    finally:
        with psycopg.connect(servers.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())


@contextlib.contextmanager
def new_nats_server(store: Path) -> Iterator[str]:
    """A NATS server of its own, so its streams hold only what its user published."""
    port = free_port()
    log_path = store / "nats.log"
    process = spawn(
        [bundled_binary("nats-server"), "--jetstream", "--store_dir", str(store / "js"),
         "--addr", "127.0.0.1", "--port", str(port)],
        log_path,
    )  # fmt: skip
    try:
        wait_for_port(port, process, log_path)
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_process(process)


@pytest.fixture
def fresh_database(servers: Servers) -> Iterator[str]:
    """A new, migrated database for tests that need the whole event log to themselves."""
    with new_database(servers) as url:
        yield url


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[str]:
    with new_nats_server(tmp_path) as url:
        yield url
