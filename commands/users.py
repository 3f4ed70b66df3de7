"""The `User` and `Tenant` aggregates: accounts, their roles, and who founded a tenant.

A user's id is derived from the tenant and the normalised e-mail address, so logging in loads the
account straight from the event store, with no read model. A tenant's id is derived from its
slug: the first registration in a tenant creates it, and a second one racing it hits the
version-1 conflict, so exactly one registrant founds a tenant and becomes its first admin.

The password hash is stored in `User.Created` (registered) and `User.PasswordChanged`, as logging
in needs it, and never published: the contract marks it private (docs/adr/0009-security-package.md).
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from streams import contract
from streams.contract.identity import ROLES

USER_NAMESPACE = uuid.UUID("0d5e5a40-2f7c-4f8e-9a59-3f0a1c6b7e21")
TENANT_NAMESPACE = uuid.UUID("8b1f4c3a-6d2e-4b7a-9c15-5e2d7f0a9b34")
# No whitespace and no control characters anywhere (\x00-\x1f, \x7f).
EMAIL_PATTERN = r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$"
_EMAIL = re.compile(EMAIL_PATTERN)
MAX_EMAIL_LENGTH = 320


def normalise_email(email: str) -> str:
    """The form an address is stored and compared in: NFKC, trimmed, lower case."""
    return unicodedata.normalize("NFKC", email).strip().lower()


def is_email(email: str) -> bool:
    return len(email) <= MAX_EMAIL_LENGTH and bool(_EMAIL.match(email))


def user_id_for(tenant: str, email: str) -> UUID:
    """The id of the account of `email` in `tenant`: the same address always names it."""
    return uuid.uuid5(uuid.uuid5(USER_NAMESPACE, tenant), normalise_email(email))


def tenant_id_for(tenant: str) -> UUID:
    return uuid.uuid5(TENANT_NAMESPACE, tenant)


def _topic(payload: type[contract.ContractPayload]) -> str:
    return contract.event_type_of(payload).topic


class Tenant(Aggregate):
    """A tenant exists once someone registered in it; only the founding is recorded."""

    TOPIC = "ticketflow.tenant.v1"

    class Event(Aggregate.Event):
        tenant: str
        traceparent: str | None

    class Created(Event, Aggregate.Created):
        TOPIC = _topic(contract.TenantFounded)
        founded_by: str

    def __init__(self, tenant: str, founded_by: str) -> None:
        self.tenant = tenant
        self.founded_by = founded_by

    @classmethod
    def found(cls, tenant: str, founded_by: str, traceparent: str | None) -> Tenant:
        payload = contract.TenantFounded(
            tenant_id=tenant_id_for(tenant), tenant=tenant, founded_by=founded_by
        )
        fields = payload.model_dump(mode="json", exclude={"tenant_id"})
        return cls._create(cls.Created, id=tenant_id_for(tenant), traceparent=traceparent, **fields)


class User(Aggregate):
    """One account of one tenant. Roles only ever come from `ROLES`."""

    TOPIC = "ticketflow.user.v1"

    class Event(Aggregate.Event):
        tenant: str
        traceparent: str | None

    class Created(Event, Aggregate.Created):
        TOPIC = _topic(contract.UserRegistered)
        email: str
        roles: list[str]
        registered_by: str | None
        password_hash: str

    class RoleGranted(Event):
        TOPIC = _topic(contract.UserRoleGranted)
        role: str
        granted_by: str

        def apply(self, user: User) -> None:
            user.roles = user.roles | {self.role}

    class RoleRevoked(Event):
        TOPIC = _topic(contract.UserRoleRevoked)
        role: str
        revoked_by: str

        def apply(self, user: User) -> None:
            user.roles = user.roles - {self.role}

    class PasswordChanged(Event):
        TOPIC = _topic(contract.UserPasswordChanged)
        changed_by: str
        reason: str
        password_hash: str

        def apply(self, user: User) -> None:
            user.password_hash = self.password_hash

    class Deactivated(Event):
        TOPIC = _topic(contract.UserDeactivated)
        deactivated_by: str

        def apply(self, user: User) -> None:
            user.active = False

    def __init__(
        self,
        tenant: str,
        email: str,
        roles: list[str],
        registered_by: str | None,
        password_hash: str,
    ) -> None:
        self.tenant = tenant
        self.email = email
        self.roles: frozenset[str] = frozenset(roles)
        self.registered_by = registered_by
        self.password_hash = password_hash
        self.active = True

    # -- commands ---------------------------------------------------------------------------

    @classmethod
    def register(
        cls,
        tenant: str,
        email: str,
        roles: set[str] | frozenset[str],
        password_hash: str,
        registered_by: str | None,
        traceparent: str | None,
    ) -> User:
        unknown = set(roles) - ROLES
        if unknown or not roles:
            raise ValueError(f"roles must be a non-empty subset of {sorted(ROLES)}")
        email = normalise_email(email)
        payload = contract.UserRegistered.model_validate(
            {
                "user_id": user_id_for(tenant, email),
                "tenant": tenant,
                "email": email,
                "roles": sorted(roles),
                "registered_by": registered_by,
            }
        )
        fields = payload.model_dump(mode="json", exclude={"user_id"})
        return cls._create(
            cls.Created,
            id=payload.user_id,
            traceparent=traceparent,
            password_hash=password_hash,
            **fields,
        )

    def grant_role(self, role: str, granted_by: str, traceparent: str | None) -> None:
        """Adds `role`; granting a role the user holds changes nothing."""
        if role in self.roles:
            return
        self._emit(
            self.RoleGranted,
            contract.UserRoleGranted.model_validate(
                {"user_id": self.id, "tenant": self.tenant, "role": role, "granted_by": granted_by}
            ),
            traceparent,
        )

    def revoke_role(self, role: str, revoked_by: str, traceparent: str | None) -> None:
        """Removes `role`; revoking a role the user lacks changes nothing."""
        if role not in self.roles:
            return
        self._emit(
            self.RoleRevoked,
            contract.UserRoleRevoked.model_validate(
                {"user_id": self.id, "tenant": self.tenant, "role": role, "revoked_by": revoked_by}
            ),
            traceparent,
        )

    def change_password(
        self, password_hash: str, changed_by: str, reason: str, traceparent: str | None
    ) -> None:
        self._emit(
            self.PasswordChanged,
            contract.UserPasswordChanged.model_validate(
                {
                    "user_id": self.id,
                    "tenant": self.tenant,
                    "changed_by": changed_by,
                    "reason": reason,
                }
            ),
            traceparent,
            password_hash=password_hash,
        )

    def deactivate(self, deactivated_by: str, traceparent: str | None) -> None:
        """The user can no longer log in. Deactivating twice changes nothing."""
        if not self.active:
            return
        self._emit(
            self.Deactivated,
            contract.UserDeactivated(
                user_id=self.id, tenant=self.tenant, deactivated_by=deactivated_by
            ),
            traceparent,
        )

    def _emit(
        self,
        event_class: type[User.Event],
        payload: contract.UserEventPayload,
        traceparent: str | None,
        **private: Any,
    ) -> None:
        event_type = contract.event_type_of(payload)
        assert event_type.topic == event_class.TOPIC  # type: ignore[attr-defined]
        assert set(private) == event_type.private_fields
        fields = payload.model_dump(mode="json", exclude={"user_id"})
        self.trigger_event(event_class, traceparent=traceparent, **fields, **private)
