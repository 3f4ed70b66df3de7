"""The event store's wake-ups against real PostgreSQL: a NOTIFY on the channel after appends,
one for those that came meanwhile, and again after the sender's connection was dropped."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from commands.application import open_application
from commands.recorder import WakeUps
from tests.conftest import Servers

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def channel() -> str:
    return f"wake_ups_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def listener(servers: Servers, channel: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(servers.database_url, autocommit=True) as conn:
        conn.execute(f"LISTEN {channel}")
        yield conn


def notifications(conn: psycopg.Connection[tuple[object, ...]], wait_s: float) -> int:
    """How many notifications arrive within `wait_s` of quiet."""
    return sum(1 for _ in conn.notifies(timeout=wait_s))


def test_appends_wake_the_listeners_again_after_the_connection_was_dropped(
    servers: Servers, channel: str, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    app = open_application(servers.database_url, pool_size=2)
    wake_ups = WakeUps(app.recorder.datastore, channel)  # type: ignore[attr-defined]
    try:
        wake_ups.appended()
        assert notifications(listener, 1.0) == 1

        # The server drops the sender's connection (a restart, an idle timeout).
        with psycopg.connect(servers.database_url, autocommit=True) as admin:
            dropped = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE query LIKE %s AND pid <> pg_backend_pid()",
                (f"NOTIFY%{channel}%",),
            ).fetchone()
        assert dropped == (1,)
        deadline = time.monotonic() + 10
        woken = 0
        while woken == 0:
            assert time.monotonic() < deadline, "no NOTIFY after the connection was dropped"
            wake_ups.appended()
            woken = notifications(listener, 0.5)
    finally:
        wake_ups.close()
        app.close()
