"""Helpers shared by the test suites (no fixtures here; see conftest.py)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def samples_dir() -> Path:
    configured = os.environ.get("TF_SAMPLES_DIR")
    return Path(configured) if configured else REPO.parent / "shared" / "samples"


def sample(name: str) -> Path:
    path = samples_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"sample {name} not found in {samples_dir()} (set TF_SAMPLES_DIR)")
    return path


def random_tenant() -> str:
    return f"t-{secrets.token_hex(5)}"


def small_pipeline(name: str = "tiny", *, max_attempts: int = 3) -> dict[str, Any]:
    """A diamond: a → (b, c) → d."""
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}

    def subtask(sid: str, *deps: str) -> dict[str, Any]:
        return {
            "id": sid,
            "title": sid.upper(),
            "instruction": f"do {sid}",
            "depends_on": list(deps),
            "output_schema": schema,
        }

    return {
        "name": name,
        "version": 1,
        "system_prompt": "You are a test.",
        "max_attempts": max_attempts,
        "subtasks": [subtask("a"), subtask("b", "a"), subtask("c", "a"), subtask("d", "b", "c")],
    }
