"""The command HTTP API against the real servers: accepted, refused, and nothing half-stored."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from tests.conftest import Servers
from tests.integration.conftest import settings_for
from tests.support import random_tenant, sample
from ticketflow.bootstrap import commands_api, jwt_codec
from ticketflow.settings import Settings

PDF = sample("research-paper.pdf").read_bytes()
DOCX = sample("coursework-ru.docx").read_bytes()


@pytest.fixture(scope="module")
def api_settings(servers: Servers) -> Settings:
    return settings_for(servers, max_upload_bytes=64 * 1024)


@pytest.fixture(scope="module")
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(commands_api(api_settings)) as client:
        yield client


def bearer(settings: Settings, tenant: str, *roles: str) -> dict[str, str]:
    token = jwt_codec(settings).mint(subject="alice", tenant=tenant, roles=roles or ("user",))
    return {"Authorization": f"Bearer {token}"}


def rows_for_tenant(servers: Servers, tenant: str) -> tuple[int, int]:
    with psycopg.connect(servers.database_url) as conn:
        blobs = conn.execute("SELECT count(*) FROM blobs WHERE tenant = %s", (tenant,)).fetchone()
        events = conn.execute(
            "SELECT count(*) FROM ticketflow_events WHERE convert_from(state, 'UTF8') LIKE %s",
            (f'%"tenant": "{tenant}"%',),
        ).fetchone()
    assert blobs is not None
    assert events is not None
    return int(blobs[0]), int(events[0])


def test_a_pdf_upload_is_accepted_with_the_ticket_and_its_position(
    client: TestClient, api_settings: Settings
) -> None:
    response = client.post(
        "/tickets",
        files={"file": ("paper.pdf", PDF, "application/pdf")},
        data={"pipeline": "document-review"},
        headers=bearer(api_settings, random_tenant()),
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["position"] > 0
    assert body["created"] is True


def test_a_docx_upload_is_accepted(client: TestClient, api_settings: Settings) -> None:
    response = client.post(
        "/tickets",
        files={"file": ("coursework.docx", DOCX, "application/octet-stream")},
        headers=bearer(api_settings, random_tenant()),
    )
    assert response.status_code == 202, response.text


def test_a_repeated_request_with_the_same_idempotency_key_returns_the_first_ticket(
    client: TestClient, api_settings: Settings
) -> None:
    headers = {**bearer(api_settings, random_tenant()), "Idempotency-Key": "upload-1"}
    files = {"file": ("paper.pdf", PDF, "application/pdf")}
    first = client.post("/tickets", files=files, headers=headers)
    again = client.post("/tickets", files=files, headers=headers)
    assert again.status_code == 202
    # The first answer, replayed, saying what the write model would say: the same ticket, and
    # nothing created by the retry.
    assert first.json()["created"] is True
    assert again.json() == {**first.json(), "created": False}
    assert again.headers["Idempotent-Replayed"] == "true"


def test_a_text_file_named_pdf_is_refused_and_nothing_is_stored(
    client: TestClient, api_settings: Settings, servers: Servers
) -> None:
    tenant = random_tenant()
    response = client.post(
        "/tickets",
        files={"file": ("paper.pdf", sample("bad-not-a-pdf.pdf").read_bytes(), "application/pdf")},
        headers=bearer(api_settings, tenant),
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert rows_for_tenant(servers, tenant) == (0, 0)


def test_an_upload_over_the_size_limit_is_refused_and_nothing_is_stored(
    client: TestClient, api_settings: Settings, servers: Servers
) -> None:
    tenant = random_tenant()
    big = b"%PDF-1.7\n" + b"0" * (api_settings.max_upload_bytes + 1)
    response = client.post(
        "/tickets",
        files={"file": ("big.pdf", big, "application/pdf")},
        headers=bearer(api_settings, tenant),
    )
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]["message"]
    assert rows_for_tenant(servers, tenant) == (0, 0)


def test_an_unknown_pipeline_is_a_clear_422(client: TestClient, api_settings: Settings) -> None:
    response = client.post(
        "/tickets",
        files={"file": ("paper.pdf", PDF, "application/pdf")},
        data={"pipeline": "astrology"},
        headers=bearer(api_settings, random_tenant()),
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unknown_pipeline"


def test_documents_with_roles_the_pipeline_does_not_take_are_refused(
    client: TestClient, api_settings: Settings
) -> None:
    response = client.post(
        "/tickets",
        files=[("files", ("a.pdf", PDF, "application/pdf")), ("files", ("b.docx", DOCX, "x/y"))],
        data={"roles": ["resume", "vacancy"]},
        headers=bearer(api_settings, random_tenant()),
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "document_roles_mismatch"


@pytest.mark.parametrize(
    ("files", "data", "field"),
    [
        (
            [("file", ("a.pdf", PDF, "application/pdf")), ("file", ("b.pdf", PDF, "x/y"))],
            {},
            "file",
        ),
        ([("file", ("a.pdf", PDF, "application/pdf"))], {"pipeline": ["tiny", "tiny"]}, "pipeline"),
        ([("file", ("a.pdf", PDF, "application/pdf"))], {"options": ["{}", "{}"]}, "options"),
    ],
)
def test_a_single_valued_form_field_sent_twice_is_refused_and_nothing_is_stored(
    client: TestClient,
    api_settings: Settings,
    servers: Servers,
    files: list[Any],
    data: dict[str, Any],
    field: str,
) -> None:
    tenant = random_tenant()
    response = client.post("/tickets", files=files, data=data, headers=bearer(api_settings, tenant))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"The form field {field!r} was sent 2 times")
    assert rows_for_tenant(servers, tenant) == (0, 0)


def test_options_that_are_not_a_json_object_are_refused(
    client: TestClient, api_settings: Settings
) -> None:
    response = client.post(
        "/tickets",
        files={"file": ("paper.pdf", PDF, "application/pdf")},
        data={"options": "[1, 2]"},
        headers=bearer(api_settings, random_tenant()),
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_options"


def test_a_request_without_a_token_is_unauthorised(client: TestClient) -> None:
    response = client.post("/tickets", files={"file": ("paper.pdf", PDF, "application/pdf")})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_token_signed_with_another_secret_is_unauthorised(
    client: TestClient, api_settings: Settings
) -> None:
    forged = api_settings.model_copy(update={"jwt_secret": "x" * 40})
    response = client.post(
        "/tickets",
        files={"file": ("paper.pdf", PDF, "application/pdf")},
        headers=bearer(forged, random_tenant()),
    )
    assert response.status_code == 401


def test_an_auditor_cannot_open_tickets(client: TestClient, api_settings: Settings) -> None:
    response = client.post(
        "/tickets",
        files={"file": ("paper.pdf", PDF, "application/pdf")},
        headers=bearer(api_settings, random_tenant(), "auditor"),
    )
    assert response.status_code == 403


def test_a_ticket_is_cancelled_by_its_tenant(client: TestClient, api_settings: Settings) -> None:
    headers = bearer(api_settings, random_tenant())
    created = client.post(
        "/tickets", files={"file": ("paper.pdf", PDF, "application/pdf")}, headers=headers
    ).json()
    response = client.post(f"/tickets/{created['ticket_id']}/cancel", headers=headers)
    assert response.status_code == 202
    assert response.json()["position"] > created["position"]


def test_another_tenants_ticket_answers_not_found(
    client: TestClient, api_settings: Settings
) -> None:
    created = client.post(
        "/tickets",
        files={"file": ("paper.pdf", PDF, "application/pdf")},
        headers=bearer(api_settings, random_tenant()),
    ).json()
    response = client.post(
        f"/tickets/{created['ticket_id']}/cancel", headers=bearer(api_settings, random_tenant())
    )
    assert response.status_code == 404


def test_health_reports_every_server(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "nats": "ok", "redis": "ok"},
    }


def test_the_openapi_document_describes_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/tickets", "/tickets/{ticket_id}/cancel", "/health"} <= set(paths)
