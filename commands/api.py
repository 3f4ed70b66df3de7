"""The command HTTP API: open and cancel tickets. Thin: parse, build a command, call the service.
The composition root adds the account and integrator routes (`identity.api`) as `routers`.

`POST /tickets` honours `Prefer: wait=N` (RFC 7240): it waits up to N seconds (at most
`CommandApiDeps.max_wait_s`) for the ticket to finish and answers 200 with its report when it
completes in time. This side never reads the read models itself: the composition root gives it
`TicketOutcomes`, which does.

Domain errors become HTTP errors here and only here, always as
`{"error": {"code": ..., "message": ...}}` (`security.http`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Path, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from commands.errors import (
    ConcurrencyConflict,
    DomainError,
    IdempotencyConflict,
    InvalidDocument,
    InvalidOptions,
    InvalidTransition,
    TicketNotFound,
    UnknownPipeline,
    UnknownSubtask,
)
from commands.messages import (
    AskQuestion,
    CancelTicket,
    CreateTicket,
    RetrySubtask,
    UploadedDocument,
)
from commands.service import CommandService
from security.filenames import sanitize_filename
from security.http import (
    ApiError,
    Authenticate,
    HealthCheck,
    api_lifespan,
    auth_docs,
    error_doc,
    error_response,
    health_router,
    install_error_handlers,
    require_roles,
)
from streams.contract import QUESTION_MAX_CHARS
from streams.contract.identity import Principal

logger = logging.getLogger(__name__)

_IDEMPOTENCY_KEY_MAX = 200
#: How deeply arrays and objects may nest in `options` (pipelines' options are flat).
OPTIONS_MAX_DEPTH = 32
_MAX_NUMBER_DIGITS = 100
# PostgreSQL text cannot hold a NUL, and no document, name or option needs one.
_NO_NUL = "must not contain NUL characters (U+0000)."


@dataclass(frozen=True)
class UploadLimits:
    max_document_bytes: int
    max_documents: int
    max_options_bytes: int


class FinishedTicket(Protocol):
    """How a ticket finished: completed (with its report), failed or cancelled."""

    @property
    def status(self) -> str: ...

    @property
    def report(self) -> Mapping[str, Any] | None:
        """A completed ticket's report as the query API serves it (`final_subtask_id`,
        `verdict`, `outputs`, `markdown`, `completed_at`, `position`); None otherwise."""


class TicketOutcomes(Protocol):
    """Waits for a ticket to finish (`projections.outcomes.ReadModelOutcomes`)."""

    async def wait(
        self,
        tenant: str,
        ticket_id: UUID,
        timeout_s: float,
        *,
        abandoned: Callable[[], Awaitable[bool]] | None = None,
    ) -> FinishedTicket | None: ...


MAX_WAIT_S = 60.0
"""The longest `Prefer: wait` is honoured by default; a longer wait waits this long."""


@dataclass
class CommandApiDeps:
    service: CommandService
    authenticate: Authenticate
    health_checks: dict[str, HealthCheck]
    limits: UploadLimits
    accounts: object
    """What the routers the composition root adds need (`identity.api.AccountApiDeps`)."""
    outcomes: TicketOutcomes | None = None
    """What `Prefer: wait` waits on; without it the preference is ignored."""
    max_wait_s: float = MAX_WAIT_S


class TicketAccepted(BaseModel):
    ticket_id: UUID = Field(examples=["6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f"])
    position: int = Field(examples=[42], description="Global position of the command's last event.")
    created: bool = Field(
        description="False when an Idempotency-Key matched an earlier ticket.", examples=[True]
    )


class TicketReportPublic(BaseModel):
    final_subtask_id: str = Field(examples=["verdict"])
    verdict: dict[str, Any] | None = Field(examples=[{"verdict": "accept", "confidence": 0.8}])
    outputs: dict[str, dict[str, Any]] = Field(
        description="Every subtask's `title`, `output` and `output_sha256`, by subtask id."
    )
    markdown: str = Field(examples=["# Document review: paper.pdf (main)\n"])
    completed_at: datetime
    position: int = Field(
        examples=[57], description="Global position of the event that completed the ticket."
    )


class TicketCompletedReport(BaseModel):
    """The answer to `POST /tickets` with `Prefer: wait=N` when the ticket completed in time."""

    ticket_id: UUID = Field(examples=["6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f"])
    position: int = Field(examples=[42], description="Global position of the command's last event.")
    created: bool = Field(
        description="False when an Idempotency-Key matched an earlier ticket.", examples=[True]
    )
    status: Literal["completed"] = "completed"
    report: TicketReportPublic = Field(
        description="The report, as `GET /tickets/{ticket_id}/report` of the query API answers it."
    )


_PREFERENCE_APPLIED = {
    "Preference-Applied": {
        "description": "`wait=N` when the request's `Prefer: wait` was honoured: the seconds"
        " waited at most (the asked wait, capped).",
        "schema": {"type": "string"},
        "example": "wait=30",
    }
}


class TicketCancelAccepted(BaseModel):
    ticket_id: UUID
    position: int


class SubtaskRetryAccepted(BaseModel):
    ticket_id: UUID
    subtask_id: str = Field(examples=["summary"])
    position: int = Field(examples=[42], description="Global position of the command's last event.")


class QuestionAsk(BaseModel):
    question: str = Field(
        min_length=1,
        max_length=QUESTION_MAX_CHARS,
        description="A question on the ticket's documents; it may refer to earlier ones.",
        examples=["What is the goal of the paper?"],
    )


class QuestionAccepted(BaseModel):
    ticket_id: UUID
    question_id: UUID = Field(examples=["0d7e8f9a-1b2c-4d3e-8f4a-5b6c7d8e9f0a"])
    position: int = Field(examples=[42], description="Global position of the command's last event.")
    created: bool = Field(
        description="False when an Idempotency-Key matched an earlier question.", examples=[True]
    )


_STATUS_OF: list[tuple[type[DomainError], int]] = [
    (TicketNotFound, 404),
    (UnknownPipeline, 422),
    (UnknownSubtask, 422),
    (IdempotencyConflict, 422),
    (InvalidOptions, 422),
    (InvalidTransition, 409),
    (ConcurrencyConflict, 409),
]

TICKET_WRITERS = ("user", "admin")

_ERRORS: dict[int | str, dict[str, Any]] = {
    **auth_docs(*TICKET_WRITERS),
    404: error_doc("ticket_not_found", "ticket 6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f not found"),
    409: error_doc("ticket_already_finished", "ticket 6f1c… is already completed"),
    413: error_doc("document_too_large", "paper.pdf is larger than 20971520 bytes."),
    415: error_doc("unsupported_media_type", "Only PDF and DOCX documents are accepted."),
    422: error_doc("unknown_pipeline", "Unknown pipeline 'astrology'; available: …"),
}


def _deps_of(request: Request) -> CommandApiDeps:
    deps: CommandApiDeps = request.app.state.deps
    return deps


async def _get_deps(request: Request) -> CommandApiDeps:
    # A coroutine: FastAPI would run a plain function dependency in a worker thread.
    return _deps_of(request)


Deps = Annotated[CommandApiDeps, Depends(_get_deps)]
Writer = Annotated[Principal, Depends(require_roles(*TICKET_WRITERS))]
Admin = Annotated[Principal, Depends(require_roles("admin"))]


def _status_of(error: DomainError, more: Sequence[tuple[type[DomainError], int]] = ()) -> int:
    if isinstance(error, InvalidDocument):
        return error.status
    for cls, status in [*_STATUS_OF, *more]:
        if isinstance(error, cls):
            return status
    return 400


def create_app(
    resources: Callable[[], AbstractAsyncContextManager[CommandApiDeps]],
    *,
    routers: Sequence[APIRouter] = (),
    error_statuses: Sequence[tuple[type[DomainError], int]] = (),
    docs: bool = True,
) -> FastAPI:
    """The API; `resources` opens its connections at start-up and closes them at shutdown.

    `routers` are included before the ticket routes (the composition root passes the account
    and integrator routes), and `error_statuses` maps their domain errors to HTTP statuses.
    `docs` serves `/openapi.json`, `/docs` and `/redoc` (not in production).
    """

    app = FastAPI(
        title="ticketflow commands",
        version="1",
        description=(
            "Opens and cancels document-processing tickets, and manages accounts and tokens."
            " Reads live in the query API. Roles per route: docs/security.md."
        ),
        lifespan=api_lifespan(resources),
        # Without the OpenAPI document FastAPI serves no /docs and no /redoc either.
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, error: DomainError) -> JSONResponse:
        status = _status_of(error, error_statuses)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return error_response(status, error.code, str(error), headers)

    for router in routers:
        app.include_router(router)

    @app.post(
        "/tickets",
        status_code=202,
        response_model=TicketAccepted,
        responses={
            200: {
                "model": TicketCompletedReport,
                "headers": _PREFERENCE_APPLIED,
                "description": "With `Prefer: wait=N`: the ticket completed within the wait;"
                " its report.",
            },
            202: {
                "headers": _PREFERENCE_APPLIED,
                "description": "The ticket is open (or, with `Prefer: wait=N`, did not"
                " complete within the wait); follow it on the query API.",
            },
            **_ERRORS,
        },
        summary="Open a ticket for one document (or several with roles) and a pipeline",
        operation_id="createTicket",
        tags=["tickets"],
    )
    async def create_ticket(
        request: Request,
        principal: Writer,
        deps: Deps,
        file: Annotated[UploadFile | None, File(description="The document (role main).")] = None,
        files: Annotated[
            list[UploadFile] | None, File(description="Several documents, with `roles`.")
        ] = None,
        roles: Annotated[
            list[str] | None, Form(description="One role per file in `files`, in order.")
        ] = None,
        pipeline: Annotated[str, Form(examples=["document-review"])] = "document-review",
        options: Annotated[str | None, Form(description="A JSON object.")] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
        traceparent: Annotated[str | None, Header()] = None,
        prefer: Annotated[
            str | None,
            Header(
                description="`wait=N` (RFC 7240): answer with the report (200) if the ticket"
                f" completes within N seconds (at most {MAX_WAIT_S:g} by default), else 202"
                " as without it.",
                examples=["wait=30"],
            ),
        ] = None,
    ) -> JSONResponse:
        """Stores the documents and opens a ticket running `pipeline` on them; answers 202 with
        the ticket id and the position of its first event. The same `Idempotency-Key` again
        answers with the first ticket (`created: false`).

        With `Prefer: wait=N` the request stays open until the ticket finishes, for at most N
        seconds (capped at the server's maximum, 60 by default; `Preference-Applied` says the
        wait used): a ticket that completes in time answers 200 with its report, as the query
        API's `GET /tickets/{ticket_id}/report` would; one still running, or that failed or was
        cancelled, answers 202 as usual. A retry with the same `Idempotency-Key` and
        `Prefer: wait` waits for that same ticket, and answers at once with its report once it
        completed."""
        limits = deps.limits
        content_length = int(request.headers.get("content-length") or 0)
        if content_length > limits.max_document_bytes * limits.max_documents + 1024 * 1024:
            raise ApiError(413, "request_too_large", "The request is larger than allowed.")
        _refuse_nul("pipeline", pipeline)
        for role in roles or ():
            _refuse_nul("roles", role)
        _refuse_repeated_fields(await request.form())
        uploads = _pair_uploads(file, files, roles, limits.max_documents)
        for _, upload in uploads:
            _refuse_nul("filename", upload.filename)
        documents = [
            UploadedDocument(
                role=role,
                filename=_filename(upload),
                media_type=upload.content_type or "",
                content=await _read_bounded(upload, limits.max_document_bytes),
            )
            for role, upload in uploads
        ]
        command = CreateTicket(
            tenant=principal.tenant,
            owner=principal.subject,
            documents=tuple(documents),
            pipeline=pipeline,
            options=_parse_options(options, limits.max_options_bytes),
            idempotency_key=_check_idempotency_key(idempotency_key),
            traceparent=traceparent,
        )
        wait_s = preferred_wait(request.headers.getlist("prefer"))
        result = await run_in_threadpool(deps.service.create_ticket, command)
        created = result.appended > 0
        headers: dict[str, str] = {}
        applied = min(wait_s or 0, math.floor(deps.max_wait_s))
        if applied > 0 and deps.outcomes is not None:
            headers["Preference-Applied"] = f"wait={applied}"
            # A client that hangs up ends the wait: nobody is left to answer.
            finished = await deps.outcomes.wait(
                principal.tenant, result.ticket_id, applied, abandoned=request.is_disconnected
            )
            if finished is not None and finished.report is not None:
                completed = TicketCompletedReport(
                    ticket_id=result.ticket_id,
                    position=result.position,
                    created=created,
                    report=TicketReportPublic.model_validate(dict(finished.report)),
                )
                return JSONResponse(completed.model_dump(mode="json"), headers=headers)
        body = TicketAccepted(ticket_id=result.ticket_id, position=result.position, created=created)
        return JSONResponse(body.model_dump(mode="json"), status_code=202, headers=headers)

    @app.post(
        "/tickets/{ticket_id}/cancel",
        status_code=202,
        response_model=TicketCancelAccepted,
        responses=_ERRORS,
        summary="Cancel a ticket: nothing more is dispatched; in-flight results are ignored",
        operation_id="cancelTicket",
        tags=["tickets"],
    )
    async def cancel_ticket(
        ticket_id: UUID,
        principal: Writer,
        deps: Deps,
        traceparent: Annotated[str | None, Header()] = None,
    ) -> TicketCancelAccepted:
        command = CancelTicket(
            ticket_id=ticket_id,
            tenant=principal.tenant,
            cancelled_by=principal.subject,
            traceparent=traceparent,
        )
        result = await run_in_threadpool(deps.service.cancel_ticket, command)
        return TicketCancelAccepted(ticket_id=result.ticket_id, position=result.position)

    @app.post(
        "/tickets/{ticket_id}/subtasks/{subtask_id}/retry",
        status_code=202,
        response_model=SubtaskRetryAccepted,
        responses={
            **auth_docs("admin"),
            404: _ERRORS[404],
            409: error_doc(
                "invalid_transition", "only a failed ticket can be retried; ticket … is running"
            ),
            422: error_doc("unknown_subtask", "pipeline 'document-review' has no subtask 'x'"),
        },
        summary="Retry a failed subtask of a failed ticket: the ticket runs again (admins)",
        operation_id="retryTicketSubtask",
        tags=["tickets"],
    )
    async def retry_subtask(
        ticket_id: UUID,
        subtask_id: Annotated[str, Path(min_length=1, max_length=200, examples=["summary"])],
        principal: Admin,
        deps: Deps,
        traceparent: Annotated[str | None, Header()] = None,
    ) -> SubtaskRetryAccepted:
        """Re-opens a failed ticket of the caller's tenant: the failed subtask becomes ready for
        one more attempt, which the inference workers pick up as any other; if it fails again,
        so does the ticket. 409 unless the ticket failed and the subtask is its failed one;
        another tenant's ticket answers 404."""
        _refuse_nul("subtask_id", subtask_id)
        command = RetrySubtask(
            ticket_id=ticket_id,
            tenant=principal.tenant,
            subtask_id=subtask_id,
            retried_by=principal.subject,
            traceparent=traceparent,
        )
        result = await run_in_threadpool(deps.service.retry_subtask, command)
        return SubtaskRetryAccepted(
            ticket_id=result.ticket_id, subtask_id=subtask_id, position=result.position
        )

    @app.post(
        "/tickets/{ticket_id}/questions",
        status_code=202,
        response_model=QuestionAccepted,
        responses={
            **auth_docs(*TICKET_WRITERS),
            404: _ERRORS[404],
            409: error_doc(
                "documents_not_ingested",
                "the documents of ticket … are not ingested yet; ask once they are",
            ),
            422: error_doc("invalid_question", "The question is empty."),
        },
        summary="Ask a follow-up question on a ticket's documents, answered with citations",
        operation_id="askTicketQuestion",
        tags=["tickets"],
    )
    async def ask_question(
        ticket_id: UUID,
        body: QuestionAsk,
        principal: Writer,
        deps: Deps,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
        traceparent: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        """Records the question (`question_asked`) on a ticket of the caller's tenant whose
        documents were ingested, whether it is running, completed or failed; the ticket's status
        does not change. The answer is a subtask of its own (retrieval over the ticket's chunks,
        citations, the earlier questions and answers in its prompt), ending in
        `question_answered` or `question_failed`: follow it on the ticket's SSE stream or read
        `GET /tickets/{id}/questions` on the query API. A ticket answers its questions one at a
        time, in the order asked. 409 while the documents are not ingested, or once the ticket
        was cancelled; another tenant's ticket answers 404."""
        _refuse_nul("question", body.question)
        question = body.question.strip()
        if not question:
            raise ApiError(422, "invalid_question", "The question is empty.")
        command = AskQuestion(
            ticket_id=ticket_id,
            tenant=principal.tenant,
            asked_by=principal.subject,
            question=question,
            idempotency_key=_check_idempotency_key(idempotency_key),
            traceparent=traceparent,
        )
        result, question_id = await run_in_threadpool(deps.service.ask_question, command)
        accepted = QuestionAccepted(
            ticket_id=result.ticket_id,
            question_id=question_id,
            position=result.position,
            created=result.appended > 0,
        )
        return JSONResponse(accepted.model_dump(mode="json"), status_code=202)

    app.include_router(
        health_router(
            lambda request: _deps_of(request).health_checks, servers="PostgreSQL, NATS and Redis"
        )
    )

    return app


#: What a delta-seconds value too large to represent reads as (RFC 9111, section 1.2.2).
DELTA_SECONDS_CAP = 2**31


def preferred_wait(prefer: Sequence[str]) -> int | None:
    """The seconds of the first `wait` preference in `Prefer` header values (RFC 7240:
    `Prefer: respond-async, wait=10`), or None. A malformed one is ignored, as the RFC asks; a
    value too large to hold reads as 2^31, as HTTP reads delta-seconds (RFC 9111, 1.2.2)."""
    for value in prefer:
        for preference in value.split(","):
            token, _, parameter = preference.split(";", 1)[0].partition("=")
            if token.strip().lower() != "wait":
                continue
            seconds = parameter.strip().strip('"')
            if seconds.isascii() and seconds.isdigit():
                return int(seconds) if len(seconds) <= 10 else DELTA_SECONDS_CAP
            return None
    return None


def _refuse_repeated_fields(form: FormData) -> None:
    """A single-valued field sent twice would lose one of its values unseen (the form parser
    keeps the last): a second `file` is a document dropped. Refused, saying what to send."""
    for name in ("file", "pipeline", "options"):
        count = len(form.getlist(name))
        if count > 1:
            hint = (
                " (several documents go as `files`, with their `roles`)" if name == "file" else ""
            )
            raise ApiError(
                422, "invalid_request", f"The form field {name!r} was sent {count} times{hint}."
            )


def _pair_uploads(
    file: UploadFile | None,
    files: list[UploadFile] | None,
    roles: list[str] | None,
    max_documents: int,
) -> list[tuple[str, UploadFile]]:
    if file is not None and files:
        raise ApiError(422, "invalid_request", "Send either `file` or `files`, not both.")
    if file is not None:
        return [("main", file)]
    if not files:
        raise ApiError(422, "missing_document", "Attach a document as `file` (or `files`).")
    if len(files) > max_documents:
        raise ApiError(422, "too_many_documents", f"At most {max_documents} documents per ticket.")
    if not roles or len(roles) != len(files):
        raise ApiError(
            422, "missing_roles", "Give one `roles` value per file in `files`, in the same order."
        )
    return list(zip(roles, files, strict=True))


async def _read_bounded(upload: UploadFile, limit: int) -> bytes:
    content = await upload.read(limit + 1)
    if len(content) > limit:
        raise ApiError(
            413, "document_too_large", f"{_filename(upload)} is larger than {limit} bytes."
        )
    return content


def _filename(upload: UploadFile) -> str:
    return sanitize_filename(upload.filename)


def _parse_options(raw: str | None, limit: int) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    if len(raw.encode()) > limit:
        raise ApiError(413, "options_too_large", f"`options` is larger than {limit} bytes.")
    # Checked on the text, before parsing: the parser recurses once per level.
    if _nesting_exceeds(raw, OPTIONS_MAX_DEPTH):
        raise ApiError(
            422,
            "invalid_options",
            f"`options` is nested more than {OPTIONS_MAX_DEPTH} levels deep.",
        )
    try:
        value = json.loads(
            raw, parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float
        )
    except ValueError as error:  # JSONDecodeError, or one of the three parsers below
        raise ApiError(422, "invalid_options", f"`options` is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_options", "`options` must be a JSON object.")
    if _contains_nul(value):
        raise ApiError(422, "invalid_options", f"`options` {_NO_NUL}")
    return value


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON `text` opens more than `limit` arrays or objects inside each other; brackets
    inside strings do not count. Linear, with no recursion, whatever the input."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_NUMBER_DIGITS:
        raise ValueError(f"a number has more than {_MAX_NUMBER_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _contains_nul(value: Any) -> bool:
    """Whether any key or string in parsed JSON holds a NUL (only after the depth check)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or _contains_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_contains_nul(item) for item in value)
    return False


def _refuse_nul(field: str, value: str | None) -> None:
    if value is not None and "\x00" in value:
        raise ApiError(422, "invalid_text", f"`{field}` {_NO_NUL}")


def _check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= _IDEMPOTENCY_KEY_MAX or not key.isascii() or not key.isprintable():
        raise ApiError(
            422,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1-{_IDEMPOTENCY_KEY_MAX} printable ASCII characters.",
        )
    return key
