"""The llama.cpp backend against the real SmolLM2-135M model on CPU."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from inference.backends import GenerationRequest, LlamaCppBackend
from inference.pipelines import pipeline_definition
from inference.prompts import PromptInput, build_messages
from inference.validation import complete_output, generation_schema, validate_output

# The first test loads the model; none generates more than a few hundred tokens.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REVIEW = pipeline_definition("document-review")
DOCUMENT = """Sleep and the consolidation of word memory in students

Introduction. Earlier studies suggest that sleep helps people keep what they learned. We ask
whether a night of sleep improves the recall of word lists in university students.

Method. Forty students learned a list of 60 words in the evening. Twenty slept normally; twenty
stayed awake in the laboratory. Everyone was tested the next morning after a short breakfast.

Results. The sleep group recalled 41 words on average, the wake group 33 (p < 0.01). Reaction
times did not differ between the groups.

Conclusion. A night of sleep improves the recall of word lists. Schools should start later.
"""


def subtask(subtask_id: str) -> dict[str, Any]:
    return next(s for s in REVIEW["subtasks"] if s["id"] == subtask_id)


def request_for(
    subtask_id: str,
    *,
    max_tokens: int | None = None,
    dependency_outputs: dict[str, Any] | None = None,
) -> GenerationRequest:
    definition = subtask(subtask_id)
    prompt = PromptInput(
        system_prompt=REVIEW["system_prompt"],
        instruction=definition["instruction"],
        output_schema=definition["output_schema"],
        document_text=DOCUMENT,
        dependency_outputs=dependency_outputs or {},
    )
    return GenerationRequest(
        messages=build_messages(prompt),
        json_schema=generation_schema(definition["output_schema"]),
        max_tokens=max_tokens or definition["max_tokens"],
    )


@pytest_asyncio.fixture(scope="module")
async def backend() -> AsyncIterator[LlamaCppBackend]:
    llama = LlamaCppBackend(n_ctx=4096).load()
    yield llama
    await llama.aclose()


async def test_the_verdict_output_parses_and_validates_against_its_schema(
    backend: LlamaCppBackend,
) -> None:
    findings = {
        "summary": {"summary": "Sleep improved word recall in 40 students."},
        "goal": {"goal": "Test whether sleep improves recall.", "stated_explicitly": True},
    }
    schema = subtask("verdict")["output_schema"]
    request = request_for("verdict", dependency_outputs=findings)

    generation = await backend.generate(request)

    answer = validate_output(
        generation.text, request.json_schema, system_prompt=REVIEW["system_prompt"]
    )
    # The model gives the score; the verdict is the band it lies in, so they always agree.
    assert "verdict" not in answer
    output = complete_output(answer, schema, findings)
    low, high = schema["x-bands"]["bands"][output["verdict"]]
    assert low <= output["score"] <= high
    assert generation.finish_reason == "stop"


async def test_temperature_zero_gives_the_same_output_twice(backend: LlamaCppBackend) -> None:
    request = request_for("goal", max_tokens=40)

    first = await backend.generate(request)
    second = await backend.generate(request)

    assert first.text == second.text


async def test_a_second_call_sharing_the_document_reuses_the_cached_prefix(
    backend: LlamaCppBackend,
) -> None:
    await backend.generate(request_for("summary", max_tokens=8))

    second = await backend.generate(request_for("goal", max_tokens=8))

    # System prompt and document are shared; only the instruction and schema differ.
    assert second.cached_tokens > second.prompt_tokens // 2
    assert second.cached_tokens < second.prompt_tokens


async def test_usage_counts_and_latency_are_reported(backend: LlamaCppBackend) -> None:
    generation = await backend.generate(request_for("goal", max_tokens=8))

    assert generation.prompt_tokens > 100
    assert 0 < generation.completion_tokens <= 8
    assert generation.latency_ms > 0
    assert generation.model == "SmolLM2-135M-Instruct.Q4_1"


async def test_a_batch_returns_one_generation_per_request_in_order(
    backend: LlamaCppBackend,
) -> None:
    requests = [request_for("goal", max_tokens=8), request_for("summary", max_tokens=3)]

    generations = await backend.generate_batch(requests)

    # Neither JSON document fits its budget, so each stops at its own max_tokens.
    assert [g.finish_reason for g in generations] == ["length", "length"]
    assert generations[0].completion_tokens >= 7
    assert generations[1].completion_tokens <= 4


async def test_generation_leaves_the_event_loop_free(backend: LlamaCppBackend) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        generation = await backend.generate(request_for("goal", max_tokens=16))
    finally:
        ticker.cancel()

    # A blocked loop would not tick at all while the model runs.
    assert ticks >= generation.latency_ms / 10 / 4
