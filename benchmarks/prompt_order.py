"""What the prompt order buys: shared prefix first (ours) against instruction first, same run.

Run it as `python -m benchmarks.prompt_order`. One run starts its own embedded servers and runs
the relay, the ingest worker and the inference worker (the same code `ticketflow up` runs) on
this machine's CPU backend (llama.cpp, SmolLM2). It opens `document-review` tickets on
`research-paper.pdf`, alternating two prompt layouts, each ticket under a new tenant:

- ours: system prompt, document (or retrieved excerpts), findings of earlier steps, instruction;
- reversed (the baseline): system prompt, instruction, findings, document last.

The reversed layout is made by a thin wrapper around the real backend that reorders the user
message's sections; everything else (scheduling, retrieval, validation, events) is identical.
For each layout it prints the wall time per ticket (accepted → completed), the prompt tokens
llama.cpp served from its KV cache, and the ratio. It also prints the share of each ticket's
prompt tokens that is a common prefix with an earlier prompt of the same ticket: what a radix
cache like SGLang's can reuse, while llama.cpp reuses only the previous prompt's prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks.harness import run_with_servers
from benchmarks.pipeline import SAMPLES, events_of
from commands.messages import CreateTicket, UploadedDocument
from commands.service import CommandService
from inference.backends import Generation, GenerationRequest, LlamaCppBackend
from inference.sglang import render_chatml
from ticketflow.bootstrap import command_service, run_inference_worker, run_ingest_worker, run_relay
from ticketflow.embedded import EmbeddedServers
from ticketflow.settings import Settings

OURS, REVERSED = "ours", "reversed"
_TASK = "\n\nTask: "
_FINDINGS = "\n\nFindings of the earlier steps"


def instruction_first(content: str) -> str:
    """The user message with its sections reversed: instruction, findings, then the document."""
    task_at = content.rfind(_TASK)
    if task_at < 0:
        return content
    head, task = content[:task_at], content[task_at + 2 :]
    findings_at = head.rfind(_FINDINGS)
    findings = ""
    if findings_at >= 0:
        head, findings = head[:findings_at], head[findings_at + 2 :]
    return "\n\n".join(part for part in (task, findings, head) if part)


@dataclass
class LayoutBackend:
    """The real backend, with prompts laid out as `layout` says; records the prompts' tokens."""

    inner: LlamaCppBackend
    layout: str = OURS
    prompts: list[list[int]] = field(default_factory=list)
    model_name: str = ""
    batch_runs_in_order: bool = True

    def __post_init__(self) -> None:
        self.model_name = self.inner.model_name

    def _arrange(self, request: GenerationRequest) -> GenerationRequest:
        messages = request.messages
        if self.layout == REVERSED:
            messages = tuple(
                {**m, "content": instruction_first(m["content"])} if m["role"] == "user" else m
                for m in messages
            )
        self.prompts.append(self._tokens(messages))
        return replace(request, messages=messages)

    def _tokens(self, messages: tuple[dict[str, str], ...]) -> list[int]:
        llm = self.inner.load()._llm
        text = render_chatml(messages).encode()
        return list(llm.tokenize(text, add_bos=False, special=True))

    async def generate(self, request: GenerationRequest) -> Generation:
        return await self.inner.generate(self._arrange(request))

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return await self.inner.generate_batch([self._arrange(r) for r in requests])

    async def aclose(self) -> None:
        await self.inner.aclose()


def radix_shared(prompts: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(tokens shared with some earlier prompt's prefix, all prompt tokens) of one ticket."""
    shared = total = 0
    for index, prompt in enumerate(prompts):
        total += len(prompt)
        best = 0
        for earlier in prompts[:index]:
            length = 0
            for a, b in zip(earlier, prompt, strict=False):
                if a != b:
                    break
                length += 1
            best = max(best, length)
        shared += best
    return shared, total


@dataclass(frozen=True)
class Run:
    layout: str
    wall_s: float
    prompt_tokens: int
    cached_tokens: int
    radix_shared: int
    radix_total: int


async def one_ticket(
    service: CommandService,
    database_url: str,
    backend: LayoutBackend,
    upload: UploadedDocument,
    tenant: str,
    layout: str,
) -> Run:
    backend.layout = layout
    backend.prompts.clear()
    started = time.time()
    ticket_id = service.create_ticket(
        CreateTicket(tenant, "bench", (upload,), "document-review")
    ).ticket_id
    while not service.get_ticket(ticket_id).is_finished:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    events = events_of(database_url, ticket_id)
    completions = [state for name, state, _ in events if name == "subtask_completed"]
    shared, total = radix_shared(backend.prompts)
    return Run(
        layout,
        events[-1][2] - started,
        sum(c["usage"]["prompt_tokens"] for c in completions),
        sum(c["usage"]["cached_tokens"] for c in completions),
        shared,
        total,
    )


async def benchmark(servers: EmbeddedServers, rounds: int, upload: UploadedDocument) -> list[Run]:
    settings = Settings(
        env="test",
        data_dir=servers.data_dir,
        database_url=servers.database_url,
        nats_url=servers.nats_url,
        redis_url=servers.redis_url,
    )
    backend = LayoutBackend(LlamaCppBackend(n_threads=settings.inference_threads))
    service = command_service(settings, servers.database_url)
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(run_relay(settings, stop)),
        asyncio.create_task(run_ingest_worker(settings, stop)),
        asyncio.create_task(run_inference_worker(settings, stop, backend=backend)),
    ]
    try:
        await asyncio.sleep(3)  # models load before the clock starts
        await one_ticket(service, servers.database_url, backend, upload, "warm-up", OURS)
        runs = []
        for index in range(rounds):
            # Alternate which layout goes first, so drift over the run favours neither.
            order = (OURS, REVERSED) if index % 2 == 0 else (REVERSED, OURS)
            for layout in order:
                tenant = f"{layout}-{index}"
                runs.append(
                    await one_ticket(service, servers.database_url, backend, upload, tenant, layout)
                )
        return runs
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        service.close()


def report(runs: Sequence[Run], document: Path) -> str:
    lines = [
        f"document-review on {document.name}, CPU backend (llama.cpp, SmolLM2-135M), "
        f"{len(runs) // 2} tickets per layout after one warm-up ticket",
        "",
        f"{'layout':10}{'wall s (median)':>17}{'prompt tok':>12}{'KV-cached':>11}"
        f"{'cached %':>10}{'radix-shareable %':>19}",
    ]
    walls: dict[str, float] = {}
    for layout in (OURS, REVERSED):
        mine = [r for r in runs if r.layout == layout]
        walls[layout] = statistics.median(r.wall_s for r in mine)
        prompt = sum(r.prompt_tokens for r in mine) // len(mine)
        cached = sum(r.cached_tokens for r in mine) // len(mine)
        shareable = sum(r.radix_shared for r in mine) / max(1, sum(r.radix_total for r in mine))
        lines.append(
            f"{layout:10}{walls[layout]:>17.2f}{prompt:>12}{cached:>11}"
            f"{cached / max(1, prompt):>10.0%}{shareable:>19.0%}"
        )
    lines.append("")
    lines.append(f"ratio wall ours / reversed: {walls[OURS] / walls[REVERSED]:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2, help="tickets per layout (default 2)")
    parser.add_argument("--document", type=Path, default=SAMPLES / "research-paper.pdf")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    document: Path = args.document
    upload = UploadedDocument("main", document.name, "application/pdf", document.read_bytes())
    runs: list[Run] = []

    async def body(servers: EmbeddedServers) -> None:
        runs.extend(await benchmark(servers, args.rounds, upload))

    run_with_servers("tf-bench-order-", body)
    print(report(runs, document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
