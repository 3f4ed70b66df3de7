"""Documents and large outputs as blobs in PostgreSQL, keyed per tenant by their sha256."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from psycopg_pool import ConnectionPool


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class Blob:
    """Bytes an event will name by their sha256, to store in the same transaction as that event
    (`Application.save(..., blobs=...)`; `commands.recorder.GapSafeRecorder` stores them in
    the append's own statement)."""

    tenant: str
    content: bytes
    media_type: str
    sha256: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", sha256_hex(self.content))


class BlobStore(Protocol):
    """Where the blobs events name are read from. They are written with those events, in the
    same transaction (`Blob`)."""

    def get(self, tenant: str, sha256: str) -> bytes | None: ...


class PostgresBlobStore:
    """Content-addressed, per tenant: the same bytes stored twice are stored once."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def get(self, tenant: str, sha256: str) -> bytes | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT content FROM blobs WHERE tenant = %s AND sha256 = %s", (tenant, sha256)
            ).fetchone()
        return bytes(row[0]) if row else None
