"""Time travel, explanations and report diffs: what the query API answers for auditors.

- `parse_as_of`: an `as_of` query value, a global position or an RFC 3339 time.
- `explain`: for each field of a ticket's report, the subtask, the events (positions), the
  prompt hash, the model and the dependency outputs it came from, folded from the ticket's own
  events (upcast, so v1 results explain as results without provenance).
- `diff_reports`: two reports compared field by field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field

from read_api.schemas import SHA256_EXAMPLE, TICKET_ID_EXAMPLE
from streams.contract import (
    Provenance,
    SubtaskCompletedV2,
    SubtaskFailed,
    SubtaskReady,
    SubtaskStarted,
    TicketCreated,
    TicketRerunRequested,
    canonical_json,
    sha256_of,
    upcast,
)
from streams.contract.eventlog import RecordedEvent, UnknownEventTopic

MAX_POSITION = 2**63 - 1


class InvalidAsOf(ValueError):
    """An `as_of` that is neither a position nor an RFC 3339 time with a zone."""


def parse_as_of(raw: str) -> int | datetime:
    """A global position (digits) or an aware time (RFC 3339, e.g. `2025-03-01T12:00:00Z`)."""
    value = raw.strip()
    if value.isdigit():
        position = int(value)
        if position > MAX_POSITION:
            raise InvalidAsOf(f"as_of position {value} is beyond any position of the log")
        return position
    if value[-1:] == "z":
        value = value[:-1] + "Z"  # RFC 3339 allows both cases of T and Z
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidAsOf(
            "as_of must be a global position (an integer) or an RFC 3339 time with its zone,"
            " e.g. 2025-03-01T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise InvalidAsOf("as_of time has no zone: add Z or an offset such as +02:00")
    return moment


# -- explanations ---------------------------------------------------------------------------------


class EventRef(BaseModel):
    position: int = Field(examples=[44])
    type: str = Field(examples=["subtask_completed"])
    topic: str = Field(examples=["ticketflow.ticket.subtask_completed.v2"])
    attempt: int = Field(examples=[1])


class DependencyOutput(BaseModel):
    subtask_id: str = Field(examples=["goal"])
    position: int | None = Field(
        examples=[44], description="Position of the dependency's SubtaskCompleted."
    )
    output_sha256: str | None = Field(
        examples=[SHA256_EXAMPLE], description="sha256 of the output's canonical JSON."
    )


class SubtaskExplanation(BaseModel):
    subtask_id: str = Field(examples=["verdict"])
    title: str = Field(examples=["Verdict"])
    status: str = Field(examples=["completed"])
    attempts: int = Field(examples=[1])
    events: list[EventRef] = Field(description="The subtask's events, in order.")
    completed_position: int | None = Field(
        examples=[57], description="Position of the SubtaskCompleted whose output counts."
    )
    output_sha256: str | None = Field(examples=[SHA256_EXAMPLE])
    prompt_sha256: str | None = Field(
        examples=[SHA256_EXAMPLE],
        description="The prompt's blob key; null for results recorded before provenance.",
    )
    model: str | None = Field(examples=["SmolLM2-135M-Instruct.Q4_1"])
    provenance: Provenance | None = Field(
        description="Backend, model hash or revision, sampling and seed; null before v2."
    )
    dependencies: list[DependencyOutput]


class FieldExplanation(BaseModel):
    field: str = Field(
        examples=["verdict.verdict"],
        description="A field of the report: `verdict.<key>` or `outputs.<subtask>.<key>`.",
    )
    subtask_id: str = Field(examples=["verdict"])
    position: int | None = Field(examples=[57], description="Where its value was recorded.")
    prompt_sha256: str | None = Field(examples=[SHA256_EXAMPLE])
    model: str | None = Field(examples=["SmolLM2-135M-Instruct.Q4_1"])
    dependencies: list[str] = Field(examples=[["goal", "structure"]])


class Explanation(BaseModel):
    ticket_id: UUID = Field(examples=[TICKET_ID_EXAMPLE])
    pipeline_name: str = Field(examples=["document-review"])
    pipeline_version: int = Field(examples=[1])
    rerun_of: UUID | None = Field(
        default=None, description="The ticket this one re-runs, if it is a re-run."
    )
    position: int = Field(examples=[57], description="Position of the ticket's last event.")
    final_subtask_id: str = Field(examples=["verdict"])
    fields: list[FieldExplanation]
    subtasks: list[SubtaskExplanation] = Field(description="In pipeline order.")


def _final_subtask(order: Sequence[str], depends_on: Mapping[str, Sequence[str]]) -> str:
    """The report's verdict comes from the last subtask in pipeline order nothing depends on
    (projections/report.py decides the same way)."""
    depended_on = {dependency for deps in depends_on.values() for dependency in deps}
    sinks = [subtask for subtask in order if subtask not in depended_on]
    return (sinks or list(order))[-1]


def explain(events: Sequence[RecordedEvent]) -> Explanation:
    """The explanation of a ticket from its events (the first one its `TicketCreated`)."""
    created = events[0].payload()
    if not isinstance(created, TicketCreated):
        raise ValueError("a ticket's history starts with TicketCreated")
    order = [s.id for s in created.pipeline.subtasks]
    titles = {s.id: s.title for s in created.pipeline.subtasks}
    depends_on = {s.id: tuple(s.depends_on) for s in created.pipeline.subtasks}
    refs: dict[str, list[EventRef]] = {sid: [] for sid in order}
    status = dict.fromkeys(order, "pending")
    attempts = dict.fromkeys(order, 0)
    results: dict[str, tuple[int, SubtaskCompletedV2]] = {}
    rerun_of: UUID | None = None
    for event in events:
        try:
            payload = upcast(event.payload())
            name = event.event_type.name
        except UnknownEventTopic:
            continue
        if isinstance(payload, TicketRerunRequested):
            rerun_of = payload.rerun_of
        # A follow-up question's answer is not the pipeline's: GET /tickets/{id}/questions.
        if (
            not isinstance(
                payload, SubtaskReady | SubtaskStarted | SubtaskCompletedV2 | SubtaskFailed
            )
            or payload.subtask_id not in refs
        ):
            continue
        sid = payload.subtask_id
        refs[sid].append(EventRef(position=event.position, type=name, topic=event.topic,
                                  attempt=payload.attempt))  # fmt: skip
        attempts[sid] = max(attempts[sid], payload.attempt)
        if isinstance(payload, SubtaskCompletedV2):
            if payload.ignored or sid in results:
                continue
            results[sid] = (event.position, payload)
            status[sid] = "completed"
        elif sid not in results:
            status[sid] = {SubtaskReady: "ready", SubtaskStarted: "running"}.get(
                type(payload), "failed"
            )

    def output_sha256(sid: str) -> str | None:
        if sid not in results:
            return None
        payload = results[sid][1]
        if payload.provenance is not None:
            return payload.provenance.output_sha256
        if payload.output is not None:
            return sha256_of(canonical_json(payload.output))
        return payload.output_sha256

    subtasks = []
    for sid in order:
        position, result = results.get(sid, (None, None))
        provenance = result.provenance if result is not None else None
        subtasks.append(
            SubtaskExplanation(
                subtask_id=sid,
                title=titles[sid],
                status=status[sid],
                attempts=attempts[sid],
                events=refs[sid],
                completed_position=position,
                output_sha256=output_sha256(sid),
                prompt_sha256=provenance.prompt_sha256 if provenance else None,
                model=result.model if result is not None else None,
                provenance=provenance,
                dependencies=[
                    DependencyOutput(
                        subtask_id=dependency,
                        position=results[dependency][0] if dependency in results else None,
                        output_sha256=output_sha256(dependency),
                    )
                    for dependency in depends_on[sid]
                ],
            )
        )
    final = _final_subtask(order, depends_on)
    by_id = {s.subtask_id: s for s in subtasks}
    fields: list[FieldExplanation] = []
    for prefix, sid in [("verdict", final), *((f"outputs.{sid}", sid) for sid in order)]:
        if sid not in results:
            continue
        output = results[sid][1].output or {}
        explained = by_id[sid]
        for key in output:
            fields.append(
                FieldExplanation(
                    field=f"{prefix}.{key}",
                    subtask_id=sid,
                    position=explained.completed_position,
                    prompt_sha256=explained.prompt_sha256,
                    model=explained.model,
                    dependencies=list(depends_on[sid]),
                )
            )
    return Explanation(
        ticket_id=events[0].aggregate_id,
        pipeline_name=created.pipeline.name,
        pipeline_version=created.pipeline.version,
        rerun_of=rerun_of,
        position=events[-1].position,
        final_subtask_id=final,
        fields=fields,
        subtasks=subtasks,
    )


# -- report diffs ---------------------------------------------------------------------------------

Change = Literal["added", "removed", "changed"]


class FieldChange(BaseModel):
    field: str = Field(examples=["outputs.verdict.output.verdict"])
    change: Change = Field(examples=["changed"])
    a: Any = Field(default=None, examples=["accept"], description="The value in report a.")
    b: Any = Field(default=None, examples=["revise"], description="The value in report b.")


class ReportRef(BaseModel):
    ticket_id: UUID = Field(examples=[TICKET_ID_EXAMPLE])
    pipeline_name: str = Field(examples=["document-review"])
    pipeline_version: int = Field(examples=[1])
    rerun_of: UUID | None = Field(default=None)
    position: int = Field(examples=[57], description="Position of the report.")


class ReportDiff(BaseModel):
    a: ReportRef
    b: ReportRef
    equal: bool = Field(description="True when every compared field is the same.")
    compared: int = Field(examples=[12], description="Fields compared.")
    changes: list[FieldChange] = Field(description="The fields that differ, in report order.")


_MISSING = object()


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) for every field: objects are walked, lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}")
    else:
        yield path, value


def diff_reports(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[int, list[FieldChange]]:
    """Compare `verdict` and every subtask's `output` of two reports, field by field."""

    def fields(report: Mapping[str, Any]) -> dict[str, Any]:
        found = dict(_leaves(report.get("verdict"), "verdict"))
        for sid, entry in (report.get("outputs") or {}).items():
            found.update(_leaves(entry.get("output"), f"outputs.{sid}.output"))
        return found

    left, right = fields(a), fields(b)
    keys = list(dict.fromkeys([*left, *right]))
    changes = []
    for key in keys:
        old, new = left.get(key, _MISSING), right.get(key, _MISSING)
        if old is _MISSING:
            changes.append(FieldChange(field=key, change="added", b=new))
        elif new is _MISSING:
            changes.append(FieldChange(field=key, change="removed", a=old))
        elif canonical(old) != canonical(new):
            changes.append(FieldChange(field=key, change="changed", a=old, b=new))
    return len(keys), changes


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)
