"""`ticketflow up` supervises its embedded servers: a killed server comes back on the same data
and port, and a killed `up` takes every server and process of its data directory with it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import psycopg
import pytest
import redis

from tests.e2e.stack import (
    SERVERS,
    server_pid,
    servers_started,
    stack_processes,
    start_up,
    wait_for,
)
from ticketflow.bootstrap import connect_nats
from ticketflow.embedded import StackInfo


def restarted(up: subprocess.Popen[bytes], name: str, old: int) -> bool:
    return server_pid(up, name) not in (None, old)


def postgres_answers(info: StackInfo) -> bool:
    with psycopg.connect(info.database_url, connect_timeout=3) as conn:
        return conn.execute("SELECT count(*) FROM pg_tables").fetchone() is not None


def nats_answers(info: StackInfo) -> bool:
    async def publish() -> bool:
        nc = await asyncio.wait_for(connect_nats(info.nats_url, "e2e", info.nats_credentials), 5)
        try:
            account = await nc.jetstream(timeout=5).account_info()
            return account is not None
        finally:
            await nc.close()

    return asyncio.run(publish())


def redis_answers(info: StackInfo) -> bool:
    client = redis.Redis.from_url(info.redis_url, socket_timeout=3)
    try:
        return bool(client.ping())
    finally:
        client.close()


ANSWERS: dict[str, Callable[[StackInfo], bool]] = {
    "postgres": postgres_answers,
    "nats": nats_answers,
    "redis": redis_answers,
}


@pytest.fixture
def up_process(stack_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = start_up(stack_env, tmp_path / "up.log")
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


@pytest.mark.timeout(300)  # 60 s to start, three restarts of 30 s at most, 60 s to stop
def test_each_embedded_server_killed_comes_back_answering_on_the_same_address(
    stack_env: dict[str, str], up_process: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    data_dir = Path(stack_env["TF_DATA_DIR"])
    info = wait_for(
        lambda: servers_started(data_dir, up_process), "servers started", 60, up_process
    )
    assert isinstance(info, StackInfo)
    with psycopg.connect(info.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept_across_crashes (x int)")
        conn.execute("INSERT INTO kept_across_crashes VALUES (7)")
    for name, answers in ANSWERS.items():
        pid = wait_for(partial(server_pid, up_process, name), name, 10, up_process)
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(partial(restarted, up_process, name, pid), f"{name} restarted", 30, up_process)
        wait_for(partial(answers, info), f"{name} answering", 30, up_process)
        assert time.monotonic() - killed_at < 30
    with psycopg.connect(info.database_url) as conn:
        assert conn.execute("SELECT x FROM kept_across_crashes").fetchone() == (7,)
    log = (tmp_path / "up.log").read_text()
    for name in ANSWERS:
        assert f"{name} exited with code -9; restarting" in log
    # The addresses did not change: stack.json still tells the truth.
    assert StackInfo.read(data_dir) == info


@pytest.mark.timeout(330)  # two starts of 60 s, the waits below, a stop of 60 s
def test_kill_9_of_up_leaves_nothing_of_its_data_directory_and_up_starts_again(
    stack_env: dict[str, str], up_process: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    data_dir = Path(stack_env["TF_DATA_DIR"])
    wait_for(lambda: servers_started(data_dir, up_process), "servers started", 60, up_process)
    wait_for(
        lambda: all(server_pid(up_process, name) for name in SERVERS), "servers", 10, up_process
    )
    running = stack_processes(data_dir)
    assert {"postgres", "nats-server", "redis-server"} <= set(running.values()), running
    up_process.kill()
    up_process.wait()
    deadline = time.monotonic() + 20
    while stack_processes(data_dir):
        assert time.monotonic() < deadline, f"left running: {stack_processes(data_dir)}"
        time.sleep(0.2)
    # PostgreSQL had a fast shutdown, not a crash: no recovery needed next time.
    assert "database system is shut down" in (data_dir / "logs" / "postgres.log").read_text()

    again = start_up(stack_env, tmp_path / "again.log")
    try:
        info = wait_for(lambda: servers_started(data_dir, again), "second start", 60, again)
        assert isinstance(info, StackInfo)
        for name, answers in ANSWERS.items():
            wait_for(partial(answers, info), f"{name} answering", 30, again)
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0
    assert not stack_processes(data_dir)


@pytest.mark.timeout(180)  # preparing a server, then `up` given 80 s
def test_up_stops_with_the_cpu_named_when_a_vector_query_kills_the_backend(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """The start-up self-check meets a backend dying of SIGILL (the crash pgvector built for a
    newer CPU causes; here a real SIGILL from an event trigger on CREATE INDEX): `up` stops with
    a message naming the CPU features, and leaves nothing running."""
    from ticketflow.postgres import PostgresServer, stop_postgres

    data_dir = Path(stack_env["TF_DATA_DIR"])
    (data_dir / "logs").mkdir(parents=True)
    server = PostgresServer(data_dir / "postgres", data_dir / "logs" / "postgres.log")
    server.prepare()
    process = server.spawn()
    try:
        server.wait_ready(process)
        with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE ticketflow")
        with psycopg.connect(server.url("ticketflow"), autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION die() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN "
                "EXECUTE 'COPY (SELECT 1) TO PROGRAM ''kill -ILL $PPID'''; END $$"
            )
            conn.execute(
                "CREATE EVENT TRIGGER die ON ddl_command_end WHEN TAG IN ('CREATE INDEX') "
                "EXECUTE FUNCTION die()"
            )
    finally:
        stop_postgres(process)
    result = subprocess.run(
        [sys.executable, "-m", "ticketflow", "up"],
        env={**stack_env, "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "illegal instruction (SIGILL)" in result.stderr
    assert "x86-64-v3 CPU (avx avx2 bmi1 bmi2 f16c fma abm movbe xsave)" in result.stderr
    assert "ticketflow is up" not in result.stderr
    assert not stack_processes(data_dir)
