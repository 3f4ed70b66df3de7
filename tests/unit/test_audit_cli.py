"""What `ticketflow audit export` says it wrote."""

from __future__ import annotations

from ticketflow.audit_cli import export_summary


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
