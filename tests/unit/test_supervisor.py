"""The supervisor restarts what dies, with backoff, and stops everything; processes started by
`spawn` die with their parent. Real (tiny) processes, no servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ticketflow.processes import spawn
from ticketflow.supervisor import Supervisor


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(30)
def test_a_killed_child_is_relaunched_and_backoff_grows_with_quick_crashes(
    tmp_path: Path,
) -> None:
    supervisor = Supervisor(tmp_path)
    launches: list[int] = []

    def launch() -> subprocess.Popen[bytes]:
        process = spawn(["sleep", "60"], tmp_path / "sleeper.log")
        launches.append(process.pid)
        return process

    supervisor.add_process("sleeper", launch, first_delay=0.1, max_delay=0.4)
    supervisor.start()
    try:
        first = supervisor.pid("sleeper")
        assert first == launches[0]
        delays = []
        for _ in range(3):
            pid = supervisor.pid("sleeper")
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda pid=pid: _polled_new_pid(supervisor, pid))
            delays.append(time.monotonic() - killed_at)
        assert len(set(launches)) == 4
        # 0.1 s, then 0.2 s, then 0.4 s (the cap): each restart waits at least its delay.
        assert delays[0] >= 0.1
        assert delays[1] >= 0.2
        assert delays[2] >= 0.4
    finally:
        supervisor.stop()
    assert all(not alive(pid) for pid in launches)


def _polled_pid(supervisor: Supervisor, name: str) -> int | None:
    supervisor.poll()
    return supervisor.pid(name)


def _polled_new_pid(supervisor: Supervisor, old: int) -> bool:
    supervisor.poll()
    pid = supervisor.pid("sleeper")
    return pid is not None and pid != old


@pytest.mark.timeout(30)
def test_a_launch_that_fails_is_retried_with_backoff(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path)
    attempts: list[float] = []

    def launch() -> subprocess.Popen[bytes]:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise OSError("not yet")
        return spawn(["sleep", "60"], tmp_path / "late.log")

    supervisor.add_process("late", launch, first_delay=0.1, max_delay=1.0)
    try:
        wait_for(lambda: _polled_pid(supervisor, "late") is not None)
        assert len(attempts) == 3
        assert attempts[1] - attempts[0] >= 0.1
        assert attempts[2] - attempts[1] >= 0.2
    finally:
        supervisor.stop()


@pytest.mark.timeout(30)
def test_stop_escalates_to_the_next_signal_when_a_child_ignores_the_first(
    tmp_path: Path,
) -> None:
    script = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    supervisor = Supervisor(tmp_path)
    supervisor.add_process(
        "stubborn",
        lambda: spawn([sys.executable, "-c", script], tmp_path / "stubborn.log"),
        stop_signals=((signal.SIGINT, 0.5), (signal.SIGTERM, 5.0)),
    )
    supervisor.start()
    pid = supervisor.pid("stubborn")
    assert pid is not None
    time.sleep(0.5)  # let it install its handler
    started = time.monotonic()
    supervisor.stop()
    assert not alive(pid)
    assert 0.5 <= time.monotonic() - started < 5.0


@pytest.mark.timeout(30)
def test_a_spawned_child_gets_its_death_signal_when_its_parent_is_killed(
    tmp_path: Path,
) -> None:
    """The parent is a Python process that spawns `sleep` and waits; kill -9 of the parent
    takes the child with it."""
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import signal, sys, time\n"
        "from pathlib import Path\n"
        "from ticketflow.processes import spawn\n"
        f"child = spawn(['sleep', '60'], Path({str(tmp_path / 'child.log')!r}), "
        "death_signal=signal.SIGTERM)\n"
        f"Path({str(pid_file)!r}).write_text(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        wait_for(pid_file.exists)
        child = int(pid_file.read_text())
        assert alive(child)
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: not alive(child), timeout=5)
