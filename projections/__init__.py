"""Read-model builders that fold the event log into query tables, each with its position."""

from projections.projector import (
    PROJECTION_NOTIFY_CHANNEL,
    READ_MODELS,
    Projector,
    ProjectorSettings,
)
from projections.rebuild import (
    ProjectionStatus,
    RebuildInProgress,
    RebuildResult,
    rebuild,
    status,
)
from projections.report import Report, ReportSource, SubtaskOutcome, build_report, render_markdown
from projections.writer import (
    READ_MODEL_TABLES,
    ReadModelWriter,
    Statement,
    WriteReport,
    apply_events,
)

__all__ = [
    "PROJECTION_NOTIFY_CHANNEL",
    "READ_MODELS",
    "READ_MODEL_TABLES",
    "ProjectionStatus",
    "Projector",
    "ProjectorSettings",
    "ReadModelWriter",
    "RebuildInProgress",
    "RebuildResult",
    "Report",
    "ReportSource",
    "Statement",
    "SubtaskOutcome",
    "WriteReport",
    "apply_events",
    "build_report",
    "rebuild",
    "render_markdown",
    "status",
]
