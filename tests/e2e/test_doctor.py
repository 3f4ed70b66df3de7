"""`ticketflow doctor` as a user runs it: with no stack (it starts servers of its own for the
check and removes them) and with a stack running (it checks that stack's servers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ticketflow.embedded import EmbeddedServers


def doctor(env: dict[str, str]) -> tuple[int, dict[str, tuple[str, str]]]:
    """Exit code and the table's rows: check -> (verdict, detail)."""
    result = subprocess.run(
        [sys.executable, "-m", "ticketflow", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    rows: dict[str, tuple[str, str]] = {}
    last = ""
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) != 5:
            continue
        if cells[1] and cells[2] in ("ok", "warn", "fail"):
            last = cells[1]
            rows[last] = (cells[2], cells[3])
        elif not cells[1] and last:  # a wrapped detail goes on in the next line
            rows[last] = (rows[last][0], f"{rows[last][1]} {cells[3]}")
    assert rows, result.stdout + result.stderr
    return result.returncode, rows


EXPECTED = {
    "CPU",
    "disk",
    "memory",
    "PostgreSQL",
    "NATS JetStream",
    "Redis",
    "model (llama.cpp)",
    "embedder",
}


@pytest.mark.timeout(300)  # `doctor` itself is given 240 s
def test_doctor_checks_servers_of_its_own_and_fails_on_a_taken_port(
    stack_env: dict[str, str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(stack_env["TF_COMMANDS_PORT"])))
        taken.listen()
        code, rows = doctor(stack_env)
    assert code == 1
    assert set(rows) >= EXPECTED
    commands = rows[f"port {stack_env['TF_COMMANDS_PORT']} (commands API)"]
    assert commands[0] == "fail"
    assert "TF_COMMANDS_PORT" in commands[1]
    assert rows[f"port {stack_env['TF_QUERIES_PORT']} (query API)"] == ("ok", "free")
    assert rows["CPU"][0] == "ok"
    for server in ("PostgreSQL", "NATS JetStream", "Redis"):
        assert rows[server][0] == "ok", rows[server]
    assert "HNSW nearest-neighbour query" in rows["PostgreSQL"][1]
    assert rows["embedder"][0] == "ok", rows["embedder"]
    # Nothing of the check is left behind, and the data directory was not touched.
    assert not Path(stack_env["TF_DATA_DIR"]).exists()


@pytest.mark.timeout(300)  # `doctor` itself is given 240 s
def test_doctor_checks_the_running_stack(stack_env: dict[str, str]) -> None:
    """The servers of the stack on the data directory (started here as `ticketflow up` starts
    them, without the APIs and workers, which do not matter to the check) are the ones checked,
    and the ports that stack holds are not reported as taken."""
    data_dir = Path(stack_env["TF_DATA_DIR"])
    servers = EmbeddedServers(
        data_dir,
        nats_port=int(stack_env["TF_EMBEDDED_NATS_PORT"]),
        redis_port=int(stack_env["TF_EMBEDDED_REDIS_PORT"]),
    )
    servers.start()
    try:
        servers.info(
            commands_url=f"http://127.0.0.1:{stack_env['TF_COMMANDS_PORT']}",
            queries_url=f"http://127.0.0.1:{stack_env['TF_QUERIES_PORT']}",
        ).write(data_dir)
        pids = servers.pids()
        _, rows = doctor(stack_env)
        assert servers.pids() == pids  # checked, not restarted
    finally:
        servers.stop()
    for server in ("PostgreSQL", "NATS JetStream", "Redis"):
        verdict, detail = rows[server]
        assert verdict == "ok", rows[server]
        assert f"(the running stack, pid {os.getpid()})" in detail
    in_use = ("ok", f"in use by the running stack (pid {os.getpid()})")
    for variable, label in (
        ("TF_COMMANDS_PORT", "commands API"),
        ("TF_QUERIES_PORT", "query API"),
        ("TF_EMBEDDED_NATS_PORT", "NATS"),
        ("TF_EMBEDDED_REDIS_PORT", "Redis"),
    ):
        assert rows[f"port {stack_env[variable]} ({label})"] == in_use
