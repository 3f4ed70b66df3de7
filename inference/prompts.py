"""Builds the chat messages for one subtask: system prompt, fenced document, findings, instruction.

Order matters for speed: what all of a ticket's subtasks share comes first (the system prompt,
then the document) and what varies comes last (dependency outputs, the instruction and its
schema), so a prefix cache (SGLang's radix cache, llama.cpp's KV cache) evaluates the shared
part once per ticket. The output is a pure function of the input: equal inputs give equal
messages, byte for byte, which a prefix cache also needs.

The document is untrusted data: it sits between `<document>` and `</document>` lines, and any
such tag inside it is defused so the text cannot close the fence and pose as instructions.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FENCE_OPEN = "<document>"
FENCE_CLOSE = "</document>"
DEFAULT_MAX_DOCUMENT_CHARS = 12000

# Any opening or closing `document` tag, however spaced or cased, with or without attributes.
_FENCE_TAG = re.compile(r"<(\s*/?\s*document\b[^<>]*)>", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ContextChunk:
    """A retrieved piece of the document with where it came from."""

    text: str
    page: int | None = None
    heading: str | None = None


@dataclass(frozen=True)
class PromptInput:
    """Everything one subtask's prompt is made of.

    `dependency_outputs` maps the id of each subtask this one depends on to its validated
    output; `dependency_titles` optionally gives them readable names. When `chunks` are given
    they replace `document_text` (the subtask asked for retrieval).
    """

    system_prompt: str
    instruction: str
    output_schema: Mapping[str, Any]
    document_text: str | None = None
    chunks: tuple[ContextChunk, ...] = ()
    dependency_outputs: Mapping[str, Any] = field(default_factory=dict)
    dependency_titles: Mapping[str, str] = field(default_factory=dict)


def build_messages(
    prompt: PromptInput, *, max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS
) -> tuple[dict[str, str], ...]:
    """The system message, then one user message: document, findings, instruction last."""
    if max_document_chars < 1:
        raise ValueError("max_document_chars must be positive")
    sections: list[str] = []
    if prompt.chunks:
        sections.append(_fence(_render_chunks(prompt.chunks, max_document_chars)))
    elif prompt.document_text is not None:
        sections.append(_fence(_render_document(prompt.document_text, max_document_chars)))
    if prompt.dependency_outputs:
        sections.append(_render_dependencies(prompt))
    # The schema keeps its own key order: property order is meaningful (the constrained
    # backends make the model answer in that order) and pipeline snapshots preserve it.
    schema = json.dumps(prompt.output_schema, ensure_ascii=False, separators=(",", ":"))
    sections.append(
        f"Task: {prompt.instruction.strip()}\n"
        f"Reply with only a JSON object that matches this JSON schema: {schema}"
    )
    return (
        {"role": "system", "content": prompt.system_prompt},
        {"role": "user", "content": "\n\n".join(sections)},
    )


def defuse_fence_tags(text: str) -> str:
    """Rewrites `<document>`-like tags as `&lt;document&gt;` so they no longer read as fences."""
    return _FENCE_TAG.sub(lambda match: f"&lt;{match.group(1)}&gt;", text)


def _fence(body: str) -> str:
    return f"{FENCE_OPEN}\n{body}\n{FENCE_CLOSE}"


def _truncation_marker(shown: int, total: int) -> str:
    return f"[... truncated: the first {shown} of {total} characters are shown ...]"


def _render_document(text: str, limit: int) -> str:
    text = text.strip()
    if len(text) <= limit:
        return defuse_fence_tags(text)
    # Cut before defusing so the counts in the marker refer to the original text; a tag split
    # by the cut cannot close the fence because the marker and the real fence follow it.
    return f"{defuse_fence_tags(text[:limit])}\n{_truncation_marker(limit, len(text))}"


def _chunk_label(number: int, chunk: ContextChunk) -> str:
    parts = [f"excerpt {number}"]
    if chunk.page is not None:
        parts.append(f"page {chunk.page}")
    if chunk.heading:
        # Headings come from the document too: one line, and no tags.
        parts.append(defuse_fence_tags(_WHITESPACE.sub(" ", chunk.heading).strip()))
    return "[" + " | ".join(parts) + "]"


def _render_chunks(chunks: tuple[ContextChunk, ...], limit: int) -> str:
    """Chunks in the given (retrieval) order, within the same character budget as a document."""
    rendered: list[str] = []
    budget = limit
    for number, chunk in enumerate(chunks, start=1):
        text = chunk.text.strip()
        if budget <= 0:
            rendered.append(f"[... {len(chunks) - number + 1} more excerpts omitted ...]")
            break
        if len(text) > budget:
            text = f"{text[:budget]}\n{_truncation_marker(budget, len(text))}"
            budget = 0
        else:
            budget -= len(text)
        rendered.append(f"{_chunk_label(number, chunk)}\n{defuse_fence_tags(text)}")
    return "\n\n".join(rendered)


def _render_dependencies(prompt: PromptInput) -> str:
    lines = ["Findings of the earlier steps (JSON):"]
    for subtask_id in sorted(prompt.dependency_outputs):
        output = json.dumps(
            prompt.dependency_outputs[subtask_id], sort_keys=True, ensure_ascii=False
        )
        title = prompt.dependency_titles.get(subtask_id)
        name = f"{title} ({subtask_id})" if title else subtask_id
        # Outputs were derived from the untrusted document, so they get the same defusing.
        lines.append(f"{name}: {defuse_fence_tags(output)}")
    return "\n".join(lines)
