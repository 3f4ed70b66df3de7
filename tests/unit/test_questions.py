"""Follow-up questions on a ticket's documents: the aggregate's sub-lifecycle of a question, and
the inference handler answering questions with the conversation so far.

The write side is the deterministic fake of the handlers' port (real `Ticket` aggregates, no
event store), the backend the deterministic `FakeBackend`, the chunk store a fixed list.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

import pytest

from commands.errors import IdempotencyConflict, QuestionRefused
from commands.messages import AskQuestion, CancelTicket, FailTicket
from commands.port import SubtaskStatus, TicketSnapshot, TicketStatus
from commands.ticket import snapshot_of
from commands.write_side import InMemoryWriteSide
from handlers.inference import InferenceHandler, ReadyWork
from handlers.ingest import DocumentTexts
from inference.backends import FakeBackend
from inference.embeddings import FakeEmbedder
from inference.retrieval import ChunkStore, RetrievedChunk
from streams import contract
from tests.unit.test_inference_handler import SHA, Texts, ingested, opened, ready

COMPLETED = "ticketflow.ticket.completed.v1"
ASKED = "ticketflow.ticket.question_asked.v1"
ANSWERED = "ticketflow.ticket.question_answered.v1"
QUESTION_FAILED = "ticketflow.ticket.question_failed.v1"
CANCELLED = "ticketflow.ticket.cancelled.v1"


class Chunks:
    """Two chunks of the ticket's document, whatever the query; the queries are kept."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    async def search(
        self, tenant: str, query: str, *args: object, **kwargs: object
    ) -> Sequence[RetrievedChunk]:
        self.queries.append(query)
        return [
            RetrievedChunk(SHA, 0, "The goal is faster parsing.", 1, "Abstract", 0.9),
            RetrievedChunk(SHA, 3, "Compiler writers benefit most.", 4, "Discussion", 0.8),
        ]


def handler(write: InMemoryWriteSide, backend: FakeBackend, chunks: Chunks) -> InferenceHandler:
    return InferenceHandler(
        write, backend, cast(ChunkStore, chunks), cast(DocumentTexts, Texts()), FakeEmbedder()
    )


def ask(
    write: InMemoryWriteSide, ticket_id: uuid.UUID, question: str, key: str | None = None
) -> uuid.UUID:
    _, question_id = write.ask_question(
        AskQuestion(ticket_id, "acme", "alice", question, idempotency_key=key)
    )
    return question_id


def ready_questions(ticket: TicketSnapshot) -> list[ReadyWork]:
    return [
        ReadyWork(
            contract.SubtaskReady(
                ticket_id=ticket.ticket_id,
                tenant=ticket.tenant,
                subtask_id=q.subtask_id,
                attempt=q.attempt,
            )
        )
        for q in ticket.questions.values()
        if q.status is SubtaskStatus.READY
    ]


async def completed_ticket(write: InMemoryWriteSide) -> uuid.UUID:
    ticket_id = opened(write)
    await ingested(write, ticket_id)
    run = handler(write, FakeBackend(), Chunks())
    while not (ticket := snapshot_of(write.tickets[ticket_id])).is_finished:
        await run.run(ticket_id, ready(ticket))
    assert ticket.status is TicketStatus.COMPLETED
    return ticket_id


def answer(text: str, *citations: int) -> dict[str, Any]:
    return {"answerable": True, "answer": text, "citations": list(citations)}


async def test_a_follow_up_question_sees_the_first_answer_and_the_ticket_stays_completed() -> None:
    write = InMemoryWriteSide()
    ticket_id = await completed_ticket(write)
    backend = FakeBackend(
        [answer("The goal is faster parsing.", 1), answer("Compiler writers benefit most.", 2)]
    )
    chunks = Chunks()
    run = handler(write, backend, chunks)

    first = ask(write, ticket_id, "What is the goal of the paper?")
    second = ask(write, ticket_id, "Who would benefit from that?")
    ticket = snapshot_of(write.tickets[ticket_id])
    # One question at a time, in the order asked: the second waits for the first's answer.
    assert [q.status for q in ticket.questions.values()] == [
        SubtaskStatus.READY,
        SubtaskStatus.PENDING,
    ]
    assert await run.run(ticket_id, ready_questions(ticket)) == [None]
    ticket = snapshot_of(write.tickets[ticket_id])
    assert await run.run(ticket_id, ready_questions(ticket)) == [None]

    ticket = snapshot_of(write.tickets[ticket_id])
    assert ticket.status is TicketStatus.COMPLETED
    answers = {q.question_id: q for q in ticket.questions.values()}
    assert answers[first].finished
    assert answers[second].finished
    assert answers[first].answer == "The goal is faster parsing."
    second_output = answers[second].output
    assert second_output is not None
    assert second_output["citations"] == [{"excerpt": 2, "page": 4, "heading": "Discussion"}]
    second_prompt = backend.requests[1].messages[-1]["content"]
    history = second_prompt.index("Earlier questions and answers")
    assert second_prompt.index("[excerpt 1") < history < second_prompt.index("<options>")
    assert "What is the goal of the paper?" in second_prompt[history:]
    assert "The goal is faster parsing." in second_prompt[history:]
    assert "Earlier questions" not in backend.requests[0].messages[-1]["content"]
    # The follow-up searches with the question it refers to as well.
    assert chunks.queries == [
        "What is the goal of the paper?",
        "What is the goal of the paper?\nWho would benefit from that?",
    ]
    events = write.events(ticket_id)
    assert events.count(COMPLETED) == 1
    assert events[events.index(COMPLETED) + 1 :].count(ANSWERED) == 2
    assert not {"ticketflow.ticket.failed.v1", CANCELLED} & set(events)


async def test_a_question_on_a_ticket_whose_documents_are_not_ingested_is_refused() -> None:
    write = InMemoryWriteSide()
    ticket_id = opened(write)

    with pytest.raises(QuestionRefused) as refused:
        ask(write, ticket_id, "What is the goal?")

    assert refused.value.code == "documents_not_ingested"
    assert ASKED not in write.events(ticket_id)


async def test_a_question_on_a_ticket_that_failed_before_its_documents_were_read_says_so() -> None:
    write = InMemoryWriteSide()
    ticket_id = opened(write)
    await write.fail_ticket(FailTicket(ticket_id, "paper.pdf: The PDF is password-protected."))

    with pytest.raises(QuestionRefused) as refused:
        ask(write, ticket_id, "What is the goal?")

    assert refused.value.code == "documents_not_ingested"
    assert "failed before its documents were read: it takes no questions" in str(refused.value)
    assert "ask once" not in str(refused.value)


async def test_a_question_that_never_validates_fails_alone_and_the_next_one_runs() -> None:
    write = InMemoryWriteSide()
    ticket_id = await completed_ticket(write)
    backend = FakeBackend(["not json"] * 3 + [answer("Compiler writers benefit most.", 2)])
    run = handler(write, backend, Chunks())
    first = ask(write, ticket_id, "What is the goal of the paper?")
    ask(write, ticket_id, "Who would benefit?")

    while ready_now := ready_questions(snapshot_of(write.tickets[ticket_id])):
        await run.run(ticket_id, ready_now)

    ticket = snapshot_of(write.tickets[ticket_id])
    failed, answered = ticket.questions.values()
    assert failed.question_id == first
    assert failed.finished
    assert failed.attempt == 3
    assert write.tickets[ticket_id].questions[failed.subtask_id].failure_reason
    assert answered.finished
    assert answered.answer == "Compiler writers benefit most."
    # A failed question is no part of the conversation the next one sees.
    assert "Earlier questions" not in backend.requests[-1].messages[-1]["content"]
    assert ticket.status is TicketStatus.COMPLETED
    events = write.events(ticket_id)
    assert events.count(QUESTION_FAILED) == 1
    assert events.count(COMPLETED) == 1


async def test_cancelling_a_running_ticket_ends_its_open_questions_before_its_final_event() -> None:
    write = InMemoryWriteSide()
    ticket_id = opened(write)
    await ingested(write, ticket_id)
    ask(write, ticket_id, "What is the goal?")
    ask(write, ticket_id, "And then?")

    write.cancel_ticket(CancelTicket(ticket_id, "acme", "alice"))

    events = write.events(ticket_id)
    assert events[-3:] == [QUESTION_FAILED, QUESTION_FAILED, CANCELLED]
    with pytest.raises(QuestionRefused) as refused:
        ask(write, ticket_id, "One more?")
    assert refused.value.code == "ticket_cancelled"


async def test_asking_again_with_the_same_key_records_the_question_once() -> None:
    write = InMemoryWriteSide()
    ticket_id = await completed_ticket(write)

    first = ask(write, ticket_id, "What is the goal?", key="k1")
    again = ask(write, ticket_id, "What is the goal?", key="k1")

    assert first == again
    assert write.events(ticket_id).count(ASKED) == 1
    with pytest.raises(IdempotencyConflict):
        ask(write, ticket_id, "Something else?", key="k1")


async def test_a_late_answer_of_a_question_ended_by_a_cancel_is_recorded_as_ignored() -> None:
    write = InMemoryWriteSide()
    ticket_id = opened(write)
    await ingested(write, ticket_id)
    ask(write, ticket_id, "What is the goal?")
    ticket = snapshot_of(write.tickets[ticket_id])
    (work,) = ready_questions(ticket)
    backend = FakeBackend([answer("The goal is faster parsing.", 1)])
    run = handler(write, backend, Chunks())
    write.cancel_ticket(CancelTicket(ticket_id, "acme", "alice"))

    assert await run.run(ticket_id, [work]) == [None]

    assert backend.calls == 0  # stale: the question had ended
    assert write.events(ticket_id)[-1] == CANCELLED


def test_the_question_events_are_in_the_contract_with_their_schemas() -> None:
    schemas = contract.json_schemas()
    asked = schemas[ASKED]
    assert {"question_id", "subtask_id", "question", "asked_by", "definition"} <= set(
        asked["properties"]
    )
    assert {"question_id", "subtask_id", "attempt"} <= set(schemas[ANSWERED]["properties"])
    assert {"question_id", "subtask_id", "reason"} <= set(schemas[QUESTION_FAILED]["properties"])
