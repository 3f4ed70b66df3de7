"""The `Document` aggregate: one stored copy of a document (or of a prompt holding its text)
whose content was purged. Its only event is the purge (`ticketflow.document.purged.v1`), which
keeps the blob's sha256 so that the events naming it still explain what they referenced."""

from __future__ import annotations

import uuid
from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate

from commands.events import event_class
from streams import contract

DOCUMENT_NAMESPACE = uuid.UUID("3c9a0f52-7e1d-4b8e-a6f4-2d5c8b9e0a17")


def document_id_for(tenant: str, sha256: str, stored_at: datetime) -> UUID:
    """One stored copy of a blob: the same bytes uploaded again after a purge are a new one."""
    micros = int(stored_at.timestamp() * 1_000_000)
    return uuid.uuid5(DOCUMENT_NAMESPACE, f"{tenant}\n{sha256}\n{micros}")


class Document(Aggregate):
    """A stored copy of a document whose content was purged; its only event is the purge."""

    TOPIC = "ticketflow.document.v1"

    class Event(Aggregate.Event):
        tenant: str
        traceparent: str | None

    Created = event_class(Event, contract.DocumentPurged, created=True)

    def __init__(
        self,
        tenant: str,
        sha256: str,
        media_type: str,
        size: int,
        stored_at: str,
        reason: str,
        retention_days: int,
    ) -> None:
        self.tenant = tenant
        self.sha256 = sha256
        self.media_type = media_type
        self.size = size
        self.stored_at = stored_at
        self.reason = reason
        self.retention_days = retention_days
