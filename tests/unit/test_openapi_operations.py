"""Both OpenAPI documents name every operation for generated clients: a tag per resource (the
module a client generator puts it in) and an explicit, unique, camelCase operationId (the
function it becomes), instead of names made from the path (`get_report_tickets__ticket_id__…`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI

from read_api.app import create_app as queries_app
from ticketflow.bootstrap import command_app as commands_app

CAMEL_CASE = re.compile(r"^[a-z][a-z0-9]*(?:[A-Z][a-z0-9]*)*$")


@contextlib.asynccontextmanager
async def no_resources() -> AsyncIterator[Any]:
    yield None  # never started: the documents are built without serving a request


def apps() -> dict[str, FastAPI]:
    async def mint(*_: object) -> Any:
        return None

    return {
        "commands": commands_app(no_resources, mint),
        "queries": queries_app(no_resources),
    }


def operations(app: FastAPI) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{method.upper()} {path}", operation)
        for path, item in app.openapi()["paths"].items()
        for method, operation in item.items()
    ]


@pytest.mark.parametrize("api", ["commands", "queries"])
def test_every_operation_has_one_tag_and_a_camel_case_operation_id(api: str) -> None:
    found = operations(apps()[api])
    assert len(found) > 5
    untagged = [route for route, operation in found if len(operation.get("tags", [])) != 1]
    assert untagged == []
    badly_named = [
        (route, operation.get("operationId"))
        for route, operation in found
        if not CAMEL_CASE.match(operation.get("operationId", ""))
    ]
    assert badly_named == []


def test_operation_ids_are_unique_across_both_apis_except_shared_routes() -> None:
    # The health routes are the same operations in both APIs; everything else is named once.
    seen: dict[str, str] = {}
    clashes = []
    for api, app in apps().items():
        for route, operation in operations(app):
            key = operation["operationId"]
            if key in seen and not (seen[key] == route and route.split()[1].startswith("/health")):
                clashes.append((api, route, key, seen[key]))
            seen.setdefault(key, route)
    assert clashes == []


def test_ticket_routes_read_well_in_a_generated_client() -> None:
    named = {route: op["operationId"] for app in apps().values() for route, op in operations(app)}
    assert named["POST /tickets"] == "createTicket"
    assert named["GET /tickets"] == "listTickets"
    assert named["GET /tickets/{ticket_id}/report"] == "getTicketReport"
