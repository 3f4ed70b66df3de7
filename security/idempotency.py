"""Idempotent retries for POST routes: the first answer to a request carrying an
`Idempotency-Key` is kept in Redis for 24 hours, and a retry gets that same answer back, marked
`Idempotent-Replayed: true` (and with `"created": false` where the answer says whether it created
something: the retry did not).

Keys belong to a caller (tenant and subject). The same key sent with a different request answers
422 `idempotency_key_reused`; sent again while the first request is still running, it answers
409 `idempotency_key_in_progress`. A request is recognised by a fingerprint of its method, path
and body; a multipart body is fingerprinted by its parsed fields, so a retry that encodes the same
form with another boundary is the same request. See docs/adr/0011-limits.md.

A request asking to wait for its outcome (`Prefer: wait=N`, RFC 7240) whose key holds an
accepted (202) answer runs again instead of getting that answer back: the work it accepted may
have finished since, and the write model answers a repeated create with the same ticket. The
first answer stays the one kept.

A running request holds its key by a short lease (5 s) that it renews while it runs, so a process
that dies mid-request frees the key within seconds; the retry then runs again, and the write
model (which derives a created ticket's id from the caller and the key) answers with the ticket
the first request created.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from security.requests import (
    Caller,
    Identify,
    RedisProvider,
    RequestTooLarge,
    caller_of,
    parse_route,
    route_of,
    send_error,
)

logger = logging.getLogger(__name__)

IDEMPOTENT_ROUTES = (
    "POST /tickets",
    "POST /tickets/{ticket_id}/cancel",
    "POST /tickets/{ticket_id}/questions",
)
HEADER = "idempotency-key"
MAX_KEY_LENGTH = 200
DAY_S = 24 * 3600

# Answers worth replaying: those that tell the outcome of the request itself. A 401 or a 429
# says nothing about the request, and a 5xx may succeed when retried.
_NOT_KEPT = frozenset({401, 429})
# Headers that describe one delivery rather than the answer.
_PER_DELIVERY = frozenset({b"date", b"server", b"set-cookie", b"connection", b"keep-alive"})
_CHUNK = 64 * 1024

# Claims a key for a request unless it already holds a claim or an answer, which it returns.
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# Extends our own claim's lease; 0 when the key no longer holds our claim.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# Replaces our own claim by the answer (or deletes it when there is no answer to keep); a claim
# that expired and was taken by another request is left alone.
_SETTLE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


@dataclass(frozen=True)
class KeptResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class _Scripts:
    client: Redis
    claim: AsyncScript
    renew: AsyncScript
    settle: AsyncScript


class IdempotencyStore:
    """Claims and kept answers in Redis, under `<prefix><tenant>:<hash of subject and key>`:
    a key is one caller's (one user of one tenant), never shared with another user.

    A claim lives `lease_s` unless its holder renews it (`renew`); an answer, `ttl_s`."""

    def __init__(
        self,
        redis: RedisProvider,
        *,
        prefix: str = "tf:idem:",
        ttl_s: float = DAY_S,
        lease_s: float = 5.0,
    ) -> None:
        self._redis = redis
        self.prefix = prefix
        self.ttl_ms = math.ceil(ttl_s * 1000)
        self.lease_ms = math.ceil(lease_s * 1000)
        self._scripts: _Scripts | None = None

    def key_for(self, caller: Caller, idempotency_key: str) -> str:
        subject, tenant = caller
        # A key is printable ASCII, so the last newline splits the pair: no two callers share
        # an entry.
        digest = hashlib.sha256(f"{subject}\n{idempotency_key}".encode()).hexdigest()
        return f"{self.prefix}{tenant}:{digest}"

    def _bound(self) -> _Scripts:
        client = self._redis()
        if client is None:
            raise ConnectionError("Redis is not connected")
        if self._scripts is None or self._scripts.client is not client:
            self._scripts = _Scripts(
                client,
                client.register_script(_CLAIM),
                client.register_script(_RENEW),
                client.register_script(_SETTLE),
            )
        return self._scripts

    async def claim(self, key: str, claim: bytes) -> dict[str, Any] | None:
        """None when the claim is ours (for `lease_s`); else what the key already holds."""
        current = await self._bound().claim(keys=[key], args=[claim, self.lease_ms])
        return None if current is None else dict(json.loads(current))

    async def renew(self, key: str, claim: bytes) -> bool:
        """Extend our claim by `lease_s`; False when the key no longer holds it."""
        return bool(await self._bound().renew(keys=[key], args=[claim, self.lease_ms]))

    async def settle(self, key: str, claim: bytes, entry: bytes | None) -> None:
        await self._bound().settle(keys=[key], args=[claim, entry or b"", self.ttl_ms])


class IdempotencyMiddleware:
    """Keeps and replays the answers to POST requests with an `Idempotency-Key` on `routes`
    (route keys such as `POST /tickets/{ticket_id}/cancel`).

    Sits inside the request size cap, which bounds the body it buffers. When Redis cannot be
    reached, requests go through as if they had no key, with a warning logged (ticket creation
    stays idempotent in the write model, which derives the ticket id from the key)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        redis: RedisProvider,
        identify: Identify,
        routes: Iterable[str] = IDEMPOTENT_ROUTES,
        max_body_bytes: int,
        max_response_bytes: int = 1024 * 1024,
        ttl_s: float = DAY_S,
        lease_s: float = 5.0,
        prefix: str = "tf:idem:",
        timeout_s: float = 0.5,
    ) -> None:
        self.app = app
        self.identify = identify
        self.routes = frozenset(parse_route(route) for route in routes)
        self.max_body_bytes = max_body_bytes
        self.max_response_bytes = max_response_bytes
        self.timeout_s = timeout_s
        self.store = IdempotencyStore(redis, prefix=prefix, ttl_s=ttl_s, lease_s=lease_s)
        self.renew_every_s = lease_s / 3
        self._warned_at = -math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = Headers(scope=scope).get(HEADER) if scope["type"] == "http" else None
        if key is None or route_of(scope) not in self.routes:
            await self.app(scope, receive, send)
        elif not _valid(key):
            await send_error(
                send,
                422,
                "invalid_idempotency_key",
                f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters.",
            )
        else:
            await self._idempotent(scope, receive, send, key)

    async def _idempotent(self, scope: Scope, receive: Receive, send: Send, key: str) -> None:
        caller = await caller_of(scope, self.identify)
        if caller is None:  # the app answers 401, which is never kept
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive, self.max_body_bytes)
        except RequestTooLarge:
            await send_error(
                send,
                413,
                "request_too_large",
                f"The request body is larger than {self.max_body_bytes} bytes.",
            )
            return
        if body is None:
            return  # the client went away before sending its whole request
        replay_body = _replaying(body, receive)
        fingerprint = await request_fingerprint(scope, body)
        redis_key = self.store.key_for(caller, key)
        claim = json.dumps(
            {"state": "in_progress", "fingerprint": fingerprint, "owner": secrets.token_hex(16)}
        ).encode()
        try:
            async with asyncio.timeout(self.timeout_s):
                current = await self.store.claim(redis_key, claim)
        except (RedisError, OSError, TimeoutError) as error:
            self._warn("Idempotency-Key not honoured, Redis unavailable", error)
            await self.app(scope, replay_body, send)
            return
        if current is not None:
            if _accepted(current, fingerprint) and _prefers_wait(scope):
                await self.app(scope, replay_body, send)
                return
            await self._answer_from(current, fingerprint, send)
            return
        await self._run_and_keep(scope, replay_body, send, redis_key, claim, fingerprint)

    async def _answer_from(self, current: dict[str, Any], fingerprint: str, send: Send) -> None:
        if current.get("fingerprint") != fingerprint:
            await send_error(
                send,
                422,
                "idempotency_key_reused",
                "This Idempotency-Key was already used for a different request.",
            )
        elif current.get("state") != "done":
            await send_error(
                send,
                409,
                "idempotency_key_in_progress",
                "A request with this Idempotency-Key is still being processed; retry shortly.",
                [("retry-after", "1")],
            )
        else:
            kept = _as_replay(_decode(current))
            headers = [*kept.headers, (b"idempotent-replayed", b"true")]
            await send({"type": "http.response.start", "status": kept.status, "headers": headers})
            await send({"type": "http.response.body", "body": kept.body})

    async def _run_and_keep(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        redis_key: str,
        claim: bytes,
        fingerprint: str,
    ) -> None:
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        complete = False

        async def send_and_record(message: Message) -> None:
            nonlocal status, headers, size, complete
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(bytes(n), bytes(v)) for n, v in message.get("headers", ())]
            elif message["type"] == "http.response.body":
                chunk = bytes(message.get("body", b""))
                size += len(chunk)
                if size <= self.max_response_bytes:
                    chunks.append(chunk)
                complete = not message.get("more_body", False)
            await send(message)

        entry: bytes | None = None
        lease = asyncio.create_task(self._hold(redis_key, claim))
        try:
            await self.app(scope, receive, send_and_record)
            keep = (200 <= status < 300 or 400 <= status < 500) and status not in _NOT_KEPT
            if keep and complete and size <= self.max_response_bytes:
                entry = _encode(fingerprint, KeptResponse(status, headers, b"".join(chunks)))
        finally:
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.store.settle(redis_key, claim, entry)
            except (RedisError, OSError, TimeoutError) as error:
                self._warn("an idempotent answer was not kept, Redis unavailable", error)

    async def _hold(self, redis_key: str, claim: bytes) -> None:
        """Renews the claim's lease while the request runs (cancelled when it ends). A renewal
        that fails is tried again at the next turn; a claim that is gone is not taken back."""
        while True:
            await asyncio.sleep(self.renew_every_s)
            try:
                async with asyncio.timeout(self.timeout_s):
                    if not await self.store.renew(redis_key, claim):
                        return
            except (RedisError, OSError, TimeoutError) as error:
                self._warn("an Idempotency-Key lease was not renewed, Redis unavailable", error)

    def _warn(self, message: str, error: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            logger.warning("%s: %s", message, error)


def _accepted(current: dict[str, Any], fingerprint: str) -> bool:
    """Whether `current` is this request's kept answer, and a 202 Accepted."""
    return (
        current.get("state") == "done"
        and current.get("fingerprint") == fingerprint
        and current.get("status") == 202
    )


def _prefers_wait(scope: Scope) -> bool:
    """Whether the request carries a `wait` preference (`Prefer: wait=N`)."""
    for value in Headers(scope=scope).getlist("prefer"):
        for preference in value.split(","):
            token = preference.split(";", 1)[0].partition("=")[0]
            if token.strip().lower() == "wait":
                return True
    return False


def _valid(key: str) -> bool:
    return 1 <= len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()


def _encode(fingerprint: str, response: KeptResponse) -> bytes:
    kept_headers = [
        [name.decode("latin-1"), value.decode("latin-1")]
        for name, value in response.headers
        if name.lower() not in _PER_DELIVERY
    ]
    return json.dumps(
        {
            "state": "done",
            "fingerprint": fingerprint,
            "status": response.status,
            "headers": kept_headers,
            "body": base64.b64encode(response.body).decode(),
        }
    ).encode()


def _decode(entry: dict[str, Any]) -> KeptResponse:
    return KeptResponse(
        status=int(entry["status"]),
        headers=[
            (name.encode("latin-1"), value.encode("latin-1")) for name, value in entry["headers"]
        ],
        body=base64.b64decode(entry["body"]),
    )


def _as_replay(kept: KeptResponse) -> KeptResponse:
    """The kept answer as a retry receives it. An accepted answer that says it `created`
    something says so only the first time: a retry matched what the first request created, so
    it reads `"created": false`, as when the write model itself finds the key's ticket."""
    if not 200 <= kept.status < 300:
        return kept
    headers = dict(kept.headers)
    if not headers.get(b"content-type", b"").startswith(b"application/json"):
        return kept
    try:
        body = json.loads(kept.body)
    except ValueError:
        return kept
    if not isinstance(body, dict) or body.get("created") is not True:
        return kept
    replayed = json.dumps(
        {**body, "created": False}, separators=(",", ":"), ensure_ascii=False
    ).encode()
    length = str(len(replayed)).encode("latin-1")
    return KeptResponse(
        status=kept.status,
        headers=[
            (name, length if name == b"content-length" else value) for name, value in kept.headers
        ],
        body=replayed,
    )


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None if the client disconnects first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] != "http.request":
            continue
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the buffered body, then waits for the disconnect."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def request_fingerprint(scope: Scope, body: bytes) -> str:
    """A hash of what the request asks for: method, path, query, and the body's content. A
    multipart form counts by its fields, in a canonical order (by name, keeping the order of
    fields sharing a name, which pairs `files` with `roles`), so its boundary does not count."""
    digest = hashlib.sha256()

    def feed(*parts: str | bytes) -> None:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)

    feed(scope["method"], scope["path"], bytes(scope.get("query_string", b"")))
    headers = Headers(scope=scope)
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    fields = await _form_fields(headers, body) if media_type == "multipart/form-data" else None
    if fields is None:
        feed("body", media_type, body)
    else:
        feed("multipart")
        for field in fields:
            feed(*field)
    return digest.hexdigest()


async def _form_fields(headers: Headers, body: bytes) -> list[tuple[str, ...]] | None:
    """The form's fields as (kind, name, ...) tuples in canonical order; None if it does not
    parse (the app will refuse it, and the raw body stands for it)."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1000, max_fields=1000).parse()
    except MultiPartException:
        return None
    try:
        fields: list[tuple[str, ...]] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                content = hashlib.sha256()
                while chunk := await value.read(_CHUNK):
                    content.update(chunk)
                media_type = value.content_type or ""
                fields.append(("file", name, value.filename or "", media_type, content.hexdigest()))
            else:
                fields.append(("field", name, value))
        return sorted(fields, key=lambda field: field[1])
    finally:
        await form.close()
