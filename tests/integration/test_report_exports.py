# ruff: noqa: RUF001 - Cyrillic characters are the test data
"""A ticket's report as PDF and a flashcards ticket's cards as an Anki package, through the query
API served by uvicorn on real PostgreSQL: tickets opened and completed by the command service,
folded by the projector."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pypdf
import pytest

from commands.messages import CompleteSubtask, CreateTicket, UploadedDocument
from read_api import pdf
from read_api.anki import BASIC_MODEL_ID, CLOZE_MODEL_ID, deck_id
from read_api.app import QuerySettings
from tests.conftest import Servers
from tests.integration.test_read_api import PDF, USAGE, World, world_for
from tests.support import random_tenant

CARDS = {
    "language": "en",
    "cards": [
        {
            "front": "Where does photosynthesis take place?",
            "back": "In the chloroplasts.",
            "cloze": "Photosynthesis takes place in the [...].",
            "difficulty": "easy",
            "duplicate": False,
            "duplicate_of": None,
        },
        {
            "front": "What produces most of a cell's ATP?",
            "back": "The mitochondria.",
            "cloze": None,
            "difficulty": "medium",
            "duplicate": True,
            "duplicate_of": {"ticket_id": str(uuid.uuid4()), "front": "ATP?", "similarity": 0.93},
        },
    ],
}
RUSSIAN_CARDS = {
    "language": "ru",
    "cards": [
        {
            "front": "Где происходит фотосинтез?",
            "back": "В хлоропластах.",
            "cloze": "Фотосинтез происходит в [...].",
            "difficulty": "easy",
            "duplicate": False,
            "duplicate_of": None,
        }
    ],
}


@pytest.fixture
async def world(servers: Servers, fresh_database: str) -> AsyncIterator[World]:
    async with world_for(servers, fresh_database, QuerySettings(max_wait_s=3)) as world:
        yield world


def flashcards_ticket(
    world: World, output: dict[str, Any], filename: str = "biology.pdf"
) -> uuid.UUID:
    document = UploadedDocument("main", filename, "application/pdf", PDF)
    command = CreateTicket(world.tenant, "alice", (document,), "flashcards", {"count": 2})
    ticket_id = world.service.create_ticket(command).ticket_id
    world.ingest(ticket_id)
    world.service.complete_subtask(
        CompleteSubtask(ticket_id, "cards", 1, output, "smollm2", USAGE, 10.0)
    )
    return ticket_id


def collection(package: bytes, tmp_path: Path) -> sqlite3.Connection:
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        path = tmp_path / "collection.anki2"
        path.write_bytes(archive.read("collection.anki2"))
    return sqlite3.connect(path)


def pdf_text(document: bytes) -> str:
    pages = pypdf.PdfReader(io.BytesIO(document)).pages
    return re.sub(r"\s+", " ", " ".join(page.extract_text() for page in pages))


# -- the Anki package ----------------------------------------------------------------------------


async def test_a_completed_flashcards_ticket_downloads_as_an_anki_deck(
    world: World, tmp_path: Path
) -> None:
    ticket_id = flashcards_ticket(world, CARDS)
    await world.project()

    response = await world.client.get(f"/tickets/{ticket_id}/cards.apkg", headers=world.headers())

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/apkg"
    assert f'filename="flashcards-{ticket_id}.apkg"' in response.headers["content-disposition"]
    conn = collection(response.content, tmp_path)
    try:
        notes = conn.execute("SELECT mid, flds, tags FROM notes ORDER BY id").fetchall()
        decks = json.loads(conn.execute("SELECT decks FROM col").fetchone()[0])
        card_decks = {row[0] for row in conn.execute("SELECT did FROM cards")}
    finally:
        conn.close()
    assert [(mid, fields.split("\x1f")[0]) for mid, fields, _ in notes] == [
        (BASIC_MODEL_ID, "Where does photosynthesis take place?"),
        (CLOZE_MODEL_ID, "Photosynthesis takes place in the {{c1::chloroplasts}}."),
        (BASIC_MODEL_ID, "What produces most of a cell's ATP?"),
    ]
    assert "duplicate" in notes[2][2].split()
    assert card_decks == {deck_id(ticket_id)}
    assert (
        decks[str(deck_id(ticket_id))]["name"] == f"Flashcards: biology.pdf ({str(ticket_id)[:8]})"
    )


async def test_the_package_of_another_tenant_s_ticket_is_not_found(world: World) -> None:
    ticket_id = flashcards_ticket(world, CARDS)
    await world.project()

    stranger = await world.client.get(
        f"/tickets/{ticket_id}/cards.apkg", headers=world.headers(random_tenant())
    )
    unknown = await world.client.get(f"/tickets/{uuid.uuid4()}/cards.apkg", headers=world.headers())

    assert stranger.status_code == 404
    assert stranger.json()["error"]["code"] == "ticket_not_found"
    assert unknown.status_code == 404


async def test_no_package_while_the_ticket_runs_nor_for_a_pipeline_without_cards(
    world: World,
) -> None:
    document = UploadedDocument("main", "biology.pdf", "application/pdf", PDF)
    command = CreateTicket(world.tenant, "alice", (document,), "flashcards", {"count": 2})
    running = world.service.create_ticket(command).ticket_id
    review = world.completed_ticket()
    await world.project()

    waiting = await world.client.get(f"/tickets/{running}/cards.apkg", headers=world.headers())
    no_cards = await world.client.get(f"/tickets/{review}/cards.apkg", headers=world.headers())

    assert waiting.status_code == 409
    assert waiting.json()["error"]["code"] == "ticket_not_completed"
    assert no_cards.status_code == 409
    assert no_cards.json()["error"] == {
        "code": "no_flashcards",
        "message": f"Ticket {review} ran pipeline tiny, which writes no flashcards.",
    }


async def test_auditors_read_the_package_and_integrators_may_not(world: World) -> None:
    ticket_id = flashcards_ticket(world, CARDS)
    await world.project()
    path = f"/tickets/{ticket_id}/cards.apkg"

    auditor = await world.client.get(path, headers=world.headers(None, "auditor"))
    integrator = await world.client.get(path, headers=world.headers(None, "integrator"))
    anonymous = await world.client.get(path)

    assert auditor.status_code == 200
    assert integrator.status_code == 403
    assert anonymous.status_code == 401


# -- the report as PDF ---------------------------------------------------------------------------


async def test_the_report_as_pdf_holds_every_section_of_its_markdown(world: World) -> None:
    ticket_id = world.completed_ticket()
    await world.project()
    path = f"/tickets/{ticket_id}/report"

    markdown = await world.client.get(path, headers={**world.headers(), "Accept": "text/markdown"})
    response = await world.client.get(
        path, headers={**world.headers(), "Accept": "application/pdf"}
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pdf"
    assert response.headers["x-projection-position"]
    assert response.headers["vary"] == "Accept"
    assert response.content.startswith(b"%PDF-")
    text = pdf_text(response.content)
    headings = re.findall(r"^#+ (.+)$", markdown.text, flags=re.MULTILINE)
    assert len(headings) == 5  # the title, then the subtasks D (the verdict), A, B, C
    for heading in headings:
        assert heading in text
    assert f"Ticket: {ticket_id}" in text


async def test_a_russian_report_reads_back_in_russian_from_its_pdf(world: World) -> None:
    assert pdf.unicode_font() is not None, "the packaged Noto Sans is always a candidate"
    ticket_id = flashcards_ticket(world, RUSSIAN_CARDS, filename="лекция.pdf")
    await world.project()

    response = await world.client.get(
        f"/tickets/{ticket_id}/report", headers={**world.headers(), "Accept": "application/pdf"}
    )

    assert response.status_code == 200, response.text
    text = pdf_text(response.content)
    assert "лекция.pdf" in text
    assert "Где происходит фотосинтез?" in text
    assert "Фотосинтез происходит в [...]." in text


async def test_json_stays_the_answer_to_any_other_accept(world: World) -> None:
    ticket_id = world.completed_ticket()
    await world.project()

    response = await world.client.get(
        f"/tickets/{ticket_id}/report", headers={**world.headers(), "Accept": "text/html"}
    )

    assert response.status_code == 200
    assert response.json()["ticket_id"] == str(ticket_id)


async def test_a_running_ticket_has_no_pdf_either(world: World) -> None:
    ticket_id, _ = world.create()
    await world.project()

    response = await world.client.get(
        f"/tickets/{ticket_id}/report", headers={**world.headers(), "Accept": "application/pdf"}
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "ticket_not_completed"
