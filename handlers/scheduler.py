"""The inference worker: pulls ready subtasks ahead, then dispatches them fairly, ticket by ticket.

A plain FIFO consumer would serve a tenant who queued thirty tickets before another tenant's
single ticket. This worker instead keeps up to `buffer` messages of the durable consumer in hand
(acknowledging none until its work is recorded, and keeping each alive with `in_progress()`), and
picks what goes to the model next with a `FairQueue`: tenants take turns, interactive tickets
(small documents) go first, and a ticket's waiting subtasks go together so they share a prefix.

Across workers, `TenantSlots` bounds how many of one tenant's tickets are with the model at once.
When the backend says it is overloaded (`BackendThrottled`: HTTP 429 or 503), the model is paused
for every worker through a Redis cool-down until its `Retry-After`; the batch goes back into the
queue unacknowledged, so the pause costs none of the message's delivery attempts.

Everything else follows the shared consumer runtime: failures are redelivered with backoff, the
last delivery is dead-lettered, and on stop unfinished messages are left for redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from commands.port import TicketSnapshot
from handlers.consumer import (
    NATS_AWAY,
    ConsumerSettings,
    PermanentFailure,
    ensure_dead_letter_stream,
    pause_while_nats_is_away,
    settle_failure,
    subscribe_when_stream_exists,
)
from handlers.fairness import FairQueue, Priority, TenantSlots, new_lease_token
from handlers.inference import InferenceHandler, ReadyWork, parse_ready
from inference.backends import BackendRejected, BackendThrottled

logger = logging.getLogger(__name__)


class Cooldown(Protocol):
    """A shared pause per model (see handlers/cooldown.py)."""

    async def pause(self, model: str, seconds: float) -> object: ...

    async def remaining(self, model: str) -> float: ...

    async def wait(self, model: str) -> None: ...


@dataclass(frozen=True)
class SchedulerSettings:
    concurrency: int = 2
    """Batches (tickets) this worker sends to the backend at once."""
    buffer: int = 256
    """Messages held at most: waiting in the queue or running."""
    interactive_max_chars: int = 20_000
    """Tickets whose documents have at most this many characters are interactive."""
    promote_after_s: float = 60.0
    """A bulk ticket waiting this long is served like an interactive one."""
    idle_poll_s: float = 0.25
    """How often a worker with waiting work re-checks slots held by other workers."""


@dataclass
class _Held:
    message: Msg
    work: ReadyWork


class InferenceScheduler:
    def __init__(
        self,
        js: JetStreamContext,
        consumer: ConsumerSettings,
        handler: InferenceHandler,
        *,
        settings: SchedulerSettings | None = None,
        slots: TenantSlots | None = None,
        cooldown: Cooldown | None = None,
        worker: str = "inference",
    ) -> None:
        self.js = js
        self.consumer = consumer
        self.handler = handler
        self.settings = settings or SchedulerSettings()
        self.slots = slots
        self.cooldown = cooldown
        self.worker = worker
        self.queue: FairQueue[_Held] = FairQueue(promote_after_s=self.settings.promote_after_s)
        self._held: dict[int, Msg] = {}
        """Every message in hand, waiting or running, by identity."""
        self._running: set[asyncio.Task[None]] = set()
        self._leases: dict[str, str] = {}
        """Slot token → tenant, for every running batch."""
        self._priorities: dict[UUID, Priority] = {}
        # Set when there may be something to dispatch, or room to fetch more. Each loop clears
        # its flag before it looks, so a signal sent while it looks is never lost.
        self._wake = asyncio.Event()
        self._room = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        await ensure_dead_letter_stream(self.js, self.consumer.dead_letter_replicas)
        config = self.consumer.config()
        # The consumer lets this worker hold its whole buffer unacknowledged.
        config.max_ack_pending = max(self.settings.buffer, self.consumer.concurrency)
        subscription = await subscribe_when_stream_exists(
            self.js,
            self.consumer.filter_subject,
            durable=self.consumer.durable,
            stream=self.consumer.stream,
            config=config,
            stop=stop,
        )
        if subscription is None:
            return
        logger.info(
            "scheduling %s as %s (concurrency %d, buffer %d, tenant slots %s)",
            self.consumer.filter_subject,
            self.consumer.durable,
            self.settings.concurrency,
            self.settings.buffer,
            self.slots.limit if self.slots else "unbounded",
        )
        keepalive = asyncio.create_task(self._keep_alive())
        dispatcher = asyncio.create_task(self._dispatch_loop(stop))
        try:
            while not stop.is_set():
                self._room.clear()
                room = self.settings.buffer - len(self._held)
                if room <= 0:
                    await _wait_any(self._room, stop, at_most_s=1.0)
                    continue
                try:
                    messages = await subscription.fetch(min(room, 64), timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                except NATS_AWAY as error:
                    await pause_while_nats_is_away(error, stop)
                    continue
                for message in messages:
                    await self._accept(message)
                self._wake.set()
        finally:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
            await self._finish_running()
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _accept(self, message: Msg) -> None:
        try:
            work = ReadyWork(parse_ready(message), (message.headers or {}).get("traceparent"))
            priority = await self._priority(work.ready.ticket_id)
        except Exception as error:
            await self._settle(message, error)
            return
        self._held[id(message)] = message
        self.queue.push(work.ready.tenant, work.ready.ticket_id, priority, _Held(message, work))

    async def _priority(self, ticket_id: UUID) -> Priority:
        known = self._priorities.get(ticket_id)
        if known is None:
            ticket = await self.handler.snapshot(ticket_id)
            known = classify(ticket, self.settings.interactive_max_chars)
            if len(self._priorities) > 10_000:
                self._priorities.clear()
            self._priorities[ticket_id] = known
        return known

    async def _dispatch_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            if len(self._running) >= self.settings.concurrency or not len(self.queue):
                await _wait_any(self._wake, stop, at_most_s=1.0)
                continue
            if await self._paused_for() > 0:
                await self._wait_for_resume(stop)
                continue
            if not await self._dispatch_one():
                # Every waiting tenant is at its bound; slots free up in other workers too.
                await _wait_any(self._wake, stop, at_most_s=self.settings.idle_poll_s)

    async def _paused_for(self) -> float:
        if self.cooldown is None:
            return 0.0
        try:
            return await self.cooldown.remaining(self.handler.model)
        except Exception as error:  # a broken Redis must not stop inference
            logger.warning("cannot read the model cool-down: %s", error)
            return 0.0

    async def _wait_for_resume(self, stop: asyncio.Event) -> None:
        """Waits out the model's cool-down (it logs and counts the resume), or the stop."""
        assert self.cooldown is not None
        resumed = asyncio.ensure_future(self.cooldown.wait(self.handler.model))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([resumed, stopped], return_when=asyncio.FIRST_COMPLETED)
            if resumed.done() and resumed.exception() is not None:
                logger.warning("cannot wait for the model cool-down: %s", resumed.exception())
                await _wait_any(stop, at_most_s=1.0)
        finally:
            resumed.cancel()
            stopped.cancel()

    async def _dispatch_one(self) -> bool:
        for tenant in list(self.queue.candidates()):
            token = new_lease_token(self.worker)
            if self.slots is not None and not await self._try_slot(tenant, token):
                continue
            ticket_id, priority, since, held = self.queue.pop(tenant)
            self._leases[token] = tenant
            task = asyncio.create_task(
                self._run_batch(tenant, ticket_id, priority, since, held, token)
            )
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            return True
        return False

    async def _try_slot(self, tenant: str, token: str) -> bool:
        assert self.slots is not None
        try:
            return await self.slots.try_acquire(tenant, token)
        except Exception as error:  # without Redis, fairness within this worker still holds
            logger.warning("cannot reach the tenant slots, dispatching anyway: %s", error)
            return True

    async def _run_batch(
        self,
        tenant: str,
        ticket_id: UUID,
        priority: Priority,
        since: float,
        held: list[_Held],
        token: str,
    ) -> None:
        requeued = False
        try:
            try:
                outcomes = await asyncio.wait_for(
                    self.handler.run(ticket_id, [h.work for h in held]),
                    timeout=self.consumer.job_timeout_s,
                )
            except BackendThrottled as error:
                await self._throttled(error)
                self.queue.requeue(tenant, ticket_id, priority, held, since)
                requeued = True
                return
            except BackendRejected as error:
                # The server refused the request itself: no redelivery can change that.
                failure = PermanentFailure(f"the inference server refused the request: {error}")
                outcomes = [failure] * len(held)
            except Exception as error:
                outcomes = [error] * len(held)
            for item, outcome in zip(held, outcomes, strict=True):
                if outcome is None:
                    await item.message.ack()
                else:
                    await self._settle(item.message, outcome)
        finally:
            if not requeued:
                for item in held:
                    self._held.pop(id(item.message), None)
            self._leases.pop(token, None)
            if self.slots is not None:
                with contextlib.suppress(Exception):
                    await self.slots.release(tenant, token)
            self._wake.set()
            self._room.set()

    async def _throttled(self, error: BackendThrottled) -> None:
        if self.cooldown is None:
            await asyncio.sleep(error.retry_after_s)
            return
        try:
            await self.cooldown.pause(error.model, error.retry_after_s)
        except Exception as redis_error:
            logger.warning("cannot record the cool-down, pausing locally: %s", redis_error)
            await asyncio.sleep(error.retry_after_s)

    async def _settle(self, message: Msg, error: BaseException) -> None:
        try:
            await settle_failure(self.js, self.consumer, message, error, self.handler.fail)
        except Exception as settle_error:
            # Not acknowledged: JetStream redelivers it after ack_wait.
            logger.error("could not settle %s: %s", message.subject, settle_error)
        finally:
            self._held.pop(id(message), None)
            self._room.set()

    async def _keep_alive(self) -> None:
        """Every held message (waiting or running) and every slot lease stays alive."""
        interval = max(1.0, self.consumer.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            for message in list(self._held.values()):
                with contextlib.suppress(Exception):
                    await message.in_progress()
            if self.slots is not None:
                for token, tenant in list(self._leases.items()):
                    with contextlib.suppress(Exception):
                        await self.slots.renew(tenant, token)

    async def _finish_running(self) -> None:
        if self._running:
            logger.info("waiting for %d running batches", len(self._running))
            _, pending = await asyncio.wait(self._running, timeout=self.consumer.stop_grace_s)
            for task in pending:
                task.cancel()
            if pending:
                logger.warning("cancelled %d batches still running at stop", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        # Waiting messages are not acknowledged: JetStream redelivers them after ack_wait.
        self._held.clear()


async def _wait_any(*events: asyncio.Event, at_most_s: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=at_most_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def classify(ticket: TicketSnapshot, interactive_max_chars: int) -> Priority:
    """Interactive when the ticket's documents are small (known once they are ingested)."""
    characters = ticket.ingested_characters
    if characters is None:
        return Priority.BULK
    return Priority.INTERACTIVE if characters <= interactive_max_chars else Priority.BULK
