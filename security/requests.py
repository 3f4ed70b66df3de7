"""Request guards shared by both APIs: a cap on body size (413 before the body is buffered), and
what the other guards need to know about a request: its route, its caller, its client address.

Every guard is plain ASGI middleware, so it sees a request before routing and parsing, and
answers in the APIs' error shape `{"error": {"code": ..., "message": ...}}`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import fastapi.routing
from redis.asyncio import Redis
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

Caller = tuple[str, str]
"""Who sent a request: (subject, tenant)."""

Identify = Callable[[str], Awaitable[Caller | None]]
"""Turns a bearer token into its caller, or None when the token is not valid."""

RedisProvider = Callable[[], Redis | None]
"""The Redis client the process opened at start-up (None before start-up or after shutdown)."""

# The identified caller is kept in the scope so that guards share one token verification.
_CALLER_SCOPE_KEY = "ticketflow.caller"
_PARAMETER = re.compile(r"\{[^}]*\}")


def route_key(method: str, path_template: str) -> str:
    """`POST /tickets/{ticket_id}/cancel` → `POST /tickets/{}/cancel`: parameter names and
    converters do not matter when a configured rule is compared with an app's route."""
    return f"{method.upper()} {_PARAMETER.sub('{}', path_template.strip())}"


def parse_route(text: str) -> str:
    """The route key of a configured route such as `POST /tickets/{ticket_id}/cancel`."""
    method, _, path = text.strip().partition(" ")
    if not method.isalpha() or not path.strip().startswith("/"):
        raise ValueError(f"route {text!r} is not like 'POST /tickets/{{ticket_id}}/cancel'")
    return route_key(method, path)


def route_of(scope: Scope) -> str | None:
    """The route key (`METHOD /template`) of the route the app will dispatch this request to,
    or None when no route matches (the app answers 404 or 405).

    The route is found as the router finds it: each route's own `matches`, in order, the first
    full match winning, and into the routes of mounted apps. Its template is the matched route's
    own, with every prefix it was included or mounted under."""
    app = scope.get("app")
    template = _match(_dispatched(getattr(app, "routes", ())), scope, "")
    return None if template is None else route_key(scope["method"], template)


def _dispatched(routes: Sequence[Any]) -> Sequence[Any]:
    """The routes a router tries, in its order, each with its full template.

    Since FastAPI 0.165 `include_router` adds one route that stands for the included router and
    tells neither which of its routes matched nor their templates; FastAPI's own route contexts
    (what its OpenAPI document is built from) open it into the routes it dispatches to."""
    expand = getattr(fastapi.routing, "iter_route_contexts", None)
    return routes if expand is None else list(expand(routes))


def _match(routes: Iterable[Any], scope: Scope, prefix: str) -> str | None:
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is not Match.FULL:
            continue
        inner = getattr(route, "routes", None)
        if inner:  # a mounted app: its routes see the path below the mount's
            path = str(getattr(route, "path", ""))
            return _match(_dispatched(inner), {**scope, **child_scope}, prefix + path)
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if not isinstance(template, str) or not template.startswith("/"):
            _warn_unnamed(route)
            return None
        return prefix + template
    return None


_unnamed_warned: set[str] = set()


def _warn_unnamed(route: Any) -> None:
    """Said once per kind of route: its requests are counted under the default rule."""
    kind = type(route).__qualname__
    if kind not in _unnamed_warned:
        _unnamed_warned.add(kind)
        logger.error(
            "a %s route matched without a path template; its requests get the default "
            "rate limits and no idempotent replays",
            kind,
        )


def bearer_token(scope: Scope) -> str | None:
    authorization = Headers(scope=scope).get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def caller_of(scope: Scope, identify: Identify) -> Caller | None:
    """The caller named by the request's bearer token, verified once per request."""
    if _CALLER_SCOPE_KEY in scope:
        cached: Caller | None = scope[_CALLER_SCOPE_KEY]
        return cached
    token = bearer_token(scope)
    caller = None
    if token is not None:
        try:
            caller = await identify(token)
        except Exception as error:
            # Counted as anonymous; the app authenticates again and answers for itself
            # (a 503 when revocations cannot be read, say).
            logger.warning("caller not identified: %s", error)
    scope[_CALLER_SCOPE_KEY] = caller
    return caller


def client_ip(scope: Scope) -> str:
    """The peer address as the server reports it (behind a proxy, run uvicorn with
    `--proxy-headers --forwarded-allow-ips` so that this is the real client)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


async def send_error(
    send: Send, status: int, code: str, message: str, headers: Iterable[tuple[str, str]] = ()
) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestTooLarge(Exception):
    """Raised from `receive` once a body has gone past its cap."""


class RequestSizeLimit:
    """Refuses a request body over `max_bytes` with 413 `request_too_large`: at once when its
    Content-Length says so, and while it streams (chunked uploads) once the bytes received pass
    the cap. Whatever the app answered after the cap was passed is replaced by the 413."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return

        received = 0
        exceeded = False
        started = False

        async def receive_bounded() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise RequestTooLarge(f"request body over {self.max_bytes} bytes")
            return message

        async def send_unless_exceeded(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a cut-off body (often a 400): the 413 replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_bounded, send_unless_exceeded)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send_error(
            send,
            413,
            "request_too_large",
            f"The request body is larger than {self.max_bytes} bytes.",
            [("connection", "close")],
        )
