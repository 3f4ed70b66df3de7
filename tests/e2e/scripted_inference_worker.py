"""`python -m tests.e2e.scripted_inference_worker`: the inference worker process of
`ticketflow worker inference` (settings from `TF_…`, stopped by SIGTERM or SIGINT), with the
deterministic `FakeBackend` as its model, so that a fault test runs many tickets a minute on two
cores.

Each answer takes `TF_TEST_MODEL_DELAY_S` seconds (default 0.2), so that work is in flight when
a fault strikes. After SIGUSR1 the model never answers again: what the worker holds stays
unfinished until the process is killed, and a test knows which subtasks that was.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence

from inference.backends import FakeBackend, Generation, GenerationRequest
from ticketflow import logs
from ticketflow.bootstrap import run_inference_worker
from ticketflow.settings import Settings


class ScriptedModel(FakeBackend):
    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.stalled = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> Generation:
        await asyncio.sleep(self.delay_s)
        if self.stalled.is_set():
            await asyncio.Event().wait()  # until the process is killed
        return await super().generate(request)

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return [await self.generate(request) for request in requests]


async def main() -> None:
    settings = Settings()
    model = ScriptedModel(float(os.environ.get("TF_TEST_MODEL_DELAY_S", "0.2")))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, model.stalled.set)
    await run_inference_worker(settings, stop, backend=model)


if __name__ == "__main__":
    logs.configure(os.environ.get("TF_LOG_LEVEL", "INFO").upper())
    asyncio.run(main())
