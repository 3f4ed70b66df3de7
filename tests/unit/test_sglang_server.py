"""The command line `ticketflow inference serve-sglang` builds for SGLang's launcher."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ticketflow import sglang_server
from ticketflow.cli import app
from ticketflow.sglang_server import SGLangMissing, SGLangServerOptions, exec_sglang, launch_argv


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_the_launcher_runs_sglang_launch_server_with_the_given_interpreter() -> None:
    argv = launch_argv(SGLangServerOptions("Qwen/Qwen2.5-7B-Instruct"), python="/opt/py")

    assert argv[:3] == ["/opt/py", "-m", "sglang.launch_server"]
    assert flag_value(argv, "--model-path") == "Qwen/Qwen2.5-7B-Instruct"


def test_the_recommended_flags_schedule_by_longest_prefix_and_report_the_cache() -> None:
    argv = launch_argv(SGLangServerOptions("m"))

    assert flag_value(argv, "--schedule-policy") == "lpm"
    assert "--enable-metrics" in argv
    assert "--enable-cache-report" in argv
    assert "--disable-radix-cache" not in argv


def test_host_port_and_tensor_parallelism_are_passed() -> None:
    argv = launch_argv(SGLangServerOptions("m", host="0.0.0.0", port=31000, tp=4))  # noqa: S104

    assert flag_value(argv, "--host") == "0.0.0.0"  # noqa: S104
    assert flag_value(argv, "--port") == "31000"
    assert flag_value(argv, "--tp-size") == "4"


def test_the_memory_fraction_is_passed_only_when_set() -> None:
    assert "--mem-fraction-static" not in launch_argv(SGLangServerOptions("m"))
    argv = launch_argv(SGLangServerOptions("m", mem_fraction_static=0.85))
    assert flag_value(argv, "--mem-fraction-static") == "0.85"


def test_extra_arguments_come_last_so_they_can_override() -> None:
    extra = ("--dp-size", "2", "--schedule-policy", "fcfs")
    argv = launch_argv(SGLangServerOptions("m", extra_args=extra))

    assert tuple(argv[-4:]) == extra


@pytest.mark.parametrize("flag", ["--disable-radix-cache", "--disable-radix-cache=true"])
def test_turning_off_the_radix_cache_is_refused(flag: str) -> None:
    with pytest.raises(ValueError, match="prefix cache"):
        SGLangServerOptions("m", extra_args=(flag,))


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"model_path": ""}, "model path"),
        ({"model_path": "m", "port": 0}, "port"),
        ({"model_path": "m", "tp": 0}, "--tp"),
        ({"model_path": "m", "mem_fraction_static": 1.5}, "--mem-fraction-static"),
    ],
)
def test_impossible_options_are_refused(options: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        SGLangServerOptions(**options)  # type: ignore[arg-type]


def test_without_sglang_installed_the_launcher_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sglang_server, "sglang_installed", lambda: False)

    with pytest.raises(SGLangMissing, match=r"pip install 'ticketflow\[gpu\]'"):
        exec_sglang(SGLangServerOptions("m"))


def test_the_cli_exits_with_the_install_hint_when_sglang_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sglang_server, "sglang_installed", lambda: False)

    result = CliRunner().invoke(app, ["inference", "serve-sglang", "--model-path", "m"])

    assert result.exit_code == 1
    assert "ticketflow[gpu]" in result.output


def test_the_cli_passes_unknown_flags_through_to_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[SGLangServerOptions] = []
    monkeypatch.setattr("ticketflow.sglang_server.exec_sglang", launched.append)

    result = CliRunner().invoke(
        app,
        ["inference", "serve-sglang", "--model-path", "m", "--tp", "2", "--dp-size", "4"],
    )

    assert result.exit_code == 0, result.output
    assert launched == [SGLangServerOptions("m", tp=2, extra_args=("--dp-size", "4"))]
