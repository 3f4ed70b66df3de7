"""The request body cap: refused by Content-Length and while streaming, in the API error shape.
And the route a request is counted and replayed under: the template of the route it reaches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, FastAPI, File, Request, UploadFile

from security.requests import RequestSizeLimit, route_key, route_of
from tests.support import documented_routes
from ticketflow.bootstrap import commands_api, queries_api
from ticketflow.settings import Settings

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


def test_routes_of_included_and_mounted_routers_are_named_by_their_full_template() -> None:
    inner = APIRouter(prefix="/keys")

    @inner.get("/{key_id}")
    async def key(key_id: str) -> None: ...

    accounts = APIRouter(prefix="/accounts")

    @accounts.post("/{account_id}/close")
    async def close(account_id: str) -> None: ...

    accounts.include_router(inner)
    admin = FastAPI()

    @admin.get("/reports/{report_id}")
    async def report(report_id: str) -> None: ...

    admin.include_router(accounts)
    app = FastAPI()
    app.include_router(accounts, prefix="/v1")
    app.mount("/admin", admin)

    def named(method: str, path: str) -> str | None:
        return route_of(
            {"type": "http", "method": method, "path": path, "root_path": "", "app": app}
        )

    assert named("POST", "/v1/accounts/a1/close") == "POST /v1/accounts/{}/close"
    assert named("GET", "/v1/accounts/keys/k1") == "GET /v1/accounts/keys/{}"
    assert named("GET", "/admin/reports/r1") == "GET /admin/reports/{}"
    assert named("GET", "/admin/accounts/keys/k1") == "GET /admin/accounts/keys/{}"
    assert named("GET", "/v1/accounts/a1/close") is None
    assert named("GET", "/admin/nowhere") is None


@pytest.mark.parametrize(
    ("api", "known"),
    [("commands", ("POST", "/auth/login")), ("queries", ("GET", "/tickets/{ticket_id}/report"))],
)
def test_every_route_of_both_apis_is_named_by_its_own_template(
    api: str, known: tuple[str, str]
) -> None:
    settings = Settings()
    app = commands_api(settings) if api == "commands" else queries_api(settings)
    routes = documented_routes(app)
    assert known in {(method, template) for method, template, _ in routes}

    named = {
        (method, template): route_of(
            {"type": "http", "method": method, "path": path, "root_path": "", "app": app}
        )
        for method, template, path in routes
    }

    assert named == {
        (method, template): route_key(method, template) for method, template, _ in routes
    }
