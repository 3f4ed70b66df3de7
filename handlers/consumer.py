"""The runtime every handler shares: a durable JetStream pull consumer with bounded concurrency.

The durable consumer *is* the queue. A worker fetches no more than it has free slots for, keeps
long jobs alive with `in_progress()`, acknowledges only after the handler's commands succeeded,
`nak`s failures with exponential backoff, and on the last permitted delivery hands the message to
a dead-letter callback (which records a failure event) and copies it to `tf.dlq.<consumer>.…`.
On stop it fetches nothing more, waits a bounded time for in-flight work, then cancels the rest
(their messages are redelivered to another worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import NotFoundError, ServiceUnavailableError

from streams.contract.subjects import DEAD_LETTER_PREFIX

logger = logging.getLogger(__name__)

DEAD_LETTER_STREAM = "TF_DEAD_LETTERS"

Handle = Callable[[Msg], Awaitable[None]]
DeadLetter = Callable[[Msg, str], Awaitable[None]]


NATS_AWAY: tuple[type[Exception], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    ServiceUnavailableError,
)
"""What a fetch raises while NATS is away, or back without its JetStream yet: the worker waits
a moment and fetches again (the client reconnects by itself; the durable consumer is kept on
the server)."""


_last_away_warning = -math.inf


async def pause_while_nats_is_away(
    error: Exception, stop: asyncio.Event, seconds: float = 1.0
) -> None:
    """Wait `seconds` (or until `stop`), with a warning at most every 30 s."""
    global _last_away_warning  # noqa: PLW0603 - one rate limit per process
    if time.monotonic() - _last_away_warning > 30:
        _last_away_warning = time.monotonic()
        logger.warning("NATS unavailable, fetching again: %s", str(error) or type(error).__name__)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class PermanentFailure(Exception):
    """A message that no redelivery can fix (malformed, refers to nothing): dead-letter it now."""


@dataclass(frozen=True)
class ConsumerSettings:
    durable: str
    filter_subject: str
    stream: str = "TF_EVENTS"
    concurrency: int = 4
    max_deliver: int = 5
    ack_wait_s: float = 30.0
    job_timeout_s: float = 600.0
    backoff_s: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
    fetch_batch: int = 16
    stop_grace_s: float = 20.0
    dead_letter_replicas: int = 1
    """Replicas of the dead-letter stream: the event stream's (3 on a three-node cluster)."""

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            # Headroom past the last handled attempt, so a failed dead-letter write is retried
            # instead of the message silently running out of deliveries.
            max_deliver=self.max_deliver + 3,
            max_ack_pending=self.concurrency,
        )

    def delay_after(self, delivered: int) -> float:
        return self.backoff_s[min(delivered, len(self.backoff_s)) - 1]


async def ensure_dead_letter_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the dead-letter stream with `replicas`, or raise an existing one's replicas to
    them (a stream created by a release that made it R1 on a cluster; never lowered here)."""
    config = StreamConfig(
        name=DEAD_LETTER_STREAM,
        subjects=[f"{DEAD_LETTER_PREFIX}.>"],
        num_replicas=replicas,
        max_age=90 * 24 * 3600.0,
        description="Copies of messages that exhausted their deliveries",
    )
    try:
        info = await js.stream_info(DEAD_LETTER_STREAM)
    except NotFoundError:
        await js.add_stream(config)
        return
    if (info.config.num_replicas or 1) < replicas:
        logger.info("raising the replicas of %s to %d", DEAD_LETTER_STREAM, replicas)
        await js.update_stream(config)


async def subscribe_when_stream_exists(
    js: JetStreamContext,
    subject: str,
    *,
    durable: str,
    stream: str,
    config: ConsumerConfig,
    stop: asyncio.Event,
) -> JetStreamContext.PullSubscription | None:
    """A durable pull subscription on `stream`, waiting for the stream to exist first.

    The relay creates the event stream once it holds the leader lock; a worker started before
    that (or while the stream is being recreated) waits and tries again instead of exiting.
    Returns None when `stop` is set while waiting.
    """
    delay = 0.2
    while True:
        try:
            return await js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
        except NotFoundError:
            logger.info("stream %s does not exist yet; waiting for the relay to create it", stream)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return None
        delay = min(delay * 2, 5.0)


@dataclass
class JetStreamWorker:
    js: JetStreamContext
    settings: ConsumerSettings
    handle: Handle
    dead_letter: DeadLetter
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)
    processed: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        await ensure_dead_letter_stream(self.js, settings.dead_letter_replicas)
        subscription = await subscribe_when_stream_exists(
            self.js,
            settings.filter_subject,
            durable=settings.durable,
            stream=settings.stream,
            config=settings.config(),
            stop=stop,
        )
        if subscription is None:
            return
        slots = asyncio.Semaphore(settings.concurrency)
        logger.info(
            "consuming %s as %s (concurrency %d)",
            settings.filter_subject,
            settings.durable,
            settings.concurrency,
        )
        try:
            while not stop.is_set():
                await slots.acquire()
                free = 1
                while free < settings.fetch_batch and not slots.locked():
                    await slots.acquire()
                    free += 1
                try:
                    messages = await subscription.fetch(free, timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    messages = []
                except NATS_AWAY as error:
                    messages = []
                    await pause_while_nats_is_away(error, stop)
                for _ in range(free - len(messages)):
                    slots.release()
                for message in messages:
                    task = asyncio.create_task(self._process(message))
                    self.in_flight.add(task)
                    task.add_done_callback(self._finished(slots))
        finally:
            await self._finish_in_flight()
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    def _finished(self, slots: asyncio.Semaphore) -> Callable[[asyncio.Task[None]], None]:
        def release(task: asyncio.Task[None]) -> None:
            self.in_flight.discard(task)
            slots.release()

        return release

    async def _finish_in_flight(self) -> None:
        if not self.in_flight:
            return
        logger.info("waiting for %d in-flight messages", len(self.in_flight))
        _, pending = await asyncio.wait(self.in_flight, timeout=self.settings.stop_grace_s)
        for task in pending:
            task.cancel()
        if pending:
            # Cancelled work is not acknowledged: JetStream redelivers it after ack_wait.
            logger.warning("cancelled %d messages still in flight at stop", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def _process(self, message: Msg) -> None:
        keepalive = asyncio.create_task(self._keep_alive(message))
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.handle(message), timeout=self.settings.job_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            await settle_failure(self.js, self.settings, message, error, self.dead_letter)
            return
        finally:
            keepalive.cancel()
        await message.ack()
        self.processed += 1
        logger.debug("handled %s in %.0f ms", message.subject, (time.monotonic() - started) * 1000)

    async def _keep_alive(self, message: Msg) -> None:
        interval = max(1.0, self.settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await message.in_progress()


async def settle_failure(
    js: JetStreamContext,
    settings: ConsumerSettings,
    message: Msg,
    error: BaseException,
    dead_letter: DeadLetter,
) -> None:
    """A handler failed on `message`: redeliver it later, or dead-letter it on its last try."""
    delivered = message.metadata.num_delivered or 1
    reason = _reason(error)
    if isinstance(error, PermanentFailure) or delivered >= settings.max_deliver:
        logger.error("giving up on %s after %d deliveries: %s", message.subject, delivered, reason)
        await dead_letter(message, reason)
        headers = dict(message.headers or {})
        headers["tf-dead-letter-reason"] = reason[:1000]
        headers["tf-deliveries"] = str(message.metadata.num_delivered)
        headers.pop("Nats-Msg-Id", None)
        await js.publish(
            f"{DEAD_LETTER_PREFIX}.{settings.durable}.{message.subject}",
            message.data,
            headers=headers,
        )
        await message.term()
        return
    delay = settings.delay_after(delivered)
    logger.warning(
        "%s failed (delivery %d), retrying in %.0fs: %s", message.subject, delivered, delay, reason
    )
    await message.nak(delay=delay)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text if text else type(error).__name__
