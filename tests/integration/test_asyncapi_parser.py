"""The AsyncAPI document against the official parser (`@asyncapi/parser`, run by Node).

The parser is installed by `./scripts/install --dev` (`npm ci --prefix tools/asyncapi`, from
the committed lock file). Without it these tests fail and say so; they are never skipped.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from streams.contract.asyncapi import asyncapi_document, asyncapi_json, released_document_path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "asyncapi"
VALIDATE = TOOL / "validate.js"
PARSER = TOOL / "node_modules" / "@asyncapi" / "parser" / "package.json"
INSTALL_HINT = (
    "run `./scripts/install --dev` (it runs `npm ci --prefix tools/asyncapi`), "
    "which needs Node.js 18 or newer and npm"
)


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail(f"`node` is not on PATH; {INSTALL_HINT}")
    if not PARSER.exists():
        pytest.fail(
            f"the AsyncAPI parser is not installed in {TOOL / 'node_modules'}; {INSTALL_HINT}"
        )
    return found


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node(), str(VALIDATE), str(path), "--fail-on-warnings"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(180)
def test_todays_document_is_valid_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "asyncapi.json"
    path.write_text(asyncapi_json(), encoding="utf-8")
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid:" in result.stdout
    assert "AsyncAPI 3.0.0" in result.stdout
    assert "0 errors, 0 warnings" in result.stdout


@pytest.mark.timeout(180)
def test_the_released_document_is_valid() -> None:
    result = validate(released_document_path("0.1.0"))
    assert result.returncode == 0, result.stdout + result.stderr


def broken_copies(document: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """Copies of `document`, each broken in one way, and what the parser should point at."""
    copies: dict[str, tuple[dict[str, Any], str]] = {}

    bad_type = copy.deepcopy(document)
    bad_type["components"]["schemas"]["TicketCompleted"]["properties"]["subtasks"]["type"] = (
        "integr"
    )
    copies["payload schema"] = (bad_type, "components.schemas.TicketCompleted")

    dangling = copy.deepcopy(document)
    dangling["operations"]["receive.ticket.created"]["channel"]["$ref"] = "#/channels/nowhere"
    copies["dangling reference"] = (dangling, "'#/channels/nowhere' does not exist")

    undeclared = copy.deepcopy(document)
    del undeclared["channels"]["ticket.created"]["parameters"]["tenant"]
    copies["undeclared parameter"] = (undeclared, "Missed: tenant")

    no_info = copy.deepcopy(document)
    del no_info["info"]
    copies["missing info"] = (no_info, 'required property "info"')
    return copies


@pytest.mark.timeout(300)
def test_a_broken_document_is_reported_invalid(tmp_path: Path) -> None:
    """The negative control: the same script refuses what the specification refuses."""
    for name, (broken, expected) in broken_copies(asyncapi_document()).items():
        path = tmp_path / f"{name.replace(' ', '-')}.json"
        path.write_text(json.dumps(broken), encoding="utf-8")
        result = validate(path)
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        errors = [line for line in result.stdout.splitlines() if line.startswith("error ")]
        assert any(expected in line for line in errors), (name, errors)
        assert "invalid:" in result.stdout


def test_an_unreadable_file_is_a_usage_error(tmp_path: Path) -> None:
    result = validate(tmp_path / "missing.json")
    assert result.returncode == 2
    assert "cannot read" in result.stderr
