"""The write side's access to data subjects' keys (`ticketflow_subject_keys`, outside the log):
create a subject's key when its first personal value is encrypted, read it to decrypt, destroy it
to erase the subject (docs/adr/0021-crypto-shredding.md)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from uuid import UUID

import psycopg
from eventsourcing.application import Application
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool

from streams.contract.personal import KEYS_TABLE, SubjectErased, new_key

logger = logging.getLogger(__name__)

__all__ = ["SubjectErased", "SubjectKeyStore", "pool_of"]


def pool_of(app: Application[UUID]) -> ConnectionPool:
    """The connection pool of an application stored in PostgreSQL."""
    pool = getattr(getattr(app.recorder, "datastore", None), "pool", None)
    if not isinstance(pool, ConnectionPool):
        raise TypeError("the application does not store its events in PostgreSQL")
    return pool


class SubjectKeyStore:
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    @classmethod
    def of(cls, app: Application[UUID]) -> SubjectKeyStore:
        return cls(pool_of(app))

    def key_for(self, tenant: str, subject: UUID) -> bytes:
        """The subject's key, created on first use; raises `SubjectErased` once erased."""
        with self._pool.connection() as conn:
            cursor = conn.cursor(row_factory=tuple_row)
            row = cursor.execute(
                f"INSERT INTO {KEYS_TABLE} (tenant, subject, key) VALUES (%s, %s, %s)"
                " ON CONFLICT (tenant, subject) DO NOTHING RETURNING key",
                (tenant, subject, new_key()),
            ).fetchone()
            if row is None:
                row = cursor.execute(
                    f"SELECT key FROM {KEYS_TABLE} WHERE tenant = %s AND subject = %s",
                    (tenant, subject),
                ).fetchone()
        if row is None or row[0] is None:
            raise SubjectErased(f"subject {subject} of {tenant} is erased")
        return bytes(row[0])

    def keys(self, tenant: str, subjects: Iterable[UUID]) -> dict[UUID, bytes | None]:
        """Existing keys: bytes, or None for an erased subject; unknown subjects left out."""
        wanted = sorted(set(subjects))
        if not wanted:
            return {}
        with self._pool.connection() as conn:
            rows = (
                conn.cursor(row_factory=tuple_row)
                .execute(
                    f"SELECT subject, key FROM {KEYS_TABLE}"
                    " WHERE tenant = %s AND subject = ANY(%s)",
                    (tenant, wanted),
                )
                .fetchall()
            )
        return {row[0]: (bytes(row[1]) if row[1] is not None else None) for row in rows}

    def destroy(self, tenant: str, subject: UUID) -> bool:
        """Erases the subject: its key is overwritten by NULL (a subject with no key yet gets
        an erased row, which hides its plain values in older events). Returns whether it was
        erased by this call. The table is then vacuumed, so the old key's bytes leave the
        table's pages too (backups and the write-ahead log keep them until they expire)."""
        with self._pool.connection() as conn:
            row = (
                conn.cursor(row_factory=tuple_row)
                .execute(
                    f"INSERT INTO {KEYS_TABLE} AS k (tenant, subject, key, erased_at)"
                    " VALUES (%s, %s, NULL, now())"
                    " ON CONFLICT (tenant, subject) DO UPDATE SET key = NULL, erased_at = now()"
                    " WHERE k.key IS NOT NULL RETURNING subject",
                    (tenant, subject),
                )
                .fetchone()
            )
        erased = row is not None
        if erased:
            self.vacuum()
        return erased

    def vacuum(self) -> None:
        with (
            contextlib.suppress(psycopg.Error),
            self._pool.connection() as conn,
        ):
            conn.commit()
            conn.autocommit = True
            try:
                conn.execute(f"VACUUM {KEYS_TABLE}")
            finally:
                conn.autocommit = False
