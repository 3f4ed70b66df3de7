"""Hostile form fields sent to the command API, against the real servers: deeply nested or
oversized JSON in `options` and NUL characters anywhere are a clear 422, and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from commands.api import OPTIONS_MAX_DEPTH
from streams.contract.audit import SigningKey
from tests.conftest import Servers
from tests.integration.conftest import settings_for
from tests.integration.test_command_api import PDF, bearer, rows_for_tenant
from tests.support import random_tenant
from ticketflow.bootstrap import commands_api, queries_api
from ticketflow.settings import Settings

DOCS_ROUTES = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


@pytest.fixture(scope="module")
def api_settings(servers: Servers) -> Settings:
    return settings_for(servers, max_upload_bytes=64 * 1024, rate_limits_enabled=False)


@pytest.fixture(scope="module")
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(commands_api(api_settings)) as client:
        yield client


def submit(
    client: TestClient,
    settings: Settings,
    tenant: str,
    data: dict[str, str | list[str]],
    filename: str = "paper.pdf",
) -> tuple[int, dict[str, str]]:
    response = client.post(
        "/tickets",
        files={"file": (filename, PDF, "application/pdf")},
        data=data,
        headers=bearer(settings, tenant),
    )
    return response.status_code, response.json().get("error", {})


@pytest.mark.parametrize(
    "options",
    [
        '{"":' * 3000 + "1" + "}" * 3000,
        '{"question": ' + "[" * 8000 + "]" * 8000 + "}",
        "[" * 100_000,  # unbalanced, and past the size limit as well
        '{"a":' * (OPTIONS_MAX_DEPTH + 1) + "1" + "}" * (OPTIONS_MAX_DEPTH + 1),
    ],
    ids=["object 3000 deep", "array 8000 deep", "100000 brackets", "one level too deep"],
)
def test_deeply_nested_options_are_a_clear_error(
    client: TestClient, api_settings: Settings, servers: Servers, options: str
) -> None:
    tenant = random_tenant()

    status, error = submit(
        client, api_settings, tenant, {"pipeline": "document-qa", "options": options}
    )

    assert (status, error["code"]) in {(422, "invalid_options"), (413, "options_too_large")}
    if status == 422:
        assert error["message"] == f"`options` is nested more than {OPTIONS_MAX_DEPTH} levels deep."
    assert rows_for_tenant(servers, tenant) == (0, 0)


def test_brackets_inside_strings_do_not_count_as_nesting(
    client: TestClient, api_settings: Settings
) -> None:
    question = "Which of these holds? " + "[{" * 100
    options = json.dumps({"question": question})

    status, error = submit(
        client, api_settings, random_tenant(), {"pipeline": "document-qa", "options": options}
    )

    assert status == 202, error


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('{"question": "What is the main\\u0000 result?"}', "must not contain NUL characters"),
        ('{"question\\u0000": "What is the main result?"}', "must not contain NUL characters"),
        ('{"question": "What is the main\x00 result?"}', "Invalid control character"),
        ('{"question": "What is the main result?", "count": NaN}', "NaN is not a JSON number"),
        ('{"question": "What is the main result?", "count": 1e999}', "1e999 is out of range"),
        ('{"question": "Why?", "count": ' + "9" * 5000 + "}", "more than 100 digits"),
    ],
    ids=["escaped NUL", "NUL in a key", "raw NUL", "NaN", "infinite", "5000 digits"],
)
def test_options_with_nul_or_numbers_json_cannot_hold_are_refused(
    client: TestClient, api_settings: Settings, servers: Servers, options: str, message: str
) -> None:
    tenant = random_tenant()

    status, error = submit(
        client, api_settings, tenant, {"pipeline": "document-qa", "options": options}
    )

    assert (status, error["code"]) == (422, "invalid_options")
    assert message in error["message"]
    assert rows_for_tenant(servers, tenant) == (0, 0)


def test_a_nul_in_the_pipeline_name_is_refused(
    client: TestClient, api_settings: Settings, servers: Servers
) -> None:
    tenant = random_tenant()

    status, error = submit(client, api_settings, tenant, {"pipeline": "document-\x00review"})

    assert (status, error["code"]) == (422, "invalid_text")
    assert error["message"] == "`pipeline` must not contain NUL characters (U+0000)."
    assert rows_for_tenant(servers, tenant) == (0, 0)


def test_a_nul_in_a_role_is_refused(
    client: TestClient, api_settings: Settings, servers: Servers
) -> None:
    tenant = random_tenant()
    response = client.post(
        "/tickets",
        files=[
            ("files", ("cv.pdf", PDF, "application/pdf")),
            ("files", ("job.pdf", PDF, "application/pdf")),
        ],
        data={"pipeline": "resume-screening", "roles": ["resume", "vac\x00ancy"]},
        headers=bearer(api_settings, tenant),
    )

    assert response.status_code == 422
    assert response.json()["error"]["message"] == (
        "`roles` must not contain NUL characters (U+0000)."
    )
    assert rows_for_tenant(servers, tenant) == (0, 0)


def test_a_nul_in_a_file_name_is_refused(
    client: TestClient, api_settings: Settings, servers: Servers
) -> None:
    # HTTP clients percent-encode a NUL in a file name; a hostile one sends it raw.
    tenant = random_tenant()
    boundary = "hostile-boundary"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="pa\x00per.pdf"\r\n'
            "Content-Type: application/pdf\r\n\r\n"
        ).encode()
        + PDF
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        **bearer(api_settings, tenant),
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }

    response = client.post("/tickets", content=body, headers=headers)

    assert response.status_code == 422
    assert response.json()["error"]["message"] == (
        "`filename` must not contain NUL characters (U+0000)."
    )
    assert rows_for_tenant(servers, tenant) == (0, 0)


@pytest.mark.parametrize("env", ["production", "development"])
def test_the_api_documents_are_served_outside_production_only(servers: Servers, env: str) -> None:
    settings = settings_for(
        servers,
        env=env,
        jwt_secret="a-production-secret-of-32-chars!!",
        audit_signing_key=SigningKey.generate().pem().decode(),
    )
    # Not started: the documents need no connection, and nothing is opened.
    for app in (commands_api(settings), queries_api(settings)):
        client = TestClient(app)
        codes = {path: client.get(path).status_code for path in DOCS_ROUTES}
        expected = 404 if env == "production" else 200
        assert codes == dict.fromkeys(DOCS_ROUTES, expected), app.title
