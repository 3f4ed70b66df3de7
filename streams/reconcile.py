"""The event store against the stream: is every recorded event in JetStream, once, in order?

PostgreSQL is the source of truth; the stream is a copy the relay makes. A copy can lose
messages: the stream deleted or purged by hand, a message deleted, every replica of it lost.
This module finds out (`verify`: every event present once, in position order, with the body
and `Nats-Msg-Id` the relay gives it) and puts back what is missing (`republish`).

Two things make a repair visible rather than silent:

- A message published again is appended after the newer ones, so it carries the header
  `tf-republished: 1`; `verify` counts such late arrivals apart from out-of-order messages.
- JetStream's duplicate window remembers a `Nats-Msg-Id` even after its message was deleted or
  purged, and answers "duplicate" without storing it again. A republish that gets that answer
  for a message the stream does not hold is published once more without `Nats-Msg-Id` (the
  `ce-id`, the key consumers deduplicate on, stays the same); only the relay's leader or an
  operator's `streams verify --repair` republishes, so nothing else races with it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from streams.contract.eventlog import RecordedEvent
from streams.contract.subjects import STREAM_SUBJECTS

logger = logging.getLogger(__name__)

REPUBLISHED_HEADER = "tf-republished"

_EVENT_COLUMNS = "notification_id, originator_id, originator_version, topic, state, prev_hash, hash"


@dataclass(frozen=True)
class StreamMessage:
    seq: int
    position: int | None
    msg_id: str | None
    body: bytes
    republished: bool


@dataclass
class Report:
    """What `verify` found, by position (stream sequences for messages with no position)."""

    checked: int = 0
    """Events of the store that the stream should hold."""
    in_stream: int = 0
    expired: int = 0
    """Events older than the stream's max age (the stream dropped them, as configured)."""
    missing: list[int] = field(default_factory=list)
    duplicates: dict[int, list[int]] = field(default_factory=dict)
    """Position → the stream sequences holding it, for positions held more than once."""
    out_of_order: list[int] = field(default_factory=list)
    republished: list[int] = field(default_factory=list)
    """Positions published again by a repair, after newer ones (expected, not an error)."""
    different: list[int] = field(default_factory=list)
    """Positions whose message's body or `Nats-Msg-Id` differs from the event."""
    unknown: list[int] = field(default_factory=list)
    """Stream sequences whose `tf-position` names no event of the store."""
    first_live: int | None = None
    """The oldest position checked that the stream should still hold (not expired)."""

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.duplicates or self.out_of_order or self.different or self.unknown
        )

    def summary(self) -> str:
        def few(values: Sequence[int]) -> str:
            shown = ", ".join(str(v) for v in list(values)[:10])
            return shown + (f" … ({len(values)} in all)" if len(values) > 10 else "")

        lines = [
            f"{self.checked} events checked against {self.in_stream} stream messages"
            + (f" ({self.expired} older than the stream's max age)" if self.expired else "")
        ]
        for label, values in (
            ("missing", self.missing),
            ("duplicated", list(self.duplicates)),
            ("out of order", self.out_of_order),
            ("different body or Nats-Msg-Id", self.different),
            ("stream messages naming no event (sequences)", self.unknown),
            ("republished after newer events (not an error)", self.republished),
        ):
            if values:
                lines.append(f"{label}: {few(values)}")
        lines.append("stream verified: every event once, in order" if self.ok else "NOT OK")
        return "\n".join(lines)


def expected_message(event: RecordedEvent) -> tuple[str, bytes, dict[str, str]]:
    from streams.relay import message_for

    return message_for(event)


async def read_stream(
    js: JetStreamContext, stream: str, *, timeout_s: float = 60.0
) -> list[StreamMessage]:
    """Every message of `stream` up to its last sequence now, in sequence order."""
    info = await js.stream_info(stream)
    last_seq = info.state.last_seq
    if not info.state.messages:
        return []
    subscription = await js.pull_subscribe(
        STREAM_SUBJECTS[0],
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    found: list[StreamMessage] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not found or found[-1].seq < last_seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading stream {stream} took longer than {timeout_s}s")
            try:
                batch = await subscription.fetch(512, timeout=2.0)
            except TimeoutError:
                break  # nothing more (the last messages were deleted)
            for message in batch:
                headers = message.headers or {}
                position = headers.get("tf-position")
                found.append(
                    StreamMessage(
                        seq=message.metadata.sequence.stream,
                        position=int(position) if position and position.isdigit() else None,
                        msg_id=headers.get("Nats-Msg-Id"),
                        body=message.data,
                        republished=headers.get(REPUBLISHED_HEADER) == "1",
                    )
                )
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return [m for m in found if m.seq <= last_seq]


async def relayed_position(pool: asyncpg.Pool) -> int:
    """The position up to which the relay's publishes were acknowledged."""
    from streams.relay import RELAY_NAME

    value = await pool.fetchval(
        "SELECT position FROM relay_checkpoints WHERE name = $1", RELAY_NAME
    )
    return int(value or 0)


async def events_between(pool: asyncpg.Pool, first: int, last: int) -> list[RecordedEvent]:
    rows = await pool.fetch(
        f"SELECT {_EVENT_COLUMNS} FROM ticketflow_events "
        "WHERE notification_id BETWEEN $1 AND $2 ORDER BY notification_id",
        first,
        last,
    )
    return [RecordedEvent.from_row(row) for row in rows]


def _expired(event: RecordedEvent, max_age_s: float, now: float) -> bool:
    if max_age_s <= 0:
        return False
    try:
        stamp = datetime.fromisoformat(event.timestamp.replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return False
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp() < now - max_age_s


def compare(
    events: Sequence[RecordedEvent],
    messages: Sequence[StreamMessage],
    *,
    max_age_s: float = 0.0,
    until: int | None = None,
    now: float | None = None,
) -> Report:
    """Checks `messages` (in stream order) against `events` (in position order).

    Stream messages past `until` (published after the relay's checkpoint was read) are left
    out; events older than `max_age_s` may be missing (the stream expired them)."""
    now = time.time() if now is None else now
    report = Report()
    by_position: dict[int, list[StreamMessage]] = defaultdict(list)
    known = {event.position for event in events}
    newest = 0
    for message in messages:
        if message.position is None or message.position not in known:
            if message.position is None or until is None or message.position <= until:
                report.unknown.append(message.seq)
            continue
        report.in_stream += 1
        by_position[message.position].append(message)
        if message.position < newest and len(by_position[message.position]) == 1:
            (report.republished if message.republished else report.out_of_order).append(
                message.position
            )
        newest = max(newest, message.position)
    for event in events:
        held = by_position.get(event.position, [])
        if not held:
            if _expired(event, max_age_s, now):
                report.expired += 1
            else:
                report.checked += 1
                report.missing.append(event.position)
                report.first_live = report.first_live or event.position
            continue
        report.checked += 1
        report.first_live = report.first_live or event.position
        if len(held) > 1:
            report.duplicates[event.position] = [m.seq for m in held]
        _, body, headers = expected_message(event)
        first = held[0]
        msg_id_ok = first.msg_id in (headers["Nats-Msg-Id"], None) and (
            first.msg_id is not None or first.republished
        )
        if first.body != body or not msg_id_ok:
            report.different.append(event.position)
    return report


async def verify(
    pool: asyncpg.Pool,
    js: JetStreamContext,
    stream: str,
    *,
    since: int = 1,
) -> tuple[Report, list[RecordedEvent]]:
    """Compares the store's events from `since` up to the relay's checkpoint with the stream.
    Returns the report and the events it checked (for `republish`)."""
    until = await relayed_position(pool)
    try:
        info = await js.stream_info(stream)
        max_age_s = float(info.config.max_age or 0)
        messages = await read_stream(js, stream)
    except NotFoundError:
        max_age_s, messages = 0.0, []
    events = await events_between(pool, since, until) if until >= since else []
    return compare(events, messages, max_age_s=max_age_s, until=until), events


async def republish(
    js: JetStreamContext, events: Sequence[RecordedEvent], *, timeout_s: float = 10.0
) -> int:
    """Publishes `events` again, in order, marked `tf-republished`; returns how many landed."""
    landed = 0
    for event in events:
        subject, body, headers = expected_message(event)
        headers = {**headers, REPUBLISHED_HEADER: "1"}
        ack = await js.publish(subject, body, headers=headers, timeout=timeout_s)
        if ack.duplicate and not await _holds(js, ack.stream, ack.seq, headers["Nats-Msg-Id"]):
            # The duplicate window remembers an id whose message is gone.
            del headers["Nats-Msg-Id"]
            ack = await js.publish(subject, body, headers=headers, timeout=timeout_s)
        if not ack.duplicate:
            landed += 1
    return landed


async def _holds(js: JetStreamContext, stream: str, seq: int, msg_id: str) -> bool:
    try:
        message = await js.get_msg(stream, seq)
    except NotFoundError:
        return False
    return (message.headers or {}).get("Nats-Msg-Id") == msg_id


async def repair(js: JetStreamContext, report: Report, events: Sequence[RecordedEvent]) -> int:
    """Republishes the events `report` found missing; returns how many landed."""
    missing = set(report.missing)
    return await republish(js, [event for event in events if event.position in missing])


async def count_events(pool: asyncpg.Pool, first: int, last: int) -> int:
    value = await pool.fetchval(
        "SELECT count(*) FROM ticketflow_events WHERE notification_id BETWEEN $1 AND $2",
        first,
        last,
    )
    return int(value or 0)


__all__ = [
    "REPUBLISHED_HEADER",
    "Report",
    "StreamMessage",
    "compare",
    "count_events",
    "events_between",
    "read_stream",
    "relayed_position",
    "repair",
    "republish",
    "verify",
]
