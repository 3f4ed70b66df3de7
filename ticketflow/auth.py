"""JWT access tokens (HS256): minting for development and verification for both APIs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import jwt

from streams.contract.identity import ROLES, AuthenticationError, Principal, is_tenant_slug

ALGORITHM = "HS256"


class JwtCodec:
    def __init__(self, secret: str, *, issuer: str, audience: str) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience

    def mint(self, *, subject: str, tenant: str, roles: Iterable[str], ttl_s: int = 3600) -> str:
        roles = sorted(set(roles))
        unknown = set(roles) - ROLES
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; known: {sorted(ROLES)}")
        if not is_tenant_slug(tenant):
            raise ValueError(f"tenant {tenant!r} must be 1-63 characters of a-z, 0-9 and '-'")
        now = int(time.time())
        claims = {
            "sub": subject,
            "tenant": tenant,
            "roles": roles,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.PyJWTError as error:
            raise AuthenticationError(f"invalid token: {error}") from None
        tenant = claims.get("tenant")
        roles = claims.get("roles", [])
        if not isinstance(tenant, str) or not is_tenant_slug(tenant):
            raise AuthenticationError("invalid token: no valid tenant claim")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthenticationError("invalid token: roles must be a list of strings")
        return Principal(subject=str(claims["sub"]), tenant=tenant, roles=frozenset(roles) & ROLES)
