"""`ticketflow run` as a newcomer types it: the README command, and a document it refuses."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO, sample
from ticketflow.embedded import free_port


def readme_first_command() -> str:
    blocks = re.findall(r"```sh\n(.*?)\n```", (REPO / "README.md").read_text(), re.DOTALL)
    return str(blocks[0]).strip()


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    env.update(overrides)
    return env


# The install (a no-op on an installed .venv), the stack's start and the whole review on the
# CPU model: up to the command's own 900 s.
@pytest.mark.timeout(960)
def test_the_readmes_first_command_reviews_the_paper_and_prints_the_report() -> None:
    command = readme_first_command()
    assert "ticketflow run" in command
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = result.stdout
    for heading in ("Verdict", "Summary", "Goal", "Structure", "Results versus conclusions"):
        assert heading in report
    assert re.search(r"Verdict: (accept|minor_revision|major_revision|reject)", report)


@pytest.mark.timeout(360)
def test_a_password_protected_pdf_exits_non_zero_with_the_reason(tmp_path: Path) -> None:
    env = clean_env(
        TF_DATA_DIR=str(tmp_path / "data"),
        TF_COMMANDS_PORT=str(free_port()),
        TF_QUERIES_PORT=str(free_port()),
        TF_EMBEDDED_NATS_PORT=str(free_port()),
        TF_EMBEDDED_REDIS_PORT=str(free_port()),
    )
    result = subprocess.run(
        [str(REPO / ".venv/bin/ticketflow"), "run", str(sample("bad-encrypted.pdf"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1
    output = " ".join((result.stdout + result.stderr).split())
    assert "password-protected" in output
