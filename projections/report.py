"""The report of a completed ticket: its verdict, every subtask's output, and a Markdown rendering.

Pure functions of what the read models hold, so a rebuild renders byte-identical reports. Outputs
come from a model that read an untrusted document: the rendering escapes HTML, so a frontend that
renders the Markdown cannot be made to emit markup by a document.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

# What would turn a line of text into a heading, quote, list item or rule.
_BLOCK_MARKER = re.compile(r"^(\d*)([#>+*=-]|[.)](?=\s|$))")


@dataclass(frozen=True)
class SubtaskOutcome:
    subtask_id: str
    title: str
    depends_on: tuple[str, ...]
    output: dict[str, Any] | None
    output_sha256: str | None = None


@dataclass(frozen=True)
class ReportSource:
    """What a report is made of; `subtasks` in pipeline order."""

    ticket_id: UUID
    tenant: str
    pipeline_name: str
    pipeline_version: int
    documents: Sequence[dict[str, Any]]
    completed_at: datetime
    subtasks: Sequence[SubtaskOutcome]


@dataclass(frozen=True)
class Report:
    final_subtask_id: str
    verdict: dict[str, Any] | None
    outputs: dict[str, dict[str, Any]]
    markdown: str


def final_subtask(subtasks: Sequence[SubtaskOutcome]) -> SubtaskOutcome:
    """The subtask whose output is the verdict: the last one in the pipeline nothing depends on."""
    if not subtasks:
        raise ValueError("a report needs at least one subtask")
    depended_on = {dependency for subtask in subtasks for dependency in subtask.depends_on}
    sinks = [subtask for subtask in subtasks if subtask.subtask_id not in depended_on]
    return (sinks or list(subtasks))[-1]


def build_report(source: ReportSource) -> Report:
    final = final_subtask(source.subtasks)
    outputs = {
        subtask.subtask_id: {
            "title": subtask.title,
            "output": subtask.output,
            "output_sha256": subtask.output_sha256,
        }
        for subtask in source.subtasks
    }
    return Report(
        final_subtask_id=final.subtask_id,
        verdict=final.output,
        outputs=outputs,
        markdown=render_markdown(source),
    )


def render_markdown(source: ReportSource) -> str:
    """A readable document: title, pipeline and documents, the verdict, then every subtask."""
    final = final_subtask(source.subtasks)
    filenames = ", ".join(
        f"{_text(str(d.get('filename', '?')))} ({_text(str(d.get('role', '?')))})"
        for d in source.documents
    )
    lines = [
        f"# {_humanize(source.pipeline_name)}: {filenames}",
        "",
        f"- **Pipeline:** {_text(source.pipeline_name)} v{source.pipeline_version}",
        f"- **Ticket:** `{source.ticket_id}`",
        f"- **Completed:** {source.completed_at.strftime('%Y-%m-%d %H:%M:%S UTC')}",
    ]
    ordered = [final, *(s for s in source.subtasks if s.subtask_id != final.subtask_id)]
    for subtask in ordered:
        lines += ["", f"## {_text(subtask.title)}", ""]
        lines += _render_output(subtask)
    return "\n".join(lines) + "\n"


def _render_output(subtask: SubtaskOutcome) -> list[str]:
    if subtask.output is None:
        if subtask.output_sha256:
            return [f"_The output is stored separately (sha256 `{subtask.output_sha256}`)._"]
        return ["_No output._"]
    if not subtask.output:
        return ["_Empty output._"]
    return _render_mapping(subtask.output, depth=0)


# Output checks that still failed on the last attempt (inference/validation.py): the reader is
# told plainly that these claims of the answer above could not be checked against the document.
UNVERIFIED = "unverified"
UNVERIFIED_LABEL = "**Not verified against the document:**"


def _render_mapping(mapping: dict[str, Any], depth: int) -> list[str]:
    lines: list[str] = []
    for key, value in mapping.items():
        if key == UNVERIFIED and depth == 0:
            continue
        lines += _render_item(f"**{_text(_humanize(key))}:**", value, depth)
    if depth == 0 and isinstance(mapping.get(UNVERIFIED), list) and mapping[UNVERIFIED]:
        lines += _render_item(UNVERIFIED_LABEL, mapping[UNVERIFIED], depth)
    return lines


def _render_item(label: str, value: Any, depth: int) -> list[str]:
    """One bullet: `label value` for a scalar, `label` over nested bullets otherwise."""
    indent = "  " * depth
    if isinstance(value, dict | list) and not value:
        return [f"{indent}- {label} (none)"]
    if isinstance(value, dict):
        return [f"{indent}- {label}", *_render_mapping(value, depth + 1)]
    if isinstance(value, list):
        lines = [f"{indent}- {label}"]
        for number, item in enumerate(value, start=1):
            lines += _render_list_item(number, item, depth + 1)
        return lines
    return [f"{indent}- {label} {_scalar(value, depth)}"]


def _render_list_item(number: int, item: Any, depth: int) -> list[str]:
    indent = "  " * depth
    if (
        isinstance(item, dict)
        and item
        and not any(isinstance(v, dict | list) for v in item.values())
    ):
        # A flat object reads best on one line: **Name:** Python · **Score:** 80
        fields = " · ".join(
            f"**{_text(_humanize(key))}:** {_scalar(value, depth)}" for key, value in item.items()
        )
        return [f"{indent}- {fields}"]
    if isinstance(item, dict | list):
        return _render_item(f"Item {number}", item, depth)
    return [f"{indent}- {_scalar(item, depth)}"]


def _scalar(value: Any, depth: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return json.dumps(value)
    lines = [_BLOCK_MARKER.sub(r"\1\\\2", line.strip()) for line in _text(str(value)).splitlines()]
    # Continuation lines of a multi-line value stay inside their bullet, as plain text.
    continuation = "\n" + "  " * (depth + 1)
    return continuation.join(line for line in lines if line) or "—"


def _text(value: str) -> str:
    return html.escape(value, quote=False)


def _humanize(key: str) -> str:
    words = key.replace("_", " ").replace("-", " ").strip()
    return words[:1].upper() + words[1:] if words else key
