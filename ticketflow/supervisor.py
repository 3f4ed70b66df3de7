"""Runs processes as children and restarts any that die, with backoff.

The same mechanism runs ticketflow's own processes (APIs and workers) and the embedded servers
(PostgreSQL, NATS, Redis): a child is a name, a way to launch it and a way to stop it. A server
is relaunched with the same arguments, so it comes back on the same data, port and socket.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ticketflow.processes import spawn

logger = logging.getLogger(__name__)

# A child that ran this long before it died is restarted after the shortest delay again.
STABLE_AFTER_S = 60.0

StopSignals = tuple[tuple[signal.Signals, float], ...]
"""How to stop a child: each signal in turn, waiting that many seconds; then SIGKILL."""
TERMINATE: StopSignals = ((signal.SIGTERM, 15.0),)


@dataclass
class Child:
    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    log_path: Path
    stop_signals: StopSignals = TERMINATE
    first_delay: float = 0.5
    max_delay: float = 30.0
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self._log_dir = log_dir
        self._env = env
        self._children: list[Child] = []

    def add(self, name: str, *cli_args: str, env: dict[str, str] | None = None) -> None:
        """A ticketflow process (`python -m ticketflow <cli_args>`), logging to `<name>.log`;
        `env` adds to (or overrides) the supervisor's environment for this process.

        It is killed outright if the supervisor dies: the servers it talks to go down at the
        same moment, so a graceful shutdown could only hang on them, and every process of the
        stack is built to survive a crash (JetStream redelivers, read models commit their
        position with their changes, commands are idempotent).
        """
        args = [sys.executable, "-m", "ticketflow", *cli_args]
        log_path = self._log_dir / f"{name}.log"
        child_env = {**(self._env if self._env is not None else os.environ), **env} if env else None
        self.add_process(
            name,
            lambda: spawn(args, log_path, child_env or self._env, death_signal=signal.SIGKILL),
            log_path=log_path,
        )

    def add_process(
        self,
        name: str,
        launch: Callable[[], subprocess.Popen[bytes]],
        *,
        stop_signals: StopSignals = TERMINATE,
        log_path: Path | None = None,
        running: subprocess.Popen[bytes] | None = None,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> None:
        """Supervise the process `launch` starts; `running` is one already started by it.

        After a crash the child is relaunched after `first_delay` seconds, doubling per quick
        crash up to `max_delay`.
        """
        child = Child(
            name,
            launch,
            log_path or self._log_dir / f"{name}.log",
            stop_signals,
            first_delay=first_delay,
            max_delay=max_delay,
        )
        if running is not None:
            child.process = running
            child.started_at = time.monotonic()
        self._children.append(child)

    def start(self) -> None:
        """Start every child that is not running yet."""
        for child in self._children:
            if child.process is None:
                self._start(child)

    def pid(self, name: str) -> int | None:
        for child in self._children:
            if child.name == name and child.process is not None:
                return child.process.pid
        return None

    def _start(self, child: Child) -> None:
        child.process = child.launch()
        child.started_at = time.monotonic()
        logger.info("started %s (pid %d)", child.name, child.process.pid)

    def poll(self) -> None:
        """Restart children that exited, each after its backoff delay."""
        now = time.monotonic()
        for child in self._children:
            if child.process is None:
                if now >= child.next_start:
                    try:
                        self._start(child)
                    except Exception:
                        delay = self._schedule_restart(child, now, ran=False)
                        logger.exception("could not start %s; next try in %.1fs", child.name, delay)
                continue
            code = child.process.poll()
            if code is None:
                continue
            delay = self._schedule_restart(child, now)
            logger.error(
                "%s exited with code %s; restarting in %.1fs (see %s)",
                child.name,
                code,
                delay,
                child.log_path,
            )

    def _schedule_restart(self, child: Child, now: float, *, ran: bool = True) -> float:
        if ran and now - child.started_at > STABLE_AFTER_S:
            child.restarts = 0
        delay = min(child.max_delay, child.first_delay * 2.0**child.restarts)
        child.restarts += 1
        child.process = None
        child.next_start = now + delay
        return delay

    def stop(self) -> None:
        """Stop every child: the first stop signal to all at once, then wait for each (the last
        added first), escalating to its next signal, and SIGKILL, when it takes too long."""
        running = [c for c in self._children if c.process and c.process.poll() is None]
        for child in running:
            assert child.process is not None
            child.process.send_signal(child.stop_signals[0][0])
        for child in reversed(running):
            assert child.process is not None
            _wait_stopped(child.process, child.stop_signals)
        for child in self._children:
            child.process = None


def _wait_stopped(process: subprocess.Popen[bytes], stop_signals: StopSignals) -> None:
    for index, (sig, patience) in enumerate(stop_signals):
        if index:
            process.send_signal(sig)
        try:
            process.wait(patience)
            return
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    process.wait()
