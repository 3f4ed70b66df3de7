"""Retention: how long a tenant keeps its documents, and the purge that enforces it.

A tenant admin sets the number of days (`ticketflow.tenant.retention_set.v1` on the tenant
aggregate). The retention job (`RetentionService.purge_expired`, run periodically by the relay
process behind its own leader lock) deletes what is older: the stored documents (PDF, DOCX), the
stored prompts (they hold the documents' text), the extracted texts, chunks and ingestion
markers. Each deleted blob is first recorded as `ticketflow.document.purged.v1` on a `Document`
aggregate whose id is derived from the tenant, the blob's sha256 and when that copy was stored,
so a purge that crashed half-way records nothing twice and finishes on the next run. Events only
reference blobs by hash: the hash chain does not change, and audit bundles mark the blob
`purged` (docs/adr/0021-crypto-shredding.md). Large subtask outputs are reports, not documents:
they are kept.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool

from commands.documents import Document, document_id_for
from commands.errors import ConcurrencyConflict, DomainError
from commands.events import create
from commands.service import PROMPT_MEDIA_TYPE
from commands.tracing import child_traceparent
from identity.subject_keys import pool_of
from identity.users import Tenant, tenant_id_for
from streams import contract
from streams.contract.eventlog import EVENTS_TABLE

logger = logging.getLogger(__name__)

PURGED_MEDIA_TYPES = (
    "application/pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    PROMPT_MEDIA_TYPE,
)
RETENTION_TOPIC = "ticketflow.tenant.retention_set.v1"
MAX_RETENTION_DAYS = 36_500


class TenantNotFound(DomainError):
    code = "tenant_not_found"


class InvalidRetention(DomainError):
    code = "invalid_retention"


@dataclass(frozen=True)
class Purge:
    tenant: str
    sha256: str
    media_type: str
    size: int
    document_id: UUID
    position: int | None
    """Global position of the purge event; None when an earlier run recorded it."""


@dataclass(frozen=True)
class RetentionResult:
    tenant: str
    days: int | None
    position: int | None
    """Global position of the event; None when the setting did not change."""


class RetentionService:
    """Sets tenants' retention and purges what they no longer keep. Like the command service,
    the only writer of its events."""

    def __init__(
        self,
        app: Application[UUID],
        pool: ConnectionPool | None = None,
        *,
        max_conflict_retries: int = 20,
    ) -> None:
        self._app = app
        self._pool = pool or pool_of(app)
        self._max_conflict_retries = max_conflict_retries

    def set_retention(
        self, tenant: str, days: int | None, set_by: str, traceparent: str | None = None
    ) -> RetentionResult:
        if days is not None and not 0 <= days <= MAX_RETENTION_DAYS:
            raise InvalidRetention(f"Retention is 0 to {MAX_RETENTION_DAYS} days, or none.")
        traceparent = child_traceparent(traceparent)
        for attempt in range(1, self._max_conflict_retries + 1):
            found = self._tenant(tenant)
            if found.retention_days == days:
                return RetentionResult(tenant, days, None)
            found.set_retention(days, set_by, traceparent)
            try:
                recordings = self._app.save(found)
            except IntegrityError:
                logger.debug("tenant %s changed meanwhile (attempt %d)", tenant, attempt)
                time.sleep(random.uniform(0, 0.005 * attempt))  # noqa: S311
                continue
            logger.info("retention set", extra={"tenant": tenant, "days": days})
            return RetentionResult(tenant, days, recordings[-1].notification.id)
        raise ConcurrencyConflict(f"tenant {tenant}: gave up after conflicting writes")

    def close(self) -> None:
        self._app.close()

    def retention_of(self, tenant: str) -> int | None:
        return self._tenant(tenant).retention_days

    def purge_expired(
        self, now: datetime | None = None, *, limit: int = 200, stop: Callable[[], bool] = bool
    ) -> list[Purge]:
        """Purges up to `limit` blobs (and their texts and chunks) that tenants no longer keep,
        oldest first; call again while it returns `limit` purges."""
        now = now or datetime.now(UTC)
        purged: list[Purge] = []
        for tenant in self._tenants_with_retention():
            days = self._tenant(tenant).retention_days
            if days is None:
                continue
            cutoff = now - timedelta(days=days)
            with self._pool.connection() as conn:
                rows = (
                    conn.cursor(row_factory=tuple_row)
                    .execute(
                        "SELECT sha256, media_type, size, created_at FROM blobs"
                        " WHERE tenant = %s AND created_at <= %s AND media_type = ANY(%s)"
                        " ORDER BY created_at LIMIT %s",
                        (tenant, cutoff, list(PURGED_MEDIA_TYPES), limit - len(purged)),
                    )
                    .fetchall()
                )
            for sha256, media_type, size, stored_at in rows:
                if stop():
                    return purged
                purged.append(self._purge(tenant, sha256, media_type, size, stored_at, days))
            if len(purged) >= limit:
                break
        return purged

    def _purge(
        self, tenant: str, sha256: str, media_type: str, size: int, stored_at: datetime, days: int
    ) -> Purge:
        document_id = document_id_for(tenant, sha256, stored_at)
        payload = contract.DocumentPurged(
            document_id=document_id,
            tenant=tenant,
            sha256=sha256,
            media_type=media_type,
            size=size,
            stored_at=stored_at.astimezone(UTC).isoformat(),
            reason="retention",
            retention_days=days,
        )
        position: int | None
        try:
            recordings = self._app.save(create(Document, payload, child_traceparent(None)))
            position = recordings[-1].notification.id
        except IntegrityError:
            position = None  # recorded by an earlier run that stopped before deleting
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                "DELETE FROM blobs WHERE tenant = %s AND sha256 = %s AND created_at = %s",
                (tenant, sha256, stored_at),
            )
            for table in ("document_chunks", "document_texts", "ingested_documents"):
                conn.execute(
                    f"DELETE FROM {table} WHERE tenant = %s AND document_sha256 = %s",
                    (tenant, sha256),
                )
        logger.info(
            "document purged",
            extra={"tenant": tenant, "sha256": sha256, "reason": "retention", "days": days},
        )
        return Purge(tenant, sha256, media_type, size, document_id, position)

    def _tenants_with_retention(self) -> list[str]:
        with self._pool.connection() as conn:
            rows = (
                conn.cursor(row_factory=tuple_row)
                .execute(
                    f"SELECT DISTINCT tenant FROM {EVENTS_TABLE} WHERE topic = %s ORDER BY tenant",
                    (RETENTION_TOPIC,),
                )
                .fetchall()
            )
        return [str(row[0]) for row in rows]

    def _tenant(self, tenant: str) -> Tenant:
        try:
            found: object = self._app.repository.get(tenant_id_for(tenant))
        except AggregateNotFoundError:
            found = None
        if not isinstance(found, Tenant):
            raise TenantNotFound(f"No tenant {tenant!r}.")
        return found
