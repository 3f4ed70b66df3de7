"""The `eventsourcing` application that stores tickets, users and tenants in PostgreSQL."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, project_aggregate
from eventsourcing.utils import EnvType
from psycopg.conninfo import conninfo_to_dict

from commands.documents import Document
from commands.recorder import GapSafeRecorder
from commands.ticket import Ticket
from streams.contract.eventlog import EVENTS_TABLE

# What the write model stores; importing them registers their events' topics for loading. Users
# and tenants share the store; their topics are registered by `identity.users`, which the account
# and retention services import (`identity` sits above `commands`, never the other way round).
AGGREGATES = (Ticket, Document)

T = TypeVar("T")


class TicketCache:
    """Tickets this process loaded or appended to last, by id, least recently used first out.

    A ticket in here belongs to nobody: `take` removes it, so one command at a time works on
    it without copying, and `keep` puts it back once its events are stored. It may be stale
    (another process appended since), which is safe for a command: its append then reuses a
    version that exists and conflicts, and the command decides again on a fresh load.
    """

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._tickets: OrderedDict[UUID, Ticket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, ticket_id: UUID) -> Ticket | None:
        with self._lock:
            return self._tickets.pop(ticket_id, None)

    def keep(self, ticket: Ticket) -> None:
        if ticket.pending_events or self._max_size <= 0:
            return
        with self._lock:
            current = self._tickets.get(ticket.id)
            if current is not None and current.version > ticket.version:
                return
            self._tickets[ticket.id] = ticket
            self._tickets.move_to_end(ticket.id)
            while len(self._tickets) > self._max_size:
                self._tickets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._tickets)


class TicketApplication(Application[UUID]):
    """Tables come from `migrations/`, never from the library (`CREATE_TABLE` is off)."""

    name = "ticketflow"
    is_snapshotting_enabled = False
    ticket_cache_size = 512

    def __init__(self, env: EnvType | None = None) -> None:
        super().__init__(env=env)
        self.tickets = TicketCache(self.ticket_cache_size)

    def close(self) -> None:
        if isinstance(self.recorder, GapSafeRecorder):
            self.recorder.close()
        super().close()

    def get_ticket(self, ticket_id: UUID) -> Ticket:
        """The ticket replayed from all its events."""
        ticket: object = self.repository.get(ticket_id)
        if not isinstance(ticket, Ticket):
            # Users and tenants share the store: their ids name no ticket.
            raise AggregateNotFoundError(ticket_id)
        return ticket

    def current_ticket(self, ticket_id: UUID) -> Ticket:
        """The ticket as stored now, for the caller to keep: the cached one brought up to
        date with the events after its version (one query, no replay), else a full load."""
        ticket = self.tickets.take(ticket_id)
        if ticket is None:
            ticket = self.get_ticket(ticket_id)
        else:
            self.fast_forward(ticket)
        self.tickets.keep(copy.deepcopy(ticket))
        return ticket

    def view_ticket(self, ticket_id: UUID, view: Callable[[Ticket], T]) -> T:
        """`view` of the ticket as stored now: the cached one brought up to date (one query, no
        replay, no copy), else a full load; the ticket stays cached for the next command."""
        ticket = self.tickets.take(ticket_id)
        if ticket is None:
            ticket = self.get_ticket(ticket_id)
        else:
            self.fast_forward(ticket)
        seen = view(ticket)
        self.tickets.keep(ticket)
        return seen

    def fast_forward(self, ticket: Ticket) -> bool:
        """Apply the stored events after the ticket's version; True if there were any."""
        newer = list(self.events.get(ticket.id, gt=ticket.version))
        if newer:
            project_aggregate(ticket, newer)
        return bool(newer)

    def has_newer_events(self, ticket: Ticket) -> bool:
        return bool(self.recorder.select_events(ticket.id, gt=ticket.version, limit=1))


assert f"{TicketApplication.name}_events" == EVENTS_TABLE


def persistence_env(database_url: str, *, pool_size: int = 5) -> dict[str, str]:
    """The library's settings for a PostgreSQL URL (TCP or Unix socket)."""
    params = conninfo_to_dict(database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(params.get("dbname") or "postgres"),
        "POSTGRES_HOST": str(params.get("host") or "localhost"),
        "POSTGRES_PORT": str(params.get("port") or "5432"),
        "POSTGRES_USER": str(params.get("user") or "postgres"),
        "POSTGRES_PASSWORD": str(params.get("password") or ""),
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": str(pool_size),
        "POSTGRES_LOCK_TIMEOUT": "10",
        # A broken connection is retried by the recorder instead of pinging every checkout.
        "POSTGRES_PRE_PING": "n",
        "CREATE_TABLE": "n",
        "APPLICATION_RECORDER_TOPIC": "commands.recorder:GapSafeRecorder",
    }


def open_application(database_url: str, *, pool_size: int = 5) -> TicketApplication:
    return TicketApplication(env=persistence_env(database_url, pool_size=pool_size))
