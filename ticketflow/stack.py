"""The whole stack in one process tree: embedded servers, migrations and supervised workers.

`ticketflow up` is a thin wrapper around `Stack`: it starts it, prints where things are, and
stops it on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from migrations import apply_migrations
from ticketflow.embedded import EmbeddedServers, StackInfo
from ticketflow.settings import Settings
from ticketflow.supervisor import Supervisor

logger = logging.getLogger(__name__)

# (log name, CLI arguments) of every process the stack runs.
PROCESSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("commands", ("serve", "commands")),
    ("queries", ("serve", "queries")),
    ("relay", ("worker", "relay")),
    ("ingest", ("worker", "ingest")),
    ("inference", ("worker", "inference")),
    ("projector", ("worker", "projector")),
)


class PortInUse(RuntimeError):
    pass


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _nats_access(settings: Settings, servers: EmbeddedServers | None) -> dict[str, str]:
    """Credentials for the NATS the stack uses: the settings' own, else the embedded server's."""
    if settings.nats_url or servers is None or servers.nats_authority is None:
        return {
            "nats_credentials": str(settings.nats_credentials or ""),
            "nats_integrator_account": settings.nats_integrator_account or "",
            "nats_integrator_seed_file": str(settings.nats_integrator_seed_file or ""),
        }
    authority = servers.nats_authority
    return {
        "nats_credentials": str(authority.service_credentials),
        "nats_integrator_account": authority.integrator_account,
        "nats_integrator_seed_file": str(authority.integrator_seed_file),
    }


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self._servers: EmbeddedServers | None = None
        self._supervisor: Supervisor | None = None
        self.info: StackInfo | None = None

    def start(self) -> StackInfo:
        """Start everything, or raise `StackAlreadyRunning` / `PortInUse` leaving nothing behind."""
        settings = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.uses_embedded_servers:
            self._servers = EmbeddedServers(
                self.data_dir,
                nats_port=settings.embedded_nats_port,
                redis_port=settings.embedded_redis_port,
            )
            self._servers.start()
        try:
            return self._start_processes()
        except BaseException:
            self.stop()
            raise

    def _start_processes(self) -> StackInfo:
        settings, servers = self.settings, self._servers
        info = StackInfo(
            pid=os.getpid(),
            database_url=settings.database_url or (servers.database_url if servers else ""),
            nats_url=settings.nats_url or (servers.nats_url if servers else ""),
            redis_url=settings.redis_url or (servers.redis_url if servers else ""),
            commands_url=f"http://{settings.host}:{settings.commands_port}",
            queries_url=f"http://{settings.host}:{settings.queries_port}",
            **_nats_access(settings, servers),
        )
        applied = apply_migrations(info.database_url)
        if applied:
            logger.info("applied migrations: %s", ", ".join(applied))
        for port, variable in (
            (settings.commands_port, "TF_COMMANDS_PORT"),
            (settings.queries_port, "TF_QUERIES_PORT"),
        ):
            if not port_is_free(settings.host, port):
                raise PortInUse(f"port {port} is in use; set {variable} to a free port")
        info.write(self.data_dir)
        env = {
            **os.environ,
            "TF_DATABASE_URL": info.database_url,
            "TF_NATS_URL": info.nats_url,
            "TF_REDIS_URL": info.redis_url,
            "TF_DATA_DIR": str(self.data_dir),
        }
        for variable, value in (
            ("TF_NATS_CREDENTIALS", info.nats_credentials),
            ("TF_NATS_INTEGRATOR_ACCOUNT", info.nats_integrator_account),
            ("TF_NATS_INTEGRATOR_SEED_FILE", info.nats_integrator_seed_file),
        ):
            if value:
                env[variable] = value
        (self.data_dir / "logs").mkdir(exist_ok=True)
        self._supervisor = Supervisor(self.data_dir / "logs", env)
        for name, args in PROCESSES:
            self._supervisor.add(name, *args)
        self._supervisor.start()
        self.info = info
        return info

    def run_until(self, should_stop: Callable[[], bool]) -> None:
        """Watch the embedded servers and the processes, restarting any that died, until
        `should_stop()` says so.

        `should_stop` is called about twice a second and may block for that long.
        """
        assert self._supervisor is not None
        while not should_stop():
            if self._servers is not None:
                self._servers.poll()
            self._supervisor.poll()

    def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.stop()
            self._supervisor = None
        if self._servers is not None:
            self._servers.stop()
            self._servers = None

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"
