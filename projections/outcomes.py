"""Waiting, boundedly, for a ticket to finish, as the read models tell it: what lets the command
API answer `POST /tickets` with `Prefer: wait=N` by the finished report.

A ticket is finished here once its read-model row says so and, for a completed ticket, once its
report row is written: the very report `GET /tickets/{id}/report` answers. Waiters wake on the
projector's notifications (one LISTEN connection per process) and re-read at an interval as
well, so a missed notification only costs that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from projections.projector import PROJECTION_NOTIFY_CHANNEL

logger = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[asyncpg.Connection]]

_OUTCOME = """
SELECT t.status, r.final_subtask_id, r.verdict, r.outputs, r.markdown, r.completed_at,
       r.position
FROM rm_tickets t
LEFT JOIN rm_reports r ON r.tenant = t.tenant AND r.ticket_id = t.ticket_id
WHERE t.tenant = $1 AND t.ticket_id = $2
"""

_FINISHED_WITHOUT_REPORT = frozenset({"failed", "cancelled"})


@dataclass(frozen=True)
class TicketOutcome:
    """How a ticket finished: `status` (completed, failed or cancelled) and, when completed, its
    report (`final_subtask_id`, `verdict`, `outputs`, `markdown`, `completed_at`, `position`)."""

    status: str
    report: dict[str, Any] | None


class ReadModelOutcomes:
    """Waits for tickets to finish in the read models of the database `connect` opens."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        connect: Connect,
        *,
        poll_interval_s: float = 1.0,
        relisten_interval_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._connect = connect
        self._poll_interval_s = poll_interval_s
        self._relisten_interval_s = relisten_interval_s
        self._latch = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._listening_since = -float("inf")
        self._lock = asyncio.Lock()
        self.waiting = 0
        """Requests waiting now."""

    async def wait(
        self,
        tenant: str,
        ticket_id: UUID,
        timeout_s: float,
        *,
        abandoned: Callable[[], Awaitable[bool]] | None = None,
    ) -> TicketOutcome | None:
        """The ticket's outcome once finished, or None if it is not within `timeout_s` (or the
        tenant has no such ticket, or the read models cannot be read meanwhile), or once
        `abandoned` says nobody waits any longer (asked before each pause)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self._ensure_listening()
        self.waiting += 1
        try:
            return await self._wait(tenant, ticket_id, deadline, abandoned)
        finally:
            self.waiting -= 1

    async def _wait(
        self,
        tenant: str,
        ticket_id: UUID,
        deadline: float,
        abandoned: Callable[[], Awaitable[bool]] | None,
    ) -> TicketOutcome | None:
        loop = asyncio.get_running_loop()
        while True:
            # Taken before the read: a notification arriving in between sets this very latch.
            latch = self._latch
            try:
                outcome = await self.outcome(tenant, ticket_id)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                # The ticket exists whatever happens here: the caller answers 202 at the end.
                logger.warning("cannot read the outcome of ticket %s: %s", ticket_id, error)
                outcome = None
            remaining = deadline - loop.time()
            if outcome is not None or remaining <= 0:
                return outcome
            if abandoned is not None and await abandoned():
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(latch.wait(), min(remaining, self._poll_interval_s))

    async def outcome(self, tenant: str, ticket_id: UUID) -> TicketOutcome | None:
        """The ticket's outcome if the read models show it finished, else None."""
        row = await self._pool.fetchrow(_OUTCOME, tenant, ticket_id)
        if row is None:
            return None
        status = str(row["status"])
        if status in _FINISHED_WITHOUT_REPORT:
            return TicketOutcome(status, None)
        if row["final_subtask_id"] is None:
            # Running, or completed with its report not yet written (the same transaction
            # writes both, but a rebuild swaps tables in between): not finished yet.
            return None
        report = {
            "final_subtask_id": row["final_subtask_id"],
            "verdict": _json(row["verdict"]),
            "outputs": _json(row["outputs"]),
            "markdown": row["markdown"],
            "completed_at": row["completed_at"],
            "position": row["position"],
        }
        return TicketOutcome("completed", report)

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=5)
            self._listener = None

    async def _ensure_listening(self) -> None:
        """(Re)opens the LISTEN connection, at most once per `relisten_interval_s`; waiters
        poll meanwhile, so a database that is away only slows them down."""
        if self._listener is not None and not self._listener.is_closed():
            return
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            if loop.time() - self._listening_since < self._relisten_interval_s:
                return
            self._listening_since = loop.time()
            try:
                conn = await self._connect()
            except (OSError, asyncpg.PostgresError) as error:
                logger.warning("cannot listen for the projector's notifications: %s", error)
                return
            try:
                await conn.add_listener(PROJECTION_NOTIFY_CHANNEL, self._on_notify)
            except (OSError, asyncpg.PostgresError) as error:
                logger.warning("cannot listen for the projector's notifications: %s", error)
                await conn.close()
                return
            self._listener = conn

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, _payload: object) -> None:
        latch, self._latch = self._latch, asyncio.Event()
        latch.set()


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
