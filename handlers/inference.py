"""The inference handler: runs one ready subtask on the inference backend.

The durable consumer on `subtask_ready` events is the inference queue. For each message the
handler loads the ticket (the aggregate is the only source of pipeline state), skips stale
messages, records the start, builds the prompt (system prompt, document or retrieved chunks,
outputs of dependencies, instruction last), generates, validates the output against the
subtask's schema and records the completion. An output that does not validate is a retryable
subtask failure decided by the aggregate; a backend error is retried by redelivery with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from nats.aio.msg import Msg
from pydantic import ValidationError

from commands.errors import TicketNotFound
from commands.messages import CompleteSubtask, FailSubtask, StartSubtask
from commands.service import CommandService
from commands.ticket import SubtaskStatus, Ticket
from handlers.consumer import PermanentFailure
from handlers.ingest import DocumentTexts
from handlers.postprocess import OutputPostprocessor
from handlers.prompting import PromptAssembler
from inference.backends import GenerationRequest, InferenceBackend
from inference.embeddings import Embedder
from inference.prompts import build_messages
from inference.retrieval import ChunkStore
from inference.validation import InvalidOutput, validate_output
from streams import contract

logger = logging.getLogger(__name__)

RETRY_TEMPERATURE_STEP = 0.3


@dataclass(frozen=True)
class InferenceSettings:
    max_document_chars: int = 12_000
    worker: str = socket.gethostname()


class InferenceHandler:
    def __init__(
        self,
        service: CommandService,
        backend: InferenceBackend,
        chunks: ChunkStore,
        texts: DocumentTexts,
        embedder: Embedder,
        settings: InferenceSettings | None = None,
        postprocessor: OutputPostprocessor | None = None,
    ) -> None:
        self._service = service
        self._backend = backend
        self._prompts = PromptAssembler(chunks, texts, embedder)
        self._postprocessor = postprocessor or OutputPostprocessor()
        self._settings = settings or InferenceSettings()

    async def __call__(self, message: Msg) -> None:
        ready = _parse(message)
        traceparent = (message.headers or {}).get("traceparent")
        ticket = await self._load(ready)
        if ticket is None:
            return
        subtask_id, attempt = ready.subtask_id, ready.attempt
        await asyncio.to_thread(
            self._service.start_subtask,
            StartSubtask(ticket.id, subtask_id, attempt, self._settings.worker, traceparent),
        )
        definition = ticket.pipeline.subtask(subtask_id)
        prompt = await self._prompts.build(ticket, definition)
        request = GenerationRequest(
            messages=build_messages(
                prompt,
                max_document_chars=self._settings.max_document_chars,
            ),
            json_schema=definition.output_schema,
            max_tokens=definition.max_tokens,
            # At temperature 0 a retry would repeat the invalid answer word for word.
            temperature=min(0.8, RETRY_TEMPERATURE_STEP * (attempt - 1)),
        )
        generation = await self._backend.generate(request)
        try:
            output = validate_output(
                generation.text,
                definition.output_schema,
                system_prompt=ticket.pipeline.system_prompt,
            )
        except InvalidOutput as error:
            logger.info(
                "invalid output",
                extra={"ticket_id": str(ticket.id), "subtask": subtask_id, "reason": error.reason},
            )
            await asyncio.to_thread(
                self._service.fail_subtask,
                FailSubtask(
                    ticket.id,
                    subtask_id,
                    attempt,
                    f"the model's answer was not valid: {error.reason}",
                    retryable=True,
                    traceparent=traceparent,
                ),
            )
            return
        output = await self._postprocessor.apply(ticket, definition, prompt, output)
        await asyncio.to_thread(
            self._service.complete_subtask,
            CompleteSubtask(
                ticket_id=ticket.id,
                subtask_id=subtask_id,
                attempt=attempt,
                output=output,
                model=generation.model,
                usage=contract.TokenUsage(
                    prompt_tokens=generation.prompt_tokens,
                    completion_tokens=generation.completion_tokens,
                    cached_tokens=generation.cached_tokens,
                ),
                latency_ms=generation.latency_ms,
                traceparent=traceparent,
            ),
        )

    async def fail(self, message: Msg, reason: str) -> None:
        """Dead letter: the attempt fails for good, and with it the ticket."""
        try:
            ready = _parse(message)
        except PermanentFailure:
            logger.error("dropping an unreadable subtask_ready event: %s", reason)
            return
        await asyncio.to_thread(
            self._service.fail_subtask,
            FailSubtask(
                ready.ticket_id,
                ready.subtask_id,
                ready.attempt,
                f"inference kept failing ({reason})",
                retryable=False,
            ),
        )

    async def _load(self, ready: contract.SubtaskReady) -> Ticket | None:
        """The ticket, or None when this message is stale (finished, done, superseded)."""
        try:
            ticket = await asyncio.to_thread(self._service.get_ticket, ready.ticket_id)
        except TicketNotFound:
            raise PermanentFailure(f"ticket {ready.ticket_id} does not exist") from None
        state = ticket.subtasks.get(ready.subtask_id)
        if state is None:
            raise PermanentFailure(f"ticket {ready.ticket_id} has no {ready.subtask_id!r}")
        if (
            ticket.is_finished
            or state.status is SubtaskStatus.COMPLETED
            or state.attempt != ready.attempt
        ):
            return None
        return ticket


def _parse(message: Msg) -> contract.SubtaskReady:
    try:
        return contract.SubtaskReady.model_validate_json(message.data)
    except ValidationError as error:
        raise PermanentFailure(f"not a valid subtask_ready event: {error}") from None
