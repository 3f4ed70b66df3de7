"""Inference over HTTP: SGLang's native `/generate` API and any OpenAI-compatible server.

Both backends share one `httpx.AsyncClient` (one connection pool) for all of their servers. They
take several server URLs, used in turn (a server that just failed is skipped for a few seconds),
or one sglang-router URL, which then does the balancing itself.

Errors are sorted for the caller: HTTP 429 and 503 raise `BackendThrottled` (pause the model
until `retry_after_s`), connection failures, timeouts and other 5xx raise `BackendUnavailable`
(retry later), and any other 4xx raises `BackendRejected` (the request itself is wrong).
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from inference.backends import (
    BackendRejected,
    BackendThrottled,
    BackendUnavailable,
    Generation,
    GenerationRequest,
)

logger = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 5.0
# A server may ask for any pause; beyond this one a human should look rather than every worker
# sitting idle on a misconfigured header.
MAX_RETRY_AFTER_S = 600.0
# How long a server that failed is passed over while others are available.
FAILED_SERVER_SKIP_S = 5.0
THROTTLING_STATUSES = frozenset({429, 503})

ResponseFormat = Literal["json_schema", "json_object"]


# Chat templates -------------------------------------------------------------------------------
#
# The native API takes a prompt as text, so the chat messages are rendered here, exactly as the
# model's own template would render them. Rendering is deterministic: equal messages give equal
# text, so prompts that share their first messages share a text prefix for the radix cache.


def render_chatml(messages: Sequence[Mapping[str, str]]) -> str:
    """ChatML, as used by Qwen2/2.5/3 and SmolLM2 instruct models.

    No default system message is inserted when the messages lack one (the Hugging Face
    templates of Qwen and SmolLM2 insert their own); ticketflow's prompts always have one.
    """
    turns = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(turns) + "<|im_start|>assistant\n"


def render_llama3(messages: Sequence[Mapping[str, str]]) -> str:
    """Llama 3, 3.1, 3.2 and 3.3 instruct models (contents trimmed, as their template does).

    `<|begin_of_text|>` is left out: SGLang tokenizes text prompts with the tokenizer's special
    tokens, which already starts them with BOS, and a second BOS degrades the answers. The dated
    preamble of the 3.1 template is left out too: a date in the system message would change the
    shared prefix every day.
    """
    turns = [
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        for m in messages
    ]
    return "".join(turns) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


CHAT_TEMPLATES: dict[str, Callable[[Sequence[Mapping[str, str]]], str]] = {
    "chatml": render_chatml,
    "llama3": render_llama3,
}


def render_chat(messages: Sequence[Mapping[str, str]], template: str) -> str:
    """The prompt text for `messages` in the named chat template, ending with the assistant's
    turn opened."""
    try:
        render = CHAT_TEMPLATES[template]
    except KeyError:
        known = ", ".join(sorted(CHAT_TEMPLATES))
        raise ValueError(f"unknown chat template {template!r}; known: {known}") from None
    for message in messages:
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError("every chat message needs a string role and content")
    return render(messages)


# Errors ---------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP-date (RFC 9110).

    An absent or unreadable header gives `DEFAULT_RETRY_AFTER_S`; a date in the past gives 0.
    """
    if value is None or not value.strip():
        return DEFAULT_RETRY_AFTER_S
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_S
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds):
        return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def error_message(response: httpx.Response) -> str:
    """The server's explanation from an error response, in the shapes SGLang, OpenAI-compatible
    servers and FastAPI use, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                detail = body[key]
                return detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return json.dumps(body)[:500]


# The shared HTTP machinery ------------------------------------------------------------------


class ServerRotation:
    """Server URLs in round-robin order, passing over one that failed in the last few seconds.

    When every server failed recently they are all tried anyway, the one that failed longest
    ago first: skipping is a preference, never a reason to refuse work.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        skip_failed_s: float = FAILED_SERVER_SKIP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        cleaned = [url.strip().rstrip("/") for url in urls if url.strip()]
        if not cleaned:
            raise ValueError("at least one server URL is needed")
        for url in cleaned:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"server URL {url!r} must start with http:// or https://")
        self.urls: tuple[str, ...] = tuple(cleaned)
        self._skip_failed_s = skip_failed_s
        self._clock = clock
        self._next = itertools.count()
        self._failed_at: dict[str, float] = {}

    def candidates(self) -> list[str]:
        """Every server, in the order to try them for the next request."""
        start = next(self._next) % len(self.urls)
        turn = self.urls[start:] + self.urls[:start]
        now = self._clock()
        healthy = [
            url
            for url in turn
            if url not in self._failed_at or now - self._failed_at[url] >= self._skip_failed_s
        ]
        resting = sorted(
            (url for url in turn if url not in healthy), key=lambda url: self._failed_at[url]
        )
        return healthy + resting

    def failed(self, url: str) -> None:
        self._failed_at[url] = self._clock()

    def succeeded(self, url: str) -> None:
        self._failed_at.pop(url, None)


class HttpInferenceBackend:
    """What the SGLang and OpenAI-compatible backends share: servers, the pool and errors.

    `model` names the model in results and cool-downs; when it is None the backend asks the
    server (`start()`, or lazily on the first request) and uses `placeholder_name` until then.
    Pass `client` to share one connection pool between backends; it is then not closed here.
    """

    placeholder_name = "http"
    constrains_output = True
    """Both protocols send the request's schema for the server to constrain decoding to."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        model: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        max_connections: int = 64,
        client: httpx.AsyncClient | None = None,
        skip_failed_s: float = FAILED_SERVER_SKIP_S,
    ) -> None:
        self.servers = ServerRotation(
            urls.split(",") if isinstance(urls, str) else urls, skip_failed_s=skip_failed_s
        )
        self.model_name = model or self.placeholder_name
        self._model_known = model is not None
        # The model id the server reported (asked when no model was configured), for provenance.
        self.model_revision: str | None = None
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=read_timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                # Below the 5 s after which uvicorn-based servers close idle connections, so a
                # request is never sent on a connection the server is closing.
                keepalive_expiry=4.0,
            ),
            headers={"User-Agent": "ticketflow"},
        )
        self._discovery = asyncio.Lock()

    async def start(self) -> HttpInferenceBackend:
        """Learns the model's name from the server when none was configured.

        A server that is not up yet is not an error here: the name is asked for again on the
        first request.
        """
        try:
            await self._ensure_model_name()
        except BackendUnavailable as error:
            logger.warning("could not ask %s for its model yet: %s", self._where(), error)
        return self

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def discover_model_name(self) -> str:
        raise NotImplementedError

    async def _ensure_model_name(self) -> None:
        if self._model_known:
            return
        async with self._discovery:
            if not self._model_known:
                self.model_name = await self.discover_model_name()
                self.model_revision = self.model_name
                self._model_known = True
                logger.info("%s serves %s", self._where(), self.model_name)

    def _where(self) -> str:
        return ", ".join(self.servers.urls)

    async def _request(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> Any:
        """The decoded JSON answer of the first server that takes the request.

        Only a failure to connect moves on to the next server: the request never reached that
        one, so nothing was computed twice. Anything later is raised for the caller to retry.
        """
        last_error: Exception | None = None
        for url in self.servers.candidates():
            try:
                response = await self._client.request(method, url + path, json=payload)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                self.servers.failed(url)
                logger.warning("cannot connect to %s: %r", url, error)
                last_error = error
                continue
            except httpx.TimeoutException as error:
                self.servers.failed(url)
                raise BackendUnavailable(
                    f"{url}{path} timed out ({type(error).__name__})"
                ) from error
            except httpx.TransportError as error:
                self.servers.failed(url)
                raise BackendUnavailable(f"{url}{path} failed: {error!r}") from error
            self._raise_for_status(url, path, response)
            self.servers.succeeded(url)
            try:
                return response.json()
            except ValueError as error:
                raise BackendUnavailable(f"{url}{path} answered with non-JSON") from error
        raise BackendUnavailable(
            f"no server reachable for {path} ({self._where()}): {last_error!r}"
        ) from last_error

    def _raise_for_status(self, url: str, path: str, response: httpx.Response) -> None:
        status = response.status_code
        if status < 400:
            return
        message = error_message(response)
        if status in THROTTLING_STATUSES:
            self.servers.failed(url)
            retry_after_s = parse_retry_after(response.headers.get("Retry-After"))
            raise BackendThrottled(
                f"{url}{path} answered {status}: {message}",
                model=self.model_name,
                retry_after_s=retry_after_s,
            )
        if status >= 500:
            self.servers.failed(url)
            raise BackendUnavailable(f"{url}{path} answered {status}: {message}")
        raise BackendRejected(message, status=status)


# SGLang's native API --------------------------------------------------------------------------


def _finish_reason(value: Any) -> str:
    """SGLang reports `{"type": "stop", "matched": …}` or `{"type": "length", "length": n}`;
    an aborted request (`{"type": "abort", "message": …}`) is a server-side failure."""
    if value is None:
        return "stop"
    kind = value.get("type") if isinstance(value, Mapping) else value
    if kind == "abort":
        message = value.get("message") if isinstance(value, Mapping) else None
        raise BackendUnavailable(f"the server aborted the request: {message or 'no reason'}")
    return str(kind or "stop")


@dataclass(frozen=True)
class _NativeResult:
    text: str
    meta_info: Mapping[str, Any]


class SGLangBackend(HttpInferenceBackend):
    """SGLang's native `POST /generate`, with the chat messages rendered by `chat_template`.

    A batch is one HTTP request whose `text` is the list of prompts in order, with one
    `sampling_params` object per prompt, so SGLang schedules them together and its radix cache
    evaluates a prefix the prompts share once. `cached_tokens` comes from each result's
    `meta_info`.
    """

    placeholder_name = "sglang"

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        chat_template: str = "chatml",
        model: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        max_connections: int = 64,
        client: httpx.AsyncClient | None = None,
        skip_failed_s: float = FAILED_SERVER_SKIP_S,
    ) -> None:
        if chat_template not in CHAT_TEMPLATES:
            known = ", ".join(sorted(CHAT_TEMPLATES))
            raise ValueError(f"unknown chat template {chat_template!r}; known: {known}")
        super().__init__(
            urls,
            model=model,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_connections=max_connections,
            client=client,
            skip_failed_s=skip_failed_s,
        )
        self.chat_template = chat_template

    async def generate(self, request: GenerationRequest) -> Generation:
        results = await self.generate_batch((request,))
        return results[0]

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        await self._ensure_model_name()
        payload = {
            "text": [render_chat(request.messages, self.chat_template) for request in requests],
            "sampling_params": [self.sampling_params(request) for request in requests],
        }
        started = time.perf_counter()
        body = await self._request("POST", "/generate", payload)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        results = self._results(body, len(requests))
        return [
            self._generation(result, elapsed_ms, request)
            for result, request in zip(results, requests, strict=True)
        ]

    @staticmethod
    def sampling_params(request: GenerationRequest) -> dict[str, Any]:
        return {
            "temperature": float(request.temperature),
            "max_new_tokens": int(request.max_tokens),
            # SGLang takes the schema as a string; key order is kept, since the constrained
            # model writes properties in schema order.
            "json_schema": json.dumps(request.json_schema, ensure_ascii=False),
        }

    async def health(self) -> bool:
        """True when at least one server answers `GET /health` with 200."""

        async def healthy(url: str) -> bool:
            try:
                response = await self._client.get(url + "/health")
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        answers = await asyncio.gather(*(healthy(url) for url in self.servers.urls))
        return any(answers)

    async def model_info(self) -> dict[str, Any]:
        """`GET /get_model_info`: `model_path`, `tokenizer_path`, `is_generation`, …"""
        info = await self._request("GET", "/get_model_info")
        if not isinstance(info, dict):
            raise BackendUnavailable("/get_model_info did not answer with an object")
        return info

    async def discover_model_name(self) -> str:
        info = await self.model_info()
        model_path = info.get("model_path")
        if not isinstance(model_path, str) or not model_path:
            raise BackendUnavailable("/get_model_info has no model_path")
        return model_path

    @staticmethod
    def _results(body: Any, expected: int) -> list[_NativeResult]:
        items = body if isinstance(body, list) else [body]
        if len(items) != expected:
            raise BackendUnavailable(f"/generate answered {len(items)} results for {expected}")
        results = []
        for item in items:
            if not isinstance(item, Mapping) or not isinstance(item.get("text"), str):
                raise BackendUnavailable("/generate answered a result without text")
            meta_info = item.get("meta_info")
            results.append(
                _NativeResult(item["text"], meta_info if isinstance(meta_info, Mapping) else {})
            )
        return results

    def _generation(
        self, result: _NativeResult, elapsed_ms: float, request: GenerationRequest
    ) -> Generation:
        meta = result.meta_info
        e2e_latency = meta.get("e2e_latency")
        latency_ms = (
            float(e2e_latency) * 1000.0 if isinstance(e2e_latency, int | float) else elapsed_ms
        )
        return Generation(
            text=result.text,
            model=self.model_name,
            prompt_tokens=int(meta.get("prompt_tokens") or 0),
            completion_tokens=int(meta.get("completion_tokens") or 0),
            cached_tokens=int(meta.get("cached_tokens") or 0),
            latency_ms=latency_ms,
            finish_reason=_finish_reason(meta.get("finish_reason")),
            backend="sglang",
            model_revision=self.model_revision,
            sampling={k: v for k, v in self.sampling_params(request).items() if k != "json_schema"},
        )


# OpenAI-compatible API ------------------------------------------------------------------------


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real failure in a task group's exceptions (the others were cancelled)."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return group.exceptions[0]


class OpenAICompatibleBackend(HttpInferenceBackend):
    """`POST /v1/chat/completions` on SGLang or any server speaking that protocol.

    The server applies the model's own chat template. `response_format` picks how the schema is
    sent: "json_schema" is the OpenAI form (SGLang, vLLM, OpenAI); "json_object" sends
    `{"type": "json_object", "schema": …}`, the form llama-cpp-python's server understands. A
    batch is sent as concurrent requests, at most `max_concurrency` at once, results in order.
    """

    placeholder_name = "openai"

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        model: str | None = None,
        response_format: ResponseFormat = "json_schema",
        max_concurrency: int | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        max_connections: int = 64,
        client: httpx.AsyncClient | None = None,
        skip_failed_s: float = FAILED_SERVER_SKIP_S,
    ) -> None:
        if response_format not in ("json_schema", "json_object"):
            raise ValueError(f"unknown response format {response_format!r}")
        super().__init__(
            urls,
            model=model,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_connections=max_connections,
            client=client,
            skip_failed_s=skip_failed_s,
        )
        self.response_format: ResponseFormat = response_format
        self._concurrency = asyncio.Semaphore(max_concurrency or max_connections)

    async def generate(self, request: GenerationRequest) -> Generation:
        await self._ensure_model_name()
        async with self._concurrency:
            return await self._complete(request)

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        await self._ensure_model_name()

        async def bounded(request: GenerationRequest) -> Generation:
            async with self._concurrency:
                return await self._complete(request)

        try:
            # A task group cancels the rest of the batch as soon as one request fails.
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(bounded(request)) for request in requests]
        except BaseExceptionGroup as errors:
            raise _first_error(errors) from None
        return [task.result() for task in tasks]

    async def models(self) -> list[str]:
        """The model ids from `GET /v1/models`."""
        body = await self._request("GET", "/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise BackendUnavailable("/v1/models did not answer with a model list")
        return [str(entry["id"]) for entry in data if isinstance(entry, dict) and "id" in entry]

    async def discover_model_name(self) -> str:
        models = await self.models()
        if not models:
            raise BackendUnavailable("/v1/models lists no model")
        return models[0]

    def payload(self, request: GenerationRequest) -> dict[str, Any]:
        response_format: dict[str, Any]
        if self.response_format == "json_schema":
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        else:
            response_format = {"type": "json_object", "schema": request.json_schema}
        return {
            "model": self.model_name,
            "messages": [dict(message) for message in request.messages],
            "max_tokens": int(request.max_tokens),
            "temperature": float(request.temperature),
            "response_format": response_format,
        }

    async def _complete(self, request: GenerationRequest) -> Generation:
        started = time.perf_counter()
        body = await self._request("POST", "/v1/chat/completions", self.payload(request))
        latency_ms = (time.perf_counter() - started) * 1000.0
        try:
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
            usage = body.get("usage") or {}
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            raise BackendUnavailable(f"malformed chat completion: {error!r}") from error
        details = usage.get("prompt_tokens_details") or {}
        return Generation(
            text=str(text),
            model=self.model_name,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
            latency_ms=latency_ms,
            finish_reason=str(choice.get("finish_reason") or "stop"),
            backend="openai",
            model_revision=str(body.get("model") or self.model_revision or "") or None,
            sampling={
                "temperature": float(request.temperature),
                "max_tokens": int(request.max_tokens),
                "response_format": self.response_format,
            },
        )
