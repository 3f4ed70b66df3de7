"""Signs the head of every tenant's hash chain at intervals (docs/adr/0020-audit-chain.md).

The relay process runs one `Checkpointer` beside the relay. A PostgreSQL advisory lock keeps one
active across relay replicas, so one process holds the signing key's work at a time. It polls
`ticketflow_chain_heads` (one row per tenant, moved by every append in the append's own
transaction, so what it reads is committed) and signs a tenant's head once `every_events` events
were appended since the tenant's last checkpoint, or `every_s` seconds passed since it and the
chain moved. On a clean stop it signs every head that moved, so a quiet shutdown leaves no
unsigned tail. While PostgreSQL is away it waits and starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from streams.contract.audit import ALGORITHM, Checkpoint, SigningKey, from_microseconds
from streams.contract.audit import to_microseconds as microseconds
from streams.contract.availability import Backoff, database_unavailable
from streams.contract.eventlog import wait_for_leadership

logger = logging.getLogger(__name__)

LEADER_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"ticketflow.audit-checkpoints").digest()[:8], "big", signed=True
)

_DUE = """
SELECT h.tenant, h.position, h.events, h.hash, c.events AS signed_events, c.signed_at
FROM ticketflow_chain_heads AS h
LEFT JOIN LATERAL (
    SELECT k.position, k.events, k.signed_at FROM ticketflow_audit_checkpoints AS k
    WHERE k.tenant = h.tenant ORDER BY k.position DESC LIMIT 1
) AS c ON true
WHERE h.events > 0 AND h.position > coalesce(c.position, 0)
"""

_INSERT = (
    "INSERT INTO ticketflow_audit_checkpoints"
    " (tenant, position, events, hash, key_id, signature, signed_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant, position) DO NOTHING"
)


@dataclass(frozen=True)
class CheckpointSettings:
    every_events: int = 1000
    every_s: float = 60.0
    poll_interval_s: float = 1.0


class Checkpointer:
    def __init__(
        self, pool: asyncpg.Pool, key: SigningKey, settings: CheckpointSettings | None = None
    ) -> None:
        self._pool = pool
        self._key = key
        self._settings = settings or CheckpointSettings()
        self.signed = 0

    async def register_key(self) -> None:
        """Records the public key, so `GET /audit/keys` and exports can hand it out."""
        public = self._key.public
        await self._pool.execute(
            "INSERT INTO ticketflow_audit_keys (key_id, algorithm, public_key)"
            " VALUES ($1, $2, $3) ON CONFLICT (key_id) DO NOTHING",
            public.key_id,
            ALGORITHM,
            public.pem,
        )

    async def sign_due(self, *, every_head: bool = False) -> list[Checkpoint]:
        """Signs the heads that are due (with `every_head`, every head that moved)."""
        now = datetime.now(UTC)
        signed: list[Checkpoint] = []
        for row in await self._pool.fetch(_DUE):
            since_events = row["events"] - (row["signed_events"] or 0)
            last = row["signed_at"]
            due = (
                every_head
                or last is None
                or since_events >= self._settings.every_events
                or (now - last).total_seconds() >= self._settings.every_s
            )
            if due:
                signed.append(
                    self._key.sign(
                        row["tenant"],
                        row["position"],
                        row["events"],
                        bytes(row["hash"]),
                        microseconds(now),
                    )
                )
        if signed:
            await self._pool.executemany(
                _INSERT,
                [
                    (
                        c.tenant,
                        c.position,
                        c.events,
                        c.hash,
                        c.key_id,
                        c.signature,
                        from_microseconds(c.signed_at_us),
                    )
                    for c in signed
                ],
            )
            self.signed += len(signed)
            logger.debug("signed %d chain heads", len(signed))
        return signed

    async def run(self, stop: asyncio.Event, backoff: Backoff | None = None) -> None:
        """Signs due heads until `stop` is set, then every head that moved."""
        backoff = backoff or Backoff()
        while not stop.is_set():
            try:
                await self._run(stop, backoff)
                return
            except Exception as error:
                if not database_unavailable(error):
                    raise
                logger.warning("audit checkpoints paused, the database is unavailable: %s", error)
            await backoff.wait(stop)

    async def _run(self, stop: asyncio.Event, backoff: Backoff) -> None:
        async with self._pool.acquire() as leader:
            await wait_for_leadership(leader, LEADER_LOCK_KEY, "audit checkpointer", stop)
            if stop.is_set():
                return
            await self.register_key()
            backoff.reset()
            interval = min(self._settings.poll_interval_s, self._settings.every_s)
            while not stop.is_set():
                await self.sign_due()
                # Proves the leader connection (and with it the advisory lock) is still alive.
                await leader.fetchval("SELECT 1")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
            await self.sign_due(every_head=True)
