"""The OpenAI-compatible backend against a real server speaking that protocol:
llama-cpp-python's server (`python -m llama_cpp.server`) running the bundled SmolLM2-135M.

That server takes the schema in the `{"type": "json_object", "schema": …}` form, so the backend
runs with `response_format="json_object"` here; the OpenAI `json_schema` form that SGLang takes
is checked against the SGLang contract fixture (test_sglang_contract.py).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from inference.backends import BackendUnavailable, GenerationRequest, smollm2_model_path
from inference.sglang import OpenAICompatibleBackend
from inference.validation import validate_output
from ticketflow.embedded import free_port, spawn, stop_process, wait_for_port

# The first test starts the server (up to 120 s); each call may take up to its 120 s read timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SYSTEM = {"role": "system", "content": "You answer with JSON only."}


def schema_of(words: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"answer": {"enum": words}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
    }


def question(text: str, words: list[str]) -> GenerationRequest:
    return GenerationRequest(
        messages=(SYSTEM, {"role": "user", "content": text}),
        json_schema=schema_of(words),
        max_tokens=32,
    )


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` on a free port, for this module."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "llama-server.log"
    process = spawn(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_model_path()),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2"],
        log_path,
    )  # fmt: skip
    try:
        wait_for_port(port, process, log_path, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


@pytest_asyncio.fixture
async def backend(llama_server: str) -> AsyncIterator[OpenAICompatibleBackend]:
    chat = OpenAICompatibleBackend(llama_server, response_format="json_object", read_timeout_s=120)
    yield chat
    await chat.aclose()


async def test_the_model_name_comes_from_v1_models(backend: OpenAICompatibleBackend) -> None:
    await backend.start()

    assert backend.model_name == str(smollm2_model_path())
    assert await backend.models() == [str(smollm2_model_path())]


async def test_a_schema_constrained_answer_validates_against_its_schema(
    backend: OpenAICompatibleBackend,
) -> None:
    request = question("Is Paris in France? Answer yes or no.", ["yes", "no"])

    generation = await backend.generate(request)

    output = validate_output(generation.text, request.json_schema)
    assert output["answer"] in {"yes", "no"}
    assert generation.finish_reason == "stop"
    assert generation.model == str(smollm2_model_path())


async def test_usage_numbers_are_positive(backend: OpenAICompatibleBackend) -> None:
    generation = await backend.generate(question("Is water wet?", ["yes", "no"]))

    assert generation.prompt_tokens > 0
    assert generation.completion_tokens > 0
    assert generation.cached_tokens >= 0
    assert generation.latency_ms > 0


async def test_a_batch_comes_back_in_request_order(backend: OpenAICompatibleBackend) -> None:
    # Each request's schema allows a single word, so the answers tell the requests apart.
    words = ["alpha", "beta", "gamma"]

    generations = await backend.generate_batch(
        [question("Say the word you are allowed to say.", [word]) for word in words]
    )

    answers = [
        validate_output(g.text, schema_of([w]))["answer"]
        for g, w in zip(generations, words, strict=True)
    ]
    assert answers == words


async def test_a_dead_url_is_unavailable() -> None:
    nobody = OpenAICompatibleBackend(f"http://127.0.0.1:{free_port()}", connect_timeout_s=0.5)
    try:
        await nobody.start()  # logs the failure, does not raise
        with pytest.raises(BackendUnavailable):
            await nobody.generate(question("Anyone there?", ["yes", "no"]))
    finally:
        await nobody.aclose()
