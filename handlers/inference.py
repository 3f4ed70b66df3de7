"""The inference handler: runs a ticket's ready subtasks on the inference backend, together.

The scheduler (handlers/scheduler.py) hands over every waiting `subtask_ready` of one ticket at
once. The handler records each start through the write side's port, which answers with the
ticket's snapshot as the start left it (the aggregate is the only source of pipeline state; the
ticket is not loaded again), skips stale messages, builds each prompt (system prompt, documents
or retrieved chunks, options, outputs of dependencies, instruction last) and sends the prompts
so that those sharing the longest prefix are adjacent: the first one alone, then the rest as one
batch, so a prefix cache (SGLang's radix cache, llama.cpp's KV cache) has the shared part ready
for all but the first. Each output is validated against its subtask's schema, post-processed
and recorded. An output that does not validate is a retryable subtask failure decided by the
aggregate; a backend error fails the whole batch and is retried by redelivery with backoff.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from nats.aio.msg import Msg
from pydantic import ValidationError

from commands.port import (
    CompleteSubtask,
    FailSubtask,
    StartSubtask,
    TicketNotFound,
    TicketSnapshot,
    UnknownSubtask,
    WriteSide,
)
from handlers import telemetry
from handlers.consumer import PermanentFailure
from handlers.ingest import DocumentTexts
from handlers.postprocess import OutputPostprocessor
from handlers.prompting import PromptAssembler
from inference.backends import Generation, GenerationRequest, InferenceBackend
from inference.embeddings import Embedder
from inference.prompts import PromptInput, build_messages, prompt_source, shown_document
from inference.retrieval import ChunkStore
from inference.validation import (
    InvalidOutput,
    check_output,
    complete_output,
    generation_schema,
    offer_choices,
    validate_output,
)
from streams import contract

logger = logging.getLogger(__name__)

RETRY_TEMPERATURE_STEP = 0.3
#: What the user reads when a subtask failed for a reason that is not the model's answer.
INFERENCE_INTERNAL_ERROR = (
    "internal error while running this step; the operators have been notified"
)


@dataclass(frozen=True)
class InferenceSettings:
    max_document_chars: int = 12_000
    worker: str = socket.gethostname()


@dataclass(frozen=True)
class ReadyWork:
    """One `subtask_ready` message's content, with the trace it belongs to."""

    ready: contract.SubtaskReady
    traceparent: str | None = None


@dataclass(frozen=True)
class _Prepared:
    work: ReadyWork
    definition: contract.SubtaskDefinition
    prompt: PromptInput
    request: GenerationRequest
    order: tuple[int, str, int]
    question: bool = False
    """It answers a follow-up question rather than running a pipeline's subtask."""


class InferenceHandler:
    def __init__(
        self,
        write: WriteSide,
        backend: InferenceBackend,
        chunks: ChunkStore,
        texts: DocumentTexts,
        embedder: Embedder,
        settings: InferenceSettings | None = None,
        postprocessor: OutputPostprocessor | None = None,
    ) -> None:
        self._write = write
        self._backend = backend
        self._prompts = PromptAssembler(chunks, texts, embedder)
        self._postprocessor = postprocessor or OutputPostprocessor()
        self._settings = settings or InferenceSettings()

    @property
    def model(self) -> str:
        return self._backend.model_name

    async def snapshot(self, ticket_id: UUID) -> TicketSnapshot:
        """The ticket as stored now (the scheduler's one read, to classify a ticket)."""
        try:
            return await self._write.snapshot(ticket_id)
        except TicketNotFound:
            raise PermanentFailure(f"ticket {ticket_id} does not exist") from None

    async def __call__(self, message: Msg) -> None:
        """Runs one message on its own (the batch of one)."""
        work = ReadyWork(parse_ready(message), (message.headers or {}).get("traceparent"))
        (outcome,) = await self.run(work.ready.ticket_id, [work])
        if outcome is not None:
            raise outcome

    async def run(self, ticket_id: UUID, batch: Sequence[ReadyWork]) -> list[BaseException | None]:
        """Runs the ready subtasks of one ticket; one outcome per item, in order.

        `None` means done (recorded, or stale and nothing to do); an exception is that item's
        failure. A backend failure raises instead: it concerns the whole batch.
        """
        outcomes: list[BaseException | None] = [None] * len(batch)
        begun = time.monotonic()
        started: list[tuple[int, ReadyWork, TicketSnapshot]] = []
        for index, work in enumerate(batch):
            try:
                if work.ready.ticket_id != ticket_id:
                    raise ValueError(f"{work.ready.ticket_id} is not ticket {ticket_id}")
                with telemetry.for_work(
                    "process subtask_ready", work.traceparent, **_attributes(work.ready)
                ):
                    ticket = await self._start(work)
                if ticket.runs(work.ready.subtask_id, work.ready.attempt):
                    started.append((index, work, ticket))
            except Exception as error:
                outcomes[index] = error
        if not started:
            return outcomes
        # The last start's snapshot is the ticket as all the starts left it.
        ticket = started[-1][2]
        prepared: list[tuple[int, _Prepared]] = []
        for index, work, _ in started:
            try:
                with telemetry.for_work(
                    "build prompt", work.traceparent, **_attributes(work.ready)
                ):
                    prepared.append((index, await self._prepare(ticket, work)))
            except Exception as error:
                outcomes[index] = error
        if not prepared:
            return outcomes
        prepared.sort(key=lambda pair: pair[1].order)
        with telemetry.model_calls(
            [item.work.traceparent for _, item in prepared],
            type(self._backend).__name__,
            self._backend.model_name,
            [(item.work.ready.subtask_id, item.work.ready.attempt) for _, item in prepared],
        ) as calls:
            generations = await self._generate([item.request for _, item in prepared])
            calls.finish(generations)
        for (index, item), generation in zip(prepared, generations, strict=True):
            try:
                with telemetry.for_work(
                    "validate and record", item.work.traceparent, **_attributes(item.work.ready)
                ):
                    await self._record(ticket, item, generation)
            except Exception as error:
                outcomes[index] = error
            telemetry.SUBTASK_SECONDS.labels(
                ticket.pipeline.name,
                # One label for every question, not one per question.
                "question" if item.question else item.work.ready.subtask_id,
                "error" if outcomes[index] is not None else "recorded",
            ).observe(time.monotonic() - begun)
        return outcomes

    async def fail(self, message: Msg, reason: str) -> None:
        """Dead letter: the attempt fails for good, and with it the ticket."""
        try:
            ready = parse_ready(message)
        except PermanentFailure:
            logger.error("dropping an unreadable subtask_ready event: %s", reason)
            return
        logger.error(
            "subtask failed for good: %s",
            reason,
            extra={
                "ticket_id": str(ready.ticket_id),
                "tenant": ready.tenant,
                "subtask": ready.subtask_id,
            },
        )
        await self._write.fail_subtask(
            FailSubtask(
                ready.ticket_id,
                ready.subtask_id,
                ready.attempt,
                INFERENCE_INTERNAL_ERROR,
                retryable=False,
            ),
        )

    async def _start(self, work: ReadyWork) -> TicketSnapshot:
        """Records the start of the attempt (a no-op when the message is stale) and answers
        with the ticket as the start left it."""
        ready = work.ready
        try:
            return await self._write.start_subtask(
                StartSubtask(
                    ready.ticket_id,
                    ready.subtask_id,
                    ready.attempt,
                    self._settings.worker,
                    work.traceparent,
                )
            )
        except TicketNotFound:
            raise PermanentFailure(f"ticket {ready.ticket_id} does not exist") from None
        except UnknownSubtask:
            raise PermanentFailure(
                f"ticket {ready.ticket_id} has no {ready.subtask_id!r}"
            ) from None

    async def _prepare(self, ticket: TicketSnapshot, work: ReadyWork) -> _Prepared:
        ready = work.ready
        definition = ticket.definition(ready.subtask_id)
        question = ticket.questions.get(ready.subtask_id)
        if question is None:
            schema = definition.output_schema_for(dict(ticket.options))
            prompt = await self._prompts.build(ticket, definition)
        else:
            schema = definition.output_schema_for({})
            prompt = await self._prompts.build_question(ticket, ready.subtask_id)
        # Lists chosen from the document (its headings) get their candidates before the prompt
        # shows the answer's shape and the decoder is constrained to it.
        schema = offer_choices(schema, shown_document(prompt))
        prompt = replace(prompt, output_schema=schema)
        request = GenerationRequest(
            messages=build_messages(
                prompt,
                max_document_chars=self._settings.max_document_chars,
                # A constrained decoder follows the schema without reading it; shown, its text
                # distracts a small model (it answers with the schema's keywords).
                show_schema=not getattr(self._backend, "constrains_output", False),
            ),
            json_schema=generation_schema(schema),
            max_tokens=definition.max_tokens,
            # At temperature 0 a retry would repeat the invalid answer word for word.
            temperature=min(0.8, RETRY_TEMPERATURE_STEP * (ready.attempt - 1)),
        )
        # Prompts with the whole document share everything up to the findings; prompts with
        # retrieved chunks share the system prompt, and the same query gives the same chunks.
        query = definition.retrieval.query if definition.retrieval else ""
        ids = [s.id for s in ticket.pipeline.subtasks]
        position = len(ids) if question is not None else ids.index(definition.id)
        order = (1 if definition.retrieval else 0, query or "", position)
        return _Prepared(work, definition, prompt, request, order, question is not None)

    async def _generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """The first prompt alone, so its prefix is cached before the rest arrive together.

        A backend whose batches run one request after another, in order (llama.cpp), gets
        everything as one batch instead: nothing can then come between the requests and evict
        their shared prefix.
        """
        if getattr(self._backend, "batch_runs_in_order", False):
            return await self._backend.generate_batch(requests)
        first = await self._backend.generate(requests[0])
        rest = await self._backend.generate_batch(requests[1:]) if len(requests) > 1 else []
        return [first, *rest]

    async def _record(
        self, ticket: TicketSnapshot, item: _Prepared, generation: Generation
    ) -> None:
        ready, traceparent = item.work.ready, item.work.traceparent
        question = ticket.questions.get(ready.subtask_id)
        try:
            output = validate_output(
                generation.text,
                item.request.json_schema,
                system_prompt=(
                    ticket.pipeline.system_prompt
                    if question is None
                    else question.definition.system_prompt
                ),
            )
        except InvalidOutput as error:
            await self._retry(ticket, item, f"the model's answer was not valid: {error.reason}")
            return
        # Fields the schema computes, then its checks: claims the document does not support and
        # fields that contradict each other. They fail the attempt like an invalid answer while
        # attempts remain; the last attempt's answer is kept, with what failed in `unverified`.
        schema = item.prompt.output_schema
        output = complete_output(output, schema, item.prompt.dependency_outputs)
        problems = check_output(output, schema, prompt_source(item.prompt))
        max_attempts = (
            ticket.pipeline.max_attempts if question is None else question.definition.max_attempts
        )
        if problems and ready.attempt < max_attempts:
            await self._retry(
                ticket, item, f"the model's answer did not hold up: {'; '.join(problems)}"
            )
            return
        output = await self._postprocessor.apply(ticket, item.definition, item.prompt, output)
        if problems:
            logger.info(
                "output kept with unverified fields",
                extra={"ticket_id": str(ticket.ticket_id), "subtask": ready.subtask_id},
            )
            output = {**output, "unverified": problems}
        provenance, prompt = provenance_of(item.request, generation, output)
        await self._write.complete_subtask(
            CompleteSubtask(
                ticket_id=ticket.ticket_id,
                subtask_id=ready.subtask_id,
                attempt=ready.attempt,
                output=output,
                model=generation.model,
                usage=contract.TokenUsage(
                    prompt_tokens=generation.prompt_tokens,
                    completion_tokens=generation.completion_tokens,
                    cached_tokens=generation.cached_tokens,
                ),
                latency_ms=generation.latency_ms,
                traceparent=traceparent,
                provenance=provenance,
                prompt=prompt,
            ),
        )

    async def _retry(self, ticket: TicketSnapshot, item: _Prepared, reason: str) -> None:
        """Fails the attempt as retryable; the aggregate decides whether another one follows."""
        ready = item.work.ready
        logger.info(
            "invalid output",
            extra={
                "ticket_id": str(ticket.ticket_id),
                "subtask": ready.subtask_id,
                "reason": reason,
            },
        )
        await self._write.fail_subtask(
            FailSubtask(
                ticket.ticket_id,
                ready.subtask_id,
                ready.attempt,
                reason,
                retryable=True,
                traceparent=item.work.traceparent,
            ),
        )


def _attributes(ready: contract.SubtaskReady) -> dict[str, str | int]:
    return {
        "ticketflow.ticket_id": str(ready.ticket_id),
        "ticketflow.subtask": ready.subtask_id,
        "ticketflow.attempt": ready.attempt,
    }


def prompt_text(request: GenerationRequest) -> str:
    """The exact prompt, as stored and hashed: the canonical JSON of the chat messages."""
    return contract.canonical_json([dict(message) for message in request.messages]).decode()


def provenance_of(
    request: GenerationRequest, generation: Generation, output: dict[str, Any]
) -> tuple[contract.Provenance, str]:
    """The provenance of `output` (as it will be recorded) and the prompt it names."""
    prompt = prompt_text(request)
    provenance = contract.Provenance(
        backend=generation.backend,
        model=generation.model,
        model_sha256=generation.model_sha256,
        model_revision=generation.model_revision,
        sampling=dict(generation.sampling),
        seed=generation.seed,
        prompt_sha256=contract.sha256_of(prompt.encode()),
        output_sha256=contract.sha256_of(contract.canonical_json(output)),
    )
    return provenance, prompt


def parse_ready(message: Msg) -> contract.SubtaskReady:
    try:
        return contract.SubtaskReady.model_validate_json(message.data)
    except ValidationError as error:
        raise PermanentFailure(f"not a valid subtask_ready event: {error}") from None
