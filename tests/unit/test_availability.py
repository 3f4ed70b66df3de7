"""Telling an outage from a bug, backing off, and per-user idempotent ticket ids."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import eventsourcing.persistence
import nats.errors
import psycopg
import pytest
import redis.exceptions
from nats.js.errors import ServiceUnavailableError
from psycopg_pool import PoolTimeout

from commands.service import IDEMPOTENCY_NAMESPACE, ticket_id_for
from security.availability import DependencyUnavailable, open_redis, unavailable_dependency
from streams.contract.availability import Backoff, database_unavailable
from ticketflow.embedded import free_port


def wrapped(cause: Exception) -> Exception:
    """An error raised from another, as the event store library raises its own."""
    try:
        raise eventsourcing.persistence.OperationalError(str(cause)) from cause
    except eventsourcing.persistence.OperationalError as error:
        return error


@pytest.mark.parametrize(
    ("error", "dependency"),
    [
        (psycopg.OperationalError("connection refused"), "database"),
        (psycopg.errors.AdminShutdown("terminating connection"), "database"),
        (PoolTimeout("couldn't get a connection after 1.00 sec"), "database"),
        (psycopg.InterfaceError("the connection is closed"), "database"),
        (wrapped(PoolTimeout("couldn't get a connection")), "database"),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation"), "database"),
        (asyncpg.exceptions.AdminShutdownError("terminating"), "database"),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), "database"),
        (asyncpg.InterfaceError("connection is closed"), "database"),
        (ConnectionRefusedError(111, "Connection refused"), "database"),
        (redis.exceptions.ConnectionError("Error 111 connecting"), "redis"),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), "redis"),
        (nats.errors.ConnectionClosedError(), "nats"),
        (nats.errors.NoServersError(), "nats"),
        (ServiceUnavailableError(), "nats"),
        (DependencyUnavailable("nats", "not connected"), "nats"),
    ],
)
def test_an_error_of_a_server_that_is_away_names_it(error: Exception, dependency: str) -> None:
    assert unavailable_dependency(error) == dependency


@pytest.mark.parametrize(
    "error",
    [
        ValueError("a bug"),
        KeyError("ticket"),
        psycopg.errors.UniqueViolation("duplicate key"),
        psycopg.InterfaceError("query parameters should be a sequence or a mapping"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        asyncpg.exceptions.UndefinedTableError("relation does not exist"),
        asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
        redis.exceptions.ResponseError("WRONGTYPE"),
        wrapped(ValueError("a bug under the library")),
    ],
)
def test_other_errors_are_not_outages(error: Exception) -> None:
    assert unavailable_dependency(error) is None


def test_the_event_log_readers_wait_on_outages_only() -> None:
    assert database_unavailable(asyncpg.exceptions.AdminShutdownError("bye"))
    assert database_unavailable(ConnectionResetError())
    assert database_unavailable(TimeoutError())
    assert not database_unavailable(asyncpg.exceptions.UniqueViolationError("dup"))


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_reset() -> None:
    backoff = Backoff(initial_s=0.5, max_s=4.0)
    delays = [backoff.next_delay() for _ in range(6)]

    assert 0.4 <= delays[0] <= 0.6
    assert 0.8 <= delays[1] <= 1.2
    assert all(delay <= 4.0 for delay in delays)
    assert delays[-1] >= 3.2
    backoff.reset()
    assert backoff.next_delay() <= 0.6
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s=2, max_s=1)


async def test_a_backoff_wait_ends_when_stop_is_set() -> None:
    backoff = Backoff(initial_s=5.0, max_s=5.0)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, stop.set)
    started = time.monotonic()
    await backoff.wait(stop)
    assert time.monotonic() - started < 2.0


async def test_a_redis_that_is_away_fails_the_next_commands_at_once() -> None:
    client = open_redis(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5, pause_s=30)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError, match="just failed"):
            await client.get("key")
        assert time.monotonic() - started < 0.05
    finally:
        await client.aclose()


def test_created_ticket_ids_belong_to_one_user_of_one_tenant() -> None:
    key = "retry-1"
    alice = ticket_id_for("acme", "alice", key)

    assert ticket_id_for("acme", "alice", key) == alice
    assert ticket_id_for("acme", "bob", key) != alice
    assert ticket_id_for("globex", "alice", key) != alice
    # Ids of tickets created when keys were per tenant only are never handed out again.
    legacy = uuid.uuid5(uuid.uuid5(IDEMPOTENCY_NAMESPACE, "acme"), key)
    assert alice != legacy
