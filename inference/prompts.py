"""Builds the chat messages for one subtask: system prompt, fenced documents, options, findings,
instruction.

Order matters for speed: what all of a ticket's subtasks share comes first (the system prompt,
then the documents, then the ticket's options) and what varies comes last (dependency outputs,
the instruction and its schema), so a prefix cache (SGLang's radix cache, llama.cpp's KV cache)
evaluates the shared part once per ticket. The output is a pure function of the input: equal
inputs give equal messages, byte for byte, which a prefix cache also needs.

Documents and options are untrusted data. A single document sits between `<document>` and
`</document>` lines; several documents each get their own fence labelled with their role
(`<document role="resume">`); the options sit between `<options>` and `</options>`. Any such tag
inside untrusted text is defused so it cannot close a fence and pose as instructions. Options
only ever appear in the user message: they cannot replace or extend the system prompt.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FENCE_OPEN = "<document>"
FENCE_CLOSE = "</document>"
OPTIONS_OPEN = "<options>"
OPTIONS_CLOSE = "</options>"
DEFAULT_MAX_DOCUMENT_CHARS = 12000

# Any opening or closing fence tag (`document` or `options`), however spaced or cased, with or
# without attributes.
_FENCE_TAG = re.compile(r"<(\s*/?\s*(?:document|options)\b[^<>]*)>", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ContextChunk:
    """A retrieved piece of the document with where it came from."""

    text: str
    page: int | None = None
    heading: str | None = None
    role: str | None = None  # the role of its document, when a ticket has several


@dataclass(frozen=True)
class RoleDocument:
    """The text of one of a ticket's documents and the role it plays (`resume`, `vacancy`)."""

    role: str
    text: str


@dataclass(frozen=True)
class PromptInput:
    """Everything one subtask's prompt is made of.

    A ticket's text is either one `document_text` (fenced without a label) or several
    `documents`, each fenced with its role, in the given order. When `chunks` are given they
    replace both (the subtask asked for retrieval). `options` are the ticket's options.
    `dependency_outputs` maps the id of each subtask this one depends on to its validated
    output; `dependency_titles` optionally gives them readable names.
    """

    system_prompt: str
    instruction: str
    output_schema: Mapping[str, Any]
    document_text: str | None = None
    documents: tuple[RoleDocument, ...] = ()
    chunks: tuple[ContextChunk, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    dependency_outputs: Mapping[str, Any] = field(default_factory=dict)
    dependency_titles: Mapping[str, str] = field(default_factory=dict)
    conversation: tuple[tuple[str, str], ...] = ()
    """Earlier (question, answer) pairs of a follow-up conversation, oldest first."""


def build_messages(
    prompt: PromptInput,
    *,
    max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
    show_schema: bool = True,
) -> tuple[dict[str, str], ...]:
    """The system message, then one user message: documents, options, findings, instruction.

    `max_document_chars` bounds the document text shown, in total over all documents.
    `show_schema=False` leaves the output schema out of the prompt, for backends whose decoder
    is constrained to it anyway: a small model shown the schema's text tends to answer with its
    keywords ("type", "items", "maxItems") instead of the document's content.
    """
    if max_document_chars < 1:
        raise ValueError("max_document_chars must be positive")
    sections: list[str] = []
    if prompt.chunks:
        sections.append(_fence(_render_chunks(prompt.chunks, max_document_chars)))
    elif prompt.documents:
        budgets = _share_budget([len(d.text.strip()) for d in prompt.documents], max_document_chars)
        for document, budget in zip(prompt.documents, budgets, strict=True):
            body = _render_document(document.text, max(budget, 1))
            sections.append(_fence(body, role=document.role))
    elif prompt.document_text is not None:
        sections.append(_fence(_render_document(prompt.document_text, max_document_chars)))
    if prompt.conversation:
        sections.append(_render_conversation(prompt.conversation))
    if prompt.options:
        sections.append(_render_options(prompt.options))
    if prompt.dependency_outputs:
        sections.append(_render_dependencies(prompt))
    if show_schema:
        # The schema keeps its own key order: property order is meaningful (the constrained
        # backends make the model answer in that order) and pipeline snapshots preserve it.
        schema = json.dumps(prompt.output_schema, ensure_ascii=False, separators=(",", ":"))
        sections.append(
            f"Task: {prompt.instruction.strip()}\n"
            f"Reply with only a JSON object that matches this JSON schema: {schema}"
        )
    else:
        # The fields' names and kinds without the schema's own words: what to fill in, not how
        # JSON Schema says it.
        sections.append(
            f"Task: {prompt.instruction.strip()}\n"
            f"Answer as {json.dumps(answer_shape(prompt.output_schema), ensure_ascii=False)}"
        )
    return (
        {"role": "system", "content": prompt.system_prompt},
        {"role": "user", "content": "\n\n".join(sections)},
    )


def answer_shape(schema: Mapping[str, Any]) -> Any:
    """A skeleton of the answer: each property with "" for text, the range of a number,
    "true or false", a one-item list (or the items to choose from, when they are listed), the
    allowed values joined by " or "; computed fields (`x-mean-of`, a derived `x-bands` label)
    left out."""
    if "enum" in schema:
        return " or ".join(str(value) for value in schema["enum"])
    branches = schema.get("anyOf") or schema.get("oneOf")
    if branches:
        return answer_shape(branches[0])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        bands = schema.get("x-bands")
        derived = bands.get("label") if isinstance(bands, Mapping) and bands.get("derive") else None
        return {
            name: answer_shape(sub)
            for name, sub in schema.get("properties", {}).items()
            if isinstance(sub, Mapping) and "x-mean-of" not in sub and name != derived
        }
    if kind == "array":
        items = schema.get("items")
        if isinstance(items, Mapping) and isinstance(items.get("enum"), list):
            # Items chosen from a list (a document's headings): the list is the shape.
            return list(items["enum"])
        return [answer_shape(items)] if isinstance(items, Mapping) else []
    return _scalar_shape(schema)


def _scalar_shape(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if kind in ("integer", "number"):
        if "minimum" in schema and "maximum" in schema:
            return f"{schema['minimum']} to {schema['maximum']}"
        return "a number"
    # Text is left blank: shown "...", a small model copies it as its answer.
    return "true or false" if kind == "boolean" else ""


def shown_document(prompt: PromptInput) -> str:
    """The document text a prompt shows (its excerpts, when it shows excerpts), whole."""
    if prompt.chunks:
        return "\n\n".join(chunk.text for chunk in prompt.chunks)
    parts = [document.text for document in prompt.documents]
    if prompt.document_text is not None:
        parts.append(prompt.document_text)
    return "\n\n".join(parts)


def prompt_source(prompt: PromptInput) -> str:
    """The material a prompt shows the model (documents or excerpts, options, findings), which
    an output's claims must come from; the instruction is left out, its example included."""
    parts = [chunk.text for chunk in prompt.chunks]
    if not prompt.chunks:
        parts += [document.text for document in prompt.documents]
        if prompt.document_text is not None:
            parts.append(prompt.document_text)
    parts += [f"{question}\n{answer}" for question, answer in prompt.conversation]
    parts += [json.dumps(value, ensure_ascii=False) for value in prompt.options.values()]
    parts += [
        json.dumps(output, ensure_ascii=False) for output in prompt.dependency_outputs.values()
    ]
    return "\n\n".join(parts)


def defuse_fence_tags(text: str) -> str:
    """Rewrites `<document>`- and `<options>`-like tags as `&lt;document&gt;` so they no longer
    read as fences."""
    return _FENCE_TAG.sub(lambda match: f"&lt;{match.group(1)}&gt;", text)


def _fence(body: str, *, role: str | None = None) -> str:
    if role is None:
        return f"{FENCE_OPEN}\n{body}\n{FENCE_CLOSE}"
    # Roles come from the pipeline and the contract (slugs); escaping is a second line of defence.
    return f'<document role="{html.escape(role, quote=True)}">\n{body}\n{FENCE_CLOSE}'


def _share_budget(lengths: list[int], limit: int) -> list[int]:
    """Splits `limit` characters among documents: short ones keep all their text, and what they
    leave is shared equally by the longer ones (so one long document cannot crowd out another).
    """
    budgets = [0] * len(lengths)
    remaining = limit
    pending = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    while pending:
        share = remaining // len(pending)
        index = pending[0]
        if lengths[index] <= share:
            budgets[index] = lengths[index]
            remaining -= lengths[index]
            pending.pop(0)
            continue
        for index in pending:
            budgets[index] = share
        break
    return budgets


def _render_options(options: Mapping[str, Any]) -> str:
    # Keys sorted so equal options give equal bytes; the JSON is defused like a document since
    # every value comes from the user.
    body = json.dumps(options, sort_keys=True, ensure_ascii=False)
    return f"{OPTIONS_OPEN}\n{defuse_fence_tags(body)}\n{OPTIONS_CLOSE}"


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
    if chunk.role is not None:
        parts.append(defuse_fence_tags(_WHITESPACE.sub(" ", chunk.role).strip()))
    if chunk.page is not None:
        parts.append(f"page {chunk.page}")
    if chunk.heading:
        # Headings come from the document too: one line, and no tags.
        parts.append(defuse_fence_tags(_WHITESPACE.sub(" ", chunk.heading).strip()))
    return "[" + " | ".join(parts) + "]"


def shown_excerpts(
    chunks: tuple[ContextChunk, ...], max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS
) -> int:
    """How many of `chunks` (the first ones) a prompt shows as numbered excerpts, in full or
    cut; the others are only counted as omitted. Mirrors `_render_chunks`."""
    budget = max_document_chars
    for shown, chunk in enumerate(chunks):
        if budget <= 0:
            return shown
        budget -= len(chunk.text.strip())
    return len(chunks)


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


def _render_conversation(conversation: tuple[tuple[str, str], ...]) -> str:
    # After the documents, before the question: what the question may refer to. Questions come
    # from users and answers from the untrusted document, so both are defused like a document.
    turns = [{"question": question, "answer": answer} for question, answer in conversation]
    body = json.dumps(turns, ensure_ascii=False)
    return f"Earlier questions and answers of this conversation (JSON):\n{defuse_fence_tags(body)}"


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
