"""Migrations on real PostgreSQL: applied once each, safe to run concurrently."""

from __future__ import annotations

import multiprocessing
import secrets
from collections.abc import Iterator

import psycopg
import pytest

from migrations import applied_versions, apply_migrations, discover
from tests.conftest import Servers


@pytest.fixture
def empty_database(servers: Servers) -> Iterator[str]:
    name = f"tf_empty_{secrets.token_hex(4)}"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    yield servers.database_url.replace("/ticketflow?", f"/{name}?")
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())


def _apply(url: str, results: multiprocessing.Queue[list[str]]) -> None:
    results.put(apply_migrations(url))


def test_two_processes_migrating_at_once_apply_each_migration_once(empty_database: str) -> None:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[list[str]] = context.Queue()
    processes = [context.Process(target=_apply, args=(empty_database, results)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    applied = results.get(timeout=5) + results.get(timeout=5)
    assert sorted(applied) == sorted(m.name for m in discover())
    assert applied_versions(empty_database) == [m.version for m in discover()]


def test_migrating_an_up_to_date_database_does_nothing(empty_database: str) -> None:
    apply_migrations(empty_database)
    assert apply_migrations(empty_database) == []


def test_a_migration_edited_after_it_was_applied_is_refused(empty_database: str) -> None:
    apply_migrations(empty_database)
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        apply_migrations(empty_database)
