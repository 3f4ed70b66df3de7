"""The systemd unit files of deploy/systemd: they parse, run commands the CLI has, restart.

`systemd-analyze verify` checks them too where it is installed (with ExecStart pointed at this
checkout's `ticketflow`, since /opt/ticketflow does not exist here).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer

from ticketflow.cli import app

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
INSTALLED = "/opt/ticketflow/.venv/bin/ticketflow"
# Every instance a template is meant for (docs/deployment.md).
INSTANCES = {
    "ticketflow-api@.service": ("commands", "queries"),
    "ticketflow-worker@.service": ("relay", "ingest", "inference", "projector"),
    "ticketflow-migrate.service": ("",),
}


@dataclass
class Unit:
    """A unit file's sections: each key with all its values, in order (systemd allows repeats)."""

    sections: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def values(self, section: str, key: str) -> list[str]:
        return self.sections.get(section, {}).get(key, [])

    def value(self, section: str, key: str) -> str:
        values = self.values(section, key)
        assert len(values) == 1, f"[{section}] {key}: {values}"
        return values[0]


def parse_unit(text: str, instance: str = "") -> Unit:
    """A minimal systemd unit parser: sections, KEY=VALUE, comments, `%i` substituted."""
    unit = Unit()
    section: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert section is not None, f"line {number} is outside a section: {raw!r}"
        assert sep, f"line {number} is not KEY=VALUE: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip().replace("%i", instance))
    return unit


def environment_assignments(value: str) -> dict[str, str]:
    """`Environment=A=1 B="two words"` as systemd reads it."""
    pairs = (word.partition("=") for word in shlex.split(value))
    return {key: val for key, _, val in pairs}


def parse_environment_file(text: str) -> dict[str, str]:
    """An EnvironmentFile: KEY=VALUE lines, `#` comments, optional quotes around the value."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def cli_has(args: list[str]) -> bool:
    """Whether `ticketflow ARGS…` names a command of the CLI (options ignored)."""
    # typer carries its own copy of click: its groups are known by their `commands`.
    command: Any = typer.main.get_command(app)
    for word in args:
        if word.startswith("-"):
            break
        commands = getattr(command, "commands", None)
        if commands is None or word not in commands:
            return False
        command = commands[word]
    return not hasattr(command, "commands")


def test_every_template_is_there() -> None:
    assert sorted(path.name for path in UNITS.glob("*.service")) == sorted(INSTANCES)


@pytest.mark.parametrize(
    ("name", "instance"),
    [(name, instance) for name, instances in INSTANCES.items() for instance in instances],
)
def test_unit_runs_a_ticketflow_command_with_its_settings(name: str, instance: str) -> None:
    unit = parse_unit((UNITS / name).read_text(), instance)
    assert set(unit.sections) == {"Unit", "Service", "Install"}
    exec_start = shlex.split(unit.value("Service", "ExecStart"))
    assert exec_start[0] == INSTALLED
    assert cli_has(exec_start[1:]), f"{name}: `ticketflow {' '.join(exec_start[1:])}` no command"
    files = unit.values("Service", "EnvironmentFile")
    assert files[0] == "/etc/ticketflow/ticketflow.env"
    if instance:
        # Per-process settings, optional ("-"), read after the shared ones so they win.
        assert files[1:] == [f"-/etc/ticketflow/{instance}.env"]
        assert unit.value("Service", "Restart") == "always"
        assert "ticketflow-migrate.service" in unit.value("Unit", "After")
    else:
        assert unit.value("Service", "Type") == "oneshot"
    env = environment_assignments(unit.value("Service", "Environment"))
    assert env["TF_DATA_DIR"] == unit.value("Service", "WorkingDirectory")
    assert int(unit.value("Service", "LimitNOFILE" if instance else "RestartSec")) > 0


def test_environment_file_parsing() -> None:
    text = '# shared\nTF_ENV=production\n\nTF_NATS_URL="nats://a:4222,nats://b:4222"\nX=a=b\n'
    assert parse_environment_file(text) == {
        "TF_ENV": "production",
        "TF_NATS_URL": "nats://a:4222,nats://b:4222",
        "X": "a=b",
    }


def test_cli_has_knows_commands() -> None:
    assert cli_has(["worker", "inference"])
    assert cli_has(["serve", "queries", "--reuse-port"])
    assert not cli_has(["worker", "nonsense"])
    assert not cli_has(["worker"])


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    ticketflow = Path(sys.executable).parent / "ticketflow"
    assert ticketflow.exists()
    paths = []
    for name, instances in INSTANCES.items():
        text = (UNITS / name).read_text().replace(INSTALLED, str(ticketflow))
        for instance in instances:
            path = tmp_path / (name.replace("@.", f"@{instance}.") if instance else name)
            path.write_text(text)
            paths.append(str(path))
    result = subprocess.run(
        ["systemd-analyze", "verify", *paths],
        check=False,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # verify also reports some problems without failing: none is expected.
    assert not result.stderr.strip(), result.stderr
