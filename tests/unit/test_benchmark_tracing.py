"""The tracing comparison of the benchmarks: its option, and each mode's processes really
exporting (or not) to a real OTLP/HTTP receiver."""

from __future__ import annotations

import multiprocessing
import os
from types import ModuleType

import pytest

from benchmarks import handler_latency, write_path
from benchmarks.tracing import ReceiverProcess, flush_tracing, otel_environment, use_tracing
from ticketflow.telemetry import configure_tracing


@pytest.mark.parametrize("module", [write_path, handler_latency])
def test_the_benchmarks_compare_tracing_only_when_asked(module: ModuleType) -> None:
    assert module.parse_args([]).compare_tracing is False
    assert module.parse_args(["--compare-tracing"]).compare_tracing is True


def test_write_path_keeps_its_other_options_with_the_tracing_comparison() -> None:
    args = write_path.parse_args(["--compare-tracing", "--workers", "1,2", "--tickets", "30"])
    assert (args.workers, args.tickets) == ([1, 2], 30)


def test_tracing_off_sets_no_otel_variable_and_on_names_the_endpoint() -> None:
    assert otel_environment(None) == {}
    assert otel_environment("http://127.0.0.1:4318")["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
        "http://127.0.0.1:4318"
    )


def _one_span(endpoint: str | None) -> None:
    from opentelemetry import trace

    use_tracing(endpoint, "bench-probe")
    # What the process's own entry point then does (`run_relay`, the command API, ...).
    if configure_tracing("bench-probe") != (endpoint is not None):
        raise SystemExit(2)
    trace.get_tracer("bench").start_span("measured").end()
    if not flush_tracing():
        raise SystemExit(3)


def _run(endpoint: str | None) -> int | None:
    process = multiprocessing.get_context("spawn").Process(target=_one_span, args=(endpoint,))
    process.start()
    process.join(60)
    return process.exitcode


def test_a_process_with_tracing_on_exports_its_spans_to_the_receiver() -> None:
    receiver = ReceiverProcess()
    try:
        assert _run(receiver.endpoint) == 0
        assert receiver.received().by_name()["bench-probe", "measured"] == 1
    finally:
        receiver.stop()


def test_a_process_with_tracing_off_exports_nothing_even_with_an_inherited_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = ReceiverProcess()
    try:
        monkeypatch.setitem(os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        assert _run(None) == 0
        assert receiver.received().spans == []
    finally:
        receiver.stop()
