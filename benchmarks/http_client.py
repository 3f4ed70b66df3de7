"""A lean HTTP/1.1 client for load generation: keep-alive connections over asyncio streams,
responses parsed by httptools (the parser uvicorn serves with).

The benchmark's client shares the machine with the servers it measures. httpx spends several
milliseconds of CPU a request in its connection pool and stream layers, which on a small machine
is CPU taken from the servers; this client spends a small fraction of that, so the rate a
benchmark reaches says more about the servers. It speaks only what the benchmarks send: one
request at a time per connection, bodies with `Content-Length`, no redirects, no TLS.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httptools


@dataclass(frozen=True)
class Response:
    status_code: int
    headers: Mapping[str, str]  # names in lower case
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Message:
    """httptools' callbacks for one response."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> tuple[Response, bool]:
        """Sends one request and reads its response; also says whether the connection may be
        used again."""
        self.writer.write(request)
        message = _Message()
        parser = httptools.HttpResponseParser(message)
        while not message.complete:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the connection mid-response")
            parser.feed_data(data)
        response = Response(parser.get_status_code(), message.headers, b"".join(message.body))
        return response, parser.should_keep_alive()

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """Requests to one server (`base_url`, plain http), over at most `max_connections`
    keep-alive connections; a request waits for a free one beyond that."""

    def __init__(self, base_url: str, *, max_connections: int = 100, timeout_s: float = 60) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"expected http://host:port, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port
        self.timeout_s = timeout_s
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode("latin-1")
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> Response:
        target = f"{path}?{urlencode(params)}" if params else path
        head = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), self._host_header]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body or method not in ("GET", "HEAD"):
            head.append(f"Content-Length: {len(body)}\r\n".encode("latin-1"))
        request = b"".join(head) + b"\r\n" + body
        async with self._slots:
            connection = self._idle.pop() if self._idle else await self._connect()
            try:
                async with asyncio.timeout(self.timeout_s):
                    response, reusable = await connection.exchange(request)
            except BaseException:
                connection.close()
                raise
            if reusable:
                self._idle.append(connection)
            else:
                connection.close()
            return response

    async def get(self, path: str, **options: Any) -> Response:
        return await self.request("GET", path, **options)

    async def post(self, path: str, **options: Any) -> Response:
        return await self.request("POST", path, **options)

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Connection(reader, writer)

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def multipart_form(
    fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes, str]], boundary: str
) -> tuple[bytes, str]:
    """A `multipart/form-data` body and its content type: text fields, then files given as
    field name → (file name, content, content type)."""
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, (filename, content, content_type) in files.items():
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
            ).encode()
            + content
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
