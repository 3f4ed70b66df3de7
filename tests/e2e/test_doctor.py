"""`ticketflow doctor` as a user runs it: with no stack (it starts servers of its own for the
check and removes them) and with `ticketflow up` running (it checks that stack's servers)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ticketflow.embedded import StackInfo


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


@pytest.mark.timeout(420)  # 90 s for `up` to start, 240 s for `doctor`, 60 s to stop
def test_doctor_checks_the_running_stack(stack_env: dict[str, str], tmp_path: Path) -> None:
    data_dir = Path(stack_env["TF_DATA_DIR"])
    log = tmp_path / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-m", "ticketflow", "up"],
        env=stack_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while (info := StackInfo.read(data_dir)) is None or info.pid != up.pid:
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        _, rows = doctor(stack_env)
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
    for server in ("PostgreSQL", "NATS JetStream", "Redis"):
        verdict, detail = rows[server]
        assert verdict == "ok", rows[server]
        assert f"(the running stack, pid {up.pid})" in detail
    in_use = ("ok", f"in use by the running stack (pid {up.pid})")
    for variable, label in (
        ("TF_COMMANDS_PORT", "commands API"),
        ("TF_QUERIES_PORT", "query API"),
        ("TF_EMBEDDED_NATS_PORT", "NATS"),
        ("TF_EMBEDDED_REDIS_PORT", "Redis"),
    ):
        assert rows[f"port {stack_env[variable]} ({label})"] == in_use
