"""Audit bundles from the event store, and the stored chain verified in place
(docs/adr/0020-audit-chain.md). The bundle format and the verifier are
`streams.contract.audit_bundle`, which needs no database.

Both read in one REPEATABLE READ, read-only transaction, streaming the tenant's events through a
cursor in position order: a tenant's chain is only ever extended by a transaction that holds its
head row, so the snapshot holds a prefix of the chain, whatever commits meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from streams.contract.audit import (
    GENESIS,
    ChainWalk,
    Checkpoint,
    Problem,
    PublicKey,
    parse_time,
    to_microseconds,
)
from streams.contract.audit_bundle import (
    BlobEntry,
    BundleWriter,
    StoredChainEvent,
    VerifyReport,
)
from streams.contract.events import BY_TOPIC, EVENT_TYPES
from streams.contract.personal import erased_subjects, is_encrypted

PRIVATE_FIELDS: frozenset[str] = frozenset().union(*(t.private_fields for t in EVENT_TYPES))
"""State fields no bundle carries (their event's state sha256 still chains them)."""
PURGED_TOPIC = "ticketflow.document.purged.v1"
_BATCH = 1000
MAX_POSITION = 2**63 - 1
if TYPE_CHECKING:
    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
_EVENTS = """
SELECT tenant, notification_id, originator_id, originator_version, topic, recorded_at, state,
       prev_hash, hash
FROM ticketflow_events
WHERE tenant = $1 AND hash IS NOT NULL
  AND ($2::bigint IS NULL OR notification_id >= $2)
  AND ($3::timestamptz IS NULL OR recorded_at >= $3)
  AND ($4::bigint IS NULL OR notification_id <= $4)
  AND ($5::timestamptz IS NULL OR recorded_at <= $5)
ORDER BY notification_id
"""


@dataclass(frozen=True)
class Bound:
    """One end of a range: a global position, or a time (the events' `recorded_at`)."""

    position: int | None = None
    time: datetime | None = None

    @classmethod
    def parse(cls, text: str) -> Bound:
        """`1234` (a position) or an RFC 3339 time such as `2026-12-01T00:00:00Z`."""
        value = text.strip()
        if value.isascii() and value.isdigit():
            position = int(value)
            if position > MAX_POSITION:
                raise ValueError(f"{text!r} is past the largest position ({MAX_POSITION})")
            return cls(position=position)
        try:
            return cls(time=parse_time(value))
        except ValueError:
            raise ValueError(
                f"{text!r} is neither a position nor an RFC 3339 time with a time zone"
            ) from None

    def __str__(self) -> str:
        return str(self.position) if self.position is not None else str(self.time)


def check_range(since: Bound | None, until: Bound | None) -> None:
    """Refuses a range whose start lies after its end (both positions, or both times): it could
    only select nothing, which is more likely a mistake than a question."""
    if since is None or until is None:
        return
    if since.position is not None and until.position is not None:
        after = since.position > until.position
    elif since.time is not None and until.time is not None:
        after = since.time > until.time
    else:
        return
    if after:
        raise ValueError(f"since ({since}) is after until ({until})")


def _stored(row: asyncpg.Record) -> StoredChainEvent:
    return StoredChainEvent(
        tenant=row["tenant"],
        position=row["notification_id"],
        aggregate_id=row["originator_id"],
        version=row["originator_version"],
        topic=row["topic"] or "",
        recorded_at_us=to_microseconds(row["recorded_at"]),
        state=bytes(row["state"] or b""),
        prev_hash=bytes(row["prev_hash"]),
        hash=bytes(row["hash"]),
    )


async def stored_keys(conn: Conn | asyncpg.Pool) -> list[dict[str, Any]]:
    """Every checkpoint key ever registered (old ones still verify old checkpoints)."""
    rows = await conn.fetch(
        "SELECT key_id, algorithm, public_key, created_at FROM ticketflow_audit_keys"
        " ORDER BY created_at, key_id"
    )
    keys = []
    for row in rows:
        public = PublicKey.from_pem(row["public_key"])
        keys.append({**public.to_json(), "created_at": row["created_at"].isoformat()})
    return keys


def _checkpoint(row: asyncpg.Record) -> Checkpoint:
    return Checkpoint(
        tenant=row["tenant"],
        position=row["position"],
        events=row["events"],
        hash=bytes(row["hash"]),
        key_id=row["key_id"],
        signed_at_us=to_microseconds(row["signed_at"]),
        signature=bytes(row["signature"]),
    )


async def _checkpoints(
    conn: Conn, tenant: str, first: int | None = None, last: int | None = None
) -> list[Checkpoint]:
    rows = await conn.fetch(
        "SELECT tenant, position, events, hash, key_id, signature, signed_at"
        " FROM ticketflow_audit_checkpoints WHERE tenant = $1"
        " AND ($2::bigint IS NULL OR position >= $2) AND ($3::bigint IS NULL OR position <= $3)"
        " ORDER BY position",
        tenant,
        first,
        last,
    )
    return [_checkpoint(row) for row in rows]


async def _events_before(conn: Conn, tenant: str, position: int) -> int:
    """How many events of the tenant precede `position`: the newest checkpoint before it says
    how many up to itself, the rest are counted."""
    row = await conn.fetchrow(
        "SELECT position, events FROM ticketflow_audit_checkpoints"
        " WHERE tenant = $1 AND position < $2 ORDER BY position DESC LIMIT 1",
        tenant,
        position,
    )
    start, counted = (row["position"], row["events"]) if row else (0, 0)
    more = await conn.fetchval(
        "SELECT count(*) FROM ticketflow_events"
        " WHERE tenant = $1 AND notification_id > $2 AND notification_id < $3",
        tenant,
        start,
        position,
    )
    return int(counted) + int(more)


def _range_args(since: Bound | None, until: Bound | None) -> tuple[Any, ...]:
    since = since or Bound()
    until = until or Bound()
    return (since.position, since.time, until.position, until.time)


async def export_bundle(
    pool: asyncpg.Pool,
    tenant: str,
    out: Path,
    *,
    since: Bound | None = None,
    until: Bound | None = None,
    with_blobs: bool = False,
) -> dict[str, Any]:
    """Writes `tenant`'s events in the range, its checkpoints among them, the public keys and
    the blob manifest (with the blobs' contents when `with_blobs`) to `out`: a directory, or a
    `.tar.gz` when its name ends so. Returns the manifest."""
    writer = BundleWriter(out, tenant)
    try:
        async with (
            pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            batch: list[StoredChainEvent] = []
            erased = await erased_subjects(conn, tenant)

            def write(events: Sequence[StoredChainEvent]) -> None:
                for event in events:
                    writer.add_event(event, hidden_fields(event, erased))

            cursor = conn.cursor(_EVENTS, tenant, *_range_args(since, until), prefetch=_BATCH)
            async for row in cursor:
                batch.append(_stored(row))
                if len(batch) >= _BATCH:
                    await asyncio.to_thread(write, batch)
                    batch = []
            await asyncio.to_thread(write, batch)
            first, last = writer.first, writer.last
            checkpoints = (
                await _checkpoints(conn, tenant, first.position, last.position)
                if first and last
                else []
            )
            events_before = (
                await _events_before(conn, tenant, first.position)
                if first is not None and first.prev_hash != GENESIS
                else 0
            )
            keys = [PublicKey.from_json(key) for key in await stored_keys(conn)]
            blobs = await _blobs(conn, writer, tenant, with_blobs)
        return await asyncio.to_thread(
            writer.finish,
            checkpoints,
            keys,
            blobs,
            since=None if since is None else str(since),
            until=None if until is None else str(until),
            events_before=events_before,
        )
    except BaseException:
        writer.abort()
        raise


def hidden_fields(event: StoredChainEvent, erased: set[UUID]) -> frozenset[str]:
    """The state fields a bundle leaves out of `event`: private fields always, and the plain
    personal fields of an erased subject in an event recorded before encryption (their stored
    bytes cannot change; the state's sha256 still chains them). Encrypted fields stay: without
    the destroyed key they are unreadable."""
    event_type = BY_TOPIC.get(event.topic)
    if event_type is None or not event_type.personal_fields or event.aggregate_id not in erased:
        return PRIVATE_FIELDS
    try:
        state = json.loads(event.state)
    except ValueError:
        return PRIVATE_FIELDS
    plain = {
        name
        for name in event_type.personal_fields
        if isinstance(state, dict) and name in state and not is_encrypted(state[name])
    }
    return PRIVATE_FIELDS | plain


async def _purges(conn: Conn, tenant: str, wanted: Sequence[str]) -> dict[str, int]:
    """The newest purge event of each blob in `wanted`: sha256 → its position."""
    rows = await conn.fetch(
        "SELECT notification_id, state FROM ticketflow_events"
        " WHERE tenant = $1 AND topic = $2 ORDER BY notification_id",
        tenant,
        PURGED_TOPIC,
    )
    wanted_set = set(wanted)
    purges: dict[str, int] = {}
    for row in rows:
        sha = json.loads(bytes(row["state"])).get("sha256")
        if sha in wanted_set:
            purges[sha] = row["notification_id"]
    return purges


async def _blobs(
    conn: Conn, writer: BundleWriter, tenant: str, with_contents: bool
) -> list[BlobEntry]:
    wanted = sorted(writer.blobs)
    rows = await conn.fetch(
        "SELECT sha256, media_type, size FROM blobs WHERE tenant = $1 AND sha256 = ANY($2)",
        tenant,
        wanted,
    )
    found = {row["sha256"]: row for row in rows}
    purges = await _purges(conn, tenant, [sha for sha in wanted if sha not in found])
    entries = []
    for sha in wanted:
        row = found.get(sha)
        if row is None:
            entries.append(BlobEntry(sha, None, None, present=False, purged_at=purges.get(sha)))
            continue
        ok = None
        if with_contents:
            content = await conn.fetchval(
                "SELECT content FROM blobs WHERE tenant = $1 AND sha256 = $2", tenant, sha
            )
            await asyncio.to_thread(writer.add_blob_content, sha, bytes(content))
            ok = True
        entries.append(BlobEntry(sha, row["media_type"], row["size"], True, ok))
    return entries


async def verify_live(
    pool: asyncpg.Pool, tenant: str, trusted_keys: Sequence[PublicKey] | None = None
) -> VerifyReport:
    """Checks `tenant`'s stored chain in place, from its first event: every hash recomputed from
    the stored fields, every link, every checkpoint (against `trusted_keys`, else the stored
    keys), and that the chain's head row names its last event. Streams the events."""
    report = VerifyReport(tenant=tenant, chain_start="genesis")
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        stored = [PublicKey.from_json(key) for key in await stored_keys(conn)]
        keys = list(trusted_keys) if trusted_keys is not None else stored
        report.keys_pinned = trusted_keys is not None
        report.keys = [key.key_id for key in keys]
        checkpoints = await _checkpoints(conn, tenant)
        report.checkpoints = len(checkpoints)
        walk = ChainWalk(checkpoints, {key.key_id: key for key in keys})
        batch: list[StoredChainEvent] = []

        def check(events: Sequence[StoredChainEvent]) -> None:
            for event in events:
                walk.add(event.walked())

        async for row in conn.cursor(_EVENTS, tenant, None, None, None, None, prefetch=_BATCH):
            if report.first_position is None:
                report.first_position = row["notification_id"]
            batch.append(_stored(row))
            if len(batch) >= _BATCH:
                await asyncio.to_thread(check, batch)
                batch = []
        await asyncio.to_thread(check, batch)
        head = await conn.fetchrow(
            "SELECT position, events, hash FROM ticketflow_chain_heads WHERE tenant = $1", tenant
        )
    problems = walk.finish(expected_last=head["position"] if head else None)
    if head is not None and walk.last_position == head["position"]:
        if bytes(head["hash"]) != walk.last_hash:
            problems.append(
                Problem(
                    "altered",
                    head["position"],
                    "the chain's head row names another hash than its last event has",
                )
            )
        if head["events"] != walk.events:
            problems.append(
                Problem(
                    "missing" if head["events"] > walk.events else "inserted",
                    head["position"],
                    f"the chain's head row counts {head['events']} events, the store holds "
                    f"{walk.events}",
                )
            )
    report.events = walk.events
    report.signatures_verified = walk.checked_signatures
    report.last_position = walk.last_position
    report.problems = sorted(problems, key=Problem.sort_key)
    return report
