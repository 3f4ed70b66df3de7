"""docs/deployment.md, followed on one machine: each process of its own from the systemd units.

The "external" servers are embedded ones started apart (`EmbeddedServers` on a temporary
directory), the way an operator's PostgreSQL, NATS and Redis would be. The settings are the
guide's: a shared `ticketflow.env` and one file per process, read as systemd reads them, with the
units' own `Environment=` and `ExecStart=` (only /etc/ticketflow, /var/lib/ticketflow and
/opt/ticketflow are moved into the test's directory). NATS is down while the processes start, as
the guide's start-up section allows: the command API serves and its `/health` names NATS, the
workers wait; once NATS is up both APIs are ready and a `document-qa` ticket goes through.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support import random_tenant, short_docx
from tests.unit.test_systemd_units import (
    INSTALLED,
    UNITS,
    environment_assignments,
    parse_environment_file,
    parse_unit,
)
from ticketflow.auth import JwtCodec
from ticketflow.embedded import EmbeddedServers, free_port

JWT_SECRET = "deployment-guide-test-secret-of-enough-length"
APIS = ("commands", "queries")
WORKERS = ("relay", "ingest", "inference", "projector")


@dataclass
class Machine:
    """Where the units' paths point in this test."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "ticketflow"

    @property
    def state(self) -> Path:
        return self.root / "var" / "lib" / "ticketflow"

    def localise(self, text: str) -> str:
        ticketflow = str(Path(sys.executable).parent / "ticketflow")
        return (
            text.replace(INSTALLED, ticketflow)
            .replace("/etc/ticketflow", str(self.etc))
            .replace("/var/lib/ticketflow", str(self.state))
        )

    def command(self, unit_name: str, instance: str = "") -> tuple[list[str], dict[str, str]]:
        """The unit's ExecStart and the environment systemd would give it."""
        unit = parse_unit(self.localise((UNITS / unit_name).read_text()), instance)
        env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
        for assignments in unit.values("Service", "Environment"):
            env.update(environment_assignments(assignments))
        for entry in unit.values("Service", "EnvironmentFile"):
            optional = entry.startswith("-")
            path = Path(entry.removeprefix("-"))
            if optional and not path.exists():
                continue
            env.update(parse_environment_file(path.read_text()))
        return shlex.split(unit.value("Service", "ExecStart")), env


@dataclass
class Running:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return f"--- {self.name} ---\n" + self.log.read_text(errors="replace")[-3000:]


def write_settings(machine: Machine, servers: EmbeddedServers) -> dict[str, int]:
    """The guide's /etc/ticketflow: ticketflow.env for all, <process>.env for each."""
    machine.etc.mkdir(parents=True)
    machine.state.mkdir(parents=True)
    key = machine.etc / "audit-signing-key.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (machine.etc / "ticketflow.env").write_text(
        "# shared by every ticketflow process of this machine\n"
        "TF_ENV=production\n"
        f"TF_DATABASE_URL={servers.database_url}\n"
        f'TF_NATS_URL="{servers.nats_url}"\n'
        f"TF_NATS_CREDENTIALS={servers.nats_credentials}\n"
        f"TF_REDIS_URL={servers.redis_url}\n"
        f"TF_JWT_SECRET={JWT_SECRET}\n"
        f"TF_AUDIT_SIGNING_KEY={key}\n"
        "TF_HOST=127.0.0.1\n"
    )
    ports = {name: free_port() for name in (*APIS, *WORKERS)}
    (machine.etc / "commands.env").write_text(f"TF_COMMANDS_PORT={ports['commands']}\n")
    (machine.etc / "queries.env").write_text(f"TF_QUERIES_PORT={ports['queries']}\n")
    for worker in WORKERS:
        (machine.etc / f"{worker}.env").write_text(
            f"TF_METRICS_PORT_{worker.upper()}={ports[worker]}\n"
        )
    return ports


def wait_until(
    condition: Callable[[], bool], what: str, timeout: float, running: list[Running]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in running:
            assert proc.process.poll() is None, f"{proc.name} exited\n{proc.tail()}"
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not {what} within {timeout}s\n" + "\n".join(p.tail() for p in running))


def status_of(url: str) -> int:
    return httpx.get(url, timeout=3).status_code


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[EmbeddedServers]:
    servers = EmbeddedServers(tmp_path / "servers", nats_port=free_port(), redis_port=free_port())
    servers.start()
    try:
        yield servers
    finally:
        servers.stop()


# Six processes importing torch, the embedder and the model at once: about three minutes on a
# loaded two-core machine, most of it start-up.
@pytest.mark.timeout(270)
def test_processes_started_as_the_guide_says(tmp_path: Path, servers: EmbeddedServers) -> None:
    machine = Machine(tmp_path / "machine")
    ports = write_settings(machine, servers)
    commands = f"http://127.0.0.1:{ports['commands']}"
    queries = f"http://127.0.0.1:{ports['queries']}"

    # NATS is away while everything starts (the guide: any order once migrated).
    os.kill(servers.pids()["nats"], signal.SIGKILL)

    argv, env = machine.command("ticketflow-migrate.service")
    migrated = subprocess.run(
        argv, check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "applied: " in migrated.stdout + migrated.stderr, migrated.stderr

    running: list[Running] = []
    try:
        for unit_name, instances in (
            ("ticketflow-api@.service", APIS),
            ("ticketflow-worker@.service", WORKERS),
        ):
            for instance in instances:
                argv, env = machine.command(unit_name, instance)
                assert env["TF_ENV"] == "production"
                log = tmp_path / f"{instance}.log"
                process = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=env["TF_DATA_DIR"],
                    stdout=log.open("wb"),
                    stderr=subprocess.STDOUT,
                )
                running.append(Running(instance, process, log))

        # The command API serves without NATS and says so; workers wait instead of exiting.
        wait_until(
            lambda: status_of(f"{commands}/health/live") == 200,
            "the command API live",
            90,
            running,
        )
        health = httpx.get(f"{commands}/health", timeout=5)
        assert health.status_code == 503, health.text
        assert health.headers["Retry-After"]
        assert health.json() == {
            "status": "degraded",
            "checks": {"database": "ok", "nats": "unavailable", "redis": "ok"},
        }

        # NATS comes back on its address: both APIs become ready, the workers connect.
        def nats_back() -> bool:
            servers.poll()
            return "nats" in servers.pids()

        wait_until(nats_back, "NATS restarted", 30, running)
        wait_until(lambda: status_of(f"{commands}/health") == 200, "commands ready", 60, running)
        wait_until(lambda: status_of(f"{queries}/health") == 200, "queries ready", 150, running)
        assert httpx.get(f"{commands}/docs", timeout=5).status_code == 404  # production

        tenant = random_tenant()
        codec = JwtCodec(JWT_SECRET, issuer="ticketflow", audience="ticketflow")
        token = codec.mint(subject="operator", tenant=tenant, roles=["user"])
        auth = {"Authorization": f"Bearer {token}"}
        created = httpx.post(
            f"{commands}/tickets",
            headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
            files={"file": ("lighthouse.docx", short_docx(), "application/octet-stream")},
            data={
                "pipeline": "document-qa",
                "options": '{"question": "When was the lighthouse built?"}',
            },
            timeout=30,
        )
        assert created.status_code == 202, created.text
        ticket = f"{queries}/tickets/{created.json()['ticket_id']}"

        def finished() -> bool:
            response = httpx.get(ticket, headers=auth, timeout=5)
            return response.status_code == 200 and response.json()["status"] in {
                "completed",
                "failed",
            }

        wait_until(finished, "the ticket finished", 120, running)
        detail = httpx.get(ticket, headers=auth, timeout=5).json()
        assert detail["status"] == "completed", detail

        # Every worker serves its metrics on the port of its own settings file.
        for worker in WORKERS:
            metrics = httpx.get(f"http://127.0.0.1:{ports[worker]}/metrics", timeout=5)
            assert metrics.status_code == 200, worker
            assert "ticketflow_" in metrics.text, worker
        relay_metrics = httpx.get(f"http://127.0.0.1:{ports['relay']}/metrics", timeout=5)
        assert "ticketflow_relay_lag_positions" in relay_metrics.text
    finally:
        for proc in running:
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                proc.process.wait(30)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait(10)
