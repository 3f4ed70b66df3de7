"""Access tokens: our own (HS256, short-lived) and an external identity provider's (RS256/ES256
from a JWKS), and the one `Authenticator` both HTTP APIs call with a Bearer token.

Which verifier a token goes to is decided by its header's `alg` alone, and each verifier accepts
only its own algorithms with its own keys: HS256 only with our secret, RS256/ES256 only with a key
from the configured JWKS whose own algorithm is the token's. So `alg: none`, and the classic
confusion of signing HS256 with a published RSA key, are refused before any key is used.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from streams.contract.identity import (
    MAX_SUBJECT_LENGTH,
    ROLES,
    AuthenticationError,
    Principal,
    is_subject,
    is_tenant_slug,
)

OWN_ALGORITHM = "HS256"
EXTERNAL_ALGORITHMS = ("RS256", "ES256")


class RevocationUnavailable(Exception):
    """The revocation list could not be read, so no token can be trusted right now."""


class RevocationList(Protocol):
    async def is_revoked(self, token_id: str | None, session_id: str | None) -> bool:
        """Whether the token, or the session (refresh family) it belongs to, was revoked."""
        ...


@dataclass(frozen=True)
class IssuedAccessToken:
    token: str
    token_id: str
    expires_at: int
    """Unix seconds."""
    expires_in: int


def _principal(claims: dict[str, Any], *, tenant: object, roles: object, source: str) -> Principal:
    if not isinstance(tenant, str) or not is_tenant_slug(tenant):
        raise AuthenticationError(f"invalid token: no valid tenant claim in the {source} token")
    subject = claims["sub"]
    if not isinstance(subject, str) or not is_subject(subject):
        raise AuthenticationError(
            f"invalid token: the sub claim of the {source} token must be 1-{MAX_SUBJECT_LENGTH}"
            " printable characters"
        )
    if isinstance(roles, str):
        roles = roles.split()
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise AuthenticationError("invalid token: roles must be a list of strings")
    jti = claims.get("jti")
    sid = claims.get("sid")
    exp = claims.get("exp")
    return Principal(
        subject=subject,
        tenant=tenant,
        roles=frozenset(roles) & ROLES,
        issuer=str(claims["iss"]),
        token_id=jti if isinstance(jti, str) and jti else None,
        session_id=sid if isinstance(sid, str) and sid else None,
        expires_at=int(exp) if isinstance(exp, int | float) else None,
    )


class AccessTokenCodec:
    """Mints and verifies ticketflow's own access tokens (HS256, with iss, aud, exp, iat, nbf,
    jti, sub, tenant, roles, and `sid` when the token belongs to a refresh family)."""

    algorithm = OWN_ALGORITHM

    def __init__(self, secret: str, *, issuer: str, audience: str, ttl_s: int = 900) -> None:
        self._secret = secret
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s
        self._verified = _VerifiedTokens()

    def issue(
        self,
        *,
        subject: str,
        tenant: str,
        roles: Iterable[str],
        session_id: str | None = None,
        ttl_s: int | None = None,
    ) -> IssuedAccessToken:
        roles = sorted(set(roles))
        unknown = set(roles) - ROLES
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; known: {sorted(ROLES)}")
        if not is_tenant_slug(tenant):
            raise ValueError(f"tenant {tenant!r} must be 1-63 characters of a-z, 0-9 and '-'")
        if not is_subject(subject):
            raise ValueError(
                f"user {subject[:40]!r} must be 1-{MAX_SUBJECT_LENGTH} printable characters"
            )
        lifetime = self.ttl_s if ttl_s is None else ttl_s
        now = int(time.time())
        token_id = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "tenant": tenant,
            "roles": roles,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": token_id,
        }
        if session_id is not None:
            claims["sid"] = session_id
        token = jwt.encode(claims, self._secret, algorithm=OWN_ALGORITHM)
        return IssuedAccessToken(token, token_id, now + lifetime, lifetime)

    def mint(self, *, subject: str, tenant: str, roles: Iterable[str], ttl_s: int = 3600) -> str:
        """A token without a session (no refresh, no `sid`), for development tools and tests."""
        return self.issue(subject=subject, tenant=tenant, roles=roles, ttl_s=ttl_s).token

    def verify(self, token: str) -> Principal:
        """The caller a valid token names; raises `AuthenticationError`. Revocation is not
        checked here (see `Authenticator`).

        A token that verified before is not decoded and its signature not checked again: what
        it says cannot change, only whether it is still in its validity window, which is
        checked on every call."""
        known = self._verified.get(token)
        if known is not None:
            return known
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[OWN_ALGORITHM],
                issuer=self.issuer,
                audience=self.audience,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.PyJWTError as error:
            raise AuthenticationError(f"invalid token: {error}") from None
        principal = _principal(
            claims, tenant=claims.get("tenant"), roles=claims.get("roles", []), source="access"
        )
        self._verified.put(token, principal, not_before=claims.get("nbf"))
        return principal

    def verified_before(self, token: str) -> Principal | None:
        """The principal of a token that verified before and is still valid, or None."""
        return self._verified.get(token)


class _VerifiedTokens:
    """Tokens whose signature and claims verified, each with its principal, for as long as the
    token is valid (`nbf` <= now < `exp`, PyJWT's rules without leeway). Bounded: when full,
    the oldest entries go first."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, token: str) -> Principal | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        principal, not_before = entry
        now = time.time()
        if principal.expires_at is None or not not_before <= now < principal.expires_at:
            del self._entries[token]
            return None
        return principal

    def put(self, token: str, principal: Principal, *, not_before: object) -> None:
        if principal.expires_at is None:
            return
        if len(self._entries) >= self.LIMIT:
            for oldest in list(self._entries)[: self.LIMIT // 4]:
                del self._entries[oldest]
        start = float(not_before) if isinstance(not_before, int | float) else 0.0
        self._entries[token] = (principal, start)


def _claim(claims: dict[str, Any], path: str) -> object:
    """A claim by name, or by a dotted path into nested objects (`realm_access.roles`)."""
    value: object = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class ExternalTokenVerifier:
    """Verifies an identity provider's tokens against its JWKS (keys cached, refetched when an
    unknown `kid` appears, at most once per cool-down). Blocking: call it from a thread."""

    def __init__(
        self,
        jwks_url: str,
        *,
        issuer: str,
        audience: str,
        tenant_claim: str = "tenant",
        roles_claim: str = "roles",
        algorithms: Sequence[str] = EXTERNAL_ALGORITHMS,
        cache_s: float = 300.0,
        timeout_s: float = 5.0,
    ) -> None:
        unsupported = set(algorithms) - set(EXTERNAL_ALGORITHMS)
        if unsupported:
            raise ValueError(f"unsupported algorithms {sorted(unsupported)}")
        self.issuer = issuer
        self.audience = audience
        self.tenant_claim = tenant_claim
        self.roles_claim = roles_claim
        self.algorithms = tuple(algorithms)
        self._keys = jwt.PyJWKClient(
            jwks_url, cache_keys=True, cache_jwk_set=True, lifespan=cache_s, timeout=timeout_s
        )

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if algorithm not in self.algorithms:
                raise AuthenticationError(f"invalid token: algorithm {algorithm!r} not accepted")
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise AuthenticationError("invalid token: no key id (kid)")
            key = self._keys.get_signing_key(kid)
            # The key decides its algorithm; a token naming another one is not verified with it.
            if key.algorithm_name != algorithm:
                raise AuthenticationError(
                    f"invalid token: key {kid!r} is for {key.algorithm_name}, not {algorithm}"
                )
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.PyJWKClientConnectionError as error:
            raise AuthenticationError(f"invalid token: keys unavailable: {error}") from None
        except jwt.PyJWTError as error:
            raise AuthenticationError(f"invalid token: {error}") from None
        return _principal(
            claims,
            tenant=_claim(claims, self.tenant_claim),
            roles=_claim(claims, self.roles_claim) or [],
            source="identity provider's",
        )


class Authenticator:
    """Bearer token → `Principal`: verifies the signature and claims with the verifier the
    token's algorithm names, then checks the revocation list (token and session)."""

    def __init__(
        self,
        own: AccessTokenCodec,
        revocations: RevocationList,
        external: ExternalTokenVerifier | None = None,
    ) -> None:
        self.own = own
        self.revocations = revocations
        self.external = external

    async def __call__(self, token: str) -> Principal:
        principal = self.own.verified_before(token) or await self._verify(token)
        if await self.revocations.is_revoked(principal.token_id, principal.session_id):
            raise AuthenticationError("invalid token: it was revoked")
        return principal

    async def _verify(self, token: str) -> Principal:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as error:
            raise AuthenticationError(f"invalid token: {error}") from None
        if algorithm == OWN_ALGORITHM:
            return self.own.verify(token)
        if self.external is not None and algorithm in self.external.algorithms:
            return await asyncio.to_thread(self.external.verify, token)
        raise AuthenticationError(f"invalid token: algorithm {algorithm!r} not accepted")
