"""`ticketflow run` as a newcomer types it: the README command, and a document it refuses."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from handlers.extraction import ExtractionLimits, extract
from inference.pipelines import pipeline_definition
from tests.support import REPO, sample
from ticketflow.embedded import free_port


def readme_first_command() -> str:
    blocks = re.findall(r"```sh\n(.*?)\n```", (REPO / "README.md").read_text(), re.DOTALL)
    return str(blocks[0]).strip()


DOCX_MEDIA_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


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
        # Wide enough that rich does not wrap a line of the report.
        env=clean_env(COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = result.stdout
    for heading in ("Verdict", "Summary", "Goal", "Structure", "Results versus conclusions"):
        assert heading in report
    verdict = re.search(r"Verdict: (accept|minor_revision|major_revision|reject)\b", report)
    score = re.search(r"Score: (\d+)\b", report)
    assert verdict is not None, report
    assert score is not None, report
    # The verdict is the band its score lies in, as the pipeline defines the bands.
    low, high = verdict_bands()[verdict.group(1)]
    assert low <= int(score.group(1)) <= high, report
    # The structure lists sections of the paper: each one a line of its text (a heading), not
    # a schema keyword, JSON punctuation or a sentence of the prompt.
    document = REPO / next(word for word in command.split() if word.endswith((".pdf", ".docx")))
    lines = document_lines(document)
    sections = listed_sections(report)
    assert sections, report
    for section in sections:
        assert section in lines, f"{section!r} is not a line of {document.name}"


def verdict_bands() -> dict[str, list[int]]:
    review = pipeline_definition("document-review")
    verdict = next(s for s in review["subtasks"] if s["id"] == "verdict")
    bands: dict[str, list[int]] = verdict["output_schema"]["x-bands"]["bands"]
    return bands


def document_lines(path: Path) -> set[str]:
    media_type = "application/pdf" if path.suffix == ".pdf" else DOCX_MEDIA_TYPE
    text = extract(path.read_bytes(), media_type, ExtractionLimits()).text
    return {" ".join(line.split()) for line in text.splitlines()}


def listed_sections(report: str) -> list[str]:
    """The bullets under "Sections:" in the printed report."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().endswith("Sections:"))
    indent = len(lines[start]) - len(lines[start].lstrip())
    sections = []
    for line in lines[start + 1 :]:
        if not line.strip() or len(line) - len(line.lstrip()) <= indent:
            break
        sections.append(" ".join(line.strip().lstrip("\N{BULLET}*-").split()))
    return sections


# The document is read before any server starts, so this takes seconds, not a stack's start.
@pytest.mark.timeout(120)
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
        timeout=90,
        check=False,
    )
    assert result.returncode == 1
    output = " ".join((result.stdout + result.stderr).split())
    assert "bad-encrypted.pdf: The PDF is password-protected" in output
    assert not (tmp_path / "data").exists(), "a stack was started for a document it refuses"
