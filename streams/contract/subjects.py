"""NATS subjects of the event stream: `tf.evt.<tenant>.<aggregate>.<aggregate_id>.<event_name>`."""

from __future__ import annotations

from uuid import UUID

from streams.contract.identity import is_tenant_slug

PREFIX = "tf.evt"
STREAM_SUBJECTS = (f"{PREFIX}.>",)
DEAD_LETTER_PREFIX = "tf.dlq"


def event_subject(tenant: str, aggregate: str, aggregate_id: UUID | str, event_name: str) -> str:
    if not is_tenant_slug(tenant):
        raise ValueError(f"invalid tenant slug {tenant!r}")
    return f"{PREFIX}.{tenant}.{aggregate}.{aggregate_id}.{event_name}"


def ticket_subject(tenant: str, ticket_id: UUID | str, event_name: str) -> str:
    return event_subject(tenant, "ticket", ticket_id, event_name)


def user_subject(tenant: str, user_id: UUID | str, event_name: str) -> str:
    return event_subject(tenant, "user", user_id, event_name)


def tenant_filter(tenant: str) -> str:
    """Every event of one tenant (what an integrator of that tenant may subscribe to)."""
    if not is_tenant_slug(tenant):
        raise ValueError(f"invalid tenant slug {tenant!r}")
    return f"{PREFIX}.{tenant}.>"


def event_filter(event_name: str, tenant: str = "*", aggregate: str = "ticket") -> str:
    """One event type across aggregates of a kind, e.g. every ticket `created` of every tenant."""
    return f"{PREFIX}.{tenant}.{aggregate}.*.{event_name}"
