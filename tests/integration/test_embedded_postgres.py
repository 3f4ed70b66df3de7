"""The embedded PostgreSQL as a supervised child: data directories it must open or refuse, what
a killed server leaves behind, and the vector self-check's diagnosis of a crashed backend.

Each test runs a PostgreSQL of its own (a session server must not be crashed or locked)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from ticketflow.embedded import EmbeddedServers
from ticketflow.portability import REQUIRED_LEVEL, VectorCheckFailed, vector_self_check
from ticketflow.postgres import (
    IncompatibleDataDirectory,
    PostgresServer,
    binary,
    run_as,
    stop_postgres,
)
from ticketflow.processes import free_port, read_appended


def process_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} is still running"
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path) -> PostgresServer:
    (tmp_path / "logs").mkdir()
    return PostgresServer(tmp_path / "postgres", tmp_path / "logs" / "postgres.log")


def start(server: PostgresServer) -> subprocess.Popen[bytes]:
    process = server.spawn()
    try:
        server.wait_ready(process)
    except BaseException:
        stop_postgres(process)
        raise
    return process


def as_server_user(args: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A process of the server's own user (PostgreSQL's lock files name such processes)."""
    user = run_as()
    return subprocess.Popen(
        args,
        cwd=cwd,
        user=user.uid if user else None,
        group=user.gid if user else None,
        extra_groups=[] if user else None,
    )


@pytest.mark.timeout(120)
def test_a_stale_postmaster_pid_does_not_block_the_next_start(
    server: PostgresServer,
) -> None:
    server.prepare()
    first = start(server)
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute("CREATE TABLE survives (x int)")
        conn.execute("INSERT INTO survives VALUES (42)")
    first.kill()
    first.wait()
    lock = server.pgdata / "postmaster.pid"
    assert lock.exists()  # kill -9: no shutdown, the lock file stays
    # The recorded pid now belongs to a live process of the same user, which PostgreSQL itself
    # would take for a running server and refuse to start.
    squatter = as_server_user(["sleep", "60"])
    try:
        lines = lock.read_text().splitlines()
        lines[0] = str(squatter.pid)
        lock.write_text("\n".join(lines) + "\n")
        deadline = time.monotonic() + 30
        while True:  # a killed server's backends need a moment to notice and exit
            second = server.spawn()
            try:
                server.wait_ready(second, timeout=30)
                break
            except RuntimeError:
                stop_postgres(second)
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.5)
        try:
            with psycopg.connect(server.url("postgres")) as conn:
                assert conn.execute("SELECT x FROM survives").fetchone() == (42,)
        finally:
            stop_postgres(second)
        assert not lock.exists()  # a fast shutdown removes it
    finally:
        squatter.kill()
        squatter.wait()


@pytest.mark.timeout(120)
def test_a_server_left_running_on_the_data_directory_is_stopped_before_starting(
    server: PostgresServer,
) -> None:
    """A server that outlived its stack (as `pg_ctl start` of earlier releases could leave one)
    is stopped, not joined: the stack's own child is the only server on its data."""
    server.prepare()
    orphan = as_server_user(
        [
            str(binary("postgres")),
            "-D", server._path_arg(server.pgdata),
            "-k", server._path_arg(server.socket_dir),
            "-c", "listen_addresses=",
        ],
        cwd=server.pgdata,
    )  # fmt: skip
    try:
        server.wait_ready(orphan)
        ours = start(server)
        try:
            wait_gone(orphan.pid)
            assert orphan.wait(5) == 0  # a fast shutdown, not a crash
            with psycopg.connect(server.url("postgres")) as conn:
                pid = conn.execute("SELECT pg_postmaster_start_time() IS NOT NULL").fetchone()
                assert pid == (True,)
            assert (server.pgdata / "postmaster.pid").read_text().split()[0] == str(ours.pid)
        finally:
            stop_postgres(ours)
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files to another user")
def test_a_data_directory_owned_by_an_earlier_servers_user_is_taken_over(
    server: PostgresServer,
) -> None:
    """Earlier releases ran PostgreSQL as the user `pgserver`: their data stays readable."""
    server.prepare()
    nobody = 65534
    for root, dirs, files in os.walk(server.pgdata):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), nobody, nobody)
    os.chown(server.pgdata, nobody, nobody)
    server.prepare()
    process = start(server)
    try:
        with psycopg.connect(server.url("postgres")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        stop_postgres(process)
    user = run_as()
    assert user is not None
    assert (server.pgdata / "base").stat().st_uid == user.uid


@pytest.mark.timeout(60)
def test_a_data_directory_of_another_major_version_stops_the_start_with_nothing_running(
    tmp_path: Path,
) -> None:
    pgdata = tmp_path / "postgres"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("16\n")
    servers = EmbeddedServers(tmp_path, nats_port=free_port(), redis_port=free_port())
    with pytest.raises(IncompatibleDataDirectory, match="PostgreSQL 16"):
        servers.start()
    assert servers.pids() == {}
    # The lock is released: a corrected directory starts.
    (pgdata / "PG_VERSION").unlink()
    servers.start()
    try:
        assert set(servers.pids()) == {"postgres", "nats", "redis"}
    finally:
        servers.stop()


@pytest.mark.timeout(120)
def test_the_vector_check_names_the_cpu_when_a_backend_dies_of_an_illegal_instruction(
    server: PostgresServer,
) -> None:
    """A real SIGILL in the backend that builds the HNSW index: the same crash pgvector built
    for a newer CPU causes, delivered here by an event trigger on CREATE INDEX."""
    server.prepare()
    process = start(server)
    try:
        url = server.url("postgres")
        vector_self_check(url)  # runs on this CPU
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                """
                CREATE FUNCTION die_of_sigill() RETURNS event_trigger LANGUAGE plpgsql AS $$
                BEGIN
                    EXECUTE 'COPY (SELECT 1) TO PROGRAM ''kill -ILL $PPID''';
                END $$
                """
            )
            conn.execute(
                "CREATE EVENT TRIGGER sigill ON ddl_command_end WHEN TAG IN ('CREATE INDEX') "
                "EXECUTE FUNCTION die_of_sigill()"
            )
        offset = server.log_path.stat().st_size
        with pytest.raises(VectorCheckFailed) as raised:
            vector_self_check(url, server_log=lambda: read_appended(server.log_path, offset))
        message = str(raised.value)
        assert "illegal instruction (SIGILL)" in message
        assert REQUIRED_LEVEL in message
        assert "avx2" in message
        assert "this CPU has all of them" in message  # this machine's CPU is not the cause
        assert "signal 4" in read_appended(server.log_path, offset)
        # PostgreSQL recovers by itself; the check was rolled back and leaves nothing.
        server.wait_ready(process)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP EVENT TRIGGER sigill")
        vector_self_check(url)
    finally:
        stop_postgres(process)
    assert process.returncode == 0


@pytest.mark.timeout(60)
def test_the_server_stops_with_a_fast_shutdown_when_its_parent_dies(
    tmp_path: Path,
) -> None:
    """PostgreSQL runs in the foreground with SIGINT as its parent-death signal: killing the
    process that started it shuts it down cleanly instead of leaving a daemon behind."""
    pid_file = tmp_path / "postmaster"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from ticketflow.postgres import PostgresServer\n"
        f"root = Path({str(tmp_path)!r})\n"
        "server = PostgresServer(root / 'postgres', root / 'postgres.log')\n"
        "server.prepare()\n"
        "process = server.spawn()\n"
        "server.wait_ready(process)\n"
        f"Path({str(pid_file)!r}).write_text(str(process.pid))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 50
        while not pid_file.exists():
            assert parent.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.1)
        postmaster = int(pid_file.read_text())
        assert process_alive(postmaster)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    wait_gone(postmaster)
    log = (tmp_path / "postgres.log").read_text()
    assert "received fast shutdown request" in log
    assert "database system is shut down" in log
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()


@pytest.mark.timeout(120)
def test_a_data_directory_too_deep_for_a_socket_gets_one_under_tmp_that_stays_the_same(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    server = PostgresServer(deep / "postgres", tmp_path / "postgres.log")
    assert server.socket_dir != server.pgdata
    try:
        server.prepare()
        for _ in range(2):  # a restart finds the server on the same socket
            process = start(server)
            try:
                with psycopg.connect(server.url("postgres")) as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
                assert (server.socket_dir / ".s.PGSQL.5432").is_socket()
            finally:
                stop_postgres(process)
            assert PostgresServer(deep / "postgres", tmp_path / "x.log").url("postgres") == (
                server.url("postgres")
            )
    finally:
        shutil.rmtree(server.socket_dir, ignore_errors=True)
