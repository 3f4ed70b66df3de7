"""A stack environment of its own for each end-to-end test: free ports, a fresh data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ticketflow.embedded import free_port


@pytest.fixture
def stack_env(tmp_path: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TF_") or key == "TF_SAMPLES_DIR"
    }
    env.update(
        TF_DATA_DIR=str(tmp_path / "data"),
        TF_COMMANDS_PORT=str(free_port()),
        TF_QUERIES_PORT=str(free_port()),
        TF_EMBEDDED_NATS_PORT=str(free_port()),
        TF_EMBEDDED_REDIS_PORT=str(free_port()),
    )
    return env
