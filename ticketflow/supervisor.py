"""Runs ticketflow's processes as children and restarts any that crash, with backoff."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ticketflow.embedded import spawn

logger = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self._log_dir = log_dir
        self._env = env
        self._children: list[Child] = []

    def add(self, name: str, *cli_args: str) -> None:
        self._children.append(Child(name, [sys.executable, "-m", "ticketflow", *cli_args]))

    def start(self) -> None:
        for child in self._children:
            self._start(child)

    def _start(self, child: Child) -> None:
        child.process = spawn(child.args, self._log_dir / f"{child.name}.log", self._env)
        child.started_at = time.monotonic()
        logger.info("started %s (pid %d)", child.name, child.process.pid)

    def poll(self) -> None:
        """Restart children that exited; the delay doubles per quick crash, up to 30 s."""
        now = time.monotonic()
        for child in self._children:
            if child.process is None:
                if now >= child.next_start:
                    self._start(child)
                continue
            code = child.process.poll()
            if code is None:
                continue
            if now - child.started_at > 60:
                child.restarts = 0
            delay = min(30.0, 0.5 * 2**child.restarts)
            child.restarts += 1
            logger.error(
                "%s exited with code %s; restarting in %.1fs (see %s)",
                child.name,
                code,
                delay,
                self._log_dir / f"{child.name}.log",
            )
            child.process = None
            child.next_start = now + delay

    def stop(self, timeout: float = 15.0) -> None:
        running = [c.process for c in self._children if c.process and c.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
