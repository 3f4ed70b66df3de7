"""A local NATS JetStream cluster for tests: nodes that can be killed, restarted and wiped."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ticketflow.embedded import NatsNode, nats_node_args, wait_for_jetstream
from ticketflow.nats_auth import NatsAuthority
from ticketflow.processes import spawn, stop_process, wait_for_port


def distinct_free_ports(count: int) -> list[int]:
    """`count` free ports, all different: each is held while the next is chosen (one at a time,
    the kernel may hand out the same port twice, and a node's client and route ports clash)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
    return ports


@dataclass
class NatsCluster:
    authority: NatsAuthority
    directory: Path
    size: int = 3
    sync_interval: str | None = None
    nodes: list[NatsNode] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = distinct_free_ports(2 * self.size)
        self.nodes = [
            NatsNode(f"n{n + 1}", ports[2 * n], ports[2 * n + 1], self.directory / f"n{n + 1}")
            for n in range(self.size)
        ]
        self.processes = [None] * self.size

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{node.port}" for node in self.nodes)

    def log(self, index: int) -> Path:
        return self.directory / f"{self.nodes[index].name}.log"

    def start(self) -> NatsCluster:
        for index in range(self.size):
            self._launch(index)
        for index in range(self.size):
            self._wait(index)
        wait_for_jetstream(self.url, self.authority.service_credentials)
        return self

    def _launch(self, index: int) -> None:
        args = nats_node_args(
            self.authority, self.nodes[index], self.nodes, sync_interval=self.sync_interval
        )
        self.processes[index] = spawn(args, self.log(index))

    def _wait(self, index: int) -> None:
        process = self.processes[index]
        assert process is not None
        wait_for_port(self.nodes[index].port, process, self.log(index))

    def kill(self, index: int) -> None:
        """SIGKILL: no flush, no goodbye to the peers."""
        process = self.processes[index]
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        self.processes[index] = None

    def restart(self, index: int, *, empty: bool = False) -> None:
        """Starts a killed node again, on its store or (`empty`) on an empty one."""
        if self.processes[index] is not None:
            self.kill(index)
        if empty:
            shutil.rmtree(self.nodes[index].store, ignore_errors=True)
        self._launch(index)
        self._wait(index)

    def index_of(self, server_name: str) -> int:
        return next(n for n, node in enumerate(self.nodes) if node.name == server_name)

    def stop(self) -> None:
        for index, process in enumerate(self.processes):
            stop_process(process)
            self.processes[index] = None
