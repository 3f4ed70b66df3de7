"""The benchmarks' HTTP client against a plain asyncio server: keep-alive connections are used
again, and one the server closes is not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from benchmarks.http_client import HttpClient, multipart_form


class Server:
    """Answers each request with its method, target and body length; with `close`, every
    answer says `Connection: close` and ends its connection."""

    def __init__(self, close: bool = False, idle_s: float | None = None) -> None:
        self.connections = 0
        self.served: list[int] = []  # requests answered, per connection
        self.close = close
        self.idle_s = idle_s

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.served.append(0)
        index = len(self.served) - 1
        try:
            while head := await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_s):
                lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                answer = f"{lines[0].split(' ')[0]} {lines[0].split(' ')[1]} {len(body)}".encode()
                close = b"Connection: close\r\n" if self.close else b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    + close
                    + f"Content-Length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
                self.served[index] += 1
                if self.close:
                    break
        except (asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        listener.close()
        await listener.wait_closed()


async def test_requests_one_after_another_share_one_keep_alive_connection() -> None:
    server = Server()
    async with serving(server) as url, HttpClient(url) as client:
        first = await client.get("/a", params={"min_position": 3})
        body, content_type = multipart_form(
            {"pipeline": "x"}, {"file": ("a.pdf", b"%PDF", "application/pdf")}, "b"
        )
        second = await client.post("/b", headers={"Content-Type": content_type}, body=body)
        third = await client.get("/c")
    assert (first.status_code, first.text) == (200, "GET /a?min_position=3 0")
    assert second.text == f"POST /b {len(body)}"
    assert third.text == "GET /c 0"
    assert server.connections == 1


async def test_a_connection_the_server_closes_is_not_used_again() -> None:
    server = Server(close=True)
    async with serving(server) as url, HttpClient(url) as client:
        for path in ("/a", "/b", "/c"):
            assert (await client.get(path)).text == f"GET {path} 0"
    assert server.connections == 3


async def test_concurrent_requests_open_no_more_connections_than_they_need() -> None:
    server = Server()
    async with serving(server) as url, HttpClient(url, max_connections=4) as client:
        for _ in range(5):
            answers = await asyncio.gather(*(client.get(f"/{n}") for n in range(4)))
            assert [answer.text for answer in answers] == [f"GET /{n} 0" for n in range(4)]
    assert server.connections <= 4


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    server = Server(idle_s=0.05)
    async with serving(server) as url, HttpClient(url) as client:
        assert (await client.get("/a")).text == "GET /a 0"
        await asyncio.sleep(0.2)  # the server hangs up meanwhile
        assert (await client.get("/b")).text == "GET /b 0"
        client.max_idle_s = 0.0  # what has been idle that long is not used again
        assert (await client.get("/c")).text == "GET /c 0"
    assert server.connections == 3


async def test_connections_opened_ahead_take_requests_in_turn() -> None:
    server = Server()
    async with serving(server) as url, HttpClient(url) as client:
        await client.open(3)
        for n in range(6):
            assert (await client.get(f"/{n}")).text == f"GET /{n} 0"
    assert server.served == [2, 2, 2]
