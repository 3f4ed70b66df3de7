"""The event store's append path: one statement per command, no table lock.

The `eventsourcing` library's PostgreSQL recorder serialises every append with
`LOCK TABLE … IN EXCLUSIVE MODE` so that positions commit in order. Readers here do not need
that: `streams.contract.eventlog.EventLogReader` never passes over a position an in-flight
transaction may still fill (docs/adr/0002-gap-safe-event-log.md). This recorder appends through
`ticketflow_append()` (migrations/0008_partitioned_events.sql): one autocommitted statement that
checks each aggregate's version and inserts the events with the ROW EXCLUSIVE lock any INSERT
takes. One round trip per command, and writers that do not wait for each other. The readers'
wake-up NOTIFY follows the commit, one for all the appends that committed meanwhile
(docs/adr/0014-lock-free-append.md).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg import Connection, pq
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier
from psycopg_pool import PoolTimeout

from commands.blobs import Blob

logger = logging.getLogger(__name__)

_SELECT_EVENTS: Callable[..., Sequence[StoredEvent]] = inspect.unwrap(
    PostgresApplicationRecorder.select_events
)

T = TypeVar("T")


class GapSafeRecorder(PostgresApplicationRecorder):
    """Appends a command's events in one statement; ordering is the readers' job."""

    # Every this many appends a process checks that partitions exist ahead of the positions
    # (a few catalogue reads; partitions hold ten million positions each).
    partition_check_interval = 5000

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(datastore.schema)
        self._append = SQL(
            "SELECT originator_id, originator_version, notification_id"
            " FROM {}.ticketflow_append(%s::uuid[], %s::bigint[], %s::text[], %s::bytea[])"
        ).format(schema)
        # The blobs the events name, in the same statement (so the same transaction): an event
        # never names a document or prompt that is not stored, at the cost of no extra commit.
        self._append_with_blobs = SQL(
            "WITH stored AS (INSERT INTO blobs (tenant, sha256, media_type, size, content)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::bytea[])"
            " ON CONFLICT (tenant, sha256) DO NOTHING)"
            " SELECT originator_id, originator_version, notification_id"
            " FROM {}.ticketflow_append(%s::uuid[], %s::bigint[], %s::text[], %s::bytea[])"
        ).format(schema)
        self._add_partitions = SQL("SELECT {}.ticketflow_events_add_partitions()").format(schema)
        self._appends = 0
        self._appends_lock = threading.Lock()
        self._wake_ups = WakeUps(datastore, self.channel_name)

    def insert_events(
        self, stored_events: Sequence[StoredEvent], *, blobs: Sequence[Blob] = (), **kwargs: Any
    ) -> Sequence[int] | None:
        """Appends the events, and stores `blobs` (those not stored yet) in the same statement."""
        if not stored_events:
            return []
        params: tuple[list[Any], ...] = (
            [event.originator_id for event in stored_events],
            [event.originator_version for event in stored_events],
            [event.topic for event in stored_events],
            [event.state for event in stored_events],
        )
        statement = self._append
        if blobs:
            unique = list({(blob.tenant, blob.sha256): blob for blob in blobs}.values())
            statement = self._append_with_blobs
            params = (
                [blob.tenant for blob in unique],
                [blob.sha256 for blob in unique],
                [blob.media_type for blob in unique],
                [len(blob.content) for blob in unique],
                [blob.content for blob in unique],
                *params,
            )

        def append() -> list[tuple[Any, ...]]:
            with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
                cur.execute(statement, params, prepare=True)
                return cur.fetchall()

        rows = self._reconnecting(append)
        self._wake_ups.appended()
        self._count_append()
        positions = {(UUID(str(row[0])), int(row[1])): int(row[2]) for row in rows}
        try:
            return [
                positions[(UUID(str(event.originator_id)), event.originator_version)]
                for event in stored_events
            ]
        except KeyError as missing:  # pragma: no cover - the statement returns every row
            raise IntegrityError(f"no position returned for {missing}") from None

    def close(self) -> None:
        """Stops the wake-up sender (after a last NOTIFY if one is due)."""
        self._wake_ups.close()

    def _count_append(self) -> None:
        with self._appends_lock:
            self._appends += 1
            due = self._appends % self.partition_check_interval == 1
        if due:
            self.add_partitions()

    def add_partitions(self) -> int:
        """Creates the partitions the next positions need; returns how many it created."""
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            cur.execute(self._add_partitions)
            row = cur.fetchone()
        created = int(row[0]) if row else 0
        if created:
            logger.info("created %d event store partitions", created)
        return created

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        # Not the library's method itself: it retries a failed read ten times, each after
        # waiting out the pool's timeout (half a minute while the database is away, where the
        # APIs answer 503 within a second); one reconnect is all a dropped connection needs.
        return self._reconnecting(
            lambda: _SELECT_EVENTS(self, originator_id, gt=gt, lte=lte, desc=desc, limit=limit)
        )

    def _reconnecting(self, operation: Callable[[], T]) -> T:
        """Runs `operation`; after a broken connection, once more on checked connections.

        The pool does not ping each connection it lends (a round trip per command); a
        connection the server dropped (a restart) fails once, then the pool's idle
        connections are checked and the operation runs again. An append retried after its
        commit was lost finds its own rows and conflicts, which the command service treats
        like any conflict: it decides again on fresh state.
        """
        try:
            return operation()
        except (OperationalError, InterfaceError) as error:
            if isinstance(error.__cause__, PoolTimeout):
                raise  # no connection to be had at all: the database is away, not one link
            logger.info("event store connection failed (%s); reconnecting", error)
            self.datastore.pool.check()
            return operation()


class WakeUps:
    """Sends `NOTIFY <channel>` after appends commit, from a thread of its own.

    PostgreSQL serialises the commits of transactions that notify (it queues notifications in
    commit order under one lock held through the commit), so a NOTIFY inside every append would
    make concurrent appends commit one at a time. Here an append only raises a flag; the sender
    notifies once for every append that committed while it was sending the previous NOTIFY.
    Readers never depend on a notification for correctness (they also poll), only for latency.
    """

    def __init__(self, datastore: PostgresDatastore, channel: str) -> None:
        self._datastore = datastore
        self._notify = SQL("NOTIFY {}").format(Identifier(channel))
        self._due = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def appended(self) -> None:
        self._due.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closing:
                    self._thread = threading.Thread(
                        target=self._run, name="event-store-wake-ups", daemon=True
                    )
                    self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            thread = self._thread
        self._due.set()
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        # One connection of the pool is held for the sender's life, and the statement goes
        # straight to libpq (which waits without the GIL): a NOTIFY per append otherwise spends
        # more in lending a connection and wrapping a cursor than the server spends on it.
        pool = self._datastore.pool
        conn: Connection[Any] | None = None
        statement = b""
        try:
            while True:
                self._due.wait()
                self._due.clear()
                try:
                    if conn is None:
                        conn = pool.getconn()
                        statement = self._notify.as_bytes(conn)
                    result = conn.pgconn.exec_(statement)
                    if result.status != pq.ExecStatus.COMMAND_OK:
                        message = result.error_message.decode("utf-8", "replace").strip()
                        raise psycopg.OperationalError(message or "NOTIFY failed")
                except Exception as error:  # a missed wake-up only delays readers (they poll)
                    logger.warning("could not wake the event store's readers: %s", error)
                    if conn is not None:
                        pool.putconn(conn)  # the pool drops it if it is broken
                        conn = None
                    if not self._closing:
                        time.sleep(0.2)
                if self._closing and not self._due.is_set():
                    return
        finally:
            if conn is not None:
                pool.putconn(conn)
