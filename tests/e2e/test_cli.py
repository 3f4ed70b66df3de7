"""`ticketflow submit`, `status` and `report` against a stack started with `ticketflow up`.

The ticket runs the one-subtask document Q&A pipeline, with its question given as an option:
what is tested is the CLI; the README's main job (tests/e2e/test_run.py) runs the whole document
review."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_up import start_up, stop, wait_healthy
from tests.support import sample


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ticketflow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# Up to 90 s for the stack to start and 300 s for the ticket, a few commands of seconds each
# (each bounded at 120 s), and 60 s to stop.
@pytest.mark.timeout(600)
def test_a_submitted_document_can_be_followed_and_its_report_printed(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "up.log"
    process = start_up(stack_env, log)
    try:
        wait_healthy(f"http://127.0.0.1:{stack_env['TF_QUERIES_PORT']}", process, log)
        bad = cli(stack_env, "submit", str(sample("research-paper.pdf")), "--options", "[1]")
        assert bad.returncode == 2
        assert "--options must be a JSON object" in bad.stderr + bad.stdout
        submitted = cli(
            stack_env,
            "submit",
            str(sample("research-paper.pdf")),
            "--pipeline",
            "document-qa",
            "--option",
            "question=What does the paper measure?",
        )
        assert submitted.returncode == 0, submitted.stderr
        ticket_id = json.loads(submitted.stdout)["ticket_id"]

        deadline = time.monotonic() + 300
        while True:
            status = cli(stack_env, "status", ticket_id)
            assert status.returncode == 0, status.stderr
            if "completed" in status.stdout.splitlines()[0]:
                break
            assert "failed" not in status.stdout.splitlines()[0], status.stdout
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        assert "Answer" in status.stdout  # the subtask's title, in the subtasks' table

        report = cli(stack_env, "report", ticket_id)
        assert report.returncode == 0, report.stderr
        as_json = json.loads(cli(stack_env, "report", ticket_id, "--json").stdout)
        assert as_json["final_subtask_id"] == "answer"
        assert as_json["outputs"]["answer"]["output"]["answer"]
        assert "Document qa: research-paper.pdf" in report.stdout, report.stdout

        # A document the stack cannot read: the ticket fails, and its status says why.
        locked = cli(stack_env, "submit", str(sample("bad-encrypted.pdf")))
        assert locked.returncode == 0, locked.stderr
        locked_id = json.loads(locked.stdout)["ticket_id"]
        deadline = time.monotonic() + 60
        while "failed" not in (status := cli(stack_env, "status", locked_id)).stdout:
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.5)
        assert "password-protected" in " ".join(status.stdout.split()), status.stdout

        other_tenant = cli(stack_env, "status", ticket_id, "--tenant", "someone-else")
        assert other_tenant.returncode == 1
        assert "404" in other_tenant.stderr
    finally:
        assert stop(process) == 0
