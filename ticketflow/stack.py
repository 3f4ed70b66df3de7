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
from ticketflow.metrics import WORKER_OFFSETS, metrics_port
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


# Process kinds whose copies share one port: each binds it with SO_REUSEPORT and the kernel
# spreads new connections between them.
API_KINDS = {"commands": "TF_COMMANDS_PORT", "queries": "TF_QUERIES_PORT"}


class PortInUse(RuntimeError):
    pass


def parse_scale(text: str) -> dict[str, int]:
    """`inference=2,ingest=2` → copies per process kind; every kind named must exist."""
    kinds = {name for name, _ in PROCESSES}
    scale: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, count = part.partition("=")
        name = name.strip()
        if name not in kinds:
            raise ValueError(
                f"--scale: unknown process {name!r}; one of {', '.join(sorted(kinds))}"
            )
        try:
            copies = int(count)
        except ValueError:
            raise ValueError(f"--scale: {part!r} is not NAME=COUNT") from None
        if not 1 <= copies <= 16:
            raise ValueError(f"--scale: {name} must run 1 to 16 copies, not {copies}")
        scale[name] = copies
    return scale


def process_copies(scale: dict[str, int]) -> list[tuple[str, tuple[str, ...]]]:
    """(log name, CLI arguments) of every process to run: `inference`, `inference-2`, …; the
    APIs' copies share their port (`--reuse-port`)."""
    copies: list[tuple[str, tuple[str, ...]]] = []
    for name, args in PROCESSES:
        count = scale.get(name, 1)
        for n in range(count):
            extra = ("--reuse-port",) if name in API_KINDS and count > 1 else ()
            copies.append((name if n == 0 else f"{name}-{n + 1}", (*args, *extra)))
    return copies


METRICS_PORT_STRIDE = len(WORKER_OFFSETS)
"""Copy n of a worker kind serves its metrics on its kind's port + 4 * (n - 1): with
`TF_METRICS_PORT` as the base, the first copies take base+0..3, the second copies base+4..7, …"""


def copy_metrics_ports(settings: Settings, scale: dict[str, int]) -> dict[str, int]:
    """The metrics port of every worker copy after the first (`inference-2`, …) when its kind
    has one: each copy binds a port of its own."""
    ports: dict[str, int] = {}
    for kind in WORKER_OFFSETS:
        port = metrics_port(settings, kind)
        if port is None:
            continue
        for n in range(2, scale.get(kind, 1) + 1):
            ports[f"{kind}-{n}"] = port + METRICS_PORT_STRIDE * (n - 1)
    too_high = sorted(name for name, port in ports.items() if port > 65535)
    if too_high:
        raise ValueError(
            f"--scale: no metrics port left for {', '.join(too_high)}; set a lower TF_METRICS_PORT"
        )
    return ports


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
    def __init__(self, settings: Settings, *, scale: dict[str, int] | None = None) -> None:
        self.settings = settings
        self.scale = dict(scale or {})
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
                nats_cluster=settings.nats_cluster_size,
                nats_cluster_port=settings.embedded_nats_cluster_port,
                nats_sync_interval=(
                    settings.nats_sync_interval if settings.nats_cluster_size > 1 else None
                ),
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
        if settings.uses_embedded_servers and not settings.nats_url:
            # Every process creates the stream and consumers with the cluster's replicas.
            env["TF_STREAM_REPLICAS"] = str(settings.stream_replicas)
        own_ports = copy_metrics_ports(settings, self.scale)
        for name, args in process_copies(self.scale):
            kind = name.rsplit("-", 1)[0]
            extra = (
                {f"TF_METRICS_PORT_{kind.upper()}": str(own_ports[name])}
                if name in own_ports
                else {}
            )
            self._supervisor.add(name, *args, env=extra)
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
