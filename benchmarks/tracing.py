"""Tracing off against tracing on in one benchmark run: each mode in processes of its own.

The OpenTelemetry SDK is installed once per process (`ticketflow.telemetry.configure_tracing`),
so a benchmark that compares the two modes runs each in separate processes, spawned with the
`OTEL_*` environment of their mode: none at all for "off" (what a deployment without an
endpoint runs), and for "on" an OTLP/HTTP endpoint, the production BatchSpanProcessor with its
default settings, exporting to a real receiver (`benchmarks.otlp_receiver`) in a process of
its own, as a collector beside the services would run: it shares the machine with them, not the
interpreter of a measured process.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import trace

from benchmarks.otlp_receiver import OtlpReceiver
from ticketflow.telemetry import configure_tracing, tracing_wanted

MODES = ("off", "on")


def otel_environment(endpoint: str | None) -> dict[str, str]:
    """The `OTEL_*` variables of a process: none when tracing is off, else an OTLP/HTTP
    endpoint (protobuf, the default exporter), everything else at its default."""
    if endpoint is None:
        return {}
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }


def use_tracing(endpoint: str | None, service: str) -> None:
    """In a freshly started process: replace its `OTEL_*` environment by that of the mode and
    configure tracing as the process's entry point does. Fails if "on" did not take effect,
    or if "off" would still export."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        del os.environ[name]
    os.environ.update(otel_environment(endpoint))
    if endpoint is None:
        if tracing_wanted():
            raise RuntimeError("tracing is still wanted with no OTEL_* variables")
        return
    if not configure_tracing(service):
        raise RuntimeError(f"tracing did not start in {service} (endpoint {endpoint})")
    if not trace.get_tracer(service).start_span("probe").is_recording():
        raise RuntimeError(f"{service} configured tracing but its spans do not record")


def flush_tracing(timeout_ms: int = 30_000) -> bool:
    """Export every span still buffered in this process; True when there was nothing to do
    or everything went out."""
    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if not callable(force_flush):
        return True
    return bool(force_flush(timeout_ms))


def spans_note(counts: Mapping[tuple[str, str], int], requests: int) -> str:
    """One line: how many spans arrived, in how many export requests, by service and name."""
    parts = ", ".join(f"{service} {name!r} {n}" for (service, name), n in sorted(counts.items()))
    return f"spans received: {sum(counts.values())} in {requests} OTLP requests ({parts})"


@dataclass(frozen=True)
class Received:
    """What the receiver holds: (service, name, span id, parent span id) per span."""

    spans: list[tuple[str, str, str, str]]
    requests: int
    cpu_s: float
    """CPU seconds the receiver process has used so far (decoding what it received)."""

    def by_name(self) -> Counter[tuple[str, str]]:
        return Counter((service, name) for service, name, _, _ in self.spans)


class ReceiverProcess:
    """An `OtlpReceiver` in a spawned process, asked over a pipe for what it received."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), name="bench-otlp")
        self._process.start()
        child.close()
        if not self._conn.poll(60):
            self._process.terminate()
            raise RuntimeError("the OTLP receiver process did not start")
        self.endpoint: str = self._conn.recv()

    def received(self) -> Received:
        self._conn.send("received")
        spans, requests, cpu_s = self._conn.recv()
        return Received(spans, requests, cpu_s)

    def stop(self) -> None:
        if self._process.is_alive():
            self._conn.send("stop")
            self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
        self._conn.close()


def _serve(conn: multiprocessing.connection.Connection) -> None:
    receiver = OtlpReceiver().start()
    conn.send(receiver.endpoint)
    while (request := conn.recv()) != "stop":
        assert request == "received"
        spans, requests = receiver.received()
        conn.send(
            (
                [(s.service, s.name, s.span_id, s.parent_span_id) for s in spans],
                requests,
                time.process_time(),
            )
        )
    receiver.stop()
