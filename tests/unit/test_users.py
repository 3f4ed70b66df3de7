"""The `User` and `Tenant` aggregates, and how their events travel (or do not)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from identity.users import Tenant, User, normalise_email, tenant_id_for, user_id_for
from projections.writer import ReadModelWriter
from streams import contract
from streams.contract.eventlog import RecordedEvent
from streams.relay import message_for

HASH = "$argon2id$v=19$m=8192,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"


def ada(*roles: str) -> User:
    return User.register("acme", "Ada@Example.org", set(roles or {"user"}), HASH, "admin-1", None)


def recorded(event: Any, position: int = 7) -> RecordedEvent:
    """A stored event as readers see it, from an aggregate's pending event."""
    fields = {
        key: value
        for key, value in vars(event).items()
        if key not in ("originator_id", "originator_version", "timestamp")
    }
    state = {**fields, "timestamp": datetime.now(UTC).isoformat()}
    return RecordedEvent(
        position, event.originator_id, event.originator_version, event.TOPIC, state
    )


def test_a_users_id_is_named_by_tenant_and_normalised_address() -> None:
    user = ada()
    assert user.id == user_id_for("acme", " ada@example.ORG ")
    assert user.id != user_id_for("globex", "ada@example.org")
    assert user.email == normalise_email("ADA@example.org") == "ada@example.org"


def test_a_tenants_id_is_named_by_its_slug() -> None:
    assert Tenant.found("acme", "u1", None).id == tenant_id_for("acme")


def test_unknown_roles_are_refused() -> None:
    with pytest.raises(ValueError, match="roles"):
        ada("root")


def test_granting_a_held_role_or_revoking_a_missing_one_changes_nothing() -> None:
    user = ada("user")
    user.collect_events()
    user.grant_role("user", "admin-1", None)
    user.revoke_role("auditor", "admin-1", None)
    assert user.collect_events() == []
    user.grant_role("auditor", "admin-1", None)
    assert user.roles == {"user", "auditor"}


def test_deactivating_twice_records_one_event() -> None:
    user = ada()
    user.deactivate("admin-1", None)
    user.deactivate("admin-1", None)
    assert [type(e).__name__ for e in user.collect_events()] == ["Created", "Deactivated"]
    assert user.active is False


def test_a_password_change_replaces_the_hash() -> None:
    user = ada()
    user.change_password("$argon2id$new", str(user.id), "changed", None)
    assert user.password_hash == "$argon2id$new"


def test_the_hash_is_stored_but_never_published() -> None:
    user = ada()
    user.change_password("$argon2id$new", str(user.id), "changed", None)
    for event in user.collect_events():
        stored = recorded(event)
        assert stored.state["password_hash"].startswith("$argon2id$")
        payload = stored.payload()
        assert isinstance(payload, contract.UserEventPayload)
        assert "password_hash" not in payload.model_dump()
        subject, body, headers = message_for(stored)
        assert subject == f"tf.evt.acme.user.{user.id}.{stored.event_type.name}"
        assert b"argon2" not in body
        assert headers["ce-subject"] == f"user/{user.id}"


def test_the_projector_ignores_users_and_tenants() -> None:
    writer = ReadModelWriter()
    user, tenant = ada(), Tenant.found("acme", "u1", None)
    for event in [*user.collect_events(), *tenant.collect_events()]:
        assert writer.operations(recorded(event)) == []
