"""The request body cap: refused by Content-Length and while streaming, in the API error shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import FastAPI, File, Request, UploadFile

from security.requests import RequestSizeLimit, route_of

CAP = 1000


def capped_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    @app.post("/upload")
    async def upload(file: Annotated[UploadFile, File()]) -> dict[str, int]:
        return {"received": len(await file.read())}

    app.add_middleware(RequestSizeLimit, max_bytes=CAP)
    return app


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(capped_app()), base_url="http://api")


async def chunks(total: int, size: int = 100) -> AsyncIterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


async def test_a_body_within_the_cap_reaches_the_app() -> None:
    async with client() as api:
        response = await api.post("/echo", content=b"x" * CAP)
    assert response.status_code == 200
    assert response.json() == {"received": CAP}


async def test_a_declared_content_length_over_the_cap_is_refused_with_413() -> None:
    async with client() as api:
        response = await api.post("/echo", content=b"x" * (CAP + 1))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_a_chunked_body_over_the_cap_is_refused_while_it_streams() -> None:
    async with client() as api:
        response = await api.post("/echo", content=chunks(CAP * 5))
    assert response.status_code == 413
    assert response.json() == {
        "error": {
            "code": "request_too_large",
            "message": f"The request body is larger than {CAP} bytes.",
        }
    }


async def test_a_chunked_body_within_the_cap_reaches_the_app() -> None:
    async with client() as api:
        response = await api.post("/echo", content=chunks(CAP))
    assert response.status_code == 200
    assert response.json() == {"received": CAP}


async def test_a_chunked_upload_over_the_cap_is_a_413_not_a_parse_error() -> None:
    body = (
        b"--b\r\nContent-Disposition: form-data; name=file; filename=a.pdf\r\n\r\n"
        + b"x" * (CAP * 3)
        + b"\r\n--b--\r\n"
    )

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 256):
            yield body[start : start + 256]

    async with client() as api:
        response = await api.post(
            "/upload", content=stream(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/tickets", "POST /tickets"),
        ("POST", "/tickets/6f1c/cancel", "POST /tickets/{}/cancel"),
        ("GET", "/tickets/6f1c", "GET /tickets/{}"),
        ("GET", "/nowhere", None),
        ("DELETE", "/tickets", None),
    ],
)
def test_a_request_is_named_by_the_template_of_its_route(
    method: str, path: str, expected: str | None
) -> None:
    app = FastAPI()

    @app.post("/tickets")
    async def create() -> None: ...

    @app.post("/tickets/{ticket_id}/cancel")
    async def cancel(ticket_id: str) -> None: ...

    @app.get("/tickets/{ticket_id}")
    async def read(ticket_id: str) -> None: ...

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "app": app}
    assert route_of(scope) == expected
