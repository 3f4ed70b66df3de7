"""The `User` and `Tenant` aggregates: accounts, their roles, and who founded a tenant.

A user's id is derived from the tenant and the normalised e-mail address, so logging in loads the
account straight from the event store, with no read model. A tenant's id is derived from its
slug: the first registration in a tenant creates it, and a second one racing it hits the
version-1 conflict, so exactly one registrant founds a tenant and becomes its first admin.

The password hash is stored in `User.Created` (registered) and `User.PasswordChanged`, as logging
in needs it, and never published: the contract marks it private (docs/adr/0009-security-package.md).

The e-mail address is personal data: `User.Created` (`registered.v2`) stores it encrypted with the
user's key, which lives outside the log (docs/adr/0021-crypto-shredding.md); `User.email` holds
what is stored (an encrypted value, or the plain address of a `registered.v1` event), and the
account service decrypts it. Erasing the user (`erased`) closes the account for good.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from commands.events import create, emit, event_class
from streams import contract
from streams.contract.identity import ROLES
from streams.contract.personal import encrypt

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


def _role_granted(event: Any, user: User) -> None:
    user.roles = user.roles | {event.role}


def _role_revoked(event: Any, user: User) -> None:
    user.roles = user.roles - {event.role}


def _password_changed(event: Any, user: User) -> None:
    user.password_hash = event.password_hash


def _deactivated(event: Any, user: User) -> None:
    user.active = False


def _erased(event: Any, user: User) -> None:
    user.active = False
    user.erased = True


def _retention_set(event: Any, tenant: Tenant) -> None:
    tenant.retention_days = event.days


class Tenant(Aggregate):
    """A tenant exists once someone registered in it; only the founding is recorded."""

    TOPIC = "ticketflow.tenant.v1"

    class Event(Aggregate.Event):
        tenant: str
        traceparent: str | None

    Created = event_class(Event, contract.TenantFounded, created=True)
    RetentionSet = event_class(Event, contract.TenantRetentionSet, apply=_retention_set)

    def __init__(self, tenant: str, founded_by: str) -> None:
        self.tenant = tenant
        self.founded_by = founded_by
        self.retention_days: int | None = None

    @classmethod
    def found(cls, tenant: str, founded_by: str, traceparent: str | None) -> Tenant:
        payload = contract.TenantFounded(
            tenant_id=tenant_id_for(tenant), tenant=tenant, founded_by=founded_by
        )
        return create(cls, payload, traceparent)

    def set_retention(self, days: int | None, set_by: str, traceparent: str | None) -> None:
        """Documents older than `days` are purged (None: kept for ever)."""
        if days == self.retention_days:
            return
        payload = contract.TenantRetentionSet(
            tenant_id=self.id, tenant=self.tenant, days=days, set_by=set_by
        )
        emit(self, payload, traceparent)


class User(Aggregate):
    """One account of one tenant. Roles only ever come from `ROLES`."""

    TOPIC = "ticketflow.user.v1"

    class Event(Aggregate.Event):
        tenant: str
        traceparent: str | None

    # Each event's fields and topic come from its contract payload (commands/events.py); the
    # password hash is a private field of two of them.
    Created = event_class(Event, contract.UserRegisteredV2, created=True)
    CreatedV1 = event_class(Event, contract.UserRegistered, created=True)
    RoleGranted = event_class(Event, contract.UserRoleGranted, apply=_role_granted)
    RoleRevoked = event_class(Event, contract.UserRoleRevoked, apply=_role_revoked)
    PasswordChanged = event_class(Event, contract.UserPasswordChanged, apply=_password_changed)
    Deactivated = event_class(Event, contract.UserDeactivated, apply=_deactivated)
    Erased = event_class(Event, contract.UserErased, apply=_erased)

    def __init__(
        self,
        tenant: str,
        email: str | dict[str, Any],
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
        self.erased = False

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
        key: bytes | None = None,
    ) -> User:
        """A new account. `key`: the user's subject key, which encrypts the address
        (`registered.v2`); without one the address is recorded in plain text (`registered.v1`,
        the form of older history)."""
        unknown = set(roles) - ROLES
        if unknown or not roles:
            raise ValueError(f"roles must be a non-empty subset of {sorted(ROLES)}")
        email = normalise_email(email)
        user_id = user_id_for(tenant, email)
        fields = {
            "user_id": user_id,
            "tenant": tenant,
            "email": email,
            "roles": sorted(roles),
            "registered_by": registered_by,
        }
        if key is None:
            v1 = contract.UserRegistered.model_validate(fields)
            return create(cls, v1, traceparent, password_hash=password_hash)
        fields["email"] = encrypt(
            key, email, tenant=tenant, subject=user_id, aggregate_id=user_id,
            event="registered", field="email",
        )  # fmt: skip
        payload = contract.UserRegisteredV2.model_validate(fields)
        return create(cls, payload, traceparent, password_hash=password_hash)

    def grant_role(self, role: str, granted_by: str, traceparent: str | None) -> None:
        """Adds `role`; granting a role the user holds changes nothing."""
        if role in self.roles:
            return
        self._emit(
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
            contract.UserRoleRevoked.model_validate(
                {"user_id": self.id, "tenant": self.tenant, "role": role, "revoked_by": revoked_by}
            ),
            traceparent,
        )

    def change_password(
        self, password_hash: str, changed_by: str, reason: str, traceparent: str | None
    ) -> None:
        self._emit(
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
            contract.UserDeactivated(
                user_id=self.id, tenant=self.tenant, deactivated_by=deactivated_by
            ),
            traceparent,
        )

    def erase(self, erased_by: str, traceparent: str | None) -> None:
        """Records that the user's personal data was erased (their key is destroyed by the
        caller). Erasing twice changes nothing."""
        if self.erased:
            return
        self._emit(
            contract.UserErased(user_id=self.id, tenant=self.tenant, erased_by=erased_by),
            traceparent,
        )

    def _emit(
        self, payload: contract.UserEventPayload, traceparent: str | None, **private: Any
    ) -> None:
        emit(self, payload, traceparent, **private)
