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
from ticketflow.embedded import EmbeddedServers, free_port, start_nats_server, stop_process
from ticketflow.nats_auth import NatsAuthority


@dataclass(frozen=True)
class Servers:
    database_url: str
    nats_url: str
    redis_url: str
    admin_url: str
    data_dir: Path
    nats_authority: NatsAuthority

    @property
    def nats_credentials(self) -> Path:
        """The service credentials, for `connect_nats`; every test NATS server accepts them."""
        return self.nats_authority.service_credentials


@pytest.fixture(scope="session")
def nats_authority(tmp_path_factory: pytest.TempPathFactory) -> NatsAuthority:
    """The keys every NATS server of the test session trusts."""
    return NatsAuthority.load_or_create(tmp_path_factory.mktemp("nats-auth"))


@pytest.fixture(scope="session")
def nats_credentials(nats_authority: NatsAuthority) -> Path:
    return nats_authority.service_credentials


@pytest.fixture(scope="session")
def servers(
    tmp_path_factory: pytest.TempPathFactory, nats_authority: NatsAuthority
) -> Iterator[Servers]:
    data_dir = tmp_path_factory.mktemp("stack")
    embedded = EmbeddedServers(
        data_dir, nats_port=free_port(), redis_port=free_port(), nats_authority=nats_authority
    )
    embedded.start()
    try:
        apply_migrations(embedded.database_url)
        admin_url = embedded.database_url.replace("/ticketflow?", "/postgres?")
        yield Servers(
            embedded.database_url,
            embedded.nats_url,
            embedded.redis_url,
            admin_url,
            data_dir,
            nats_authority,
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
def new_nats_server(store: Path, authority: NatsAuthority) -> Iterator[str]:
    """A NATS server of its own, so its streams hold only what its user published.

    It trusts `authority` (the session's `nats_authority`), so `servers.nats_credentials` work.
    """
    port = free_port()
    process = start_nats_server(authority, store / "js", port, store / "nats.log")
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_process(process)


@pytest.fixture
def fresh_database(servers: Servers) -> Iterator[str]:
    """A new, migrated database for tests that need the whole event log to themselves."""
    with new_database(servers) as url:
        yield url


@pytest.fixture
def fresh_nats(tmp_path: Path, nats_authority: NatsAuthority) -> Iterator[str]:
    """The URL of a new NATS server; connect with the `nats_credentials` fixture."""
    with new_nats_server(tmp_path, nats_authority) as url:
        yield url
