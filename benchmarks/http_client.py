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
import collections
import json
import time
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
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # Asked here, as uvicorn asks it: once the message is complete the parser has reset
        # for the next one and answers False.
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Closed(ConnectionError):
    """The server closed the connection before it answered a byte."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self, max_idle_s: float) -> bool:
        """Not closed by the server as far as this loop has seen, nor idle for so long that
        the server may be closing it right now."""
        return not self.reader.at_eof() and time.monotonic() - self.idle_since < max_idle_s

    async def exchange(self, request: bytes) -> tuple[Response, bool]:
        """Sends one request and reads its response; also says whether the connection may be
        used again."""
        self.writer.write(request)
        message = _Message()
        parser = message.parser
        received = False
        while not message.complete:
            data = await self.reader.read(65536)
            if not data:
                if not received:
                    raise _Closed("the server closed the connection")
                raise ConnectionError("the server closed the connection mid-response")
            received = True
            parser.feed_data(data)
        self.idle_since = time.monotonic()
        response = Response(parser.get_status_code(), message.headers, b"".join(message.body))
        return response, message.keep_alive

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """Requests to one server (`base_url`, plain http), over at most `max_connections`
    keep-alive connections; a request waits for a free one beyond that."""

    max_idle_s = 4.0
    """uvicorn closes a keep-alive connection after 5 s without a request."""

    def __init__(self, base_url: str, *, max_connections: int = 100, timeout_s: float = 60) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"expected http://host:port, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port
        self.timeout_s = timeout_s
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode("latin-1")
        # Used in turn (oldest idle first): with several server processes on one port, the
        # requests spread over the connections `open` made, as the kernel spread those.
        self._idle: collections.deque[_Connection] = collections.deque()
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
            connection = self._reusable()
            try:
                async with asyncio.timeout(self.timeout_s):
                    if connection is None:
                        connection = await self._connect()
                        response, reusable = await connection.exchange(request)
                    else:
                        try:
                            response, reusable = await connection.exchange(request)
                        except _Closed:
                            # It closed as this request was sent: no answer began, so nothing
                            # was served. Once more on a new connection.
                            connection.close()
                            connection = await self._connect()
                            response, reusable = await connection.exchange(request)
            except BaseException:
                if connection is not None:
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

    async def open(self, connections: int) -> None:
        """Opens `connections` keep-alive connections ahead of the requests."""
        for _ in range(connections):
            self._idle.append(await self._connect())

    def _reusable(self) -> _Connection | None:
        """The idle connection that waited longest, if it is still usable; those that are not
        are closed."""
        while self._idle:
            connection = self._idle.popleft()
            if connection.usable(self.max_idle_s):
                return connection
            connection.close()
        return None

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
