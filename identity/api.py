"""Accounts and tokens on the command API: register, log in, refresh, log out, who am I, and the
tenant admins' routes for their users. Thin like the ticket routes: parse, call the account
service or the session store, answer. The composition root mounts `routers(...)` on the command
API with `ERROR_STATUSES`.

Access tokens are short-lived JWTs; refresh tokens are opaque, rotate on every use, and reusing a
spent one revokes its whole family (see `identity.sessions`). The roles each route needs are
listed in docs/security.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, Field, SecretStr
from starlette.concurrency import run_in_threadpool

from commands.errors import DomainError
from identity.accounts import (
    Account,
    AccountResult,
    AccountService,
    ChangePassword,
    DeactivateUser,
    EraseUser,
    GrantRole,
    InvalidAccountData,
    InvalidCredentials,
    OwnAccessChange,
    RegisterUser,
    RegistrationClosed,
    RevokeRole,
    TenantAlreadyExists,
    UserAlreadyExists,
    UserNotFound,
    WeakPasswordError,
    WrongPassword,
)
from identity.integrations import Mint, integrations_router
from identity.retention import (
    MAX_RETENTION_DAYS,
    InvalidRetention,
    RetentionService,
    TenantNotFound,
)
from identity.sessions import InvalidRefreshToken, RefreshToken, RefreshTokenReused, SessionStore
from identity.users import EMAIL_PATTERN
from security.http import (
    AUTH_UNAVAILABLE_DOC,
    INVALID_REQUEST_DOC,
    UNAUTHENTICATED_DOC,
    ApiError,
    BearerCredentials,
    CurrentPrincipal,
    auth_docs,
    authenticate_credentials,
    error_doc,
    require_roles,
)
from security.tokens import AccessTokenCodec
from streams.contract.events import Role
from streams.contract.identity import TENANT_PATTERN, Principal

logger = logging.getLogger(__name__)

USER_ID_EXAMPLE = "3d6f0a3e-5b1c-5e8e-9a0d-2c4b6e8f0a1b"


@dataclass
class AccountApiDeps:
    service: AccountService
    sessions: SessionStore
    tokens: AccessTokenCodec
    retention: RetentionService | None = None


ERROR_STATUSES: list[tuple[type[DomainError], int]] = [
    (UserNotFound, 404),
    (UserAlreadyExists, 409),
    (TenantAlreadyExists, 409),
    (OwnAccessChange, 409),
    (RegistrationClosed, 403),
    (WrongPassword, 403),
    (InvalidCredentials, 401),
    (WeakPasswordError, 422),
    (InvalidAccountData, 422),
    (InvalidRetention, 422),
    (TenantNotFound, 404),
]
"""The HTTP status of each domain error these routes raise."""


async def _get_deps(request: Request) -> AccountApiDeps:
    deps = request.app.state.deps.accounts
    if not isinstance(deps, AccountApiDeps):
        raise TypeError("the app's deps carry no AccountApiDeps as `accounts`")
    return deps


Deps = Annotated[AccountApiDeps, Depends(_get_deps)]
Admin = Annotated[Principal, Depends(require_roles("admin"))]
Traceparent = Annotated[str | None, Header()]

# -- schemas ----------------------------------------------------------------------------------

Tenant = Annotated[str, Field(pattern=TENANT_PATTERN, examples=["acme"])]
Email = Annotated[
    str, Field(min_length=3, max_length=320, pattern=EMAIL_PATTERN, examples=["ada@acme.example"])
]
Password = Annotated[
    SecretStr,
    Field(min_length=1, max_length=1024, examples=["correct horse battery staple"]),
]


class UserRegister(BaseModel):
    tenant: Tenant
    email: Email
    password: Password = Field(description="At least 12 characters (TF_PASSWORD_MIN_LENGTH).")
    roles: list[Role] | None = Field(
        default=None,
        min_length=1,
        examples=[["user"]],
        description=(
            'Only for an admin registering someone (default `["user"]`). The first user of a'
            " new tenant registers without a token and always becomes its admin."
        ),
    )


class UserPublic(BaseModel):
    user_id: UUID = Field(examples=[USER_ID_EXAMPLE])
    tenant: str = Field(examples=["acme"])
    email: str = Field(examples=["ada@acme.example"])
    roles: list[Role] = Field(examples=[["admin"]])
    active: bool = Field(examples=[True])
    registered_at: datetime
    updated_at: datetime
    version: int = Field(examples=[1], description="How many events the account has.")

    @classmethod
    def of(cls, account: Account) -> UserPublic:
        return cls(
            user_id=account.user_id,
            tenant=account.tenant,
            email=account.email,
            roles=sorted(account.roles),
            active=account.active,
            registered_at=account.registered_at,
            updated_at=account.updated_at,
            version=account.version,
        )


class UserChanged(BaseModel):
    user: UserPublic
    position: int | None = Field(
        examples=[42],
        description="Global position of the command's last event; null when nothing changed.",
    )

    @classmethod
    def of(cls, result: AccountResult) -> UserChanged:
        return cls(user=UserPublic.of(result.account), position=result.position)


class LoginRequest(BaseModel):
    tenant: Tenant
    email: Email
    password: Password


class RefreshRequest(BaseModel):
    refresh_token: SecretStr = Field(
        min_length=1, max_length=200, examples=["tfr_kq3Jd9w…"], description="Usable once."
    )


class TokenPair(BaseModel):
    access_token: str = Field(examples=["eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9…"])
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 (the scheme's name)
    expires_in: int = Field(examples=[900], description="Seconds the access token is valid.")
    refresh_token: str = Field(
        examples=["tfr_kq3Jd9w…"],
        description="Opaque; trade it once at `POST /auth/refresh` for a new pair.",
    )
    refresh_expires_in: int = Field(examples=[1209600])


class PasswordChange(BaseModel):
    current_password: Password
    new_password: Password


class RoleGrant(BaseModel):
    role: Role = Field(examples=["auditor"])


class RetentionRequest(BaseModel):
    days: int | None = Field(
        ge=0,
        le=MAX_RETENTION_DAYS,
        examples=[90],
        description="Documents and their texts older than this are purged; null: kept for ever.",
    )


class RetentionChanged(BaseModel):
    tenant: str = Field(examples=["acme"])
    days: int | None = Field(examples=[90])
    position: int | None = Field(
        examples=[42], description="Global position of the event; null when nothing changed."
    )


class Me(BaseModel):
    subject: str = Field(examples=[USER_ID_EXAMPLE], description="The token's `sub`.")
    tenant: str = Field(examples=["acme"])
    roles: list[str] = Field(examples=[["user"]], description="Roles the token carries.")
    issuer: str | None = Field(examples=["ticketflow"])
    account: UserPublic | None = Field(
        description="The local account, when the token is ticketflow's own."
    )


_INVALID_CREDENTIALS = error_doc(
    "invalid_credentials",
    "Wrong e-mail address or password.",
    "Unknown account, wrong password and deactivated account are the same answer.",
)
_INVALID_REFRESH = error_doc(
    "invalid_refresh_token",
    "The refresh token is not valid; log in again.",
    "Unknown, expired, spent (its session is then revoked) or revoked.",
)
_TOKEN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: UNAUTHENTICATED_DOC,
    503: AUTH_UNAVAILABLE_DOC,
}
_USER_NOT_FOUND = error_doc("user_not_found", f"No user {USER_ID_EXAMPLE} in this tenant.")
_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {**auth_docs("admin"), 404: _USER_NOT_FOUND}

router = APIRouter()


def _token_pair(tokens: AccessTokenCodec, account: Account, refresh: RefreshToken) -> TokenPair:
    access = tokens.issue(
        subject=str(account.user_id),
        tenant=account.tenant,
        roles=account.roles,
        session_id=refresh.family,
    )
    return TokenPair(
        access_token=access.token,
        expires_in=access.expires_in,
        refresh_token=refresh.token,
        refresh_expires_in=refresh.expires_in,
    )


def _local_user_id(deps: AccountApiDeps, principal: Principal) -> UUID | None:
    """The account a token names, if it is one of ours (not an identity provider's)."""
    if principal.issuer != deps.tokens.issuer:
        return None
    try:
        return UUID(principal.subject)
    except ValueError:
        return None


# -- tokens -----------------------------------------------------------------------------------


@router.post(
    "/auth/register",
    status_code=201,
    response_model=UserChanged,
    responses={
        401: error_doc("invalid_token", "invalid token: Signature has expired"),
        403: error_doc("forbidden", "This needs role 'admin'."),
        404: error_doc("tenant_not_found", "No tenant 'globex' for this admin."),
        409: error_doc("tenant_exists", "Tenant 'acme' exists; its admins register new users."),
        422: error_doc("weak_password", "A password needs at least 12 characters."),
        503: AUTH_UNAVAILABLE_DOC,
    },
    summary="Register a user: the first of a new tenant anonymously (as its admin), or by an admin",
    tags=["accounts"],
    operation_id="register",
)
async def register(
    body: UserRegister,
    request: Request,
    deps: Deps,
    credentials: BearerCredentials,
    traceparent: Traceparent = None,
) -> UserChanged:
    registered_by = None
    if credentials is not None:
        admin = await authenticate_credentials(request, credentials.credentials)
        if not admin.has_role("admin"):
            raise ApiError(403, "forbidden", "This needs role 'admin'.")
        if admin.tenant != body.tenant:
            raise ApiError(404, "tenant_not_found", f"No tenant {body.tenant!r} for this admin.")
        registered_by = admin.subject
    elif body.roles is not None:
        raise ApiError(
            422, "invalid_request", "The first user of a tenant is its admin; leave out `roles`."
        )
    command = RegisterUser(
        tenant=body.tenant,
        email=body.email,
        password=body.password.get_secret_value(),
        roles=frozenset(body.roles or ["user"]),
        registered_by=registered_by,
        traceparent=traceparent,
    )
    result = await run_in_threadpool(deps.service.register, command)
    return UserChanged.of(result)


@router.post(
    "/auth/login",
    response_model=TokenPair,
    responses={401: _INVALID_CREDENTIALS, 422: INVALID_REQUEST_DOC},
    summary="Trade an e-mail address and password for an access and a refresh token",
    tags=["accounts"],
    operation_id="login",
)
async def login(body: LoginRequest, deps: Deps) -> TokenPair:
    account = await run_in_threadpool(
        deps.service.login, body.tenant, body.email, body.password.get_secret_value()
    )
    refresh = await deps.sessions.start(str(account.user_id), account.tenant)
    logger.info("login", extra={"user_id": str(account.user_id), "tenant": account.tenant})
    return _token_pair(deps.tokens, account, refresh)


@router.post(
    "/auth/refresh",
    response_model=TokenPair,
    responses={401: _INVALID_REFRESH, 422: INVALID_REQUEST_DOC},
    summary="Trade a refresh token (once) for a new pair; reusing one revokes its session",
    tags=["accounts"],
    operation_id="refreshTokens",
)
async def refresh(body: RefreshRequest, deps: Deps) -> TokenPair:
    invalid = ApiError(
        401, "invalid_refresh_token", "The refresh token is not valid; log in again."
    )
    try:
        grant = await deps.sessions.rotate(body.refresh_token.get_secret_value())
    except RefreshTokenReused as error:
        logger.warning(
            "a spent refresh token was reused; session revoked",
            extra={"user_id": error.user_id, "session_id": error.family},
        )
        raise invalid from None
    except InvalidRefreshToken:
        raise invalid from None
    try:
        account = await run_in_threadpool(deps.service.account, grant.tenant, UUID(grant.user_id))
    except UserNotFound:
        account = None
    if account is None or not account.active:
        await deps.sessions.revoke_family(grant.family)
        raise invalid
    return _token_pair(deps.tokens, account, grant)


@router.post(
    "/auth/logout",
    status_code=204,
    response_class=Response,
    responses=_TOKEN_ERRORS,
    summary="Revoke this access token and its session (every refresh token of its family)",
    tags=["accounts"],
    operation_id="logout",
)
async def logout(principal: CurrentPrincipal, deps: Deps) -> Response:
    if principal.token_id and principal.expires_at:
        await deps.sessions.revoke_token(principal.token_id, principal.expires_at)
    if principal.session_id:
        await deps.sessions.revoke_family(principal.session_id)
    return Response(status_code=204)


# -- the caller's own account -------------------------------------------------------------------


@router.get(
    "/users/me",
    response_model=Me,
    responses=_TOKEN_ERRORS,
    summary="Who the token names: subject, tenant, roles, and the local account if any",
    tags=["accounts"],
    operation_id="getCurrentUser",
)
async def me(principal: CurrentPrincipal, deps: Deps) -> Me:
    account = None
    user_id = _local_user_id(deps, principal)
    if user_id is not None:
        try:
            account = UserPublic.of(
                await run_in_threadpool(deps.service.account, principal.tenant, user_id)
            )
        except UserNotFound:
            account = None
    return Me(
        subject=principal.subject,
        tenant=principal.tenant,
        roles=sorted(principal.roles),
        issuer=principal.issuer,
        account=account,
    )


@router.post(
    "/users/me/password",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "Changed; every session of the account is revoked: log in again."},
        **_TOKEN_ERRORS,
        403: error_doc("wrong_password", "The current password is not right."),
        404: error_doc("user_not_found", "This token names no local account."),
        422: error_doc("weak_password", "A password needs at least 12 characters."),
    },
    summary="Change the caller's password; ends every session of the account",
    tags=["accounts"],
    operation_id="changeOwnPassword",
)
async def change_password(
    body: PasswordChange,
    principal: CurrentPrincipal,
    deps: Deps,
    traceparent: Traceparent = None,
) -> Response:
    user_id = _local_user_id(deps, principal)
    if user_id is None:
        raise ApiError(404, "user_not_found", "This token names no local account.")
    command = ChangePassword(
        tenant=principal.tenant,
        user_id=user_id,
        current_password=body.current_password.get_secret_value(),
        new_password=body.new_password.get_secret_value(),
        traceparent=traceparent,
    )
    await run_in_threadpool(deps.service.change_password, command)
    await deps.sessions.revoke_user(str(user_id))
    return Response(status_code=204)


# -- tenant admins --------------------------------------------------------------------------------


@router.get(
    "/users/{user_id}",
    response_model=UserPublic,
    responses=_ADMIN_ERRORS,
    summary="One user of the admin's tenant",
    tags=["users"],
    operation_id="getUser",
)
async def get_user(user_id: UUID, admin: Admin, deps: Deps) -> UserPublic:
    account = await run_in_threadpool(deps.service.account, admin.tenant, user_id)
    return UserPublic.of(account)


@router.post(
    "/users/{user_id}/roles",
    response_model=UserChanged,
    responses=_ADMIN_ERRORS,
    summary="Grant a role (granting a held role changes nothing)",
    tags=["users"],
    operation_id="grantRole",
)
async def grant_role(
    user_id: UUID, body: RoleGrant, admin: Admin, deps: Deps, traceparent: Traceparent = None
) -> UserChanged:
    command = GrantRole(admin.tenant, user_id, body.role, admin.subject, traceparent)
    return UserChanged.of(await run_in_threadpool(deps.service.grant_role, command))


@router.delete(
    "/users/{user_id}/roles/{role}",
    response_model=UserChanged,
    responses={
        **_ADMIN_ERRORS,
        409: error_doc("own_access", "Admins cannot revoke their own admin role."),
    },
    summary="Revoke a role; the user's sessions end, so the change applies at once",
    tags=["users"],
    operation_id="revokeRole",
)
async def revoke_role(
    user_id: UUID, role: Role, admin: Admin, deps: Deps, traceparent: Traceparent = None
) -> UserChanged:
    command = RevokeRole(admin.tenant, user_id, role, admin.subject, traceparent)
    result = await run_in_threadpool(deps.service.revoke_role, command)
    if result.position is not None:
        await deps.sessions.revoke_user(str(user_id))
    return UserChanged.of(result)


@router.post(
    "/users/{user_id}/deactivate",
    response_model=UserChanged,
    responses={
        **_ADMIN_ERRORS,
        409: error_doc("own_access", "Admins cannot deactivate themselves."),
    },
    summary="Deactivate a user: no more logins or refreshes, and their sessions end",
    tags=["users"],
    operation_id="deactivateUser",
)
async def deactivate(
    user_id: UUID, admin: Admin, deps: Deps, traceparent: Traceparent = None
) -> UserChanged:
    command = DeactivateUser(admin.tenant, user_id, admin.subject, traceparent)
    result = await run_in_threadpool(deps.service.deactivate, command)
    await deps.sessions.revoke_user(str(user_id))
    return UserChanged.of(result)


@router.post(
    "/users/{user_id}/erase",
    response_model=UserChanged,
    responses={
        **_ADMIN_ERRORS,
        409: error_doc("own_access", "Admins cannot erase themselves."),
    },
    summary="Erase a user's personal data: their key is destroyed, their account closed",
    description=(
        "Destroys the user's encryption key, so their personal data (the e-mail address) in"
        " every stored and published event can no longer be decrypted, and records"
        " `ticketflow.user.erased.v1`. The user can no longer log in; their sessions end. The"
        " history still verifies. Cannot be undone. Erasing an erased user changes nothing."
    ),
    tags=["users"],
    operation_id="eraseUser",
)
async def erase(
    user_id: UUID, admin: Admin, deps: Deps, traceparent: Traceparent = None
) -> UserChanged:
    command = EraseUser(admin.tenant, user_id, admin.subject, traceparent)
    result = await run_in_threadpool(deps.service.erase, command)
    await deps.sessions.revoke_user(str(user_id))
    return UserChanged.of(result)


@router.put(
    "/tenant/retention",
    response_model=RetentionChanged,
    responses={**auth_docs("admin"), 503: error_doc("unavailable", "Retention is not served.")},
    summary="Set how many days the tenant's documents and extracted texts are kept",
    description=(
        "Recorded as `ticketflow.tenant.retention_set.v1`. A periodic job deletes older"
        " documents, their prompts, extracted texts and chunks, recording each as"
        " `ticketflow.document.purged.v1`; reports and the event history stay."
    ),
    tags=["users"],
    operation_id="setTenantRetention",
)
async def set_retention(
    body: RetentionRequest, admin: Admin, deps: Deps, traceparent: Traceparent = None
) -> RetentionChanged:
    if deps.retention is None:
        raise ApiError(503, "unavailable", "Retention is not served by this process.")
    result = await run_in_threadpool(
        deps.retention.set_retention, admin.tenant, body.days, admin.subject, traceparent
    )
    return RetentionChanged(tenant=result.tenant, days=result.days, position=result.position)


def routers(mint_nats_credentials: Mint | None = None) -> list[APIRouter]:
    """The account routes, and `POST /integrations/nats-credentials` for integrators when
    `mint_nats_credentials` is given. They read `AccountApiDeps` from the app's `deps.accounts`."""
    found = [router]
    if mint_nats_credentials is not None:
        found.append(
            integrations_router(
                principal=require_roles("integrator", "admin"), mint=mint_nats_credentials
            )
        )
    return found
