"""The account service: registers users, checks passwords, changes roles. Like the command
service, it is the only writer of its events (users' and tenants').

Every command names the tenant it acts in; a user of another tenant is reported as not found.
Registration founds the tenant when it is the first one there: the anonymous first registrant of a
new tenant becomes its admin, and the version-1 conflict on the tenant's id makes that race-free.

The e-mail address is recorded encrypted with the user's subject key (`identity.subject_keys`);
accounts are answered with it decrypted. Erasing a user destroys the key first, then records
`erased`: from then on the address reads `[erased]` everywhere (docs/adr/0021-crypto-shredding.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError

from commands.conflicts import retry_on_conflict
from commands.errors import DomainError
from commands.tracing import child_traceparent
from identity.passwords import Passwords, WeakPassword
from identity.subject_keys import SubjectErased, SubjectKeyStore, pool_of
from identity.users import (
    Tenant,
    User,
    is_email,
    normalise_email,
    tenant_id_for,
    user_id_for,
)
from streams.contract.identity import ROLES, is_tenant_slug
from streams.contract.personal import ERASED, PersonalDataError, decrypt, is_encrypted

logger = logging.getLogger(__name__)

_Found = TypeVar("_Found", User, Tenant)

# -- errors -----------------------------------------------------------------------------------


class UserNotFound(DomainError):
    code = "user_not_found"


class UserAlreadyExists(DomainError):
    code = "user_exists"


class TenantAlreadyExists(DomainError):
    """An anonymous registration in a tenant that exists: only its admins register users."""

    code = "tenant_exists"


class RegistrationClosed(DomainError):
    """New tenants are founded by an operator (`ticketflow create-admin`), not by anyone."""

    code = "registration_closed"


class InvalidCredentials(DomainError):
    """Unknown account, wrong password or deactivated account: deliberately the same error."""

    code = "invalid_credentials"


class WrongPassword(DomainError):
    """The current password given to change it is not the current password."""

    code = "wrong_password"


class WeakPasswordError(DomainError):
    code = "weak_password"


class InvalidAccountData(DomainError):
    code = "invalid_account"


class OwnAccessChange(DomainError):
    """An admin may not take away their own admin role or deactivate themselves: so a tenant
    never loses its last admin by accident."""

    code = "own_access"


# -- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterUser:
    """`registered_by` None: an anonymous registration, which founds a new tenant."""

    tenant: str
    email: str
    password: str
    roles: frozenset[str] = frozenset({"user"})
    registered_by: str | None = None
    traceparent: str | None = None


@dataclass(frozen=True)
class GrantRole:
    tenant: str
    user_id: UUID
    role: str
    granted_by: str
    traceparent: str | None = None


@dataclass(frozen=True)
class RevokeRole:
    tenant: str
    user_id: UUID
    role: str
    revoked_by: str
    traceparent: str | None = None


@dataclass(frozen=True)
class DeactivateUser:
    tenant: str
    user_id: UUID
    deactivated_by: str
    traceparent: str | None = None


@dataclass(frozen=True)
class EraseUser:
    """Erase the user's personal data: destroy their key, record `erased`, close the account."""

    tenant: str
    user_id: UUID
    erased_by: str
    traceparent: str | None = None


@dataclass(frozen=True)
class ChangePassword:
    tenant: str
    user_id: UUID
    current_password: str
    new_password: str
    traceparent: str | None = None


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """What callers may know of a user: never the password hash."""

    user_id: UUID
    tenant: str
    email: str
    roles: frozenset[str]
    active: bool
    registered_at: datetime
    updated_at: datetime
    version: int

    @classmethod
    def of(cls, user: User, email: str) -> Account:
        """`email`: the user's address as readers see it (decrypted, or `[erased]`)."""
        return cls(
            user_id=user.id,
            tenant=user.tenant,
            email=email,
            roles=user.roles,
            active=user.active,
            registered_at=user.created_on,
            updated_at=user.modified_on,
            version=user.version,
        )


@dataclass(frozen=True)
class AccountResult:
    account: Account
    position: int | None
    """Global position of the command's last event; None when it changed nothing."""


class AccountService:
    def __init__(
        self,
        app: Application[UUID],
        passwords: Passwords,
        *,
        open_registration: bool = True,
        max_conflict_retries: int = 20,
        keys: SubjectKeyStore | None = None,
    ) -> None:
        self._app = app
        self._keys = keys if keys is not None else SubjectKeyStore.of(app)
        self._passwords = passwords
        self.open_registration = open_registration
        self._max_conflict_retries = max_conflict_retries

    # -- commands ---------------------------------------------------------------------------

    def register(self, command: RegisterUser, *, adopt: bool = False) -> AccountResult:
        """A new account. Anonymous (`registered_by` None): founds the tenant, as its admin.

        A tenant that has no account yet but holds history (tickets opened with an identity
        provider's or development tokens) is not anyone's to found: that would make a stranger
        admin of its tickets. Only an operator adopts it (`adopt`, `ticketflow create-admin`)."""
        if not is_tenant_slug(command.tenant):
            raise InvalidAccountData(
                f"Tenant {command.tenant!r} must be 1-63 characters of a-z, 0-9 and '-'."
            )
        email = normalise_email(command.email)
        if not is_email(email):
            raise InvalidAccountData("That is not an e-mail address.")
        founding = command.registered_by is None
        if founding and not self.open_registration:
            raise RegistrationClosed("New tenants are opened by an operator here.")
        roles = frozenset({"admin"}) if founding else command.roles
        _check_roles(roles)
        password_hash = self._hash(command.password)
        traceparent = child_traceparent(command.traceparent)
        try:
            key = self._keys.key_for(command.tenant, user_id_for(command.tenant, email))
        except SubjectErased:
            raise UserAlreadyExists(
                f"That address had an account in {command.tenant}; it was erased."
            ) from None
        user = User.register(
            command.tenant, email, roles, password_hash, command.registered_by, traceparent, key
        )

        def attempt(_: int) -> AccountResult:
            tenant_exists = self._find(tenant_id_for(command.tenant), Tenant) is not None
            if founding and tenant_exists:
                raise TenantAlreadyExists(
                    f"Tenant {command.tenant!r} exists; its admins register new users."
                )
            if founding and not adopt and self._holds_history(command.tenant):
                raise TenantAlreadyExists(
                    f"Tenant {command.tenant!r} is in use (it has tickets) but has no accounts;"
                    " an operator opens it with `ticketflow create-admin`."
                )
            aggregates: list[User | Tenant] = [user]
            if not tenant_exists:
                founder = command.registered_by or str(user.id)
                aggregates.insert(0, Tenant.found(command.tenant, founder, traceparent))
            try:
                recordings = self._app.save(*aggregates)
            except IntegrityError:
                if self._find(user.id, User) is not None:
                    raise UserAlreadyExists(
                        f"{email} already has an account in {command.tenant}."
                    ) from None
                raise  # the tenant was founded meanwhile: try again as a member
            logger.info(
                "user registered",
                extra={"user_id": str(user.id), "tenant": command.tenant, "founded": founding},
            )
            return AccountResult(self._account(user), recordings[-1].notification.id)

        return retry_on_conflict(
            attempt,
            retries=self._max_conflict_retries,
            subject=f"registration in {command.tenant}",
        )

    def login(self, tenant: str, email: str, password: str) -> Account:
        """The account whose password this is; raises `InvalidCredentials` otherwise.

        Costs one password hash whether or not the account exists. A hash made with older
        parameters is replaced (`password_changed`, reason `rehashed`).
        """
        user = None
        if is_tenant_slug(tenant):
            user = self._find(user_id_for(tenant, email), User)
        if user is None or user.tenant != tenant:
            self._passwords.verify(None, password)
            raise InvalidCredentials("Wrong e-mail address or password.")
        if not self._passwords.verify(user.password_hash, password) or not user.active:
            raise InvalidCredentials("Wrong e-mail address or password.")
        if self._passwords.needs_rehash(user.password_hash):
            self._rehash(user, password)
        return self._account(user)

    def account(self, tenant: str, user_id: UUID) -> Account:
        return self._account(self._user(tenant, user_id))

    def erase(self, command: EraseUser) -> AccountResult:
        """Destroys the user's key (their encrypted personal data can no longer be read by
        anyone), then records `erased`. Erasing an erased user changes nothing; a run that
        stopped between the two steps completes the second when repeated."""
        if command.erased_by == str(command.user_id):
            raise OwnAccessChange("Admins cannot erase themselves.")
        self._user(command.tenant, command.user_id)
        self._keys.destroy(command.tenant, command.user_id)
        traceparent = child_traceparent(command.traceparent)
        result = self._update(
            command.tenant,
            command.user_id,
            lambda user: user.erase(command.erased_by, traceparent),
        )
        logger.info(
            "user erased", extra={"user_id": str(command.user_id), "tenant": command.tenant}
        )
        return result

    def grant_role(self, command: GrantRole) -> AccountResult:
        _check_roles({command.role})
        traceparent = child_traceparent(command.traceparent)
        return self._update(
            command.tenant,
            command.user_id,
            lambda user: user.grant_role(command.role, command.granted_by, traceparent),
        )

    def revoke_role(self, command: RevokeRole) -> AccountResult:
        _check_roles({command.role})
        if command.role == "admin" and command.revoked_by == str(command.user_id):
            raise OwnAccessChange("Admins cannot revoke their own admin role.")
        traceparent = child_traceparent(command.traceparent)
        return self._update(
            command.tenant,
            command.user_id,
            lambda user: user.revoke_role(command.role, command.revoked_by, traceparent),
        )

    def deactivate(self, command: DeactivateUser) -> AccountResult:
        if command.deactivated_by == str(command.user_id):
            raise OwnAccessChange("Admins cannot deactivate themselves.")
        traceparent = child_traceparent(command.traceparent)
        return self._update(
            command.tenant,
            command.user_id,
            lambda user: user.deactivate(command.deactivated_by, traceparent),
        )

    def change_password(self, command: ChangePassword) -> AccountResult:
        user = self._user(command.tenant, command.user_id)
        if not user.active or not self._passwords.verify(
            user.password_hash, command.current_password
        ):
            raise WrongPassword("The current password is not right.")
        password_hash = self._hash(command.new_password)
        traceparent = child_traceparent(command.traceparent)
        return self._update(
            command.tenant,
            command.user_id,
            lambda user: user.change_password(
                password_hash, str(command.user_id), "changed", traceparent
            ),
        )

    def close(self) -> None:
        self._app.close()

    # -- internals --------------------------------------------------------------------------

    def _hash(self, password: str) -> str:
        try:
            return self._passwords.hash(password)
        except WeakPassword as error:
            raise WeakPasswordError(str(error)) from None

    def _rehash(self, user: User, password: str) -> None:
        user.change_password(self._passwords.hash(password), str(user.id), "rehashed", None)
        try:
            self._app.save(user)
        except IntegrityError:
            logger.debug("user %s changed while rehashing; the next login rehashes", user.id)

    def _holds_history(self, tenant: str) -> bool:
        """Whether any event of `tenant` is stored (its audit chain has a head)."""
        with pool_of(self._app).connection() as conn:
            row = conn.execute(
                "SELECT 1 FROM ticketflow_chain_heads WHERE tenant = %s", (tenant,)
            ).fetchone()
        return row is not None

    def _find(self, aggregate_id: UUID, kind: type[_Found]) -> _Found | None:
        try:
            aggregate: object = self._app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        return aggregate if isinstance(aggregate, kind) else None

    def _user(self, tenant: str, user_id: UUID) -> User:
        user = self._find(user_id, User)
        if user is None or user.tenant != tenant:
            raise UserNotFound(f"No user {user_id} in this tenant.")
        return user

    def _update(self, tenant: str, user_id: UUID, decide: Callable[[User], None]) -> AccountResult:
        def attempt(_: int) -> AccountResult:
            user = self._user(tenant, user_id)
            decide(user)
            if not user.pending_events:
                return AccountResult(self._account(user), None)
            recordings = self._app.save(user)  # a conflict raises: the helper retries
            return AccountResult(self._account(user), recordings[-1].notification.id)

        return retry_on_conflict(
            attempt, retries=self._max_conflict_retries, subject=f"user {user_id}"
        )

    def _account(self, user: User) -> Account:
        return Account.of(user, self._email(user))

    def _email(self, user: User) -> str:
        """The user's address: decrypted with their key; `[erased]` once it is destroyed."""
        stored: object = user.email
        if user.erased:
            return ERASED
        if not is_encrypted(stored):
            # A `registered.v1` event: the address is plain; hidden once the user is erased.
            known = self._keys.keys(user.tenant, [user.id])
            return ERASED if user.id in known and known[user.id] is None else str(stored)
        key = self._keys.keys(user.tenant, [user.id]).get(user.id)
        if key is None:
            return ERASED
        assert isinstance(stored, dict)
        try:
            return str(
                decrypt(
                    key, stored, tenant=user.tenant, aggregate_id=user.id,
                    event="registered", field="email",
                )
            )  # fmt: skip
        except PersonalDataError:
            logger.error("the e-mail address of user %s does not decrypt", user.id)
            return ERASED


def _check_roles(roles: set[str] | frozenset[str]) -> None:
    unknown = set(roles) - ROLES
    if unknown or not roles:
        raise InvalidAccountData(
            f"Roles must be some of {', '.join(sorted(ROLES))}; got {', '.join(sorted(roles))}."
        )
