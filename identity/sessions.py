"""Sessions in Redis: refresh-token families that rotate on every use, and the revocation list.

A login starts a *family* (the session, `sid` in its access tokens). Each refresh token is opaque
(random), stored only as its sha256, and can be used once: using it spends it and issues the next
token of the family. Presenting a spent token again means two parties hold the family's tokens,
so the whole family is revoked, including its newest token and every access token naming it.

Revocations (a token's `jti`, a family) live until what they revoke could no longer be used.
Every state change runs in one Lua script or one MULTI transaction, so concurrent refreshes with
the same token cannot both succeed. One Redis (not a cluster) is assumed: the scripts touch keys
they compute.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from security.tokens import RevocationUnavailable

TOKEN_PREFIX = "tfr_"  # noqa: S105 (a marker that lets secret scanners spot leaked tokens)

# KEYS: the presented token's record, the next token's record.
# ARGV: now, refresh TTL, key prefix, how long a revoked family is remembered.
_ROTATE = """
local record = redis.call('HMGET', KEYS[1], 'family', 'user', 'tenant', 'spent', 'deadline')
local family, user, tenant, spent = record[1], record[2], record[3], record[4]
if not family then return {'invalid'} end
local prefix = ARGV[3]
if redis.call('EXISTS', prefix .. 'revoked-family:' .. family) == 1 then
  return {'revoked', family, user}
end
if spent == '1' then
  redis.call('SET', prefix .. 'revoked-family:' .. family, '1', 'EX', ARGV[4])
  return {'reused', family, user}
end
local now = tonumber(ARGV[1])
local deadline = tonumber(record[5])
if now >= deadline then return {'expired', family, user} end
redis.call('HSET', KEYS[1], 'spent', '1')
local expires = math.min(now + tonumber(ARGV[2]), deadline)
redis.call('HSET', KEYS[2], 'family', family, 'user', user, 'tenant', tenant, 'spent', '0',
  'deadline', record[5])
redis.call('EXPIREAT', KEYS[2], expires)
return {'ok', family, user, tenant, tostring(expires)}
"""


class InvalidRefreshToken(Exception):
    """Unknown, expired, spent or revoked; the message says which, for logs only."""


class RefreshTokenReused(InvalidRefreshToken):
    """A spent token was presented again: its family is now revoked."""

    def __init__(self, message: str, *, family: str, user_id: str) -> None:
        super().__init__(message)
        self.family = family
        self.user_id = user_id


@dataclass(frozen=True)
class RefreshToken:
    token: str
    family: str
    user_id: str
    tenant: str
    expires_at: int
    """Unix seconds."""

    @property
    def expires_in(self) -> int:
        return max(0, self.expires_at - int(time.time()))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class SessionStore:
    """Refresh-token families and the revocation list of access tokens, in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        refresh_ttl_s: int = 14 * 24 * 3600,
        max_age_s: int = 30 * 24 * 3600,
        prefix: str = "tf:auth:",
    ) -> None:
        self._redis = redis
        self.refresh_ttl_s = refresh_ttl_s
        self.max_age_s = max(max_age_s, refresh_ttl_s)
        self._prefix = prefix
        self._rotate = redis.register_script(_ROTATE)

    # -- keys ---------------------------------------------------------------------------------

    def _token_key(self, token: str) -> str:
        return f"{self._prefix}refresh:{_digest(token)}"

    def _family_key(self, family: str) -> str:
        return f"{self._prefix}revoked-family:{family}"

    def _jti_key(self, token_id: str) -> str:
        return f"{self._prefix}revoked-jti:{token_id}"

    def _user_key(self, user_id: str) -> str:
        return f"{self._prefix}user-families:{user_id}"

    # -- refresh tokens -------------------------------------------------------------------------

    async def start(self, user_id: str, tenant: str) -> RefreshToken:
        """A new family (session) and its first refresh token."""
        now = int(time.time())
        family = uuid.uuid4().hex
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        deadline = now + self.max_age_s
        expires = min(now + self.refresh_ttl_s, deadline)
        key = self._token_key(token)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "family": family,
                    "user": user_id,
                    "tenant": tenant,
                    "spent": "0",
                    "deadline": str(deadline),
                },
            )
            pipe.expireat(key, expires)
            pipe.sadd(self._user_key(user_id), family)
            pipe.expire(self._user_key(user_id), self.max_age_s)
            await pipe.execute()
        return RefreshToken(token, family, user_id, tenant, expires)

    async def rotate(self, token: str) -> RefreshToken:
        """Spend `token` and return the next token of its family.

        Raises `RefreshTokenReused` (and revokes the family) for a token already spent, and
        `InvalidRefreshToken` for one that is unknown, expired or revoked.
        """
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise InvalidRefreshToken("not a refresh token")
        following = TOKEN_PREFIX + secrets.token_urlsafe(32)
        result = await self._rotate(
            keys=[self._token_key(token), self._token_key(following)],
            args=[int(time.time()), self.refresh_ttl_s, self._prefix, self.max_age_s],
        )
        outcome, *rest = [_text(item) for item in result]
        if outcome == "ok":
            family, user_id, tenant, expires = rest
            return RefreshToken(following, family, user_id, tenant, int(expires))
        if outcome == "reused":
            family, user_id = rest
            raise RefreshTokenReused(
                "a spent refresh token was used again; its session is revoked",
                family=family,
                user_id=user_id,
            )
        raise InvalidRefreshToken(f"refresh token {outcome}")

    # -- revocation -----------------------------------------------------------------------------

    async def revoke_family(self, family: str) -> None:
        await self._redis.set(self._family_key(family), "1", ex=self.max_age_s)

    async def revoke_user(self, user_id: str) -> int:
        """Revoke every session of a user (deactivated, password changed); returns how many."""
        families = [_text(f) for f in await self._redis.smembers(self._user_key(user_id))]
        if families:
            async with self._redis.pipeline(transaction=True) as pipe:
                for family in families:
                    pipe.set(self._family_key(family), "1", ex=self.max_age_s)
                pipe.delete(self._user_key(user_id))
                await pipe.execute()
        return len(families)

    async def revoke_token(self, token_id: str, expires_at: int) -> None:
        """Refuse the access token `token_id` until it expires anyway."""
        if expires_at > int(time.time()):
            await self._redis.set(self._jti_key(token_id), "1", exat=expires_at)

    async def is_revoked(self, token_id: str | None, session_id: str | None) -> bool:
        keys = []
        if token_id:
            keys.append(self._jti_key(token_id))
        if session_id:
            keys.append(self._family_key(session_id))
        if not keys:
            return False
        try:
            return int(await self._redis.exists(*keys)) > 0
        except RedisError as error:
            raise RevocationUnavailable(str(error)) from error
