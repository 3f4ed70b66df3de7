"""The background processes while a server is away: the relay and the projector wait out a
PostgreSQL restart and a NATS restart and carry on where they were, and a JetStream worker keeps
its durable consumer across a NATS restart. Nothing is restarted but the server (SIGKILL, then
the same data on the same port or socket)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import nats.js.errors
import psycopg
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from commands.messages import CreateTicket, UploadedDocument
from commands.service import CommandService
from handlers.consumer import ConsumerSettings, JetStreamWorker
from migrations import apply_migrations
from streams.contract.subjects import event_filter, event_subject
from streams.jetstream import StreamSettings, ensure_stream
from streams.relay import Relay, RelaySettings
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.outage_servers import NatsServer, PostgresTestServer
from tests.support import random_tenant, sample
from ticketflow.bootstrap import (
    close_nats,
    connect_nats,
    run_projector,
    run_relay,
    stream_settings,
)
from ticketflow.settings import Settings

PDF = sample("research-paper.pdf").read_bytes()


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout}s")
        await asyncio.sleep(0.2)


def open_tickets(service: CommandService, count: int) -> None:
    tenant = random_tenant()
    document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
    for _ in range(count):
        service.create_ticket(CreateTicket(tenant, "alice", (document,), "tiny"))


def stored_events(database_url: str) -> tuple[int, int]:
    """How many events the log holds, and the last position (a crash skips positions)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(max(notification_id), 0) FROM ticketflow_events"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def projected_position(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT position FROM projection_positions WHERE name = 'read_models'"
        ).fetchone()
    return int(row[0]) if row else 0


async def stream_count(js: JetStreamContext, name: str) -> int:
    try:
        return int((await js.stream_info(name)).state.messages)
    except (nats.js.errors.NotFoundError, nats.errors.Error, TimeoutError):
        return -1


@contextlib.asynccontextmanager
async def jetstream(url: str, credentials: Path) -> AsyncIterator[JetStreamContext]:
    nc = await connect_nats(url, "tests", credentials)
    try:
        yield nc.jetstream()
    finally:
        await close_nats(nc)


@contextlib.asynccontextmanager
async def running(stop: asyncio.Event, *coroutines: Awaitable[None]) -> AsyncIterator[None]:
    """Runs `coroutines` until the block ends, then sets `stop` (which they watch); fails if
    one ended before."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        yield
        for task in tasks:
            assert not task.done(), f"a process ended during the outage: {task!r}"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    for task in tasks:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresTestServer]:
    server = PostgresTestServer(tmp_path_factory.mktemp("worker-outages") / "postgres")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_server(tmp_path: Path, servers: Servers) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", servers.nats_authority)
    server.start()
    yield server
    server.stop()


def settings_on(servers: Servers, postgres: PostgresTestServer, nats_url: str) -> Settings:
    return settings_for(servers, postgres.url, nats_url=nats_url, stream_storage="file")


@pytest.mark.timeout(120)
async def test_relay_and_projector_carry_on_after_postgres_restarts(
    servers: Servers, postgres: PostgresTestServer, nats_server: NatsServer
) -> None:
    settings = settings_on(servers, postgres, nats_server.url)
    stream = stream_settings(settings).name
    service = service_for(settings, postgres.url)
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(open_tickets, service, 5)
        async with (
            jetstream(nats_server.url, servers.nats_credentials) as js,
            running(stop, run_relay(settings, stop), run_projector(settings, stop)),
        ):

            async def caught_up() -> bool:
                count, position = await asyncio.to_thread(stored_events, postgres.url)
                projected = await asyncio.to_thread(projected_position, postgres.url)
                published = await stream_count(js, stream)
                return projected == position and published == count

            await eventually(caught_up, 30)

            postgres.kill()
            await asyncio.sleep(2.0)  # both notice, and wait
            postgres.spawn()
            await asyncio.to_thread(postgres.wait_ready, 30)

            # The command service reconnects too; then the new events flow through.
            async def opened() -> bool:
                try:
                    await asyncio.to_thread(open_tickets, service, 3)
                except Exception:
                    return False
                return True

            await eventually(opened, 20)
            await eventually(caught_up, 45)
            messages = [await js.get_msg(stream, seq) for seq in range(1, 9)]
    finally:
        service.close()
    ids = [message.headers["Nats-Msg-Id"] for message in messages if message.headers]
    assert len(set(ids)) == len(ids) == 8


@pytest.mark.timeout(90)
async def test_the_relay_carries_on_after_nats_restarts(
    servers: Servers, postgres: PostgresTestServer, nats_server: NatsServer
) -> None:
    # A database of its own: the stream must hold this test's events only.
    name = f"tf_relay_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    database_url = postgres.url.replace("/ticketflow?", f"/{name}?")
    apply_migrations(database_url)
    settings = settings_on(servers, postgres, nats_server.url)
    service = service_for(settings, database_url)
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=4)
    nc = await connect_nats(nats_server.url, "tests-relay", servers.nats_credentials)
    stream = StreamSettings(storage="file")
    relay = Relay(pool, nc, stream, RelaySettings(poll_interval_s=0.2, ack_timeout_s=3.0))
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(open_tickets, service, 5)
        async with (
            jetstream(nats_server.url, servers.nats_credentials) as js,
            running(stop, relay.run(stop)),
        ):
            await eventually(lambda: _has(js, stream.name, 5), 30)

            nats_server.kill()
            await asyncio.to_thread(open_tickets, service, 4)  # while NATS is away
            await asyncio.sleep(1.0)
            nats_server.start()

            await eventually(lambda: _has(js, stream.name, 9), 45)
            messages = [await js.get_msg(stream.name, seq) for seq in range(1, 10)]
            assert await stream_count(js, stream.name) == 9  # nothing twice
    finally:
        service.close()
        await close_nats(nc)
        await pool.close()
        with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())
    positions = [int(message.headers["tf-position"]) for message in messages if message.headers]
    assert positions == sorted(positions)
    assert len(set(positions)) == 9


async def _has(js: JetStreamContext, stream: str, count: int) -> bool:
    return await stream_count(js, stream) >= count


@pytest.mark.timeout(60)
async def test_a_worker_keeps_its_durable_consumer_across_a_nats_restart(
    servers: Servers, nats_server: NatsServer
) -> None:
    handled: list[str] = []

    async def handle(message: Msg) -> None:
        handled.append(message.subject)

    async def dead_letter(message: Msg, reason: str) -> None:
        raise AssertionError(f"nothing should be dead-lettered: {reason}")

    def subject() -> str:
        return event_subject("acme", "ticket", uuid.uuid4(), "created")

    nc = await connect_nats(nats_server.url, "tests-worker", servers.nats_credentials)
    try:
        js = nc.jetstream()
        await ensure_stream(js, StreamSettings(storage="file"))
        worker = JetStreamWorker(
            js,
            ConsumerSettings(durable="outage", filter_subject=event_filter("created")),
            handle,
            dead_letter,
        )
        stop = asyncio.Event()
        async with running(stop, worker.run(stop)):
            first = subject()
            await js.publish(first, b"{}")
            await eventually(lambda: _async(handled == [first]), 15)

            nats_server.kill()
            await asyncio.sleep(1.0)
            nats_server.start()

            second = subject()

            async def published() -> bool:
                try:
                    await js.publish(second, b"{}", timeout=2)
                except (nats.errors.Error, TimeoutError):
                    return False
                return True

            await eventually(published, 20)
            await eventually(lambda: _async(handled == [first, second]), 20)
        info = await js.consumer_info("TF_EVENTS", "outage")
        assert info.num_pending == 0
        assert info.num_ack_pending == 0
    finally:
        await close_nats(nc)


async def _async(value: bool) -> bool:
    return value
