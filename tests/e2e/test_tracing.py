"""One trace per ticket across every process of `ticketflow up`, exported over OTLP/HTTP.

The stack runs as its user runs it (`ticketflow up`, each API and worker a process of its own)
with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a real OTLP/HTTP receiver in the test. A
`document-qa` ticket (one subtask on the bundled llama.cpp model) goes through; the test reads
its live progress over SSE, then checks the spans every process exported.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.e2e.test_up import start_up, stop, wait_healthy
from tests.support import random_tenant, sample
from ticketflow.auth import JwtCodec
from ticketflow.embedded import free_port
from ticketflow.settings import Settings
from ticketflow.stack import port_is_free

SERVICES = {
    "ticketflow-commands",
    "ticketflow-queries",
    "ticketflow-relay",
    "ticketflow-ingest",
    "ticketflow-inference",
    "ticketflow-projector",
}


def _token(tenant: str, roles: list[str] | None = None) -> str:
    settings = Settings()
    codec = JwtCodec(
        settings.jwt_secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience
    )
    return codec.mint(subject="tracer", tenant=tenant, roles=roles or ["user"])


def _follow_stream(url: str, token: str, timeout_s: float) -> list[str]:
    """The SSE event names of the ticket's progress stream, until its final event."""
    names: list[str] = []
    with httpx.stream(
        "GET", url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
                if names[-1] in {"completed", "failed", "cancelled"}:
                    break
    return names


def _wait_for(receiver: OtlpReceiver, trace_id: str, timeout_s: float) -> list[ReceivedSpan]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spans = receiver.trace(trace_id)
        if {span.service for span in spans} >= SERVICES:
            return spans
        time.sleep(0.5)
    return receiver.trace(trace_id)


@dataclass
class Stack:
    env: dict[str, str]
    receiver: OtlpReceiver
    process: subprocess.Popen[bytes]
    log: Path
    commands: str
    queries: str

    def create(self, token: str) -> str:
        created = httpx.post(
            f"{self.commands}/tickets",
            headers={"Authorization": f"Bearer {token}"},
            files={"file": ("paper.pdf", sample("research-paper.pdf").read_bytes())},
            data={
                "pipeline": "document-qa",
                "options": json.dumps({"question": "What sample size did the study use?"}),
            },
            timeout=30,
        )
        assert created.status_code == 202, created.text
        return str(created.json()["ticket_id"])

    def follow(self, ticket_id: str, token: str) -> None:
        names = _follow_stream(f"{self.queries}/tickets/{ticket_id}/stream", token, 300)
        if names[-1] != "completed":
            history = httpx.get(
                f"{self.queries}/tickets/{ticket_id}/events",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            failures = [e["payload"] for e in history.json()["events"] if "failed" in e["type"]]
            raise AssertionError(f"the ticket did not complete: {failures}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`ticketflow up` exporting spans to a receiver, with worker metrics from a base port."""
    tmp = tmp_path_factory.mktemp("traced")
    receiver = OtlpReceiver().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "OTEL_"))}
    env.update(
        TF_DATA_DIR=str(tmp / "data"),
        TF_COMMANDS_PORT=str(free_port()),
        TF_QUERIES_PORT=str(free_port()),
        TF_EMBEDDED_NATS_PORT=str(free_port()),
        TF_EMBEDDED_REDIS_PORT=str(free_port()),
        TF_METRICS_PORT=str(free_ports(4)),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    log = tmp / "up.log"
    process = start_up(env, log)
    stack = Stack(
        env,
        receiver,
        process,
        log,
        f"http://127.0.0.1:{env['TF_COMMANDS_PORT']}",
        f"http://127.0.0.1:{env['TF_QUERIES_PORT']}",
    )
    try:
        # Both APIs load models at start: minutes on a loaded two-core machine.
        wait_healthy(stack.commands, process, log, timeout=300)
        wait_healthy(stack.queries, process, log, timeout=300)
        yield stack
    finally:
        if process.poll() is None:
            stop(process)
        receiver.stop()


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(50):
        base = free_port()
        if base + count < 65536 and all(port_is_free("127.0.0.1", base + i) for i in range(count)):
            return base
    raise RuntimeError("no free run of ports")


# Start (up to 600 s in the fixture), ingest and one answer on the CPU model (300 s), stop (60 s).
@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_one_ticket_is_one_trace_across_every_process(stack: Stack) -> None:
    tenant = random_tenant()
    token = _token(tenant)
    ticket_id = stack.create(token)
    stack.follow(ticket_id, token)
    history = httpx.get(
        f"{stack.queries}/tickets/{ticket_id}/events",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert history.status_code == 200
    events = history.json()["events"]
    trace_ids = {event["traceparent"].split("-")[1] for event in events}
    assert len(trace_ids) == 1, trace_ids
    (trace_id,) = trace_ids
    # Each process exports every 200 ms; the projector's last apply and the SSE come last.
    receiver = stack.receiver
    _wait_for(receiver, trace_id, 30)
    time.sleep(2)

    spans = receiver.trace(trace_id)
    services = {span.service for span in spans}
    assert services >= SERVICES, (services, Counter(s.name for s in spans))

    # Every span's parent is in the trace, except the root: the upload's request span.
    ids = {span.span_id for span in spans}
    roots = [span for span in spans if not span.parent_span_id]
    assert [(r.service, r.name) for r in roots] == [("ticketflow-commands", "POST /tickets")]
    orphans = [span for span in spans if span.parent_span_id and span.parent_span_id not in ids]
    assert not orphans, orphans

    # Each event stores the span of the command that appended it, and that span is exported.
    by_id = {span.span_id: span for span in spans}
    for event in events:
        appended = by_id[event["traceparent"].split("-")[2]]
        assert appended.name.startswith("append "), (event["type"], appended)

    names_by_service = {(span.service, span.name) for span in spans}
    for expected in [
        ("ticketflow-relay", "publish created"),
        ("ticketflow-ingest", "process created"),
        ("ticketflow-ingest", "extract"),
        ("ticketflow-ingest", "chunk"),
        ("ticketflow-ingest", "embed"),
        ("ticketflow-inference", "process subtask_ready"),
        ("ticketflow-inference", "build prompt"),
        ("ticketflow-inference", "validate and record"),
        ("ticketflow-projector", "apply completed"),
        ("ticketflow-queries", "sse completed"),
        ("ticketflow-commands", "append CreateTicket"),
        ("ticketflow-ingest", "append RecordIngestion"),
        ("ticketflow-inference", "append CompleteSubtask"),
    ]:
        assert expected in names_by_service, (expected, sorted(names_by_service))

    # The model calls follow the generative-AI conventions; the accepted attempt's tokens are
    # those SubtaskCompleted recorded, and every attempt (retries included) has its own span.
    model_spans = [span for span in spans if span.attributes.get("gen_ai.operation.name")]
    attempts = [e for e in events if e["type"] == "subtask_started"]
    assert len(model_spans) == len(attempts)
    for event in (e for e in events if e["type"] == "subtask_completed"):
        payload = event["payload"]
        (span,) = [
            s
            for s in model_spans
            if s.attributes["ticketflow.subtask"] == payload["subtask_id"]
            and s.attributes["ticketflow.attempt"] == payload["attempt"]
        ]
        assert span.service == "ticketflow-inference"
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.provider.name"] == payload["provenance"]["backend"]
        assert span.attributes["gen_ai.request.model"]
        usage = payload["usage"]
        assert span.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] > 0
        assert span.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] > 0
        assert span.attributes["gen_ai.usage.cached_tokens"] == usage["cached_tokens"]


def _scrape(
    url: str, token: str | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=10)
    assert response.status_code == 200, (url, response.status_code, response.text[:300])
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def _names(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {name for name, _ in samples}


# One more ticket on the running stack (300 s), scrapes before and after.
@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_metrics_of_every_process_move_with_a_ticket(stack: Stack) -> None:
    base = int(stack.env["TF_METRICS_PORT"])
    workers = {
        name: f"http://127.0.0.1:{base + offset}/metrics"
        for name, offset in {"relay": 0, "ingest": 1, "inference": 2, "projector": 3}.items()
    }
    admin = _token(random_tenant(), roles=["admin"])
    apis = {"commands": f"{stack.commands}/metrics", "queries": f"{stack.queries}/metrics"}
    for url in apis.values():  # admins only on the APIs' own ports
        assert httpx.get(url, timeout=10).status_code == 401
        user = _token(random_tenant())
        assert (
            httpx.get(url, headers={"Authorization": f"Bearer {user}"}, timeout=10).status_code
            == 403
        )

    before = {name: _scrape(url) for name, url in workers.items()}
    before |= {name: _scrape(url, admin) for name, url in apis.items()}
    token = _token(random_tenant())
    ticket_id = stack.create(token)
    stack.follow(ticket_id, token)

    deadline = time.monotonic() + 30
    while True:  # the samplers run every 2 s; the projector applies the last event soon after
        after = {name: _scrape(url) for name, url in workers.items()}
        after |= {name: _scrape(url, admin) for name, url in apis.items()}
        done = _value(
            after["queries"], "ticketflow_tickets", state="completed", pipeline="document-qa"
        )
        if (
            done
            > _value(
                before["queries"], "ticketflow_tickets", state="completed", pipeline="document-qa"
            )
            and _value(after["relay"], "ticketflow_relay_lag_positions") == 0
        ):
            break
        assert time.monotonic() < deadline, after["queries"]
        time.sleep(1)

    inference_before, inference_after = before["inference"], after["inference"]
    for name, labels in [
        ("ticketflow_model_tokens_total", {"kind": "prompt"}),
        ("ticketflow_model_tokens_total", {"kind": "completion"}),
        ("ticketflow_subtask_duration_seconds_count", {"outcome": "recorded"}),
        ("ticketflow_model_call_duration_seconds_count", {}),
        ("ticketflow_model_output_tokens_per_second_count", {}),
    ]:
        assert _value(inference_after, name, **labels) > _value(inference_before, name, **labels), (
            name
        )
    assert _value(inference_after, "ticketflow_model_cached_prompt_tokens_total") >= _value(
        inference_before, "ticketflow_model_cached_prompt_tokens_total"
    )
    # Gauges the samplers set from the stores and JetStream.
    assert "ticketflow_relay_lag_seconds" in _names(after["relay"])
    assert "ticketflow_projection_lag_positions" in _names(after["projector"])
    assert _value(after["projector"], "ticketflow_projection_lag_positions") >= 0
    for consumer in ("ingest", "inference"):
        assert ("ticketflow_consumer_pending_messages", (("consumer", consumer),)) in after[
            consumer
        ]
        assert ("ticketflow_consumer_redelivered_messages", (("consumer", consumer),)) in after[
            consumer
        ]
        assert "ticketflow_dead_letters_stored_messages" in _names(after[consumer])
    # Counters with no sample until something happens still describe themselves.
    commands_text = httpx.get(
        apis["commands"], headers={"Authorization": f"Bearer {admin}"}, timeout=10
    ).text
    assert "# HELP ticketflow_rate_limited_requests_total" in commands_text
    inference_text = httpx.get(workers["inference"], timeout=10).text
    assert "# HELP ticketflow_inference_queue_subtasks" in inference_text
    assert (
        "# HELP ticketflow_dead_letters_total" in inference_text
        or "# HELP ticketflow_dead_letters_total" in httpx.get(workers["ingest"], timeout=10).text
    )
