"""The projector and the rebuild against real PostgreSQL: lifecycles, replays, crashes, swaps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest

from commands.messages import (
    CancelTicket,
    CompleteSubtask,
    CreateTicket,
    FailSubtask,
    FailTicket,
    RecordIngestion,
    StartSubtask,
    UploadedDocument,
)
from commands.service import CommandService
from projections import (
    READ_MODEL_TABLES,
    Projector,
    ProjectorSettings,
    ReadModelWriter,
    apply_events,
    rebuild,
    status,
)
from projections.projector import LEADER_LOCK_KEY
from streams import contract
from streams.contract.eventlog import EventLogReader, reset_nothing
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.support import random_tenant, sample

PDF = sample("research-paper.pdf").read_bytes()
USAGE = contract.TokenUsage(prompt_tokens=100, completion_tokens=20, cached_tokens=40)
KEYS = {
    "rm_tickets": "ticket_id",
    "rm_subtasks": "ticket_id, subtask_id",
    "rm_reports": "ticket_id",
    "rm_tenant_counts": "tenant",
    "rm_questions": "ticket_id, question_id",
}


@dataclass
class Harness:
    service: CommandService
    database_url: str
    tenant: str

    def create(self, pipeline: str = "tiny") -> uuid.UUID:
        document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
        command = CreateTicket(self.tenant, "alice", (document,), pipeline)
        return self.service.create_ticket(command).ticket_id

    def ingest(self, ticket_id: uuid.UUID) -> None:
        ingested = contract.IngestedDocument(
            role="main", sha256="0" * 64, pages=3, characters=1200, chunks=4
        )
        self.service.record_ingestion(RecordIngestion(ticket_id, (ingested,)))

    def complete(self, ticket_id: uuid.UUID, subtask_id: str, attempt: int = 1) -> None:
        output = {"x": f"{subtask_id} says hello"}
        self.service.complete_subtask(
            CompleteSubtask(ticket_id, subtask_id, attempt, output, "smollm2", USAGE, 12.5)
        )

    def fail(self, ticket_id: uuid.UUID, subtask_id: str, attempt: int = 1) -> None:
        self.service.fail_subtask(
            FailSubtask(ticket_id, subtask_id, attempt, "output is not valid", retryable=True)
        )

    def completed_ticket(self) -> uuid.UUID:
        """a, b, then c failing once and retried, then d: the ticket completes."""
        ticket_id = self.create()
        self.ingest(ticket_id)
        self.service.start_subtask(StartSubtask(ticket_id, "a", 1, "worker-1"))
        self.complete(ticket_id, "a")
        self.complete(ticket_id, "b")
        self.fail(ticket_id, "c")
        self.complete(ticket_id, "c", attempt=2)
        self.complete(ticket_id, "d")
        return ticket_id

    def failed_ticket(self) -> uuid.UUID:
        ticket_id = self.create("tiny-once")
        self.ingest(ticket_id)
        self.fail(ticket_id, "a")
        return ticket_id

    def cancelled_ticket(self) -> uuid.UUID:
        """Cancelled while `a` ran; the result that arrives afterwards is recorded and ignored."""
        ticket_id = self.create()
        self.ingest(ticket_id)
        self.service.cancel_ticket(CancelTicket(ticket_id, self.tenant, "bob", "not needed"))
        self.complete(ticket_id, "a")
        return ticket_id

    def every_lifecycle(self) -> dict[str, uuid.UUID]:
        return {
            "completed": self.completed_ticket(),
            "failed": self.failed_ticket(),
            "cancelled": self.cancelled_ticket(),
            "pending": self.create(),
        }


@pytest.fixture
def harness(servers: Servers, fresh_database: str) -> Iterator[Harness]:
    service = service_for(settings_for(servers, fresh_database), fresh_database)
    yield Harness(service, fresh_database, random_tenant())
    service.close()


@contextlib.asynccontextmanager
async def database_pool(url: str) -> AsyncIterator[asyncpg.Pool]:
    # As the projector's own pool: connections go back without a reset query.
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4, reset=reset_nothing)
    try:
        yield pool
    finally:
        await pool.close()


async def project(url: str) -> Projector:
    async with database_pool(url) as pool:
        projector = Projector(pool)
        await projector.catch_up()
    return projector


@contextlib.asynccontextmanager
async def running_projector(url: str) -> AsyncIterator[Projector]:
    async with database_pool(url) as pool:
        projector = Projector(pool, ProjectorSettings(poll_interval_s=60))
        stop = asyncio.Event()
        task = asyncio.create_task(projector.run(stop))
        try:
            yield projector
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every read model, ordered by key."""
    with psycopg.connect(url) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()
            for table, key in KEYS.items()
        }


def rows(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(sql, args).fetchall()


def max_position(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(max(notification_id), 0) FROM ticketflow_events")
        return int(row.fetchone()[0])  # type: ignore[index]


def stored_position(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT position FROM projection_positions WHERE name = 'read_models'"
        ).fetchone()
    return int(row[0]) if row else 0


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result if isinstance(result, bool) else await result:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not reached")


def caught_up(url: str) -> Callable[[], bool]:
    return lambda: stored_position(url) == max_position(url)


# -- lifecycles --------------------------------------------------------------------------------


async def test_a_completed_ticket_shows_its_subtasks_retries_and_report(harness: Harness) -> None:
    ticket_id = harness.completed_ticket()
    await project(harness.database_url)
    url = harness.database_url

    [ticket] = rows(url, "SELECT * FROM rm_tickets WHERE ticket_id = %s", ticket_id)
    assert ticket["status"] == "completed"
    assert ticket["tenant"] == harness.tenant
    assert ticket["owner"] == "alice"
    assert (ticket["pipeline_name"], ticket["pipeline_version"]) == ("tiny", 1)
    assert (ticket["subtasks_total"], ticket["subtasks_completed"]) == (4, 4)
    assert ticket["subtasks_failed"] == 1
    assert ticket["documents"] == [
        {
            "role": "main",
            "filename": "paper.pdf",
            "sha256": ticket["documents"][0]["sha256"],
            "media_type": "application/pdf",
            "size": len(PDF),
            "pages": 3,
            "characters": 1200,
            "chunks": 4,
        }
    ]
    assert ticket["created_at"] < ticket["ingested_at"] < ticket["completed_at"]
    assert ticket["completed_at"] == ticket["finished_at"] == ticket["updated_at"]
    assert ticket["failure_reason"] is None
    assert ticket["last_position"] == max_position(url)
    assert ticket["last_version"] == harness.service.get_ticket(ticket_id).version

    subtasks = rows(
        url, "SELECT * FROM rm_subtasks WHERE ticket_id = %s ORDER BY ordinal", ticket_id
    )
    assert [s["subtask_id"] for s in subtasks] == ["a", "b", "c", "d"]
    assert [s["title"] for s in subtasks] == ["A", "B", "C", "D"]
    assert [s["depends_on"] for s in subtasks] == [[], ["a"], ["a"], ["b", "c"]]
    assert {s["status"] for s in subtasks} == {"completed"}
    assert [s["attempts"] for s in subtasks] == [1, 1, 2, 1]
    assert subtasks[0]["worker"] == "worker-1"
    retried = subtasks[2]
    assert retried["last_error"] == "output is not valid"
    assert retried["output"] == {"x": "c says hello"}
    assert (retried["model"], retried["latency_ms"]) == ("smollm2", 12.5)
    assert (retried["prompt_tokens"], retried["completion_tokens"]) == (100, 20)
    assert retried["cached_tokens"] == 40
    assert not any(s["ignored"] for s in subtasks)

    [report] = rows(url, "SELECT * FROM rm_reports WHERE ticket_id = %s", ticket_id)
    assert report["final_subtask_id"] == "d"
    assert report["verdict"] == {"x": "d says hello"}
    assert report["outputs"]["b"] == {
        "title": "B",
        "output": {"x": "b says hello"},
        "output_sha256": None,
    }
    assert set(report["outputs"]) == {"a", "b", "c", "d"}
    assert report["completed_at"] == ticket["completed_at"]
    markdown = report["markdown"]
    assert markdown.startswith("# Tiny: paper.pdf (main)\n")
    assert markdown.index("## D") < markdown.index("## A") < markdown.index("## B")
    assert "- **X:** d says hello" in markdown


async def test_a_failed_ticket_shows_its_reason_and_failed_subtask(harness: Harness) -> None:
    ticket_id = harness.failed_ticket()
    await project(harness.database_url)

    [ticket] = rows(
        harness.database_url, "SELECT * FROM rm_tickets WHERE ticket_id = %s", ticket_id
    )
    assert ticket["status"] == "failed"
    assert ticket["failure_reason"] == 'Step "A" failed after 1 attempt: output is not valid'
    assert ticket["failed_subtask_id"] == "a"
    assert ticket["finished_at"] is not None
    assert ticket["completed_at"] is None
    assert (ticket["subtasks_completed"], ticket["subtasks_failed"]) == (0, 1)
    [subtask] = rows(
        harness.database_url,
        "SELECT * FROM rm_subtasks WHERE ticket_id = %s AND subtask_id = 'a'",
        ticket_id,
    )
    assert (subtask["status"], subtask["attempts"]) == ("failed", 1)
    assert (
        rows(harness.database_url, "SELECT 1 FROM rm_reports WHERE ticket_id = %s", ticket_id) == []
    )


async def test_a_result_arriving_after_cancellation_is_recorded_and_changes_no_ticket_state(
    harness: Harness,
) -> None:
    ticket_id = harness.cancelled_ticket()
    await project(harness.database_url)
    url = harness.database_url

    [ticket] = rows(url, "SELECT * FROM rm_tickets WHERE ticket_id = %s", ticket_id)
    assert ticket["status"] == "cancelled"
    assert (ticket["failure_reason"], ticket["cancelled_by"]) == ("not needed", "bob")
    assert ticket["subtasks_completed"] == 0
    assert ticket["updated_at"] == ticket["finished_at"], "the ignored result moves no time"
    assert ticket["last_position"] == max_position(url)
    [subtask] = rows(
        url, "SELECT * FROM rm_subtasks WHERE ticket_id = %s AND subtask_id = 'a'", ticket_id
    )
    assert subtask["ignored"] is True
    assert subtask["output"] == {"x": "a says hello"}
    assert rows(url, "SELECT 1 FROM rm_reports WHERE ticket_id = %s", ticket_id) == []


async def test_tenant_counts_add_up_by_status(harness: Harness) -> None:
    harness.every_lifecycle()
    harness.ingest(harness.create())
    unreadable = harness.create()
    harness.service.fail_ticket(FailTicket(unreadable, "The document has no text layer."))
    await project(harness.database_url)

    [counts] = rows(
        harness.database_url, "SELECT * FROM rm_tenant_counts WHERE tenant = %s", harness.tenant
    )
    assert counts == {
        "tenant": harness.tenant,
        "tickets": 6,
        "pending": 1,
        "running": 1,
        "completed": 1,
        "failed": 2,
        "cancelled": 1,
    }


# -- applying events once ----------------------------------------------------------------------


async def test_processing_the_same_events_twice_changes_nothing(harness: Harness) -> None:
    harness.every_lifecycle()
    url = harness.database_url
    await project(url)
    before = snapshot(url)

    async with database_pool(url) as pool:
        events = await EventLogReader(pool).read_after(0, 10_000)
        async with pool.acquire() as conn, conn.transaction():
            await apply_events(conn, ReadModelWriter(), events)
    assert snapshot(url) == before

    with psycopg.connect(url) as rewind:
        rewind.execute("UPDATE projection_positions SET position = 0")
    projector = await project(url)
    assert projector.applied == len(events)
    assert snapshot(url) == before


async def test_a_running_projector_wakes_on_notify_not_on_its_timer(harness: Harness) -> None:
    url = harness.database_url
    async with running_projector(url):  # it would otherwise look only every 60 s
        await wait_for(lambda: stored_position(url) == 0)
        ticket_id = await asyncio.to_thread(harness.create)
        await wait_for(
            lambda: bool(rows(url, "SELECT 1 FROM rm_tickets WHERE ticket_id = %s", ticket_id)),
            timeout=5,
        )
        await asyncio.to_thread(harness.completed_ticket)
        await wait_for(caught_up(url), timeout=5)


async def test_only_one_projector_is_active(harness: Harness) -> None:
    url = harness.database_url
    async with running_projector(url) as first, running_projector(url) as second:
        await asyncio.to_thread(harness.every_lifecycle)
        await wait_for(caught_up(url))
        assert sorted([first.applied, second.applied]) == [0, max_position(url)]


async def test_a_stopped_projector_gives_its_lock_back_though_its_pool_stays_open(
    harness: Harness,
) -> None:
    url = harness.database_url
    async with database_pool(url) as pool:
        for _ in range(2):
            projector = Projector(pool, ProjectorSettings(poll_interval_s=60))
            stop = asyncio.Event()
            task = asyncio.create_task(projector.run(stop))
            await asyncio.to_thread(harness.create)
            await wait_for(caught_up(url))
            stop.set()
            await asyncio.wait_for(task, 10)
            # The leader's connection is back in the pool, without its lock.
            with psycopg.connect(url) as conn:
                free = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,))
                assert free.fetchone() == (True,)
                conn.execute("SELECT pg_advisory_unlock(%s)", (LEADER_LOCK_KEY,))
            assert pool.get_idle_size() >= 1


# -- crashes and rebuilds ----------------------------------------------------------------------


def projector_waits_on_a_lock(url: str) -> bool:
    return bool(
        rows(
            url,
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'ticketflow-projector' AND wait_event_type = 'Lock'",
        )
    )


async def test_a_projector_killed_mid_batch_resumes_to_the_same_tables_as_a_rebuild(
    harness: Harness,
) -> None:
    url = harness.database_url
    env = {
        **os.environ,
        "TF_DATABASE_URL": url,
        "TF_NATS_URL": "nats://127.0.0.1:1",
        "TF_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    command = [sys.executable, "-m", "ticketflow", "worker", "projector"]
    held = harness.create()
    for _ in range(5):
        harness.completed_ticket()
    projector = subprocess.Popen(command, env=env)
    try:
        await wait_for(caught_up(url))
        with psycopg.connect(url) as blocker:
            # The next batch applies new tickets, then stops at the row of `held`, uncommitted.
            blocker.execute("SELECT 1 FROM rm_tickets WHERE ticket_id = %s FOR UPDATE", (held,))
            await asyncio.to_thread(harness.every_lifecycle)
            await asyncio.to_thread(harness.ingest, held)
            await asyncio.to_thread(harness.every_lifecycle)
            await wait_for(lambda: projector_waits_on_a_lock(url))
            committed = stored_position(url)
            projector.send_signal(signal.SIGKILL)
            projector.wait(10)
        assert 0 < committed < max_position(url)
        assert stored_position(url) == committed, "the killed batch must not commit"
        await asyncio.to_thread(harness.every_lifecycle)
        projector = subprocess.Popen(command, env=env)
        await wait_for(caught_up(url))
    finally:
        projector.send_signal(signal.SIGTERM)
        projector.wait(15)
    assert projector.returncode == 0
    projected = snapshot(url)
    [ticket] = rows(url, "SELECT status FROM rm_tickets WHERE ticket_id = %s", held)
    assert ticket["status"] == "running"

    async with database_pool(url) as pool:
        await rebuild(pool)
    assert snapshot(url) == projected


async def test_rebuilding_twice_gives_identical_tables_equal_to_the_projected_ones(
    harness: Harness,
) -> None:
    url = harness.database_url
    for _ in range(3):
        harness.every_lifecycle()
    await project(url)
    projected = snapshot(url)
    reported: list[tuple[int, int]] = []
    async with database_pool(url) as pool:
        first = await rebuild(pool, progress=lambda p, m: reported.append((p, m)), batch_size=7)
        once = snapshot(url)
        second = await rebuild(pool)
    assert once == projected
    assert snapshot(url) == once
    assert first.position == second.position == stored_position(url) == max_position(url)
    assert first.events == second.events == max_position(url)
    assert reported[-1] == (max_position(url), max_position(url))
    assert [p for p, _ in reported] == sorted(p for p, _ in reported)


async def test_a_rebuild_keeps_index_names_grants_fill_factors_and_durability(
    harness: Harness,
) -> None:
    """The tables swapped in are what the live ones were, and logged like them: the replay
    fills unlogged copies, which a crash would empty."""
    url = harness.database_url
    role = f"tf_reader_{secrets.token_hex(4)}"
    options_sql = (
        "SELECT relname, reloptions, relpersistence FROM pg_class WHERE relname = ANY(%s)"
        " AND relkind = 'r' AND relnamespace = 'public'::regnamespace ORDER BY relname"
    )
    options = rows(url, options_sql, list(READ_MODEL_TABLES))
    assert {"relname": "rm_tickets", "reloptions": ["fillfactor=50"], "relpersistence": "p"} in (
        options
    )
    assert {row["relpersistence"] for row in options} == {"p"}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role}".encode())
        conn.execute(f"GRANT SELECT ON rm_tickets, rm_reports TO {role}".encode())
    indexes_sql = (
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s) ORDER BY indexname"
    )
    before = rows(url, indexes_sql, list(READ_MODEL_TABLES))
    try:
        harness.every_lifecycle()
        async with database_pool(url) as pool:
            await rebuild(pool)
        assert rows(url, indexes_sql, list(READ_MODEL_TABLES)) == before
        assert rows(url, options_sql, list(READ_MODEL_TABLES)) == options
        [privileges] = rows(
            url,
            "SELECT has_table_privilege(%s, 'rm_tickets', 'SELECT') AS tickets,"
            " has_table_privilege(%s, 'rm_subtasks', 'SELECT') AS subtasks",
            role,
            role,
        )
        assert privileges == {"tickets": True, "subtasks": False}
        leftovers = rows(url, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'rm_build%%'")
        assert leftovers == []
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}".encode())
            conn.execute(f"DROP ROLE {role}".encode())


async def test_readers_never_see_a_partial_model_during_a_rebuild(harness: Harness) -> None:
    url = harness.database_url
    for _ in range(10):
        harness.every_lifecycle()
    await project(url)
    expected = snapshot(url)
    seen: list[tuple[int, int, int]] = []
    done = asyncio.Event()

    async def read_continuously(pool: asyncpg.Pool) -> None:
        while not done.is_set():
            row = await pool.fetchrow(
                "SELECT (SELECT count(*) FROM rm_tickets) AS tickets,"
                " (SELECT count(*) FROM rm_subtasks) AS subtasks,"
                " (SELECT count(*) FROM rm_reports) AS reports"
            )
            assert row is not None
            seen.append((row["tickets"], row["subtasks"], row["reports"]))

    async with database_pool(url) as pool, database_pool(url) as readers:
        reader = asyncio.create_task(read_continuously(readers))
        try:
            await rebuild(pool, batch_size=5)
        finally:
            done.set()
            await reader
    assert len(seen) > 10
    full = (len(expected["rm_tickets"]), len(expected["rm_subtasks"]), len(expected["rm_reports"]))
    assert set(seen) == {full}
    assert snapshot(url) == expected


async def test_a_rebuild_while_the_projector_runs_loses_no_event(harness: Harness) -> None:
    url = harness.database_url
    harness.every_lifecycle()
    async with running_projector(url), database_pool(url) as pool:
        await wait_for(caught_up(url))

        async def keep_writing() -> None:
            for _ in range(8):
                await asyncio.to_thread(harness.every_lifecycle)

        writer = asyncio.create_task(keep_writing())
        await rebuild(pool, batch_size=3)
        await writer
        await wait_for(caught_up(url))
        projected = snapshot(url)
        await rebuild(pool)
        assert snapshot(url) == projected
    [counts] = rows(url, "SELECT tickets FROM rm_tenant_counts WHERE tenant = %s", harness.tenant)
    assert counts["tickets"] == 9 * 4


# -- status ------------------------------------------------------------------------------------


async def test_status_reports_the_lag_behind_the_log(harness: Harness) -> None:
    harness.every_lifecycle()
    url = harness.database_url
    async with database_pool(url) as pool:
        [behind] = await status(pool)
        assert (behind.name, behind.position, behind.updated_at) == ("read_models", 0, None)
        assert behind.max_position == behind.lag == max_position(url)
        await Projector(pool).catch_up()
        [current] = await status(pool)
    assert current.position == current.max_position == max_position(url)
    assert current.lag == 0
    assert current.updated_at is not None


def test_the_cli_rebuilds_and_reports_status(harness: Harness) -> None:
    harness.every_lifecycle()
    env = {
        **os.environ,
        "TF_DATABASE_URL": harness.database_url,
        "TF_NATS_URL": "nats://127.0.0.1:1",
        "TF_REDIS_URL": "redis://127.0.0.1:1/0",
        "COLUMNS": "200",
    }
    cli = [sys.executable, "-m", "ticketflow", "projections"]
    rebuilt = subprocess.run(
        [*cli, "rebuild"], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    events = max_position(harness.database_url)
    assert f"{events} events up to position {events}" in rebuilt.stderr
    shown = subprocess.run(
        [*cli, "status"], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if "read_models" in line]
    cells = [cell.strip() for cell in line.split("│") if cell.strip()]
    assert cells[:4] == ["read_models", str(events), str(events), "0"]
