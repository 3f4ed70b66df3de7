"""Who is asking: the claims every API call and every subject is scoped by."""

from __future__ import annotations

import re
from dataclasses import dataclass

TENANT_PATTERN = r"^[a-z0-9-]{1,63}$"
TENANT_RE = re.compile(TENANT_PATTERN)
ROLES = frozenset({"user", "admin", "auditor", "integrator"})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user of one tenant with a set of roles.

    `issuer` (the token's `iss`), `token_id` (its `jti`), `session_id` (its refresh family,
    `sid`) and `expires_at` (its `exp`, Unix seconds) say which token it came from, so that
    logging out can revoke it.
    """

    subject: str
    tenant: str
    roles: frozenset[str]
    issuer: str | None = None
    token_id: str | None = None
    session_id: str | None = None
    expires_at: int | None = None

    def has_role(self, *roles: str) -> bool:
        return bool(self.roles.intersection(roles))


def is_tenant_slug(value: str) -> bool:
    return bool(TENANT_RE.match(value))


#: The longest user id (`sub`) accepted, as OpenID Connect bounds it.
MAX_SUBJECT_LENGTH = 255


def is_subject(value: str) -> bool:
    """A user id that can own tickets: 1 to 255 characters, not only spaces, and no control
    characters (it is written into events, logs and reports)."""
    return (
        0 < len(value) <= MAX_SUBJECT_LENGTH
        and not value.isspace()
        and all(ch.isprintable() for ch in value)
    )


class AuthenticationError(Exception):
    """Credentials missing, malformed, expired or signed by someone else."""
