"""The machine checks of `ticketflow doctor` and the CPU and data-directory rules behind them."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ticketflow.doctor import check_cpu, check_disk, check_memory, check_ports, table
from ticketflow.embedded import StackInfo
from ticketflow.portability import (
    REQUIRED_CPU_FLAGS,
    cpu_flags,
    describe_cpu,
    missing_cpu_flags,
)
from ticketflow.postgres import (
    IncompatibleDataDirectory,
    check_compatible,
    major_version,
    socket_dir_for,
)
from ticketflow.processes import free_port
from ticketflow.settings import Settings

# /proc/cpuinfo of an Ivy Bridge (AVX, no AVX2/FMA/BMI) and of a Haswell.
IVY_BRIDGE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ss ht syscall nx rdtscp lm constant_tsc pni pclmulqdq ssse3 cx16 sse4_1 sse4_2 "
    "x2apic popcnt aes xsave avx f16c rdrand lahf_lm"
)
HASWELL = IVY_BRIDGE + " fma movbe abm bmi1 avx2 bmi2 invpcid"


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    block = f"processor\t: {{n}}\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n"
    path.write_text(block.format(n=0) + block.format(n=1))
    return path


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    flags = cpu_flags(cpuinfo(tmp_path, HASWELL))
    assert {"avx2", "fma", "bmi2", "movbe", "sse4_2"} <= flags
    assert missing_cpu_flags(flags) == []
    assert cpu_flags(tmp_path / "absent") == set()


def test_a_cpu_without_avx2_misses_exactly_the_x86_64_v3_features(tmp_path: Path) -> None:
    flags = cpu_flags(cpuinfo(tmp_path, IVY_BRIDGE))
    assert missing_cpu_flags(flags) == ["avx2", "bmi1", "bmi2", "fma", "abm", "movbe"]
    check = check_cpu(flags, "x86_64")
    assert check.verdict == "fail"
    assert "x86-64-v3" in check.detail
    assert "lacks avx2 bmi1 bmi2 fma abm movbe" in check.detail
    assert "its flags: " in check.detail  # the CPU's own flags, for a bug report


def test_a_haswell_passes_and_other_architectures_warn() -> None:
    assert check_cpu(set(HASWELL.split()), "x86_64").verdict == "ok"
    assert check_cpu(set(), "x86_64").verdict == "warn"
    assert check_cpu({"fp", "asimd"}, "aarch64").verdict == "warn"
    assert set(REQUIRED_CPU_FLAGS) <= set(HASWELL.split())
    assert "this CPU has all of them" in describe_cpu(set(HASWELL.split()))


def test_memory_verdicts_follow_mem_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    for available_kib, verdict in ((16 << 20, "ok"), (2 << 20, "warn"), (512 << 10, "fail")):
        meminfo.write_text(f"MemTotal: 33554432 kB\nMemAvailable: {available_kib} kB\n")
        assert check_memory(meminfo).verdict == verdict
    meminfo.write_text("MemTotal: 1 kB\n")
    assert check_memory(meminfo).verdict == "warn"


def test_disk_is_measured_where_the_data_directory_will_be(tmp_path: Path) -> None:
    check = check_disk(tmp_path / "not" / "yet" / "there")
    assert check.verdict in ("ok", "warn", "fail")
    assert str(tmp_path) in check.detail
    assert "GiB free" in check.detail


def test_a_taken_port_fails_and_names_its_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(
            commands_port=port,
            queries_port=free_port(),
            embedded_nats_port=free_port(),
            embedded_redis_port=free_port(),
        )
        checks = {check.name: check for check in check_ports(settings, None)}
        assert checks[f"port {port} (commands API)"].verdict == "fail"
        assert "TF_COMMANDS_PORT" in checks[f"port {port} (commands API)"].detail
        assert [c.verdict for c in checks.values()].count("ok") == 3
        # The same port held by the running stack is fine.
        stack = StackInfo(
            pid=1234,
            database_url="",
            nats_url="",
            redis_url="",
            commands_url=f"http://127.0.0.1:{port}",
        )
        checks = {check.name: check for check in check_ports(settings, stack)}
        assert checks[f"port {port} (commands API)"].verdict == "ok"
        assert "pid 1234" in checks[f"port {port} (commands API)"].detail


def test_external_servers_have_no_embedded_ports_to_check() -> None:
    settings = Settings(
        database_url="postgresql://db/x", nats_url="nats://n:4222", redis_url="redis://r/0"
    )
    names = [check.name for check in check_ports(settings, None)]
    assert len(names) == 2
    assert not any("NATS" in name or "Redis" in name for name in names)


def test_the_table_shows_every_verdict() -> None:
    from rich.console import Console

    from ticketflow.doctor import Check

    console = Console(record=True, width=120)
    console.print(table([Check("a", "ok", "fine"), Check("b", "fail", "broken")]))
    text = console.export_text()
    assert "ok" in text
    assert "fail" in text
    assert "broken" in text


def test_a_data_directory_of_another_major_version_is_refused_with_what_to_do(
    tmp_path: Path,
) -> None:
    pgdata = tmp_path / "postgres"
    pgdata.mkdir()
    check_compatible(pgdata)  # new: fine
    (pgdata / "PG_VERSION").write_text(f"{major_version()}\n")
    check_compatible(pgdata)  # the same major version (e.g. 18.3 data on 18.6): fine
    (pgdata / "PG_VERSION").write_text("16\n")
    with pytest.raises(IncompatibleDataDirectory) as raised:
        check_compatible(pgdata)
    message = str(raised.value)
    assert "PostgreSQL 16" in message
    assert "pg_dumpall" in message
    assert f"move {pgdata} away" in message


def test_the_socket_stays_in_the_data_directory_unless_its_path_is_too_long(
    tmp_path: Path,
) -> None:
    short = Path("/srv/tf/postgres")
    assert socket_dir_for(short) == short
    deep = Path("/srv") / ("d" * 120) / "postgres"
    fallback = socket_dir_for(deep)
    assert fallback != deep
    assert len(str(fallback / ".s.PGSQL.5432")) < 108
    assert socket_dir_for(deep) == fallback  # the same on every start
    assert socket_dir_for(Path("/srv") / ("e" * 120) / "postgres") != fallback


def test_a_probe_that_dies_of_sigill_fails_its_check_with_the_advice_given() -> None:
    import sys

    from ticketflow.doctor import check_in_child

    crash = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    check = check_in_child("model", [sys.executable, "-c", crash], on_sigill="rebuild it")
    assert (check.verdict, check.detail) == ("fail", "rebuild it")
    check = check_in_child("other", [sys.executable, "-c", crash])
    assert check.verdict == "fail"
    assert "illegal instruction" in check.detail
    assert "x86-64-v3" in check.detail


def test_a_probe_passes_on_its_json_line_and_fails_with_its_last_error_line() -> None:
    import sys

    from ticketflow.doctor import check_in_child

    passing = 'import json; print("loading"); print(json.dumps({"detail": "it works"}))'
    assert check_in_child("p", [sys.executable, "-c", passing]).detail == "it works"
    failing = "import sys; sys.exit('FileNotFoundError: no model here')"
    check = check_in_child("p", [sys.executable, "-c", failing])
    assert (check.verdict, check.detail) == ("fail", "FileNotFoundError: no model here")
    slow = "import time; time.sleep(10)"
    assert "within 1s" in check_in_child("p", [sys.executable, "-c", slow], timeout=1).detail
