"""The pipeline library: versioned pipeline definitions shipped as JSON data files.

Each file in `inference/pipelines/` is one pipeline (name, version, system prompt, subtasks with
their dependencies, instructions, optional retrieval and output JSON schemas). The command side
validates a definition against the event contract before it snapshots it into a ticket.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def _load_all() -> dict[str, dict[str, Any]]:
    pipelines: dict[str, dict[str, Any]] = {}
    for entry in resources.files(__package__ or "inference").joinpath("pipelines").iterdir():
        if entry.name.endswith(".json"):
            definition = json.loads(entry.read_text("utf-8"))
            pipelines[definition["name"]] = definition
    return pipelines


def pipeline_names() -> list[str]:
    return sorted(_load_all())


def pipeline_definition(name: str) -> dict[str, Any]:
    """The raw definition of a shipped pipeline; `KeyError` if there is none by that name."""
    copy: dict[str, Any] = json.loads(json.dumps(_load_all()[name]))  # callers may keep it
    return copy
