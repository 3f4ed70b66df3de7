"""Rate limits shared by every process through Redis: GCRA counters per user, per tenant and per
client IP, with rules per route. Exceeding one answers 429 `rate_limited` with `Retry-After`.

Rules are keyed by route (`POST /tickets`, `*` for every other route); each names the rates that
apply to it (`"60/hour"`, `"3/2s"`):

- `user` and `tenant`: requests with a valid bearer token, counted per user and per tenant;
- `anonymous`: requests without a valid token, counted per client IP;
- `ip`: every request to the route, counted per client IP, token or not (login, register and
  refresh: against password guessing, which a token of one's own must not lift).

A rate a rule leaves out is the `*` rule's, and shares its counter; `null` turns a rate off.
See docs/adr/0011-limits.md for the algorithm and why Redis being down lets requests through.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from security.metrics import RATE_LIMITED
from security.requests import (
    Caller,
    Identify,
    RedisProvider,
    caller_of,
    client_ip,
    parse_route,
    route_key,
    route_of,
    send_error,
)

logger = logging.getLogger(__name__)

Kind = Literal["user", "tenant", "anonymous", "ip"]
KINDS: tuple[Kind, ...] = get_args(Kind)
DEFAULT_ROUTE = "*"
#: Paths no rate applies to: load balancers' health checks.
EXEMPT_PATHS = frozenset({"/health", "/health/live"})

DEFAULT_RATE_LIMITS: dict[str, dict[str, str | None]] = {
    DEFAULT_ROUTE: {"user": "600/minute", "tenant": "6000/minute", "anonymous": "600/minute"},
    "POST /tickets": {"user": "60/hour", "tenant": "600/hour"},
    # A question is one model call where a ticket is several.
    "POST /tickets/{ticket_id}/questions": {"user": "120/hour", "tenant": "1200/hour"},
    "POST /auth/login": {"ip": "30/minute"},
    "POST /auth/register": {"ip": "30/minute"},
    "POST /auth/refresh": {"ip": "30/minute"},
}

_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_PLURALS = {f"{name}s": seconds for name, seconds in _UNITS.items() if len(name) > 1}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """`limit` requests per `period_s` seconds: a burst of `limit`, refilled evenly."""

    limit: int
    period_s: float

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period_s <= 0:
            raise ValueError("a rate needs a limit of at least 1 and a positive period")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """`"60/hour"`, `"600/min"`, `"3/2s"`, `"1000/day"`."""
        match = _RATE.match(text.lower())
        unit = (_UNITS | _PLURALS).get(match.group(3)) if match else None
        if match is None or unit is None:
            raise ValueError(f"rate {text!r} is not like '60/hour', '600/minute' or '3/2s'")
        count = float(match.group(2)) if match.group(2) else 1.0
        return cls(int(match.group(1)), count * unit)

    @property
    def interval_us(self) -> int:
        """The time one request uses up (the emission interval of GCRA)."""
        return max(1, int(self.period_s * 1_000_000) // self.limit)


@dataclass(frozen=True)
class Counter:
    """One rate counted for one caller, client or tenant, under one Redis key."""

    key: str
    rate: Rate
    kind: Kind


class RateLimitRules:
    """Which rates apply to a request, from rules keyed by route key (see `route_key`)."""

    def __init__(self, rules: Mapping[str, Mapping[str, str | None]]) -> None:
        if DEFAULT_ROUTE not in rules:
            raise ValueError(f"rate limits need a default rule {DEFAULT_ROUTE!r}")
        self._rules: dict[str, dict[Kind, Rate | None]] = {}
        for route, rates in rules.items():
            name = _route_name(route)
            unknown = set(rates) - set(KINDS)
            if unknown:
                raise ValueError(f"rate limit rule {route!r}: unknown {sorted(unknown)}")
            self._rules[name] = {
                kind: None if text is None else Rate.parse(text)
                for kind, text in rates.items()
                if kind in KINDS
            }

    @classmethod
    def with_defaults(
        cls, overrides: Mapping[str, Mapping[str, str | None]] | None = None
    ) -> RateLimitRules:
        """The default rules, with `overrides` laid over them rate by rate."""
        merged = {route: dict(rates) for route, rates in DEFAULT_RATE_LIMITS.items()}
        for route, rates in (overrides or {}).items():
            name = _route_name(route)
            merged.setdefault(name, {}).update(rates)
        return cls(merged)

    def rates_for(self, route: str | None) -> dict[Kind, tuple[str, Rate]]:
        """The rates for a route key, each with the rule it comes from (which names its counter)."""
        own = self._rules.get(route or DEFAULT_ROUTE, {})
        default = self._rules[DEFAULT_ROUTE]
        rates: dict[Kind, tuple[str, Rate]] = {}
        for kind in KINDS:
            if kind in own:
                rate, rule = own[kind], route or DEFAULT_ROUTE
            else:
                rate, rule = default.get(kind), DEFAULT_ROUTE
            if rate is not None:
                rates[kind] = (rule, rate)
        return rates

    def counters(self, route: str | None, caller: Caller | None, ip: str) -> list[Counter]:
        counters = []
        for kind, (rule, rate) in self.rates_for(route).items():
            if kind == "ip" or (kind == "anonymous" and caller is None):
                who = ip
            elif kind == "user" and caller is not None:
                who = f"{caller[1]}:{caller[0]}"
            elif kind == "tenant" and caller is not None:
                who = caller[1]
            else:
                continue
            counters.append(Counter(f"{rule}:{kind}:{who}", rate, kind))
        return counters


def _route_name(route: str) -> str:
    if route.strip() == DEFAULT_ROUTE:
        return DEFAULT_ROUTE
    try:
        return parse_route(route)
    except ValueError as error:
        raise ValueError(f"rate limit rule {route!r}: {error}; or '{DEFAULT_ROUTE}'") from None


# GCRA (the generic cell rate algorithm) keeps one number per counter: the theoretical arrival
# time (TAT) at which the counter would be empty again. A request costs one interval
# (period / limit); it is admitted while TAT - now, after charging it, stays within the period,
# which allows a burst of `limit` and then one request per interval. Every counter of a request
# is checked first and all are charged only if all admit it, so a refused request costs nothing.
# Time is Redis's own clock, so processes with skewed clocks still agree.
_GCRA = """
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local admitted = true
local tats = {}
local result = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval
  local wait = new_tat - now - period
  if wait > 0 then
    admitted = false
    result[i] = {0, 0, tat - now, wait}
  else
    tats[i] = new_tat
    result[i] = {1, math.floor((period - (new_tat - now)) / interval), new_tat - now, 0}
  end
end
if admitted then
  for i, key in ipairs(KEYS) do
    local ttl_ms = math.ceil((tats[i] - now) / 1000)
    redis.call('SET', key, string.format('%d', tats[i]), 'PX', string.format('%d', ttl_ms))
  end
end
return result
"""


@dataclass(frozen=True)
class Decision:
    """The outcome for one request, told by its most constraining counter."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    retry_after_s: int

    def headers(self) -> list[tuple[str, str]]:
        headers = [
            ("RateLimit-Limit", str(self.limit)),
            ("RateLimit-Remaining", str(self.remaining)),
            ("RateLimit-Reset", str(self.reset_s)),
        ]
        if not self.allowed:
            headers.append(("Retry-After", str(self.retry_after_s)))
        return headers


class RateLimiter:
    """Charges a request to its counters in one atomic script run."""

    def __init__(self, redis: RedisProvider, *, prefix: str = "tf:rl:") -> None:
        self._redis = redis
        self._prefix = prefix
        self._script: tuple[Redis, AsyncScript] | None = None

    async def hit(self, counters: Sequence[Counter]) -> Decision:
        """Charges the request to every counter if all admit it; raises when Redis cannot be
        reached (a `RedisError` or an `OSError`)."""
        client = self._redis()
        if client is None:
            raise ConnectionError("Redis is not connected")
        if self._script is None or self._script[0] is not client:
            self._script = (client, client.register_script(_GCRA))
        args: list[int] = []
        for counter in counters:
            args += [counter.rate.interval_us, counter.rate.interval_us * counter.rate.limit]
        rows: list[list[int]] = await self._script[1](
            keys=[self._prefix + counter.key for counter in counters], args=args
        )
        return _decide(counters, rows)


def _decide(counters: Sequence[Counter], rows: Sequence[Sequence[Any]]) -> Decision:
    outcomes = [
        (counter.rate.limit, bool(int(row[0])), int(row[1]), int(row[2]), int(row[3]))
        for counter, row in zip(counters, rows, strict=True)
    ]
    refused = [outcome for outcome in outcomes if not outcome[1]]
    if refused:
        limit, _, _, reset_us, wait_us = max(refused, key=lambda outcome: outcome[4])
        return Decision(False, limit, 0, _seconds(reset_us), max(1, _seconds(wait_us)))
    limit, _, remaining, reset_us, _ = min(outcomes, key=lambda outcome: (outcome[2], -outcome[3]))
    return Decision(True, limit, remaining, _seconds(reset_us), 0)


def _seconds(microseconds: int) -> int:
    return max(0, math.ceil(microseconds / 1_000_000))


class RateLimitMiddleware:
    """Counts each request against the rules of its route and answers 429 past a limit; adds
    `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` to every counted response.

    When Redis cannot be reached the request goes through uncounted, with a warning logged:
    limits protect capacity, and an outage of the cache must not become an outage of the API."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        redis: RedisProvider,
        identify: Identify,
        rules: RateLimitRules,
        exempt_paths: frozenset[str] = EXEMPT_PATHS,
        prefix: str = "tf:rl:",
        timeout_s: float = 0.5,
    ) -> None:
        self.app = app
        self.identify = identify
        self.rules = rules
        self.exempt_paths = exempt_paths
        self.timeout_s = timeout_s
        self.limiter = RateLimiter(redis, prefix=prefix)
        self._warned_at = -math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        route = route_of(scope)
        caller = await caller_of(scope, self.identify)
        counters = self.rules.counters(route, caller, client_ip(scope))
        decision = await self._decide(counters, route) if counters else None
        if decision is None:
            await self.app(scope, receive, send)
            return
        if not decision.allowed:
            RATE_LIMITED.labels(route or "").inc()
            await send_error(
                send,
                429,
                "rate_limited",
                f"Too many requests; retry in {decision.retry_after_s} s.",
                decision.headers(),
            )
            return
        extra = [(name.lower().encode(), value.encode()) for name, value in decision.headers()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _decide(self, counters: Sequence[Counter], route: str | None) -> Decision | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.limiter.hit(counters)
        except (RedisError, OSError, TimeoutError) as error:
            now = time.monotonic()
            if now - self._warned_at > 10:
                self._warned_at = now
                logger.warning(
                    "rate limits not enforced, Redis unavailable: %s",
                    error,
                    extra={"route": route or DEFAULT_ROUTE},
                )
            return None


def rate_limited_doc() -> dict[str, Any]:
    """The OpenAPI response object of a 429 from `RateLimitMiddleware`."""
    integer = {"schema": {"type": "integer"}}
    return {
        "description": "Too many requests from this user, tenant or address; retry after"
        " `Retry-After` seconds.",
        "headers": {
            "Retry-After": {"description": "Seconds until a retry can pass.", **integer},
            "RateLimit-Limit": {"description": "Requests the rate allows in a burst.", **integer},
            "RateLimit-Remaining": {"description": "Requests left now.", **integer},
            "RateLimit-Reset": {"description": "Seconds until the counter is full.", **integer},
        },
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"},
                "example": {
                    "error": {
                        "code": "rate_limited",
                        "message": "Too many requests; retry in 52 s.",
                    }
                },
            }
        },
    }


def document_rate_limits(
    app: FastAPI, rules: RateLimitRules, exempt_paths: frozenset[str] = EXEMPT_PATHS
) -> None:
    """Adds the 429 to the OpenAPI document of every operation a rate applies to, so clients
    generated from the document know the answer and its `Retry-After`."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        for path, item in document.get("paths", {}).items():
            if path in exempt_paths:
                continue
            for method, operation in item.items():
                if rules.rates_for(route_key(method, path)):
                    operation.setdefault("responses", {}).setdefault("429", rate_limited_doc())
        return document

    app.openapi = openapi  # type: ignore[method-assign]
