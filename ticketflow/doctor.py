"""`ticketflow doctor`: can this machine run the stack, and does the stack answer?

Each check gives a verdict (ok, warn or fail) and a line of detail. The servers are checked with
real work: a vector query on PostgreSQL, a JetStream publish, a Redis round trip. They are those
of the stack running on the data directory, the external ones the settings name, or else embedded
servers started on a temporary data directory for the check. The model and the embedder load in
a child process each, so a crash (an illegal instruction, say) becomes a failed check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from rich.table import Table

from ticketflow.embedded import (
    StackInfo,
    nats_server_args,
    redis_server_args,
    running_stack,
)
from ticketflow.nats_auth import NatsAuthority
from ticketflow.portability import (
    REQUIRED_LEVEL,
    X86_64_V3_FLAGS,
    cpu_flags,
    describe_cpu,
    missing_cpu_flags,
    vector_self_check,
)
from ticketflow.processes import (
    file_size,
    free_port,
    read_appended,
    spawn,
    stop_process,
    wait_for_port,
)
from ticketflow.settings import Settings

Verdict = Literal["ok", "warn", "fail"]
GIB = 1024**3
DISK_FAIL_BYTES = 1 * GIB
DISK_WARN_BYTES = 5 * GIB
MEMORY_FAIL_BYTES = 1 * GIB
MEMORY_WARN_BYTES = 3 * GIB
PROBE_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str


def check_cpu(flags: set[str] | None = None, machine: str | None = None) -> Check:
    flags = cpu_flags() if flags is None else flags
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return Check(
            "CPU", "warn", f"{machine}: the bundled binaries' CPU needs are checked on x86-64 only"
        )
    if not flags:
        return Check("CPU", "warn", "no CPU flags in /proc/cpuinfo; cannot tell")
    missing = missing_cpu_flags(flags)
    if missing:
        return Check("CPU", "fail", describe_cpu(flags))
    return Check("CPU", "ok", f"{REQUIRED_LEVEL}: {' '.join(X86_64_V3_FLAGS)}")


def _port_free(port: int, host: str) -> bool:
    from ticketflow.stack import port_is_free

    return port_is_free(host, port)


def _url_port(url: str | None) -> int | None:
    if not url:
        return None
    with contextlib.suppress(ValueError):
        return urlsplit(url).port
    return None


def check_ports(settings: Settings, stack: StackInfo | None) -> list[Check]:
    """The ports `ticketflow up` listens on: free, or already the running stack's."""
    wanted = [
        ("commands API", settings.commands_port, "TF_COMMANDS_PORT", "commands_url"),
        ("query API", settings.queries_port, "TF_QUERIES_PORT", "queries_url"),
    ]
    if settings.uses_embedded_servers:
        wanted += [
            ("NATS", settings.embedded_nats_port, "TF_EMBEDDED_NATS_PORT", "nats_url"),
            ("Redis", settings.embedded_redis_port, "TF_EMBEDDED_REDIS_PORT", "redis_url"),
        ]
    checks = []
    for label, port, variable, stack_field in wanted:
        name = f"port {port} ({label})"
        if stack is not None and _url_port(getattr(stack, stack_field)) == port:
            checks.append(Check(name, "ok", f"in use by the running stack (pid {stack.pid})"))
        elif _port_free(port, settings.host):
            checks.append(Check(name, "ok", "free"))
        else:
            checks.append(
                Check(name, "fail", f"in use by another program; set {variable} to a free port")
            )
    return checks


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_disk(data_dir: Path) -> Check:
    where = _existing(data_dir)
    free = shutil.disk_usage(where).free
    detail = f"{free / GIB:.1f} GiB free in {where}"
    if free < DISK_FAIL_BYTES:
        return Check("disk", "fail", f"{detail}; the servers need at least 1 GiB")
    if free < DISK_WARN_BYTES:
        return Check("disk", "warn", f"{detail}; 5 GiB or more is comfortable")
    return Check("disk", "ok", detail)


def check_memory(meminfo: Path = Path("/proc/meminfo")) -> Check:
    try:
        fields = dict(
            line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line
        )
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return Check("memory", "warn", f"cannot read MemAvailable from {meminfo}")
    detail = f"{available / GIB:.1f} GiB available"
    if available < MEMORY_FAIL_BYTES:
        return Check("memory", "fail", f"{detail}; the stack needs at least 1 GiB")
    if available < MEMORY_WARN_BYTES:
        return Check("memory", "warn", f"{detail}; 3 GiB or more is comfortable")
    return Check("memory", "ok", detail)


@dataclass(frozen=True)
class Targets:
    """The servers to check and where they come from."""

    where: str
    database_url: str | None
    nats_url: str | None
    nats_credentials: str | None
    redis_url: str | None
    failures: tuple[Check, ...] = ()
    server_log: Callable[[], str] | None = None


def _timed(check: Callable[[], str]) -> tuple[str, float]:
    started = time.perf_counter()
    detail = check()
    return detail, (time.perf_counter() - started) * 1000


def check_postgres(targets: Targets) -> Check:
    if targets.database_url is None:
        return next(c for c in targets.failures if c.name == "PostgreSQL")
    import psycopg

    def probe() -> str:
        assert targets.database_url is not None
        vector_self_check(targets.database_url, server_log=targets.server_log)
        with psycopg.connect(targets.database_url, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), "
                "(SELECT default_version FROM pg_available_extensions WHERE name = 'vector')"
            ).fetchone()
        assert row is not None
        return f"PostgreSQL {row[0]}, pgvector {row[1]}"

    try:
        versions, ms = _timed(probe)
    except Exception as error:
        return Check("PostgreSQL", "fail", f"{targets.where}: {error}")
    return Check(
        "PostgreSQL",
        "ok",
        f"{versions}: HNSW nearest-neighbour query over vector(384) in {ms:.0f} ms "
        f"({targets.where})",
    )


def check_nats(targets: Targets) -> Check:
    if targets.nats_url is None:
        return next(c for c in targets.failures if c.name == "NATS JetStream")
    from ticketflow.bootstrap import connect_nats

    async def publish() -> str:
        assert targets.nats_url is not None
        nc = await asyncio.wait_for(
            connect_nats(targets.nats_url, "ticketflow-doctor", targets.nats_credentials), 15
        )
        token = secrets.token_hex(6)
        stream, subject = f"TF_DOCTOR_{token}", f"tf.doctor.{token}"
        try:
            js = nc.jetstream()
            await js.add_stream(name=stream, subjects=[subject], storage="memory")
            try:
                ack = await js.publish(subject, b"ping", timeout=10)
                if ack.stream != stream or ack.seq != 1:
                    raise RuntimeError(f"unexpected acknowledgement {ack}")
            finally:
                await js.delete_stream(stream)
        finally:
            await nc.close()
        return "a JetStream publish was acknowledged"

    try:
        detail, ms = _timed(lambda: asyncio.run(publish()))
    except Exception as error:
        return Check("NATS JetStream", "fail", f"{targets.where}: {error or type(error).__name__}")
    return Check("NATS JetStream", "ok", f"{detail} in {ms:.0f} ms ({targets.where})")


def check_redis(targets: Targets) -> Check:
    if targets.redis_url is None:
        return next(c for c in targets.failures if c.name == "Redis")
    import redis

    def round_trip() -> str:
        assert targets.redis_url is not None
        client = redis.Redis.from_url(targets.redis_url, socket_timeout=10)
        try:
            key, value = f"tf:doctor:{secrets.token_hex(6)}", secrets.token_hex(8)
            client.set(key, value, ex=60)
            answered = client.get(key)
            client.delete(key)
            if answered != value.encode():
                raise RuntimeError(f"wrote {value!r}, read back {answered!r}")
            version = client.info("server").get("redis_version", "?")
        finally:
            client.close()
        return f"Redis {version}: SET, GET and DEL round trip"

    try:
        detail, ms = _timed(round_trip)
    except Exception as error:
        return Check("Redis", "fail", f"{targets.where}: {error}")
    return Check("Redis", "ok", f"{detail} in {ms:.0f} ms ({targets.where})")


@contextlib.contextmanager
def _temporary_servers() -> Iterator[Targets]:
    """Embedded servers on a temporary data directory, each started on its own so one that
    cannot start does not hide the others; all stopped and removed afterwards."""
    from ticketflow.postgres import PostgresServer, stop_postgres

    where = "embedded servers on a temporary data directory"
    root = Path(tempfile.mkdtemp(prefix="ticketflow-doctor-"))
    (root / "logs").mkdir()
    processes: list[Callable[[], None]] = []
    failures: list[Check] = []
    urls: dict[str, str | None] = {"database": None, "nats": None, "redis": None}
    credentials: str | None = None
    postgres = PostgresServer(root / "postgres", root / "logs" / "postgres.log")
    try:
        try:
            postgres.prepare()
            process = postgres.spawn()
            processes.append(lambda: stop_postgres(process))
            postgres.wait_ready(process)
            urls["database"] = postgres.url("postgres")
        except Exception as error:
            failures.append(Check("PostgreSQL", "fail", f"{where}: did not start: {error}"))
        try:
            authority = NatsAuthority.load_or_create(root / "nats-auth")
            port = free_port()
            args = nats_server_args(authority, root / "nats", port)
            nats = spawn(args, root / "logs" / "nats.log")
            processes.append(lambda: stop_process(nats))
            wait_for_port(port, nats, root / "logs" / "nats.log")
            urls["nats"] = f"nats://127.0.0.1:{port}"
            credentials = str(authority.service_credentials)
        except Exception as error:
            failures.append(Check("NATS JetStream", "fail", f"{where}: did not start: {error}"))
        try:
            (root / "redis").mkdir()
            port = free_port()
            redis_process = spawn(redis_server_args(root / "redis", port), root / "logs" / "r.log")
            processes.append(lambda: stop_process(redis_process))
            wait_for_port(port, redis_process, root / "logs" / "r.log")
            urls["redis"] = f"redis://127.0.0.1:{port}/0"
        except Exception as error:
            failures.append(Check("Redis", "fail", f"{where}: did not start: {error}"))
        yield Targets(
            where,
            urls["database"],
            urls["nats"],
            credentials,
            urls["redis"],
            tuple(failures),
            server_log=postgres.log_tail,
        )
    finally:
        for stop in reversed(processes):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(postgres.socket_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def server_targets(settings: Settings, stack: StackInfo | None) -> Iterator[Targets]:
    if stack is not None:
        log = settings.data_dir / "logs" / "postgres.log"
        offset = file_size(log)
        yield Targets(
            f"the running stack, pid {stack.pid}",
            settings.database_url or stack.database_url,
            settings.nats_url or stack.nats_url,
            str(settings.nats_credentials or stack.nats_credentials or "") or None,
            settings.redis_url or stack.redis_url,
            server_log=lambda: read_appended(log, offset),
        )
    elif not settings.uses_embedded_servers:
        yield Targets(
            "the servers of TF_DATABASE_URL, TF_NATS_URL and TF_REDIS_URL",
            settings.database_url,
            settings.nats_url,
            str(settings.nats_credentials) if settings.nats_credentials else None,
            settings.redis_url,
        )
    else:
        with _temporary_servers() as targets:
            yield targets


def _probe_model() -> str:
    from llama_cpp import Llama

    from inference.backends import smollm2_model_path

    path = smollm2_model_path()
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    output = llm.create_completion("The capital of France is", max_tokens=1, temperature=0)
    tokens = output["usage"]["completion_tokens"]  # type: ignore[index]
    size = path.stat().st_size / 1024**2
    return f"{path.name} ({size:.0f} MiB) loads in llama.cpp and generated {tokens} token"


def _probe_embedder() -> str:
    import math

    from inference.embeddings import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder().load()
    vectors = asyncio.run(embedder.embed(["A document about event sourcing."]))
    norm = math.sqrt(sum(v * v for v in vectors[0]))
    if len(vectors[0]) != embedder.dimension or abs(norm - 1) > 1e-3:
        raise RuntimeError(f"embedded into {len(vectors[0])} dimensions with norm {norm:.3f}")
    return f"{embedder.model_path.parent.name} embeds a sentence into {len(vectors[0])} dimensions"


PROBES: dict[str, Callable[[], str]] = {"model": _probe_model, "embedder": _probe_embedder}


# llama.cpp is compiled when ticketflow is installed, by default for every feature the CPU
# advertises; a virtual machine may advertise one it does not let programs use (AMX, say).
LLAMA_SIGILL = (
    "llama.cpp died with an illegal instruction (SIGILL): llama-cpp-python was compiled on "
    "install for the CPU features this machine advertises, and one of them does not work here. "
    "Rebuild it for x86-64-v3: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON "
    "-DGGML_F16C=ON -DGGML_BMI2=ON' .venv/bin/pip install --force-reinstall --no-deps "
    "--no-cache-dir llama-cpp-python"
)


def probe_command(name: str) -> list[str]:
    """The command that runs the probe `name` (a key of PROBES) in a process of its own."""
    return [sys.executable, "-m", "ticketflow.doctor", name]


def check_in_child(
    label: str, command: list[str], timeout: float = PROBE_TIMEOUT_S, on_sigill: str | None = None
) -> Check:
    """Run a probe in a child process: a crash there fails the check, not the doctor. The probe
    prints `{"detail": ...}` as its last line and exits 0 when it passes."""
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Check(label, "fail", f"did not finish within {timeout:.0f}s")
    if result.returncode == 0:
        try:
            return Check(label, "ok", str(json.loads(result.stdout.splitlines()[-1])["detail"]))
        except (IndexError, ValueError, KeyError):
            pass
    if result.returncode == -4:
        return Check(
            label,
            "fail",
            on_sigill or f"died with an illegal instruction (SIGILL); {describe_cpu()}",
        )
    if result.returncode < 0:
        return Check(label, "fail", f"died with signal {-result.returncode}")
    lines = (result.stdout + result.stderr).strip().splitlines()
    return Check(label, "fail", lines[-1] if lines else f"exited with {result.returncode}")


def run_checks(settings: Settings) -> list[Check]:
    stack = running_stack(settings.data_dir) if settings.uses_embedded_servers else None
    checks = [check_cpu()]
    checks += check_ports(settings, stack)
    checks += [check_disk(settings.data_dir), check_memory()]
    with server_targets(settings, stack) as targets:
        checks += [check_postgres(targets), check_nats(targets), check_redis(targets)]
    checks.append(
        check_in_child("model (llama.cpp)", probe_command("model"), on_sigill=LLAMA_SIGILL)
    )
    checks.append(check_in_child("embedder", probe_command("embedder")))
    return checks


_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def table(checks: list[Check]) -> Table:
    result = Table("check", "verdict", "detail", title="ticketflow doctor")
    for check in checks:
        style = _STYLE[check.verdict]
        result.add_row(check.name, f"[{style}]{check.verdict}[/{style}]", check.detail)
    return result


def _probe_main(name: str) -> int:
    """`python -m ticketflow.doctor <probe>`: one JSON line with the detail, or an error."""
    try:
        detail = PROBES[name]()
    except Exception as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"detail": detail}))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1]))
