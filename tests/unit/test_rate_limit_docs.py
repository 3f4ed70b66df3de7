"""Both OpenAPI documents name the 429 a rate limit answers, on every operation a rate applies
to, so clients generated from them know the answer and its `Retry-After`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ticketflow.bootstrap import commands_api, queries_api
from ticketflow.settings import Settings

BUILDERS = {"commands": commands_api, "queries": queries_api}
HEALTH = {"GET /health", "GET /health/live"}


def responses_429(api: str, **settings: Any) -> dict[str, dict[str, Any] | None]:
    document = BUILDERS[api](Settings(**settings)).openapi()
    assert "ErrorResponse" in document["components"]["schemas"]
    return {
        f"{method.upper()} {path}": operation["responses"].get("429")
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


@pytest.mark.parametrize("api", sorted(BUILDERS))
def test_every_limited_operation_documents_its_429(api: str, tmp_path: Path) -> None:
    found = responses_429(api, data_dir=tmp_path)
    assert {route for route, doc in found.items() if doc is None} == HEALTH
    ticket_routes = [route for route in found if route.split(" ")[1].startswith("/tickets")]
    assert ticket_routes
    for route in ticket_routes:
        doc = found[route]
        assert doc is not None
        assert "Retry-After" in doc["headers"]
        content = doc["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        assert content["example"]["error"]["code"] == "rate_limited"


def test_no_429_is_documented_where_no_rate_applies(tmp_path: Path) -> None:
    off = {"user": None, "tenant": None, "anonymous": None}
    found = responses_429("commands", data_dir=tmp_path, rate_limits={"POST /tickets": off})
    assert found["POST /tickets"] is None
    assert found["POST /tickets/{ticket_id}/cancel"] is not None  # the default rule's rates
    assert all(
        doc is None
        for doc in responses_429("queries", data_dir=tmp_path, rate_limits_enabled=False).values()
    )
