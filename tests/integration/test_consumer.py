"""The handler runtime on a real JetStream: retries with backoff, then a dead letter."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg

from handlers.consumer import (
    DEAD_LETTER_STREAM,
    ConsumerSettings,
    JetStreamWorker,
    PermanentFailure,
)
from streams.jetstream import StreamSettings, ensure_stream
from ticketflow.bootstrap import connect_nats

STREAM = StreamSettings(storage="memory")
Handle = Callable[[Msg], Awaitable[None]]


async def run_worker(
    nats_url: str,
    credentials: Path,
    handle: Handle,
    *,
    expected_calls: int,
    max_deliver: int,
) -> tuple[Counter[str], list[tuple[str, str]], list[RawStreamMsg]]:
    nc = await connect_nats(nats_url, "tests", credentials)
    js = nc.jetstream()
    await ensure_stream(js, STREAM)
    await js.publish(
        "tf.evt.acme.ticket.t1.subtask_ready",
        json.dumps({"n": 1}).encode(),
        headers={"Nats-Msg-Id": "t1:1"},
    )
    calls: Counter[str] = Counter()
    dead: list[tuple[str, str]] = []

    async def counting(message: Msg) -> None:
        calls[message.subject] += 1
        await handle(message)

    async def dead_letter(message: Msg, reason: str) -> None:
        dead.append((message.subject, reason))

    worker = JetStreamWorker(
        js,
        ConsumerSettings(
            durable="test",
            filter_subject="tf.evt.*.ticket.*.subtask_ready",
            backoff_s=(0.1, 0.2),
            max_deliver=max_deliver,
        ),
        counting,
        dead_letter,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    for _ in range(100):
        if sum(calls.values()) >= expected_calls:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # room for any delivery beyond the expected ones
    stop.set()
    await asyncio.wait_for(task, 10)
    info = await js.stream_info(DEAD_LETTER_STREAM)
    copies = [await js.get_msg(DEAD_LETTER_STREAM, s) for s in range(1, info.state.last_seq + 1)]
    await nc.close()
    return calls, dead, copies


async def test_a_failing_message_is_retried_then_dead_lettered_once(
    fresh_nats: str, nats_credentials: Path
) -> None:
    async def always_fails(_: Msg) -> None:
        raise RuntimeError("backend unavailable")

    calls, dead, copies = await run_worker(
        fresh_nats, nats_credentials, always_fails, expected_calls=3, max_deliver=3
    )
    assert sum(calls.values()) == 3
    assert dead == [("tf.evt.acme.ticket.t1.subtask_ready", "backend unavailable")]
    assert len(copies) == 1
    copy = copies[0]
    assert copy.subject == "tf.dlq.test.tf.evt.acme.ticket.t1.subtask_ready"
    assert copy.headers is not None
    assert copy.headers["tf-dead-letter-reason"] == "backend unavailable"
    assert copy.headers["tf-deliveries"] == "3"


async def test_a_permanent_failure_is_dead_lettered_without_retries(
    fresh_nats: str, nats_credentials: Path
) -> None:
    async def malformed(_: Msg) -> None:
        raise PermanentFailure("not a valid subtask_ready event")

    calls, dead, copies = await run_worker(
        fresh_nats, nats_credentials, malformed, expected_calls=1, max_deliver=5
    )
    assert sum(calls.values()) == 1
    assert [reason for _, reason in dead] == ["not a valid subtask_ready event"]
    assert len(copies) == 1


async def test_a_message_that_succeeds_on_a_retry_is_not_dead_lettered(
    fresh_nats: str, nats_credentials: Path
) -> None:
    attempts = Counter[str]()

    async def flaky(message: Msg) -> None:
        attempts["n"] += 1
        if attempts["n"] < 2:
            raise RuntimeError("timeout")

    calls, dead, copies = await run_worker(
        fresh_nats, nats_credentials, flaky, expected_calls=2, max_deliver=3
    )
    assert sum(calls.values()) == 2
    assert dead == []
    assert copies == []
