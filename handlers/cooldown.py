"""Provider cool-down: after a server throttles a model, every worker stops sending it work.

The pause lives in Redis, so all worker processes see it: one key per model whose expiry is the
end of the pause, and a hash of counters (`pauses`, `resumes`) for operators and tests.
"""

from __future__ import annotations

import asyncio
import logging
import math

import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

# Sets the pause unless a longer one is already running, and counts the pause either way.
# KEYS[1] the pause key, KEYS[2] the counters; ARGV[1] the pause in milliseconds.
# Returns the milliseconds the model is now paused for.
_PAUSE = """
local ttl = redis.call('PTTL', KEYS[1])
local wanted = tonumber(ARGV[1])
redis.call('HINCRBY', KEYS[2], 'pauses', 1)
if ttl < wanted then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', wanted)
    return wanted
end
return ttl
"""


class ModelCooldown:
    """Pauses dispatch to a model for every worker sharing `redis`.

    `pause` never shortens a longer pause already set. `wait` returns at once when the model is
    not paused, else sleeps until the pause ends; it re-reads the pause at least every
    `max_sleep_s`, so a pause extended meanwhile is honoured and one deleted by an operator
    ends early.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "tf:cooldown",
        max_sleep_s: float = 1.0,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._max_sleep_s = max_sleep_s
        self._pause_script = redis.register_script(_PAUSE)

    def _key(self, model: str) -> str:
        return f"{self._prefix}:{model}"

    def _counts_key(self, model: str) -> str:
        return f"{self._prefix}:{model}:counts"

    async def pause(self, model: str, seconds: float) -> float:
        """Pauses `model` for `seconds` (or keeps a longer pause); returns the pause in force."""
        if not math.isfinite(seconds):
            raise ValueError(f"pause must be a finite number of seconds, got {seconds}")
        milliseconds = max(1, math.ceil(seconds * 1000))
        paused_ms = await self._pause_script(
            keys=[self._key(model), self._counts_key(model)], args=[milliseconds]
        )
        paused_s = int(paused_ms) / 1000.0
        logger.warning(
            "pausing dispatch to %s for %.1f s",
            model,
            paused_s,
            extra={"model": model, "pause_s": paused_s, "requested_s": seconds},
        )
        return paused_s

    async def remaining(self, model: str) -> float:
        """Seconds until dispatch to `model` resumes; 0 when it is not paused."""
        ttl_ms = int(await self._redis.pttl(self._key(model)))
        # -2: no pause; -1 (a key without expiry) cannot come from `pause`.
        return ttl_ms / 1000.0 if ttl_ms > 0 else 0.0

    async def wait(self, model: str) -> None:
        """Returns when dispatch to `model` may go on, sleeping while it is paused."""
        waited = False
        while (remaining := await self.remaining(model)) > 0:
            waited = True
            await asyncio.sleep(min(remaining, self._max_sleep_s))
        if waited:
            await self._redis.hincrby(self._counts_key(model), "resumes", 1)
            logger.info("resuming dispatch to %s", model, extra={"model": model})

    async def counts(self, model: str) -> dict[str, int]:
        """How often `model` was paused, and how many waits resumed after a pause."""
        raw = await self._redis.hgetall(self._counts_key(model))
        values = {_text(key): int(value) for key, value in raw.items()}
        return {"pauses": values.get("pauses", 0), "resumes": values.get("resumes", 0)}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
