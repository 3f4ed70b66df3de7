"""The W3C `traceparent` that events carry, as OpenTelemetry context.

Every stored event names, in its `traceparent`, the span of the command that appended it; the
relay copies it into the message's headers. Whoever processes an event later (the relay's
publish, a consumer, the projector, the query API's progress stream) starts its span as a child
of that one, so one ticket's work, across every process, is one trace.

These helpers only use the OpenTelemetry API: with no SDK configured in the process (no
`OTEL_EXPORTER_OTLP_*` endpoint, see `ticketflow/telemetry.py`) every span is a no-op.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

_PROPAGATOR = TraceContextTextMapPropagator()

Attributes = Mapping[str, AttributeValue]


def context_of(traceparent: str | None) -> Context | None:
    """The context whose current span is the one `traceparent` names; None when it is absent
    or malformed (the span then starts a trace of its own)."""
    if not traceparent:
        return None
    context = _PROPAGATOR.extract({"traceparent": traceparent})
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def traceparent_of(span: Span) -> str | None:
    """`span` as a W3C traceparent, or None for an invalid span."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The traceparent of the span being recorded in this context, if any."""
    span = trace.get_current_span()
    return traceparent_of(span) if span.is_recording() else None


@functools.cache
def tracer_named(name: str) -> Tracer:
    """The tracer called `name`, looked up once per process: `trace.get_tracer` reads the
    environment on every call while no SDK is installed. Before `set_tracer_provider` it is a
    proxy that follows the provider installed later; OpenTelemetry installs one per process."""
    return trace.get_tracer(name)


@contextmanager
def span_from(
    tracer: str,
    name: str,
    traceparent: str | None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
    prefer_current: bool = False,
) -> Iterator[Span]:
    """A span, made current, that is a child of `traceparent` (the event's stored one).

    With `prefer_current`, a span already being recorded in this context is the parent instead
    (a command sent by a handler belongs under the handler's own span)."""
    parent = None
    if not (prefer_current and trace.get_current_span().is_recording()):
        parent = context_of(traceparent)
    with tracer_named(tracer).start_as_current_span(
        name, context=parent, kind=kind, attributes=attributes
    ) as span:
        yield span


def record_span(
    tracer: str,
    name: str,
    traceparent: str | None,
    *,
    start_ns: int,
    end_ns: int,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
    error: str | None = None,
) -> None:
    """A span that already happened (from `start_ns` to `end_ns`, `time.time_ns()` clock),
    child of `traceparent`; never made current (safe between an async generator's yields).
    Nothing is recorded for an event with no traceparent: it belongs to no trace."""
    parent = context_of(traceparent)
    if parent is None:
        return
    span = tracer_named(tracer).start_span(
        name,
        context=parent,
        kind=kind,
        attributes=attributes,
        start_time=start_ns,
    )
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)
