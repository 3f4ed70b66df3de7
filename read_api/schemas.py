"""Response and request bodies of the query API, with the examples its OpenAPI document shows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

TICKET_ID_EXAMPLE = "6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f"
SHA256_EXAMPLE = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
TIME_EXAMPLE = "2025-03-01T12:00:00.123456Z"
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ProjectionState(BaseModel):
    """How fresh the read models behind a response are (read-your-writes)."""

    position: int = Field(
        examples=[42], description="Global position the read models have applied."
    )
    behind: bool = Field(
        examples=[False],
        description="True when `min_position` was asked for and not reached within the wait.",
    )


class Progress(BaseModel):
    total: int = Field(examples=[4], description="Subtasks in the ticket's pipeline.")
    completed: int = Field(
        examples=[2],
        description="Subtasks completed for the ticket; a completion that came after the ticket"
        " ended (`ignored` on the subtask) does not count.",
    )
    failed_attempts: int = Field(
        examples=[1], description="Failed attempts, retried or not (a retry may still succeed)."
    )
    percent: int = Field(examples=[50], ge=0, le=100)


class TicketSummary(BaseModel):
    ticket_id: UUID = Field(examples=[TICKET_ID_EXAMPLE])
    owner: str = Field(examples=["alice"])
    pipeline_name: str = Field(examples=["document-review"])
    pipeline_version: int = Field(examples=[1])
    status: str = Field(examples=["running"])
    progress: Progress
    documents: list[dict[str, Any]] = Field(
        examples=[
            [
                {
                    "role": "main",
                    "filename": "paper.pdf",
                    "sha256": SHA256_EXAMPLE,
                    "media_type": "application/pdf",
                    "size": 183920,
                    "pages": 12,
                    "characters": 40211,
                    "chunks": 58,
                }
            ]
        ]
    )
    created_at: datetime = Field(examples=[TIME_EXAMPLE])
    updated_at: datetime = Field(examples=[TIME_EXAMPLE])
    ingested_at: datetime | None = Field(default=None, examples=[TIME_EXAMPLE])
    completed_at: datetime | None = Field(default=None, examples=[None])
    finished_at: datetime | None = Field(default=None, examples=[None])
    failure_reason: str | None = Field(default=None, examples=[None])
    failed_subtask_id: str | None = Field(default=None, examples=[None])
    cancelled_by: str | None = Field(default=None, examples=[None])
    last_position: int = Field(examples=[57], description="Position of the ticket's last event.")


class TicketPage(BaseModel):
    items: list[TicketSummary]
    next_cursor: str | None = Field(
        examples=["eyJjIjoiMjAyNS0wMy0wMVQxMjowMDowMCswMDowMCIsImkiOiI2ZjFjIn0"],
        description="Pass as `cursor` for the next page; null on the last page.",
    )
    projection: ProjectionState


class Subtask(BaseModel):
    subtask_id: str = Field(examples=["summary"])
    ordinal: int = Field(examples=[0])
    title: str = Field(examples=["Summarise the document"])
    depends_on: list[str] = Field(examples=[["goal"]])
    status: str = Field(
        examples=["completed"],
        description="pending, ready, running, completed or failed; `cancelled` for one that had"
        " not finished when its ticket was cancelled (work already under way may still report"
        " back: its output is then kept with `ignored`).",
    )
    attempts: int = Field(examples=[1])
    worker: str | None = Field(default=None, examples=["inference-7c9d"])
    last_error: str | None = Field(default=None, examples=[None])
    output: dict[str, Any] | None = Field(default=None, examples=[{"summary": "The paper…"}])
    output_sha256: str | None = Field(default=None, examples=[SHA256_EXAMPLE])
    model: str | None = Field(default=None, examples=["smollm2-135m-instruct"])
    prompt_tokens: int | None = Field(default=None, examples=[812])
    completion_tokens: int | None = Field(default=None, examples=[96])
    cached_tokens: int | None = Field(default=None, examples=[640])
    latency_ms: float | None = Field(default=None, examples=[1834.5])
    ignored: bool = Field(
        default=False,
        examples=[False],
        description="A result that arrived after the ticket failed or was cancelled.",
    )
    updated_at: datetime = Field(examples=[TIME_EXAMPLE])


class Question(BaseModel):
    """A follow-up question on the ticket's documents and, once answered, its answer."""

    question_id: UUID = Field(examples=["0d7e8f9a-1b2c-4d3e-8f4a-5b6c7d8e9f0a"])
    subtask_id: str = Field(
        description="The subtask that answers it, as named in its events.",
        examples=["question_0d7e8f9a1b2c4d3e8f4a5b6c7d8e9f0a"],
    )
    ordinal: int = Field(examples=[0], description="Its place in the conversation, from 0.")
    question: str = Field(examples=["What is the goal of the paper?"])
    asked_by: str = Field(examples=["alice"])
    status: Literal["asked", "ready", "running", "answered", "failed"] = Field(
        examples=["answered"],
        description="`asked`: waiting for the questions before it to be answered.",
    )
    attempts: int = Field(examples=[1])
    answer: dict[str, Any] | None = Field(
        default=None,
        description="{answerable, answer, citations: [{excerpt, page, heading}]} once answered.",
        examples=[
            {
                "answerable": True,
                "answer": "It measures …",
                "citations": [{"excerpt": 1, "page": 1, "heading": "Abstract"}],
            }
        ],
    )
    model: str | None = Field(default=None, examples=["smollm2-135m-instruct"])
    prompt_sha256: str | None = Field(
        default=None,
        description="sha256 of the exact prompt (GET /tickets/{id}/explain shows provenance).",
        examples=[SHA256_EXAMPLE],
    )
    last_error: str | None = Field(default=None, examples=[None])
    failure_reason: str | None = Field(default=None, examples=[None])
    asked_at: datetime = Field(examples=[TIME_EXAMPLE])
    answered_at: datetime | None = Field(default=None, examples=[TIME_EXAMPLE])
    updated_at: datetime = Field(examples=[TIME_EXAMPLE])


class TicketQuestions(BaseModel):
    ticket_id: UUID = Field(examples=[TICKET_ID_EXAMPLE])
    items: list[Question] = Field(description="In the order asked.")
    projection: ProjectionState


class TicketDetail(TicketSummary):
    subtasks: list[Subtask] = Field(description="In pipeline order (`ordinal`).")
    questions: list[Question] = Field(
        default_factory=list, description="Follow-up questions, in the order asked."
    )
    subtask_counts: dict[str, int] = Field(
        examples=[
            {"pending": 1, "ready": 0, "running": 1, "completed": 2, "failed": 0, "cancelled": 0}
        ],
        description="Subtasks by their current status.",
    )
    projection: ProjectionState


class ReportBody(BaseModel):
    ticket_id: UUID = Field(examples=[TICKET_ID_EXAMPLE])
    final_subtask_id: str = Field(examples=["verdict"])
    verdict: dict[str, Any] | None = Field(examples=[{"verdict": "accept", "confidence": 0.8}])
    outputs: dict[str, dict[str, Any]] = Field(
        examples=[
            {
                "verdict": {
                    "title": "Verdict",
                    "output": {"verdict": "accept"},
                    "output_sha256": SHA256_EXAMPLE,
                }
            }
        ]
    )
    markdown: str = Field(examples=["# Report\n\n## Verdict\n\naccept\n"])
    completed_at: datetime = Field(examples=[TIME_EXAMPLE])
    position: int = Field(examples=[57])
    projection: ProjectionState


class HistoryEvent(BaseModel):
    position: int = Field(examples=[41], description="Global position in the event log.")
    version: int = Field(examples=[1], description="The event's version within its ticket.")
    topic: str = Field(examples=["ticketflow.ticket.created.v1"])
    type: str = Field(examples=["created"], description="The event name (last subject token).")
    time: str = Field(examples=[TIME_EXAMPLE])
    traceparent: str | None = Field(
        default=None, examples=["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]
    )
    payload: dict[str, Any] = Field(
        examples=[{"ticket_id": TICKET_ID_EXAMPLE, "tenant": "acme", "owner": "alice"}]
    )


class EventHistory(BaseModel):
    ticket_id: UUID = Field(examples=[TICKET_ID_EXAMPLE])
    events: list[HistoryEvent]


class SearchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "query": "What sample size did the study use?",
                    "top_k": 5,
                    "document_sha256s": [SHA256_EXAMPLE],
                }
            ]
        },
    )

    # Something besides spaces, and no NUL (PostgreSQL text cannot hold one).
    query: str = Field(
        min_length=1,
        max_length=2000,
        pattern=r"^[^\x00]*[^\s\x00][^\x00]*$",
        examples=["What is the main result?"],
    )
    top_k: int = Field(default=5, ge=1, le=20, examples=[5])
    document_sha256s: list[Sha256] | None = Field(
        default=None,
        max_length=100,
        description="Only these documents of the caller's tenant; all of them when absent.",
        examples=[[SHA256_EXAMPLE]],
    )


class SearchHit(BaseModel):
    document_sha256: str = Field(examples=[SHA256_EXAMPLE])
    ordinal: int = Field(examples=[3])
    text: str = Field(examples=["We recruited 120 participants …"])
    page: int | None = Field(examples=[2])
    heading: str | None = Field(examples=["2 Methods"])
    score: float = Field(examples=[0.0328], description="Reciprocal-rank-fusion score.")


class SearchResults(BaseModel):
    results: list[SearchHit]


class HealthReport(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] = Field(examples=[{"database": "ok"}])
