"""End-to-end tickets per minute with one and with two inference workers.

Run it as `python -m benchmarks.tickets_per_minute`. For each worker count it starts
`ticketflow up --scale inference=N` on a temporary data directory and free ports, waits until
both APIs are ready, submits `--tickets` `document-qa` tickets on a one-page Word document over
HTTP (dealt to four tenants, so the per-tenant limit of ADR 12 does not cap them), and times from
the first submission until the query API shows the last one completed; the clock starts once
the ingest worker and every inference worker consume. The baseline is one
inference worker in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import docx
import httpx

from ticketflow.auth import JwtCodec
from ticketflow.embedded import free_port
from ticketflow.settings import Settings

TENANTS = ("tpm-a", "tpm-b", "tpm-c", "tpm-d")
QUESTIONS = (
    "When was the lighthouse built?",
    "How far can the light be seen?",
    "What is the lighthouse built from?",
    "How often does the keeper clean the lamps?",
)


def short_docx() -> bytes:
    document = docx.Document()
    document.add_heading("The Harbour Lighthouse", level=1)
    document.add_paragraph(
        "The harbour lighthouse was built in 1871 from local granite. Its light can be seen "
        "from 22 nautical miles away on a clear night. The keeper cleans the 4 lamps every "
        "morning."
    )
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def wait_ready(urls: Sequence[str], up: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"ticketflow up exited with {up.returncode}")
        try:
            if all(httpx.get(f"{url}/health", timeout=3).status_code == 200 for url in urls):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the stack was not ready within {timeout}s")


# What each worker logs once its models are loaded and it takes messages.
READY_LINES = {"ingest": "as ingest (concurrency", "inference": "as inference (concurrency"}


def wait_for_workers(
    logs: Path, inference: int, up: subprocess.Popen[bytes], timeout: float
) -> None:
    """Until the ingest worker and every inference worker consume: the APIs' readiness does
    not cover the workers, and their start-up must not count as ticket time."""
    names = {"ingest": "ingest"} | {
        ("inference" if n == 1 else f"inference-{n}"): "inference" for n in range(1, inference + 1)
    }
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"ticketflow up exited with {up.returncode}")
        ready = [
            (logs / f"{name}.log").exists()
            and READY_LINES[kind] in (logs / f"{name}.log").read_text(errors="replace")
            for name, kind in names.items()
        ]
        if all(ready):
            return
        time.sleep(1)
    raise RuntimeError(f"the workers were not consuming within {timeout}s")


def run(workers: int, tickets: int, root: Path) -> tuple[float, float]:
    """(seconds from first submission to last completion, seconds to start the stack)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "OTEL_"))}
    env.update(
        TF_DATA_DIR=str(root / f"inference-{workers}"),
        TF_COMMANDS_PORT=str(free_port()),
        TF_QUERIES_PORT=str(free_port()),
        TF_EMBEDDED_NATS_PORT=str(free_port()),
        TF_EMBEDDED_REDIS_PORT=str(free_port()),
    )
    commands = f"http://127.0.0.1:{env['TF_COMMANDS_PORT']}"
    queries = f"http://127.0.0.1:{env['TF_QUERIES_PORT']}"
    log = (root / f"up-{workers}.log").open("wb")
    started = time.perf_counter()
    up = subprocess.Popen(
        [sys.executable, "-m", "ticketflow", "up", "--scale", f"inference={workers}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready((commands, queries), up, 600)
        wait_for_workers(Path(env["TF_DATA_DIR"]) / "logs", workers, up, 600)
        startup = time.perf_counter() - started
        settings = Settings()
        codec = JwtCodec(
            settings.jwt_secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience
        )
        tokens = {t: codec.mint(subject="bench", tenant=t, roles=["user"]) for t in TENANTS}
        document = short_docx()
        created: list[tuple[str, str]] = []
        first = time.perf_counter()
        for index in range(tickets):
            tenant = TENANTS[index % len(TENANTS)]
            response = httpx.post(
                f"{commands}/tickets",
                headers={"Authorization": f"Bearer {tokens[tenant]}"},
                files={"file": ("lighthouse.docx", document, "application/octet-stream")},
                data={
                    "pipeline": "document-qa",
                    "options": json.dumps({"question": QUESTIONS[index % len(QUESTIONS)]}),
                },
                timeout=30,
            )
            response.raise_for_status()
            created.append((tenant, str(response.json()["ticket_id"])))
        pending = set(created)
        while pending:
            for tenant, ticket_id in list(pending):
                response = httpx.get(
                    f"{queries}/tickets/{ticket_id}",
                    headers={"Authorization": f"Bearer {tokens[tenant]}"},
                    timeout=10,
                )
                if response.status_code != 200:
                    continue
                status = response.json()["status"]
                if status == "failed":
                    raise RuntimeError(f"ticket {ticket_id} failed")
                if status == "completed":
                    pending.discard((tenant, ticket_id))
            if time.perf_counter() - first > 1200:
                raise RuntimeError(f"{len(pending)} tickets still open after 20 minutes")
            time.sleep(0.5)
        return time.perf_counter() - first, startup
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
        log.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tickets_per_minute")
    parser.add_argument("--tickets", type=int, default=8, help="tickets per run (default 8)")
    args = parser.parse_args(argv)
    if args.tickets < 1:
        parser.error("--tickets must be at least 1")
    # SIGTERM unwinds like Ctrl-C, so that the stack of the current run is stopped too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = Path(tempfile.mkdtemp(prefix="tf-tickets-per-minute-"))
    results: dict[int, tuple[float, float]] = {}
    for workers in (1, 2):
        results[workers] = run(workers, args.tickets, root)
        seconds, startup = results[workers]
        print(
            f"  inference={workers}: {args.tickets} tickets in {seconds:.1f}s "
            f"(stack and workers ready in {startup:.0f}s)",
            flush=True,
        )
    print("")
    print(
        f"document-qa on a one-page .docx, {args.tickets} tickets over {len(TENANTS)} tenants; "
        f"machine: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}; logs in {root}"
    )
    print(f"{'inference workers':18} {'seconds':>8} {'tickets/min':>12} {'vs 1':>6}")
    base = args.tickets / results[1][0] * 60
    for workers, (seconds, _) in results.items():
        rate = args.tickets / seconds * 60
        print(f"{workers:<18} {seconds:>8.1f} {rate:>12.1f} {rate / base:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
