"""Helpers for end-to-end tests that run `ticketflow up`: start it, find its processes, wait."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ticketflow.embedded import StackInfo

# Embedded server name -> its executable's name.
SERVERS = {"postgres": "postgres", "nats": "nats-server", "redis": "redis-server"}


def start_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ticketflow", "up"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def stack_processes(data_dir: Path) -> dict[int, str]:
    """Every live process of the stack on `data_dir`: servers (their data directory is in their
    command line or is their working directory, as for PostgreSQL's backends and Redis) and
    ticketflow's own processes (TF_DATA_DIR in their environment). pid -> executable name."""
    data = str(data_dir.resolve())
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        base = f"/proc/{entry}"
        stat = _read(f"{base}/stat").decode(errors="replace")
        if not stat or stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        try:
            cwd = os.readlink(f"{base}/cwd")
            executable = os.path.basename(os.readlink(f"{base}/exe"))
        except OSError:
            continue
        mine = (
            cwd == data
            or cwd.startswith(data + "/")
            or data.encode() in _read(f"{base}/cmdline")
            or f"TF_DATA_DIR={data}\0".encode() in _read(f"{base}/environ")
        )
        if mine:
            found[int(entry)] = executable
    return found


def _children(parent: int) -> list[int]:
    """The live (not zombie) children of `parent`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _read(f"/proc/{entry}/stat").decode(errors="replace").rsplit(")", 1)[-1].split()
        if len(fields) >= 2 and int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(entry))
    return found


def server_pid(up: subprocess.Popen[bytes], name: str) -> int | None:
    """The pid of the embedded server `name` that `up` runs (one of its children)."""
    for pid in _children(up.pid):
        try:
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) == SERVERS[name]:
                return pid
        except OSError:
            continue
    return None


def process_pid(up: subprocess.Popen[bytes], *cli_args: str) -> int | None:
    """The pid of `up`'s child `python -m ticketflow <cli_args>` (`serve commands`, …)."""
    wanted = ["-m", "ticketflow", *cli_args]
    for pid in _children(up.pid):
        argv = _read(f"/proc/{pid}/cmdline").decode(errors="replace").split("\0")
        if any(argv[i : i + len(wanted)] == wanted for i in range(len(argv))):
            return pid
    return None


def wait_for(
    condition: Callable[[], object], what: str, timeout: float, up: subprocess.Popen[bytes]
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        assert up.poll() is None, f"ticketflow up exited with {up.returncode}"
        try:
            result = condition()
            if result:
                return result
        except Exception as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {error}") from error
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.2)


def servers_started(data_dir: Path, up: subprocess.Popen[bytes]) -> StackInfo | None:
    """The stack's addresses, once `up` has started its servers and migrated the database."""
    info = StackInfo.read(data_dir)
    return info if info is not None and info.pid == up.pid else None
