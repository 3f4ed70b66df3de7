"""A ticket survives `kill -9` of its inference worker mid-ticket, and completes exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from commands.messages import CreateTicket, UploadedDocument
from commands.ticket import TicketStatus
from tests.conftest import Servers, new_database, new_nats_server
from tests.integration.conftest import CatalogWithTestPipelines, service_for, settings_for
from tests.support import random_tenant, short_answers, short_docx, small_pipeline
from ticketflow.bootstrap import run_ingest_worker, run_relay

# Up to 120 s until the subtask to kill starts, then 300 s to complete, plus the stops.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(540)]

# A diamond a → (b, c) → d of short answers on a short document: what is under test is the
# crash, not the model's reading or writing. The worker in a process of its own needs no
# catalogue with this pipeline in it: the ticket carries its pipeline.
CatalogWithTestPipelines.extra["crash-diamond"] = short_answers(small_pipeline("crash-diamond"))
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def topics(database_url: str) -> list[tuple[str, str | None]]:
    """(event name, subtask id) of every event, in order."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT topic, convert_from(state, 'UTF8')::jsonb ->> 'subtask_id' "
            "FROM ticketflow_events ORDER BY notification_id"
        ).fetchall()
    return [(row[0].rsplit(".", 2)[-2], row[1]) for row in rows]


def inference_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ticketflow", "worker", "inference"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def test_killing_the_inference_worker_mid_ticket_still_completes_it_exactly_once(
    servers: Servers, tmp_path: Path
) -> None:
    with (
        new_database(servers) as database_url,
        new_nats_server(tmp_path, servers.nats_authority) as nats_url,
    ):
        settings = settings_for(servers, database_url, nats_url=nats_url, stream_storage="memory")
        service = service_for(settings, database_url)
        stop = asyncio.Event()
        in_process = [
            asyncio.create_task(run(settings, stop)) for run in (run_relay, run_ingest_worker)
        ]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TF_")},
            "TF_DATABASE_URL": database_url,
            "TF_NATS_URL": nats_url,
            "TF_NATS_CREDENTIALS": str(servers.nats_credentials),
            "TF_REDIS_URL": servers.redis_url,
            "TF_INFERENCE_ACK_WAIT_S": "3",
        }
        log = tmp_path / "inference.log"
        worker = inference_worker(env, log)
        try:
            document = UploadedDocument("main", "lighthouse.docx", DOCX, short_docx())
            ticket_id = service.create_ticket(
                CreateTicket(random_tenant(), "alice", (document,), "crash-diamond")
            ).ticket_id

            # Killed once `a` is done and `b` under way: one subtask recorded, others in flight.
            deadline = time.monotonic() + 120
            while ("subtask_started", "b") not in topics(database_url):
                assert time.monotonic() < deadline, log.read_text()
                assert worker.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            assert ("completed", None) not in topics(database_url), "killed too late"
            assert ("subtask_completed", "a") in topics(database_url)

            worker = inference_worker(env, log)
            deadline = time.monotonic() + 300
            while service.get_ticket(ticket_id).status is not TicketStatus.COMPLETED:
                assert time.monotonic() < deadline, log.read_text()
                assert not service.get_ticket(ticket_id).is_finished, log.read_text()
                await asyncio.sleep(0.3)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
            stop.set()
            await asyncio.gather(*in_process, return_exceptions=True)
            pipeline = service.get_ticket(ticket_id).pipeline
            service.close()

        completions = Counter(s for name, s in topics(database_url) if name == "subtask_completed")
        assert completions == Counter({s.id: 1 for s in pipeline.subtasks})
        assert [name for name, _ in topics(database_url)].count("completed") == 1
