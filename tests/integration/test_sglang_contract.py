"""The SGLang backends against an SGLang contract fixture, and the model cool-down on Redis.

No GPU is at hand in the test suites, so `SGLangContractServer` is a small real HTTP server
(Starlette under uvicorn, on a free port) that reproduces the request and response shapes of
SGLang's documented APIs and checks every request strictly, as SGLang's own request models do:

- native API, `POST /generate`, `GET /health`, `GET /get_model_info`:
  https://docs.sglang.io/basic_usage/native_api.html
- the `/generate` arguments (`text` as a prompt or a batch of prompts, `sampling_params` as one
  object or one per prompt) and the sampling parameters, with `json_schema` a string:
  https://docs.sglang.io/basic_usage/sampling_params.html
- structured outputs (`json_schema` given as `json.dumps(schema)`):
  https://docs.sglang.io/advanced_features/structured_outputs.html
- the OpenAI-compatible API (`/v1/chat/completions` with `response_format` of type
  `json_schema`, `/v1/models`; cached tokens in `usage.prompt_tokens_details` with
  `--enable-cache-report`): https://docs.sglang.io/basic_usage/openai_api_completions.html

Its `meta_info` carries what those pages show: `id`, `finish_reason` as an object
(`{"type": "stop", "matched": …}` or `{"type": "length", "length": n}`), `prompt_tokens`,
`completion_tokens`, `cached_tokens` and `e2e_latency` in seconds. Its "model" answers with the
smallest instance of the schema, with a `question` property set to the last user turn, so tests
can tell answers apart; `cached_tokens` counts the longest token prefix shared with any earlier
prompt, as the radix cache would. Faults (429, 503, 500, 400, a server that stops answering)
are scripted per test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import uvicorn
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from handlers.cooldown import ModelCooldown
from inference.backends import (
    BackendRejected,
    BackendThrottled,
    BackendUnavailable,
    GenerationRequest,
    minimal_instance,
)
from inference.sglang import DEFAULT_RETRY_AFTER_S, OpenAICompatibleBackend, SGLangBackend
from inference.validation import validate_output
from tests.conftest import Servers
from ticketflow.embedded import free_port

MODEL_PATH = "Qwen/Qwen2.5-7B-Instruct"
EOS_TOKEN_ID = 151645

GENERATE_FIELDS = {
    "text", "input_ids", "input_embeds", "image_data", "audio_data", "sampling_params", "rid",
    "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
    "return_text_in_logprobs", "stream", "lora_path", "custom_logit_processor",
    "return_hidden_states",
}  # fmt: skip
SAMPLING_FIELDS = {
    "max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "min_new_tokens", "json_schema", "regex", "ebnf",
    "structural_tag", "n", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "custom_params",
}  # fmt: skip
CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
    "n", "stream", "seed", "response_format", "frequency_penalty", "presence_penalty",
}  # fmt: skip
_TOKEN = re.compile(r"<\|[^|]+\|>|\w+|[^\w\s]")
_LAST_USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


class ContractViolation(ValueError):
    """The request does not match what SGLang documents (the fixture answers 400)."""


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_schema_text(value: Any) -> dict[str, Any]:
    if not isinstance(value, str):
        raise ContractViolation(f"json_schema must be a string, got {type(value).__name__}")
    try:
        schema = json.loads(value)
        Draft202012Validator.check_schema(schema)
    except (ValueError, SchemaError) as error:
        raise ContractViolation(f"json_schema is not a JSON schema: {error}") from None
    if not isinstance(schema, dict):
        raise ContractViolation("json_schema must describe an object schema")
    return schema


def check_sampling_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise ContractViolation("sampling_params must be an object")
    unknown = set(params) - SAMPLING_FIELDS
    if unknown:
        raise ContractViolation(f"unknown sampling parameters: {sorted(unknown)}")
    if "temperature" in params and not (
        _is_number(params["temperature"]) and params["temperature"] >= 0
    ):
        raise ContractViolation("temperature must be a number >= 0")
    max_new_tokens = params.get("max_new_tokens", 128)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise ContractViolation("max_new_tokens must be an integer")
    if max_new_tokens < 1:
        raise ContractViolation("max_new_tokens must be positive")
    constraints = [key for key in ("json_schema", "regex", "ebnf") if params.get(key)]
    if len(constraints) > 1:
        raise ContractViolation("only one of json_schema, regex and ebnf may be given")
    if "json_schema" in params:
        _check_schema_text(params["json_schema"])
    return params


def check_generate(body: Any) -> tuple[list[str], list[dict[str, Any]], bool]:
    """The prompts, one sampling_params per prompt, and whether the request was a batch."""
    if not isinstance(body, dict):
        raise ContractViolation("the body must be a JSON object")
    unknown = set(body) - GENERATE_FIELDS
    if unknown:
        raise ContractViolation(f"unknown fields: {sorted(unknown)}")
    text = body.get("text")
    batch = isinstance(text, list)
    prompts: list[Any] = text if isinstance(text, list) else [text]
    if not prompts or not all(isinstance(prompt, str) and prompt for prompt in prompts):
        raise ContractViolation("text must be a prompt or a non-empty list of prompts")
    params = body.get("sampling_params") or {}
    if isinstance(params, list):
        if not batch or len(params) != len(prompts):
            raise ContractViolation("a sampling_params list needs one entry per prompt")
        per_prompt = [check_sampling_params(entry) for entry in params]
    else:
        per_prompt = [check_sampling_params(params)] * len(prompts)
    return prompts, per_prompt, batch


def check_chat(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ContractViolation("the body must be a JSON object")
    unknown = set(body) - CHAT_FIELDS
    if unknown:
        raise ContractViolation(f"unknown fields: {sorted(unknown)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ContractViolation("messages must be a non-empty list")
    for message in messages:
        if not (
            isinstance(message, dict)
            and message.get("role") in {"system", "user", "assistant"}
            and isinstance(message.get("content"), str)
        ):
            raise ContractViolation("each message needs a role and string content")
    if not isinstance(body.get("model", ""), str):
        raise ContractViolation("model must be a string")
    if not (isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0):
        raise ContractViolation("max_tokens must be a positive integer")
    if not (_is_number(body.get("temperature", 1.0)) and body.get("temperature", 1.0) >= 0):
        raise ContractViolation("temperature must be a number >= 0")
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        raise ContractViolation("response_format must have type json_schema")
    spec = response_format.get("json_schema")
    if not (
        isinstance(spec, dict)
        and isinstance(spec.get("name"), str)
        and isinstance(spec.get("schema"), dict)
        and isinstance(spec.get("strict", False), bool)
    ):
        raise ContractViolation("json_schema needs a name, a schema object and a boolean strict")
    Draft202012Validator.check_schema(spec["schema"])
    return body


@dataclass
class Scripted:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    hang_s: float = 0.0


class SGLangContractServer:
    """A real HTTP server that speaks SGLang's documented native and OpenAI-compatible APIs."""

    def __init__(self, model_path: str = MODEL_PATH) -> None:
        self.model_path = model_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, Any]] = []
        self._script: deque[Scripted] = deque()
        self._seen: list[list[str]] = []
        self._lock = threading.Lock()
        app = Starlette(
            routes=[
                Route("/generate", self._generate, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/get_model_info", self._model_info, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> SGLangContractServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the SGLang contract fixture did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._script.clear()
            self._seen.clear()

    def respond_next(
        self, status: int, headers: dict[str, str] | None = None, body: Any = None
    ) -> None:
        """The next generation request gets this answer instead of a generation."""
        self._script.append(Scripted(status, headers or {}, body))

    def hang_next(self, seconds: float) -> None:
        """The next generation request gets no answer for `seconds`."""
        self._script.append(Scripted(hang_s=seconds))

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    # The routes ---------------------------------------------------------------------------

    async def _scripted(self) -> Response | None:
        scripted = self._script.popleft() if self._script else None
        if scripted is None:
            return None
        if scripted.hang_s:
            # Cancelled by uvicorn's graceful-shutdown timeout if the fixture stops first.
            await asyncio.sleep(scripted.hang_s)
            return Response(status_code=200)
        body = scripted.body
        if body is None:
            body = {"object": "error", "message": f"scripted {scripted.status}"}
        return JSONResponse(body, status_code=scripted.status, headers=scripted.headers)

    async def _body(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append((request.url.path, body))
        return body

    async def _generate(self, request: Request) -> Response:
        body = await self._body(request)
        scripted = await self._scripted()
        if scripted is not None:
            return scripted
        try:
            prompts, params, batch = check_generate(body)
        except ContractViolation as error:
            return JSONResponse({"error": {"message": str(error)}}, status_code=400)
        results = [self._complete(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        return JSONResponse(results if batch else results[0])

    async def _chat(self, request: Request) -> Response:
        body = await self._body(request)
        scripted = await self._scripted()
        if scripted is not None:
            return scripted
        try:
            check_chat(body)
        except (ContractViolation, SchemaError) as error:
            return JSONResponse(
                {"object": "error", "message": str(error), "type": "BadRequest", "code": 400},
                status_code=400,
            )
        prompt = "".join(
            f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in body["messages"]
        )
        schema = body["response_format"]["json_schema"]["schema"]
        result = self._complete(
            prompt + "<|im_start|>assistant\n",
            {"max_new_tokens": body["max_tokens"], "json_schema": json.dumps(schema)},
        )
        meta = result["meta_info"]
        prompt_tokens, completion_tokens = meta["prompt_tokens"], meta["completion_tokens"]
        return JSONResponse(
            {
                "id": meta["id"],
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or self.model_path,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result["text"]},
                        "logprobs": None,
                        "finish_reason": meta["finish_reason"]["type"],
                        "matched_stop": EOS_TOKEN_ID,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": meta["cached_tokens"]},
                },
            }
        )

    async def _health(self, request: Request) -> Response:
        self.requests.append((request.url.path, None))
        return Response(status_code=200)

    async def _model_info(self, request: Request) -> Response:
        self.requests.append((request.url.path, None))
        return JSONResponse(
            {
                "model_path": self.model_path,
                "tokenizer_path": self.model_path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "has_image_understanding": False,
                "has_audio_understanding": False,
            }
        )

    async def _models(self, request: Request) -> Response:
        self.requests.append((request.url.path, None))
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_path,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "sglang",
                        "root": self.model_path,
                    }
                ],
            }
        )

    def _complete(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        tokens = _tokens(prompt)
        with self._lock:
            cached = max((_shared(tokens, seen) for seen in self._seen), default=0)
            self._seen.append(tokens)
        answer: Any = ""
        if "json_schema" in params:
            schema = json.loads(params["json_schema"])
            answer = minimal_instance(schema)
            turns = _LAST_USER_TURN.findall(prompt)
            if isinstance(answer, dict) and "question" in schema.get("properties", {}) and turns:
                answer["question"] = turns[-1]
        text = json.dumps(answer) if not isinstance(answer, str) else answer
        output = [*_tokens(text), "<eos>"]
        limit = params.get("max_new_tokens", 128)
        finish: dict[str, Any] = {"type": "stop", "matched": EOS_TOKEN_ID}
        if len(output) > limit:
            output = output[:limit]
            text = "".join(output)
            finish = {"type": "length", "length": limit}
        return {
            "text": text,
            "output_ids": list(range(len(output))),
            "meta_info": {
                "id": secrets.token_hex(16),
                "finish_reason": finish,
                "prompt_tokens": len(tokens),
                "weight_version": "default",
                "total_retractions": 0,
                "completion_tokens": len(output),
                "cached_tokens": min(cached, len(tokens) - 1),
                "cached_tokens_details": {"device": min(cached, len(tokens) - 1), "host": 0},
                "dp_rank": None,
                "e2e_latency": time.perf_counter() - started + 0.001,
            },
        }


def _shared(left: list[str], right: list[str]) -> int:
    length = 0
    for a, b in zip(left, right, strict=False):
        if a != b:
            break
        length += 1
    return length


@pytest.fixture(scope="module")
def contract_servers() -> Iterator[tuple[SGLangContractServer, SGLangContractServer]]:
    first, second = SGLangContractServer().start(), SGLangContractServer().start()
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


@pytest.fixture
def sglang(
    contract_servers: tuple[SGLangContractServer, SGLangContractServer],
) -> SGLangContractServer:
    for server in contract_servers:
        server.reset()
    return contract_servers[0]


@pytest.fixture
def other_sglang(
    contract_servers: tuple[SGLangContractServer, SGLangContractServer], sglang: object
) -> SGLangContractServer:
    return contract_servers[1]


@pytest_asyncio.fixture
async def backend(sglang: SGLangContractServer) -> AsyncIterator[SGLangBackend]:
    native = SGLangBackend(sglang.url, read_timeout_s=5)
    yield native
    await native.aclose()


SYSTEM = {"role": "system", "content": "You answer questions about one document."}
DOCUMENT = {"role": "user", "content": "<document>\nSleep improves recall.\n</document>"}
QUESTION_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}


def ask(question: str, *, max_tokens: int = 64, temperature: float = 0.0) -> GenerationRequest:
    return GenerationRequest(
        messages=(SYSTEM, DOCUMENT, {"role": "user", "content": question}),
        json_schema=QUESTION_SCHEMA,
        max_tokens=max_tokens,
        temperature=temperature,
    )


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# The native API ---------------------------------------------------------------------------


async def test_a_batch_is_one_request_with_a_text_list_and_per_prompt_sampling_params(
    backend: SGLangBackend, sglang: SGLangContractServer
) -> None:
    requests = [ask("Who slept?", temperature=0.0), ask("How many?", temperature=0.3)]

    await backend.generate_batch(requests)

    generate_calls = [body for path, body in sglang.requests if path == "/generate"]
    assert len(generate_calls) == 1
    body = generate_calls[0]
    assert set(body) == {"text", "sampling_params"}
    assert isinstance(body["text"], list)
    assert len(body["text"]) == 2
    assert body["text"][0].startswith("<|im_start|>system\nYou answer questions")
    assert body["text"][0].endswith("Who slept?<|im_end|>\n<|im_start|>assistant\n")
    assert body["sampling_params"] == [
        {"temperature": 0.0, "max_new_tokens": 64, "json_schema": json.dumps(QUESTION_SCHEMA)},
        {"temperature": 0.3, "max_new_tokens": 64, "json_schema": json.dumps(QUESTION_SCHEMA)},
    ]


async def test_batch_results_come_back_in_request_order_with_cached_tokens(
    backend: SGLangBackend,
) -> None:
    questions = ["Who slept?", "How many words?", "Was it significant?"]

    generations = await backend.generate_batch([ask(q) for q in questions])

    answers = [validate_output(g.text, QUESTION_SCHEMA) for g in generations]
    assert [a["question"] for a in answers] == questions
    assert generations[0].cached_tokens == 0
    # The later prompts share the system prompt and the document with the first.
    for generation in generations[1:]:
        assert 0 < generation.cached_tokens < generation.prompt_tokens
    for generation in generations:
        assert generation.prompt_tokens > 0
        assert generation.completion_tokens > 0
        assert generation.finish_reason == "stop"
        assert generation.latency_ms > 0


async def test_a_result_cut_short_reports_length(backend: SGLangBackend) -> None:
    generation = await backend.generate(ask("Who slept?", max_tokens=3))

    assert generation.finish_reason == "length"
    assert generation.completion_tokens == 3


async def test_without_a_configured_model_the_name_comes_from_get_model_info(
    backend: SGLangBackend, sglang: SGLangContractServer
) -> None:
    assert (await backend.model_info())["model_path"] == MODEL_PATH

    generation = await backend.generate(ask("Who slept?"))

    assert backend.model_name == MODEL_PATH
    assert generation.model == MODEL_PATH


async def test_a_configured_model_name_is_used_without_asking(
    sglang: SGLangContractServer,
) -> None:
    native = SGLangBackend(sglang.url, model="qwen-7b")
    try:
        generation = await native.generate(ask("Who slept?"))
    finally:
        await native.aclose()

    assert generation.model == "qwen-7b"
    assert "/get_model_info" not in sglang.paths()


async def test_health_is_true_while_a_server_answers(
    backend: SGLangBackend, sglang: SGLangContractServer
) -> None:
    assert await backend.health() is True
    assert "/health" in sglang.paths()

    nobody = SGLangBackend(dead_url(), connect_timeout_s=0.5)
    try:
        assert await nobody.health() is False
    finally:
        await nobody.aclose()


# Errors -----------------------------------------------------------------------------------


async def test_429_with_retry_after_seconds_raises_throttled(
    backend: SGLangBackend, sglang: SGLangContractServer
) -> None:
    await backend.start()
    sglang.respond_next(429, {"Retry-After": "7"})

    with pytest.raises(BackendThrottled) as raised:
        await backend.generate(ask("Who slept?"))

    assert raised.value.retry_after_s == 7.0
    assert raised.value.model == MODEL_PATH


async def test_429_with_an_http_date_retry_after_raises_throttled(
    backend: SGLangBackend, sglang: SGLangContractServer
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    sglang.respond_next(429, {"Retry-After": format_datetime(when, usegmt=True)})

    with pytest.raises(BackendThrottled) as raised:
        await backend.generate(ask("Who slept?"))

    assert 25 <= raised.value.retry_after_s <= 31


async def test_503_without_retry_after_is_throttled_for_the_default_time(
    backend: SGLangBackend, sglang: SGLangContractServer
) -> None:
    sglang.respond_next(503, body={"error": {"message": "no healthy workers"}})

    with pytest.raises(BackendThrottled, match="no healthy workers") as raised:
        await backend.generate(ask("Who slept?"))

    assert raised.value.retry_after_s == DEFAULT_RETRY_AFTER_S


async def test_another_5xx_is_unavailable_but_not_throttled(
    backend: SGLangBackend, sglang: SGLangContractServer
) -> None:
    sglang.respond_next(500, body={"error": {"message": "CUDA error"}})

    with pytest.raises(BackendUnavailable, match="CUDA error") as raised:
        await backend.generate(ask("Who slept?"))

    assert not isinstance(raised.value, BackendThrottled)


async def test_a_4xx_is_rejected_for_good_with_the_servers_message(
    backend: SGLangBackend, sglang: SGLangContractServer
) -> None:
    sglang.respond_next(400, body={"error": {"message": "The input is longer than the context"}})

    with pytest.raises(BackendRejected, match="longer than the context") as raised:
        await backend.generate(ask("Who slept?"))

    assert raised.value.status == 400


async def test_the_contract_fixture_rejects_a_malformed_request(
    sglang: SGLangContractServer,
) -> None:
    # The fixture's checks are real: a schema sent as an object, not a string, is refused.
    native = SGLangBackend(sglang.url, model="m")
    try:
        with pytest.raises(BackendRejected, match="json_schema must be a string"):
            await native._request(
                "POST",
                "/generate",
                {"text": ["hi"], "sampling_params": [{"json_schema": QUESTION_SCHEMA}]},
            )
    finally:
        await native.aclose()


async def test_a_server_that_stops_answering_times_out_as_unavailable(
    sglang: SGLangContractServer,
) -> None:
    native = SGLangBackend(sglang.url, model="m", read_timeout_s=0.3)
    sglang.hang_next(3)
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable, match="timed out"):
            await native.generate(ask("Who slept?"))
    finally:
        await native.aclose()

    assert time.monotonic() - started < 2


async def test_a_dead_server_is_unavailable() -> None:
    native = SGLangBackend(dead_url(), model="m", connect_timeout_s=0.5)
    try:
        with pytest.raises(BackendUnavailable, match="no server reachable"):
            await native.generate(ask("Who slept?"))
    finally:
        await native.aclose()


# Several servers ----------------------------------------------------------------------------


async def test_requests_go_round_robin_over_the_servers(
    sglang: SGLangContractServer, other_sglang: SGLangContractServer
) -> None:
    native = SGLangBackend([sglang.url, other_sglang.url], model="m")
    try:
        for question in ["one?", "two?", "three?", "four?"]:
            await native.generate(ask(question))
    finally:
        await native.aclose()

    assert sglang.paths() == ["/generate", "/generate"]
    assert other_sglang.paths() == ["/generate", "/generate"]
    asked = [body["text"][0] for _, body in sglang.requests]
    assert "one?" in asked[0]
    assert "three?" in asked[1]


async def test_a_server_that_cannot_be_reached_is_passed_over(
    sglang: SGLangContractServer, caplog: pytest.LogCaptureFixture
) -> None:
    native = SGLangBackend([dead_url(), sglang.url], model="m", connect_timeout_s=0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="inference.sglang"):
            generations = [await native.generate(ask(f"question {n}?")) for n in range(4)]
    finally:
        await native.aclose()

    assert len(generations) == 4
    assert sglang.paths() == ["/generate"] * 4
    # Tried once, then skipped while it rests.
    assert sum("cannot connect" in record.message for record in caplog.records) == 1


# The OpenAI-compatible API on SGLang ----------------------------------------------------------


async def test_the_openai_backend_sends_a_strict_json_schema_and_reads_cached_tokens(
    sglang: SGLangContractServer,
) -> None:
    chat = OpenAICompatibleBackend(sglang.url)
    try:
        await chat.start()
        generations = await chat.generate_batch([ask("Who slept?"), ask("How many?")])
    finally:
        await chat.aclose()

    assert chat.model_name == MODEL_PATH
    bodies = [body for path, body in sglang.requests if path == "/v1/chat/completions"]
    assert len(bodies) == 2
    assert bodies[0]["model"] == MODEL_PATH
    assert bodies[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": QUESTION_SCHEMA, "strict": True},
    }
    questions = [validate_output(g.text, QUESTION_SCHEMA)["question"] for g in generations]
    assert questions == ["Who slept?", "How many?"]
    assert max(g.cached_tokens for g in generations) > 0


# The model cool-down, shared through Redis ----------------------------------------------------


@pytest_asyncio.fixture
async def redis_clients(servers: Servers) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    """Two connections, as two worker processes would have."""
    first, second = aioredis.from_url(servers.redis_url), aioredis.from_url(servers.redis_url)
    yield first, second
    await first.aclose()
    await second.aclose()


@pytest.fixture
def prefix() -> str:
    return f"tf:test-cooldown:{secrets.token_hex(4)}"


async def test_a_model_that_was_never_paused_dispatches_at_once(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], prefix: str
) -> None:
    cooldown = ModelCooldown(redis_clients[0], prefix=prefix)
    started = time.monotonic()

    await cooldown.wait("qwen")

    assert time.monotonic() - started < 0.1
    assert await cooldown.remaining("qwen") == 0.0
    assert await cooldown.counts("qwen") == {"pauses": 0, "resumes": 0}


async def test_a_pause_counts_down(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], prefix: str
) -> None:
    cooldown = ModelCooldown(redis_clients[0], prefix=prefix)

    assert await cooldown.pause("qwen", 5) == 5.0

    assert 4.0 < await cooldown.remaining("qwen") <= 5.0
    assert await cooldown.remaining("llama") == 0.0


async def test_a_shorter_pause_never_shortens_a_longer_one(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], prefix: str
) -> None:
    cooldown = ModelCooldown(redis_clients[0], prefix=prefix)
    await cooldown.pause("qwen", 5)

    in_force = await cooldown.pause("qwen", 0.1)

    assert in_force > 4.0
    assert await cooldown.remaining("qwen") > 4.0
    assert (await cooldown.counts("qwen"))["pauses"] == 2


async def test_a_longer_pause_extends_a_shorter_one(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], prefix: str
) -> None:
    cooldown = ModelCooldown(redis_clients[0], prefix=prefix)
    await cooldown.pause("qwen", 0.5)

    await cooldown.pause("qwen", 5)

    assert await cooldown.remaining("qwen") > 4.0


async def test_wait_sleeps_until_the_pause_ends_then_logs_and_counts_the_resume(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis],
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cooldown = ModelCooldown(redis_clients[0], prefix=prefix)
    with caplog.at_level(logging.INFO, logger="handlers.cooldown"):
        await cooldown.pause("qwen", 0.4)
        started = time.monotonic()
        await cooldown.wait("qwen")
        waited = time.monotonic() - started

    assert 0.3 <= waited < 1.5
    assert await cooldown.counts("qwen") == {"pauses": 1, "resumes": 1}
    messages = [record.getMessage() for record in caplog.records]
    assert "pausing dispatch to qwen for 0.4 s" in messages
    assert "resuming dispatch to qwen" in messages


async def test_two_workers_see_the_same_pause(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], prefix: str
) -> None:
    first, second = (ModelCooldown(client, prefix=prefix) for client in redis_clients)

    await first.pause("qwen", 0.4)
    assert await second.remaining("qwen") > 0.2
    started = time.monotonic()
    await second.wait("qwen")

    assert time.monotonic() - started >= 0.2
    assert await first.counts("qwen") == {"pauses": 1, "resumes": 1}


async def test_a_pause_extended_by_another_worker_holds_a_waiting_one(
    redis_clients: tuple[aioredis.Redis, aioredis.Redis], prefix: str
) -> None:
    first = ModelCooldown(redis_clients[0], prefix=prefix)
    second = ModelCooldown(redis_clients[1], prefix=prefix, max_sleep_s=0.05)
    await first.pause("qwen", 0.2)
    started = time.monotonic()
    waiting = asyncio.create_task(second.wait("qwen"))
    await asyncio.sleep(0.1)

    await first.pause("qwen", 0.6)
    await waiting

    assert time.monotonic() - started >= 0.6
