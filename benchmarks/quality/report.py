"""Turns ticket results into the evaluation's tables."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from benchmarks.quality.runner import TicketResult

KINDS = ("valid", "consistent", "grounded", "covered", "clean")


def rate(values: Iterable[bool]) -> tuple[int, int]:
    items = list(values)
    return sum(items), len(items)


def _cell(passed: int, total: int) -> str:
    return f"{100 * passed / total:5.1f}% ({passed}/{total})" if total else "      -"


def kind_rate(results: Sequence[TicketResult], kind: str) -> tuple[int, int]:
    if kind == "valid":
        return rate(v for r in results for v in r.valid)
    return rate(c.ok for r in results for c in r.checks.get(kind, []))


def quality(results: Sequence[TicketResult]) -> float:
    """The mean of the five rates (those with at least one check), from 0 to 1."""
    rates = [p / t for p, t in (kind_rate(results, k) for k in KINDS) if t]
    return statistics.fmean(rates) if rates else 0.0


def pipeline_table(pipeline: str, model: str, results: Sequence[TicketResult]) -> str:
    header = (
        f"{'':9} {'tickets':>8} {'valid':>15} {'consistent':>15} {'grounded':>15} "
        f"{'covered':>15} {'clean':>15} {'quality':>8} {'gen/subtask':>11} {'s/ticket':>8}"
    )
    lines = [f"{pipeline} · {model}", header, "-" * len(header)]
    groups = [("all", list(results))]
    for language in sorted({r.language for r in results}):
        groups.append((language, [r for r in results if r.language == language]))
    for name, group in groups:
        completed = sum(r.status == "completed" for r in group)
        subtasks = sum(r.subtasks for r in group)
        generations = sum(r.generations for r in group)
        cells = " ".join(f"{_cell(*kind_rate(group, k)):>15}" for k in KINDS)
        lines.append(
            f"{name:9} {f'{completed}/{len(group)}':>8} {cells} {100 * quality(group):7.1f}% "
            f"{generations / max(subtasks, 1):11.2f} "
            f"{statistics.fmean(r.wall_s for r in group):8.1f}"
        )
    return "\n".join(lines)


def retrieval_table(results: Sequence[TicketResult]) -> str:
    header = f"{'pipeline':18} {'language':8} {'reference in top k':>22} {'ranked first':>18}"
    lines = ["retrieval (all-MiniLM-L6-v2 embeddings + full text, fused)", header]
    lines.append("-" * len(header))
    keys = sorted({(r.pipeline, r.language) for r in results if r.retrieval})
    for pipeline, language in keys:
        group = [r for r in results if (r.pipeline, r.language) == (pipeline, language)]
        found = rate(c.ok for r in group for c in r.retrieval)
        first = rate(c.ok for r in group for c in r.first_rank)
        lines.append(f"{pipeline:18} {language:8} {_cell(*found):>22} {_cell(*first):>18}")
    return "\n".join(lines)


def summary_table(by_model: dict[str, list[TicketResult]]) -> str:
    header = (
        f"{'model':34} {'tickets':>7} {'quality':>8} {'s/ticket':>8} {'model s/ticket':>14} "
        f"{'quality per minute':>18}"
    )
    lines = ["all pipelines (quality: mean over pipelines)", header, "-" * len(header)]
    for model, results in by_model.items():
        pipelines = sorted({r.pipeline for r in results})
        score = statistics.fmean(
            quality([r for r in results if r.pipeline == p]) for p in pipelines
        )
        wall = statistics.fmean(r.wall_s for r in results)
        model_s = statistics.fmean(r.model_s for r in results)
        lines.append(
            f"{model:34} {len(results):7d} {100 * score:7.1f}% {wall:8.1f} {model_s:14.1f} "
            f"{100 * score * 60 / wall:17.1f}%"
        )
    return "\n".join(lines)


def failed_checks(result: TicketResult) -> list[str]:
    lines = [
        f"    {kind}: {check.label}"
        for kind, checks in result.checks.items()
        for check in checks
        if not check.ok
    ]
    invalid = result.valid.count(False)
    if invalid:
        lines.insert(0, f"    valid: {invalid} of {len(result.valid)} generations invalid")
    if result.failure:
        lines.insert(0, f"    failed: {result.failure}")
    return lines
