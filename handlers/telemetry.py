"""Spans and metrics of the handlers' steps: extract, chunk, embed; prompt, model call, validate.

Spans use the OpenTelemetry API only (no-ops unless the process configured the SDK); metrics go
to the process's default Prometheus registry, which the worker's metrics endpoint serves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram

from inference.backends import Generation
from streams.contract.tracing import context_of, span_from, tracer_named

TRACER = "ticketflow.handlers"

SUBTASK_SECONDS = Histogram(
    "ticketflow_subtask_duration_seconds",
    "Time of one subtask attempt in the inference worker, from start to recorded outcome",
    ["pipeline", "subtask", "outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
)
MODEL_SECONDS = Histogram(
    "ticketflow_model_call_duration_seconds",
    "Time of one model call (one subtask's generation)",
    ["backend", "model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
)
MODEL_TOKENS = Counter(
    "ticketflow_model_tokens",
    "Tokens the model read (prompt) and wrote (completion)",
    ["backend", "model", "kind"],
)
MODEL_CACHED_TOKENS = Counter(
    "ticketflow_model_cached_prompt_tokens",
    "Prompt tokens served from the backend's prefix cache",
    ["backend", "model"],
)
MODEL_TOKENS_PER_SECOND = Histogram(
    "ticketflow_model_output_tokens_per_second",
    "Completion tokens per second of each model call",
    ["backend", "model"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)


@contextmanager
def step(name: str, **attributes: str | int | float | bool) -> Iterator[Span]:
    """A span for one step of a handler, child of the span current in the caller."""
    with tracer_named(TRACER).start_as_current_span(name, attributes=attributes) as span:
        yield span


@contextmanager
def for_work(
    name: str, traceparent: str | None, **attributes: str | int | float | bool
) -> Iterator[Span]:
    """A span for one subtask's step, child of the traceparent its `subtask_ready` carried."""
    with span_from(TRACER, name, traceparent, attributes=attributes) as span:
        yield span


@dataclass
class ModelCalls:
    """One generative-AI span per request of a batch, each in its own subtask's trace."""

    traceparents: Sequence[str | None]
    backend: str
    model: str
    subtasks: Sequence[tuple[str, int]]
    """Each request's subtask and attempt."""
    started_ns: int = field(default_factory=time.time_ns)

    def finish(self, generations: Sequence[Generation] | None, error: str | None = None) -> None:
        ended = time.time_ns()
        tracer = tracer_named(TRACER)
        for index, traceparent in enumerate(self.traceparents):
            generation = generations[index] if generations is not None else None
            model = generation.model if generation is not None else self.model
            backend = generation.backend if generation is not None else self.backend
            span = tracer.start_span(
                f"chat {model}",
                context=context_of(traceparent),
                kind=SpanKind.CLIENT,
                start_time=self.started_ns,
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.system": backend,
                    "gen_ai.provider.name": backend,
                    "gen_ai.request.model": self.model,
                    "ticketflow.backend": backend,
                    "ticketflow.subtask": self.subtasks[index][0],
                    "ticketflow.attempt": self.subtasks[index][1],
                    "ticketflow.batch_size": len(self.traceparents),
                },
            )
            if generation is not None:
                span.set_attributes(
                    {
                        "gen_ai.response.model": generation.model,
                        "gen_ai.usage.input_tokens": generation.prompt_tokens,
                        "gen_ai.usage.output_tokens": generation.completion_tokens,
                        "gen_ai.usage.cached_tokens": generation.cached_tokens,
                        "gen_ai.usage.cache_read.input_tokens": generation.cached_tokens,
                        "ticketflow.latency_ms": generation.latency_ms,
                    }
                )
                _observe(generation)
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
                span.set_attribute("error.type", error)
            span.end(end_time=ended)


def _observe(generation: Generation) -> None:
    labels = (generation.backend, generation.model)
    MODEL_SECONDS.labels(*labels).observe(generation.latency_ms / 1000)
    MODEL_TOKENS.labels(*labels, "prompt").inc(generation.prompt_tokens)
    MODEL_TOKENS.labels(*labels, "completion").inc(generation.completion_tokens)
    MODEL_CACHED_TOKENS.labels(*labels).inc(generation.cached_tokens)
    if generation.latency_ms > 0:
        MODEL_TOKENS_PER_SECOND.labels(*labels).observe(
            generation.completion_tokens / (generation.latency_ms / 1000)
        )


@contextmanager
def model_calls(
    traceparents: Sequence[str | None],
    backend: str,
    model: str,
    subtasks: Sequence[tuple[str, int]],
) -> Iterator[ModelCalls]:
    """Around one call of the backend: `calls.finish(generations)` once it answered; a failure
    ends every span with the error."""
    calls = ModelCalls(traceparents, backend, model, subtasks)
    try:
        yield calls
    except BaseException as error:
        calls.finish(None, type(error).__name__)
        raise
