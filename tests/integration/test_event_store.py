"""The write side against real PostgreSQL: append, reload, conflicts, idempotency."""

from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

from commands.errors import IdempotencyConflict, TicketNotFound, UnknownPipeline
from commands.messages import (
    CancelTicket,
    CompleteSubtask,
    CreateTicket,
    RecordIngestion,
    UploadedDocument,
)
from commands.service import CommandService
from commands.ticket import TicketStatus
from streams import contract
from tests.conftest import Servers
from tests.support import sample

PDF = sample("research-paper.pdf").read_bytes()
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def create(tenant: str, pipeline: str = "tiny", **kwargs: Any) -> CreateTicket:
    document = UploadedDocument("main", "paper.pdf", "application/pdf", kwargs.pop("content", PDF))
    return CreateTicket(tenant, "alice", (document,), pipeline, **kwargs)


def ingest(service: CommandService, ticket_id: uuid.UUID) -> None:
    doc = contract.IngestedDocument(role="main", sha256="0" * 64, characters=1, chunks=1)
    service.record_ingestion(RecordIngestion(ticket_id, (doc,)))


def completion(ticket_id: uuid.UUID, subtask_id: str) -> CompleteSubtask:
    return CompleteSubtask(
        ticket_id, subtask_id, 1, {"x": subtask_id}, "test-model", contract.TokenUsage(), 2.0
    )


def stored_events(servers: Servers, ticket_id: uuid.UUID) -> list[tuple[int, str, bytes]]:
    with psycopg.connect(servers.database_url) as conn:
        rows = conn.execute(
            "SELECT notification_id, topic, state FROM ticketflow_events "
            "WHERE originator_id = %s ORDER BY originator_version",
            (ticket_id,),
        ).fetchall()
    return [(r[0], r[1], bytes(r[2])) for r in rows]


def test_a_created_ticket_reloads_with_its_pipeline_snapshot(
    service: CommandService, tenant: str
) -> None:
    result = service.create_ticket(create(tenant, "document-review"))
    ticket = service.get_ticket(result.ticket_id)
    assert ticket.tenant == tenant
    assert ticket.status is TicketStatus.PENDING
    assert ticket.pipeline.name == "document-review"
    assert ticket.documents[0]["sha256"] == contract_sha(PDF)
    assert result.position > 0


def contract_sha(content: bytes) -> str:
    import hashlib

    return hashlib.sha256(content).hexdigest()


def test_events_are_stored_under_their_stable_topics(
    service: CommandService, servers: Servers, tenant: str
) -> None:
    result = service.create_ticket(create(tenant))
    ingest(service, result.ticket_id)
    topics = [topic for _, topic, _ in stored_events(servers, result.ticket_id)]
    assert topics == [
        "ticketflow.ticket.created.v1",
        "ticketflow.ticket.document_ingested.v1",
        "ticketflow.ticket.subtask_ready.v1",
    ]


def test_every_event_carries_the_trace_of_its_command(
    service: CommandService, servers: Servers, tenant: str
) -> None:
    result = service.create_ticket(create(tenant, traceparent=TRACE))
    ((_, _, state),) = stored_events(servers, result.ticket_id)
    assert b"4bf92f3577b34da6a3ce929d0e0e4736" in state


def test_a_command_returns_the_position_of_its_last_event(
    service: CommandService, servers: Servers, tenant: str
) -> None:
    created = service.create_ticket(create(tenant))
    ingest(service, created.ticket_id)
    result = service.complete_subtask(completion(created.ticket_id, "a"))
    positions = [position for position, _, _ in stored_events(servers, created.ticket_id)]
    assert result.appended == 3  # completed + two unblocked subtasks
    assert result.position == positions[-1]


def test_concurrent_completions_conflict_and_are_retried(
    service: CommandService, servers: Servers, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = service.create_ticket(create(tenant))
    ingest(service, created.ticket_id)
    service.complete_subtask(completion(created.ticket_id, "a"))

    app = service._app
    real_save = app.save
    both_loaded = threading.Barrier(2, timeout=10)
    conflicts = []

    def save_after_both_loaded(*args: Any, **kwargs: Any) -> Any:
        if not both_loaded.broken and both_loaded.n_waiting < 2:
            with contextlib.suppress(threading.BrokenBarrierError):
                both_loaded.wait()
        try:
            return real_save(*args, **kwargs)
        except IntegrityError:
            conflicts.append(1)
            both_loaded.abort()
            raise

    monkeypatch.setattr(app, "save", save_after_both_loaded)
    threads = [
        threading.Thread(target=service.complete_subtask, args=(completion(created.ticket_id, s),))
        for s in ("b", "c")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    monkeypatch.undo()

    assert conflicts == [1]
    ticket = service.get_ticket(created.ticket_id)
    assert {s: ticket.subtasks[s].status for s in ("b", "c")} == {
        "b": "completed",
        "c": "completed",
    }
    assert ticket.subtasks["d"].status == "ready"
    topics = [t for _, t, _ in stored_events(servers, created.ticket_id)]
    assert topics.count("ticketflow.ticket.subtask_completed.v2") == 3
    assert topics.count("ticketflow.ticket.subtask_ready.v1") == 4  # a, b, c, d: d only once


def test_a_repeated_create_with_the_same_key_returns_the_first_ticket(
    service: CommandService, servers: Servers, tenant: str
) -> None:
    first = service.create_ticket(create(tenant, idempotency_key="order-17"))
    again = service.create_ticket(create(tenant, idempotency_key="order-17"))
    assert again.ticket_id == first.ticket_id
    assert again.appended == 0
    assert again.position == first.position
    assert len(stored_events(servers, first.ticket_id)) == 1


def test_the_same_key_in_another_tenant_names_another_ticket(
    service: CommandService, tenant: str
) -> None:
    first = service.create_ticket(create(tenant, idempotency_key="k"))
    other = service.create_ticket(create(tenant + "x", idempotency_key="k"))
    assert first.ticket_id != other.ticket_id


def test_reusing_a_key_for_a_different_document_is_refused(
    service: CommandService, tenant: str
) -> None:
    service.create_ticket(create(tenant, idempotency_key="k2"))
    other = sample("coursework-ru.docx").read_bytes()
    with pytest.raises(IdempotencyConflict):
        service.create_ticket(create(tenant, idempotency_key="k2", content=other))


def test_documents_are_stored_in_the_transaction_of_the_events_that_name_them(
    service: CommandService, servers: Servers, tenant: str
) -> None:
    first = service.create_ticket(create(tenant, idempotency_key="k3"))
    other = sample("coursework-ru.docx").read_bytes()
    # The same key again, with another document: the append conflicts, so nothing it carried
    # is stored, the document included.
    with pytest.raises(IdempotencyConflict):
        service.create_ticket(create(tenant, idempotency_key="k3", content=other))
    with psycopg.connect(servers.database_url) as conn:
        rows = conn.execute(
            "SELECT sha256, size, media_type FROM blobs WHERE tenant = %s", (tenant,)
        ).fetchall()
        events = conn.execute(
            "SELECT count(*) FROM ticketflow_events WHERE originator_id = %s", (first.ticket_id,)
        ).fetchone()
    assert rows == [(contract_sha(PDF), len(PDF), "application/pdf")]
    assert events == (first.appended,)

    # Two roles with the same bytes: one blob, stored with the ticket's events.
    twice = CreateTicket(
        tenant,
        "alice",
        (
            UploadedDocument("resume", "a.docx", "application/octet-stream", other),
            UploadedDocument("vacancy", "b.docx", "application/octet-stream", other),
        ),
        "resume-screening",
    )
    created = service.create_ticket(twice)
    assert created.appended >= 1
    with psycopg.connect(servers.database_url) as conn:
        stored = conn.execute(
            "SELECT sha256 FROM blobs WHERE tenant = %s ORDER BY created_at", (tenant,)
        ).fetchall()
    assert stored == [(contract_sha(PDF),), (contract_sha(other),)]


def test_an_unknown_pipeline_is_refused_and_nothing_is_stored(
    service: CommandService, servers: Servers, tenant: str
) -> None:
    with pytest.raises(UnknownPipeline, match="document-review"):
        service.create_ticket(create(tenant, "no-such-pipeline"))
    with psycopg.connect(servers.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM blobs WHERE tenant = %s", (tenant,)).fetchone()
    assert row == (0,)


def test_the_document_is_stored_once_by_its_hash(
    service: CommandService, servers: Servers, tenant: str
) -> None:
    service.create_ticket(create(tenant))
    service.create_ticket(create(tenant))
    with psycopg.connect(servers.database_url) as conn:
        rows = conn.execute(
            "SELECT sha256, size FROM blobs WHERE tenant = %s", (tenant,)
        ).fetchall()
    assert rows == [(contract_sha(PDF), len(PDF))]
    assert service.document(tenant, contract_sha(PDF)) == PDF


def test_cancelling_another_tenants_ticket_answers_not_found(
    service: CommandService, tenant: str
) -> None:
    created = service.create_ticket(create(tenant))
    with pytest.raises(TicketNotFound):
        service.cancel_ticket(CancelTicket(created.ticket_id, tenant + "x", "mallory"))


@pytest.mark.parametrize("statement", ["UPDATE ticketflow_events SET topic = 'x'",
                                       "DELETE FROM ticketflow_events",
                                       "TRUNCATE ticketflow_events"])  # fmt: skip
def test_recorded_events_can_never_be_changed(servers: Servers, statement: str) -> None:
    with (
        psycopg.connect(servers.database_url) as conn,
        pytest.raises(psycopg.Error, match="append-only"),
    ):
        conn.execute(statement.encode())
