"""The `eventsourcing` application that stores tickets, users and tenants in PostgreSQL."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from psycopg.conninfo import conninfo_to_dict

from commands.ticket import Ticket
from commands.users import Tenant, User
from streams.contract.eventlog import EVENTS_TABLE

# What the application stores; importing them registers their events' topics for loading.
AGGREGATES = (Ticket, User, Tenant)


class TicketApplication(Application[UUID]):
    """Tables come from `migrations/`, never from the library (`CREATE_TABLE` is off)."""

    name = "ticketflow"
    is_snapshotting_enabled = False

    def get_ticket(self, ticket_id: UUID) -> Ticket:
        ticket: object = self.repository.get(ticket_id)
        if not isinstance(ticket, Ticket):
            # Users and tenants share the store: their ids name no ticket.
            raise AggregateNotFoundError(ticket_id)
        return ticket


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
        "POSTGRES_PRE_PING": "y",
        "CREATE_TABLE": "n",
    }


def open_application(database_url: str, *, pool_size: int = 5) -> TicketApplication:
    return TicketApplication(env=persistence_env(database_url, pool_size=pool_size))
