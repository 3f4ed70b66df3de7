"""`ticketflow audit export`: the ranges it takes, and what it says it wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from read_api.audit_export import Bound, check_range
from ticketflow.audit_cli import export_summary
from ticketflow.cli import app


@pytest.mark.parametrize(
    ("since", "until"),
    [
        ("1", "50"),
        ("7", "7"),
        ("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
        ("2026-02-01T00:00:00Z", "3"),  # a time and a position: not comparable here
    ],
)
def test_a_range_that_can_select_something_is_taken(since: str, until: str) -> None:
    check_range(Bound.parse(since), Bound.parse(until))
    check_range(Bound.parse(since), None)
    check_range(None, Bound.parse(until))


@pytest.mark.parametrize(
    ("since", "until"), [("50", "10"), ("2026-02-01T00:00:00Z", "2026-01-01T00:00:00+00:00")]
)
def test_a_range_that_ends_before_it_starts_is_refused(since: str, until: str) -> None:
    with pytest.raises(ValueError, match="is after until"):
        check_range(Bound.parse(since), Bound.parse(until))


def test_the_cli_refuses_it_before_reading_anything(tmp_path: Path) -> None:
    args = ["audit", "export", str(tmp_path / "out"), "--tenant", "acme"]
    result = CliRunner().invoke(
        app,
        [*args, "--since", "50", "--until", "10"],
        env={"TF_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"},
    )
    assert result.exit_code == 2, result.output
    assert "is after until" in result.output
    assert not (tmp_path / "out").exists()


def test_an_export_names_the_positions_its_events_span() -> None:
    manifest = {
        "counts": {"events": 3, "checkpoints": 1, "blobs": 2},
        "first_position": 10,
        "last_position": 14,
    }
    assert export_summary(manifest) == "3 events (positions 10-14), 1 checkpoints, 2 blobs"


def test_an_empty_export_names_no_positions() -> None:
    manifest = {
        "counts": {"events": 0, "checkpoints": 0, "blobs": 0},
        "first_position": None,
        "last_position": None,
    }
    assert export_summary(manifest) == "0 events, 0 checkpoints, 0 blobs"
