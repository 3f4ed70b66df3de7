"""Documents and large outputs as blobs in PostgreSQL, keyed per tenant by their sha256."""

from __future__ import annotations

import hashlib
from typing import Protocol

from psycopg_pool import ConnectionPool


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class BlobStore(Protocol):
    def put(self, tenant: str, content: bytes, media_type: str) -> str: ...

    def get(self, tenant: str, sha256: str) -> bytes | None: ...


class PostgresBlobStore:
    """Content-addressed: storing the same bytes twice stores them once."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def put(self, tenant: str, content: bytes, media_type: str) -> str:
        digest = sha256_hex(content)
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO blobs (tenant, sha256, media_type, size, content) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant, sha256) DO NOTHING",
                (tenant, digest, media_type, len(content), content),
            )
        return digest

    def get(self, tenant: str, sha256: str) -> bytes | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT content FROM blobs WHERE tenant = %s AND sha256 = %s", (tenant, sha256)
            ).fetchone()
        return bytes(row[0]) if row else None
