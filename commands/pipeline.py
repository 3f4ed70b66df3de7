"""Pipeline DAG rules: which subtasks may run, given which have completed."""

from __future__ import annotations

from collections.abc import Collection

from streams.contract import PipelineDefinition


def root_subtasks(pipeline: PipelineDefinition) -> list[str]:
    """Subtasks with no dependencies, in definition order."""
    return [subtask.id for subtask in pipeline.subtasks if not subtask.depends_on]


def unblocked_subtasks(
    pipeline: PipelineDefinition, completed: Collection[str], scheduled: Collection[str]
) -> list[str]:
    """Subtasks not yet scheduled whose dependencies have all completed, in definition order."""
    return [
        subtask.id
        for subtask in pipeline.subtasks
        if subtask.id not in scheduled and all(dep in completed for dep in subtask.depends_on)
    ]


def topological_order(pipeline: PipelineDefinition) -> list[str]:
    """One order in which every subtask follows its dependencies (definition order breaks ties)."""
    order: list[str] = []
    while len(order) < len(pipeline.subtasks):
        order.extend(unblocked_subtasks(pipeline, order, order))
    return order
