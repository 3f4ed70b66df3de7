"""Telemetry set-up for every process: OpenTelemetry traces and Prometheus metrics.

Traces follow the standard `OTEL_*` environment variables. Nothing is exported (and no SDK is
installed, so every span is a no-op) unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; spans then go over OTLP/HTTP (protobuf), or gRPC
when `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL=grpc` and `opentelemetry-exporter-otlp-proto-grpc`
is installed. `OTEL_SERVICE_NAME` overrides each process's own name (`ticketflow-relay`, …);
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn tracing off. Batching, sampling
and the exporter's timeouts follow their `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER*` and
`OTEL_EXPORTER_OTLP_*` variables. See docs/adr/0023-observability.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streams.contract.tracing import context_of, span_from

logger = logging.getLogger(__name__)

_configured: str | None = None
_lock = threading.Lock()


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def tracing_wanted() -> bool:
    """Whether the environment asks for traces to be exported."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return False
    if _env("OTEL_TRACES_EXPORTER").lower() == "none":
        return False
    return bool(_env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service: str) -> bool:
    """Install the OpenTelemetry SDK in this process, named `service` unless
    `OTEL_SERVICE_NAME` says otherwise. Once per process (a second call keeps the first set-up);
    returns whether spans are exported."""
    global _configured  # noqa: PLW0603 - one tracer provider per process
    with _lock:
        if _configured is not None:
            return True
        if not tracing_wanted():
            return False
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = _env("OTEL_SERVICE_NAME") or service
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        provider.add_span_processor(BatchSpanProcessor(_exporter()))
        trace.set_tracer_provider(provider)
        _configured = name
        logger.info("tracing: exporting spans as %s", name)
        return True


def _exporter() -> Any:
    protocol = (
        _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
    ).lower()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            logger.warning(
                "tracing: OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs "
                "opentelemetry-exporter-otlp-proto-grpc; exporting over HTTP instead"
            )
        else:
            return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown_tracing() -> None:
    """Export what is still buffered (a process about to exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


class TracingMiddleware:
    """A server span per HTTP request (`POST /tickets`), child of the request's `traceparent`
    header when it has one. The route template names the span once the router matched it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._tracer = trace.get_tracer("ticketflow.http")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _configured is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        with self._tracer.start_as_current_span(
            f"{method} {scope['path']}",
            context=context_of(headers.get("traceparent")),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            status = 500

            async def send_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None)
                if template:
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.route", template)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))


def traced_consumer(
    consumer: str, handle: Callable[[Msg], Awaitable[None]]
) -> Callable[[Msg], Awaitable[None]]:
    """`handle`, each message in a consumer span `process <event>`, child of the traceparent
    the message carries (the span of the command that appended the event)."""

    async def traced(message: Msg) -> None:
        headers = message.headers or {}
        event = message.subject.rsplit(".", 1)[-1]
        attributes: dict[str, Any] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": message.subject,
            "messaging.consumer.group.name": consumer,
            "messaging.message.id": headers.get("Nats-Msg-Id", ""),
        }
        with contextlib.suppress(Exception):  # a message built outside JetStream has none
            attributes["messaging.nats.delivered"] = message.metadata.num_delivered or 1
        with span_from(
            "ticketflow.handlers",
            f"process {event}",
            headers.get("traceparent"),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ):
            await handle(message)

    return traced


def now_ns() -> int:
    return time.time_ns()
