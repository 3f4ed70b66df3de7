"""Starts an SGLang server with the flags ticketflow's workload wants (`ticketflow inference
serve-sglang`).

ticketflow's prompts share long prefixes (system prompt, then the document) across a ticket's
subtasks, so the radix cache stays on and the scheduler serves the longest cached prefix first.
SGLang itself is an optional dependency: `pip install 'ticketflow[gpu]'` on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

SGLANG_MODULE = "sglang"
LAUNCH_MODULE = "sglang.launch_server"
INSTALL_HINT = "pip install 'ticketflow[gpu]'"

# Flags that would undo what the recommended ones are for.
FORBIDDEN_FLAGS = frozenset({"--disable-radix-cache"})


class SGLangMissing(RuntimeError):
    """SGLang is not installed in this environment."""


@dataclass(frozen=True)
class SGLangServerOptions:
    """What `serve-sglang` passes to `sglang.launch_server`; `extra_args` go through as given."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    tp: int = 1
    mem_fraction_static: float | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("a model path (a local directory or a Hugging Face id) is needed")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")
        if self.tp < 1:
            raise ValueError("--tp must be at least 1")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError("--mem-fraction-static must be between 0 and 1")
        for argument in self.extra_args:
            if argument.split("=", 1)[0] in FORBIDDEN_FLAGS:
                raise ValueError(
                    f"{argument} would turn off the prefix cache that ticketflow's prompts "
                    "are built for"
                )


def launch_argv(options: SGLangServerOptions, python: str | None = None) -> list[str]:
    """The command line that starts SGLang with ticketflow's recommended flags.

    Extra arguments come last, so one that repeats a recommended flag wins.
    """
    argv = [
        python or sys.executable,
        "-m",
        LAUNCH_MODULE,
        "--model-path",
        options.model_path,
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--tp-size",
        str(options.tp),
        # Longest-prefix-match scheduling runs requests that share a cached prefix together.
        "--schedule-policy",
        "lpm",
        # Prometheus metrics on /metrics, among them sglang:cache_hit_rate.
        "--enable-metrics",
        # Cached prompt tokens in the OpenAI-compatible API's usage too (the native API always
        # reports them in meta_info).
        "--enable-cache-report",
    ]
    if options.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(options.mem_fraction_static)]
    return argv + list(options.extra_args)


def sglang_installed() -> bool:
    # find_spec locates the package without importing it (importing SGLang loads torch/CUDA).
    return importlib.util.find_spec(SGLANG_MODULE) is not None


def exec_sglang(options: SGLangServerOptions, argv: Sequence[str] | None = None) -> NoReturn:
    """Replaces this process with the SGLang server (signals then go straight to it)."""
    if not sglang_installed():
        raise SGLangMissing(
            f"SGLang is not installed in this environment ({sys.executable}); "
            f"install it on the GPU machine with: {INSTALL_HINT}"
        )
    command = list(argv) if argv is not None else launch_argv(options)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)  # noqa: S606 - a fixed interpreter and module, by design
