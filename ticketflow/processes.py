"""Child processes that never outlive the process that started them.

Every server and worker of the stack is started by `spawn`: on Linux the kernel sends the child a
signal of its choice when its parent dies (PR_SET_PDEATHSIG), even by `kill -9`, so no server or
worker is left running without the supervisor that restarts and stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1


@lru_cache(maxsize=1)
def _prctl() -> Any:
    # Looked up in the parent: loading a library between fork and exec can deadlock.
    return ctypes.CDLL(None, use_errno=True).prctl


def _child_setup(death_signal: signal.Signals, parent: int) -> Callable[[], None]:
    """What the child runs before exec, after any change of user (which would clear the
    parent-death signal): ask for `death_signal` when the parent dies, and unblock the stop
    signals that `ticketflow up` blocks in itself to collect them."""
    prctl = _prctl()

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        prctl(_PR_SET_PDEATHSIG, int(death_signal))
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return setup


def spawn(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    death_signal: signal.Signals = signal.SIGTERM,
    user: tuple[int, int] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `args` with stdout and stderr appended to `log_path`.

    `user` is a (uid, gid) to run as (only root can ask); `death_signal` is what the child gets
    when the thread that started it dies.
    """
    log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - the child owns it from here
    linux = sys.platform == "linux"
    try:
        return subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            user=user[0] if user else None,
            group=user[1] if user else None,
            extra_groups=[] if user else None,
            preexec_fn=_child_setup(death_signal, os.getpid()) if linux else None,  # noqa: PLW1509
        )
    finally:
        log.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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


def stop_process(
    process: subprocess.Popen[bytes] | None,
    timeout: float = 10.0,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(stop_signal)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_appended(path: Path, offset: int) -> str:
    """What was appended to the log `path` since it was `offset` bytes long."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
