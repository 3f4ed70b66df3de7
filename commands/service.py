"""The command service: the only writer of events.

Each command loads the ticket, lets the aggregate decide, and saves the new events with
optimistic concurrency; a conflict (another writer appended first) is retried on fresh state.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from psycopg_pool import ConnectionPool

from commands.application import TicketApplication
from commands.blobs import Blob, BlobStore, sha256_hex
from commands.conflicts import retry_on_conflict
from commands.errors import (
    IdempotencyConflict,
    InvalidDocument,
    InvalidOptions,
    TicketNotFound,
    UnknownPipeline,
)
from commands.messages import (
    AskQuestion,
    CancelTicket,
    CommandResult,
    CompleteSubtask,
    CreateTicket,
    FailSubtask,
    FailTicket,
    RecordIngestion,
    RerunTicket,
    RetrySubtask,
    StartSubtask,
)
from commands.personal import (
    SubjectKeys,
    rerun_options,
    reveal,
    seal,
    subject_of_owner,
)
from commands.port import TicketSnapshot
from commands.questions import FOLLOW_UP, question_id_for
from commands.ticket import Ticket, snapshot_of
from commands.tracing import child_traceparent, traced_command
from commands.uploads import sniff_media_type
from streams import contract
from streams.contract.eventlog import EVENTS_TABLE

logger = logging.getLogger(__name__)

PROMPT_MEDIA_TYPE = "application/vnd.ticketflow.prompt+json"
"""Media type of the stored prompts: the canonical JSON of the chat messages."""
IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0c7f4e-4d0c-4c55-9a57-6f1f2f1f7d10")

T = TypeVar("T")


class PipelineCatalog(Protocol):
    def get(self, name: str) -> contract.PipelineDefinition:
        """The current definition of a pipeline; raises `UnknownPipeline`."""
        ...

    def names(self) -> list[str]: ...


def ticket_id_for(tenant: str, owner: str, idempotency_key: str) -> UUID:
    """The id a create with this key gets: the same user's key always names the same ticket,
    and two users' keys never name one ticket (a key is printable ASCII, so the last newline
    splits the name). Tickets created when ids were `uuid5(tenant, key)` keep their ids; this
    names new ones only."""
    return uuid.uuid5(uuid.uuid5(IDEMPOTENCY_NAMESPACE, tenant), f"{owner}\n{idempotency_key}")


class CommandService:
    def __init__(
        self,
        app: TicketApplication,
        blobs: BlobStore,
        pipelines: PipelineCatalog,
        pool: ConnectionPool,
        subject_keys: SubjectKeys,
        *,
        max_conflict_retries: int = 20,
    ) -> None:
        self._app = app
        self._blobs = blobs
        self._pipelines = pipelines
        self._pool = pool
        self._keys = subject_keys
        self._max_conflict_retries = max_conflict_retries

    # -- commands ---------------------------------------------------------------------------

    @traced_command
    def create_ticket(self, command: CreateTicket) -> CommandResult:
        try:
            pipeline = self._pipelines.get(command.pipeline)
        except KeyError:
            raise UnknownPipeline(
                f"Unknown pipeline {command.pipeline!r}; "
                f"available: {', '.join(self._pipelines.names())}"
            ) from None
        _check_roles(command, pipeline)
        options = checked_options(command.options, pipeline)
        documents = []
        for document in command.documents:
            media_type = sniff_media_type(document.content)
            documents.append(
                contract.DocumentRef(
                    role=document.role,
                    sha256=sha256_hex(document.content),
                    filename=document.filename,
                    media_type=media_type,
                    size=len(document.content),
                )
            )
        ticket_id = (
            ticket_id_for(command.tenant, command.owner, command.idempotency_key)
            if command.idempotency_key
            else uuid.uuid4()
        )
        created = contract.TicketCreated(
            ticket_id=ticket_id,
            tenant=command.tenant,
            owner=command.owner,
            documents=tuple(documents),
            pipeline=pipeline,
            prompt_hashes=pipeline.prompt_hashes,
            options=self._sealed(options, pipeline, command.tenant, ticket_id, command.owner),
            idempotency_key=command.idempotency_key,
        )
        # The documents are stored in the append's own transaction: an event never refers to
        # a document that is not stored.
        blobs = [
            Blob(command.tenant, document.content, ref.media_type, ref.sha256)
            for document, ref in zip(command.documents, documents, strict=True)
        ]
        ticket = Ticket.open(ticket_id, created, child_traceparent(command.traceparent))
        try:
            recordings = self._app.save(ticket, blobs=blobs)
        except IntegrityError:
            if not command.idempotency_key:
                raise
            return self._replay_create(ticket_id, created, options)
        self._app.tickets.keep(ticket)
        logger.info(
            "ticket created",
            extra={
                "ticket_id": str(ticket_id),
                "tenant": command.tenant,
                "pipeline": pipeline.name,
            },
        )
        return CommandResult(ticket_id, recordings[-1].notification.id, len(recordings))

    @traced_command
    def record_ingestion(self, command: RecordIngestion) -> CommandResult:
        traceparent = child_traceparent(command.traceparent)
        return self._update(
            command.ticket_id,
            lambda t: t.record_ingestion(list(command.documents), traceparent),
        )

    def start_subtask(self, command: StartSubtask) -> CommandResult:
        return self.start_subtask_viewed(command)[0]

    @traced_command
    def start_subtask_viewed(self, command: StartSubtask) -> tuple[CommandResult, TicketSnapshot]:
        """`start_subtask`, with the snapshot of the ticket the command left (for handlers:
        whether to run the attempt, and everything needed to run it, with no second load)."""
        traceparent = child_traceparent(command.traceparent)
        return self._decide(
            command.ticket_id,
            lambda t: t.start_subtask(
                command.subtask_id, command.attempt, command.worker, traceparent
            ),
            snapshot_of,
        )

    @traced_command
    def complete_subtask(self, command: CompleteSubtask) -> CommandResult:
        traceparent = child_traceparent(command.traceparent)
        provenance = command.provenance
        prompt: bytes | None = None
        if provenance is not None:
            if command.prompt is None:
                raise ValueError("a result with provenance needs the prompt it names")
            prompt = command.prompt.encode()
            if sha256_hex(prompt) != provenance.prompt_sha256:
                raise ValueError("the prompt does not match the provenance's prompt_sha256")

        def decide(ticket: Ticket) -> None:
            ticket.complete_subtask(
                command.subtask_id,
                command.attempt,
                command.output,
                command.model,
                command.usage,
                command.latency_ms,
                traceparent,
                provenance=provenance,
            )

        def blobs(ticket: Ticket) -> list[Blob]:
            # Stored with the event that names it, in the same transaction.
            return [] if prompt is None else [Blob(ticket.tenant, prompt, PROMPT_MEDIA_TYPE)]

        return self._update(command.ticket_id, decide, blobs=blobs)

    @traced_command
    def fail_subtask(self, command: FailSubtask) -> CommandResult:
        traceparent = child_traceparent(command.traceparent)
        return self._update(
            command.ticket_id,
            lambda t: t.fail_subtask(
                command.subtask_id, command.attempt, command.reason, command.retryable, traceparent
            ),
        )

    @traced_command
    def fail_ticket(self, command: FailTicket) -> CommandResult:
        traceparent = child_traceparent(command.traceparent)
        return self._update(command.ticket_id, lambda t: t.fail(command.reason, traceparent))

    @traced_command
    def cancel_ticket(self, command: CancelTicket) -> CommandResult:
        traceparent = child_traceparent(command.traceparent)
        return self._update(
            command.ticket_id,
            lambda t: t.cancel(command.reason, command.cancelled_by, traceparent),
            tenant=command.tenant,
        )

    @traced_command
    def retry_subtask(self, command: RetrySubtask) -> CommandResult:
        """Re-open a failed ticket: its failed subtask is ready for one more attempt
        (`Ticket.retry_subtask`). 404 for another tenant's ticket, 409 when it is not failed."""
        traceparent = child_traceparent(command.traceparent)
        return self._update(
            command.ticket_id,
            lambda t: t.retry_subtask(command.subtask_id, command.retried_by, traceparent),
            tenant=command.tenant,
        )

    @traced_command
    def ask_question(self, command: AskQuestion) -> tuple[CommandResult, UUID]:
        """A follow-up question on the ticket's documents (`Ticket.ask_question`), and its id.
        404 for another tenant's ticket; 409 while the documents are not ingested, or once the
        ticket was cancelled."""
        traceparent = child_traceparent(command.traceparent)
        question_id = question_id_for(command.ticket_id, command.asked_by, command.idempotency_key)
        result = self._update(
            command.ticket_id,
            lambda t: t.ask_question(
                question_id,
                command.question,
                command.asked_by,
                FOLLOW_UP,
                traceparent,
                idempotency_key=command.idempotency_key,
            ),
            tenant=command.tenant,
        )
        return result, question_id

    @traced_command
    def rerun_ticket(self, command: RerunTicket) -> CommandResult:
        """A new ticket on the same documents, linked to the first by `TicketRerunRequested`.

        It runs today's version of the pipeline, or `pipeline_version`: the version the first
        ticket ran (its recorded snapshot) or today's. The new ticket's first two events are
        `TicketCreated` (as any ticket's) and `TicketRerunRequested`, appended together.
        """
        original = self.get_ticket(command.ticket_id, command.tenant)
        current = None
        if original.pipeline.name in self._pipelines.names():
            current = self._pipelines.get(original.pipeline.name)
        wanted = command.pipeline_version
        if wanted is None:
            pipeline = current or original.pipeline
        elif current is not None and current.version == wanted:
            pipeline = current
        elif original.pipeline.version == wanted:
            pipeline = original.pipeline
        else:
            known = sorted({original.pipeline.version, *([current.version] if current else [])})
            raise UnknownPipeline(
                f"Pipeline {original.pipeline.name!r} version {wanted} is not available;"
                f" available: {', '.join(f'v{v}' for v in known)}"
            )
        documents = []
        for document in original.documents:
            if self._blobs.get(original.tenant, document["sha256"]) is None:
                raise TicketNotFound(f"document {document['sha256']} of ticket is not stored")
            documents.append(contract.DocumentRef.model_validate(document))
        ticket_id = uuid.uuid4()
        passed, subjects = rerun_options(
            self._keys,
            original.options,
            original.pipeline,
            tenant=original.tenant,
            ticket_id=original.id,
        )
        unmarked = sorted(set(subjects) - pipeline.personal_options)
        if unmarked:
            raise InvalidOptions(
                f"Option {unmarked[0]!r} is personal data, and version {pipeline.version} of"
                f" pipeline {pipeline.name!r} would record it in plain text.",
                option=unmarked[0],
            )
        created = contract.TicketCreated(
            ticket_id=ticket_id,
            tenant=original.tenant,
            owner=command.requested_by,
            documents=tuple(documents),
            pipeline=pipeline,
            prompt_hashes=pipeline.prompt_hashes,
            options=self._sealed(
                checked_options(passed, pipeline),
                pipeline,
                original.tenant,
                ticket_id,
                command.requested_by,
                subjects,
            ),
            idempotency_key=None,
        )
        traceparent = child_traceparent(command.traceparent)
        ticket = Ticket.open(ticket_id, created, traceparent)
        ticket.link_rerun(original, command.requested_by, traceparent)
        recordings = self._app.save(ticket)
        self._app.tickets.keep(ticket)
        logger.info(
            "ticket re-run",
            extra={"ticket_id": str(ticket_id), "rerun_of": str(original.id)},
        )
        return CommandResult(ticket_id, recordings[-1].notification.id, len(recordings))

    def prompt(self, tenant: str, sha256: str) -> str | None:
        """A prompt a `SubtaskCompleted` names by its `provenance.prompt_sha256`."""
        content = self._blobs.get(tenant, sha256)
        return None if content is None else content.decode()

    def ping(self) -> None:
        """Raises unless the database answers within two seconds."""
        with self._pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        """Close the connections this service holds (the event store's and its own pool)."""
        self._app.close()
        self._pool.close()

    # -- queries the write side needs --------------------------------------------------------

    def snapshot(self, ticket_id: UUID) -> TicketSnapshot:
        """What a handler sees of the ticket as stored now (commands/port.py)."""
        try:
            return self._app.view_ticket(ticket_id, snapshot_of)
        except AggregateNotFoundError:
            raise TicketNotFound(f"ticket {ticket_id} not found") from None

    def get_ticket(self, ticket_id: UUID, tenant: str | None = None) -> Ticket:
        """The current aggregate; another tenant's ticket is reported as not found."""
        try:
            ticket = self._app.current_ticket(ticket_id)
        except AggregateNotFoundError:
            raise TicketNotFound(f"ticket {ticket_id} not found") from None
        if tenant is not None and ticket.tenant != tenant:
            raise TicketNotFound(f"ticket {ticket_id} not found")
        return ticket

    def document(self, tenant: str, sha256: str) -> bytes | None:
        return self._blobs.get(tenant, sha256)

    # -- internals --------------------------------------------------------------------------

    def _update(
        self,
        ticket_id: UUID,
        decide: Callable[[Ticket], None],
        *,
        tenant: str | None = None,
        blobs: Callable[[Ticket], Sequence[Blob]] | None = None,
    ) -> CommandResult:
        return self._decide(ticket_id, decide, lambda _: None, tenant=tenant, blobs=blobs)[0]

    def _decide(
        self,
        ticket_id: UUID,
        decide: Callable[[Ticket], None],
        view: Callable[[Ticket], T],
        *,
        tenant: str | None = None,
        blobs: Callable[[Ticket], Sequence[Blob]] | None = None,
    ) -> tuple[CommandResult, T]:
        """Decides on the ticket and appends what it decided, retrying conflicts; `view` sees
        the ticket as the command left it, before anyone else may use it. `blobs` names what
        the decided events refer to, stored in the same transaction as they are."""
        # The first try decides on the cached ticket, if this process has it, without reading
        # the store: appending on stale state reuses a stored version and conflicts. What
        # appends nothing (a no-op, a refusal) is confirmed on the stored state first.
        cached = self._app.tickets.take(ticket_id)

        def attempt(_: int) -> tuple[CommandResult, T]:
            nonlocal cached
            while True:
                from_cache = cached is not None
                ticket = cached if cached is not None else self._load(ticket_id)
                cached = None
                if tenant is not None and ticket.tenant != tenant:
                    raise TicketNotFound(f"ticket {ticket_id} not found")
                try:
                    decide(ticket)
                except Exception:
                    if from_cache and self._app.has_newer_events(ticket):
                        continue  # decided on stale state: decide again on the stored one
                    raise
                if not ticket.pending_events:
                    if from_cache and self._app.has_newer_events(ticket):
                        continue
                    seen = view(ticket)
                    self._app.tickets.keep(ticket)
                    position = self._position_of(ticket_id, ticket.version)
                    return CommandResult(ticket_id, position, 0), seen
                stored = blobs(ticket) if blobs is not None else ()
                # A conflict raises: the helper retries.
                recordings = self._app.save(ticket, blobs=stored)
                seen = view(ticket)
                self._app.tickets.keep(ticket)
                result = CommandResult(ticket_id, recordings[-1].notification.id, len(recordings))
                return result, seen

        return retry_on_conflict(
            attempt, retries=self._max_conflict_retries, subject=f"ticket {ticket_id}"
        )

    def _load(self, ticket_id: UUID) -> Ticket:
        """The ticket replayed from the store, for a command (not shared with the cache)."""
        try:
            return self._app.get_ticket(ticket_id)
        except AggregateNotFoundError:
            raise TicketNotFound(f"ticket {ticket_id} not found") from None

    def _sealed(
        self,
        options: dict[str, Any],
        pipeline: contract.PipelineDefinition,
        tenant: str,
        ticket_id: UUID,
        owner: str,
        subjects: dict[str, UUID] | None = None,
    ) -> dict[str, Any]:
        """The options as recorded: personal ones encrypted for their subject, by default the
        user who opens the ticket."""
        personal = [name for name in pipeline.personal_options if options.get(name) is not None]
        if not personal:
            return options
        chosen = dict(subjects or {})
        for name in personal:
            if name not in chosen:
                chosen[name] = subject_of_owner(owner, pipeline)
        return seal(
            self._keys, options, pipeline, tenant=tenant, ticket_id=ticket_id, subjects=chosen
        )

    def plain_options(self, ticket: Ticket) -> dict[str, Any]:
        """The ticket's options as passed: personal ones decrypted, or `[erased]`."""
        return reveal(
            self._keys, ticket.options, ticket.pipeline, tenant=ticket.tenant, ticket_id=ticket.id
        )

    def _replay_create(
        self, ticket_id: UUID, created: contract.TicketCreated, options: dict[str, Any]
    ) -> CommandResult:
        """A create with a known idempotency key: the first ticket, if it is the same request."""
        existing = self.get_ticket(ticket_id)
        same_request = (
            existing.tenant == created.tenant
            and existing.pipeline.name == created.pipeline.name
            and [d["sha256"] for d in existing.documents] == [d.sha256 for d in created.documents]
            and self.plain_options(existing) == options
        )
        if not same_request:
            raise IdempotencyConflict(
                "This Idempotency-Key was already used for a different request."
            )
        return CommandResult(ticket_id, self._position_of(ticket_id, 1), 0)

    def _position_of(self, ticket_id: UUID, version: int) -> int:
        with self._pool.connection() as conn:
            row = conn.execute(
                f"SELECT notification_id FROM {EVENTS_TABLE} "
                "WHERE originator_id = %s AND originator_version = %s",
                (ticket_id, version),
            ).fetchone()
        return int(row[0]) if row else 0


def _check_roles(command: CreateTicket, pipeline: contract.PipelineDefinition) -> None:
    roles = [document.role for document in command.documents]
    if len(set(roles)) != len(roles):
        raise InvalidDocument("Each document role may appear only once.", code="duplicate_role")
    if sorted(roles) != sorted(pipeline.document_roles):
        raise InvalidDocument(
            f"Pipeline {pipeline.name!r} needs documents with roles "
            f"{', '.join(pipeline.document_roles)}; got {', '.join(roles) or 'none'}.",
            code="document_roles_mismatch",
        )


def checked_options(
    options: dict[str, Any], pipeline: contract.PipelineDefinition
) -> dict[str, Any]:
    """The options with the defaults of the pipeline's `options_schema` filled in, once they
    satisfy it; `InvalidOptions` with a sentence that names the offending option otherwise.

    Defaults are recorded in the event, so a ticket's options say what it ran with even after
    the pipeline's defaults change.
    """
    schema = pipeline.accepted_options_schema
    properties: dict[str, Any] = schema.get("properties", {})
    defaults = {
        name: spec["default"]
        for name, spec in properties.items()
        if isinstance(spec, dict) and "default" in spec and name not in options
    }
    effective = {**defaults, **options}
    error = best_match(Draft202012Validator(schema).iter_errors(effective))
    if error is not None:
        raise _options_error(error, effective, pipeline)
    return effective


def _options_error(
    error: ValidationError, options: dict[str, Any], pipeline: contract.PipelineDefinition
) -> InvalidOptions:
    accepted = sorted(pipeline.accepted_options_schema.get("properties", {}))
    where = [str(part) for part in error.absolute_path]
    if not where and error.validator == "required":
        required = error.validator_value if isinstance(error.validator_value, list) else []
        missing = [name for name in required if name not in options]
        name = missing[0] if missing else "?"
        return InvalidOptions(f"Pipeline {pipeline.name!r} needs the option {name!r}.", option=name)
    if not where and error.validator == "additionalProperties":
        unknown = sorted(name for name in options if name not in accepted)
        name = unknown[0] if unknown else "?"
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no options"
        return InvalidOptions(
            f"Pipeline {pipeline.name!r} has no option {name!r}; {takes}.", option=name
        )
    if not where:
        return InvalidOptions(f"Options for pipeline {pipeline.name!r}: {error.message}.")
    name = ".".join(where)
    return InvalidOptions(f"Option {name!r} is invalid: {error.message}.", option=where[0])
