# ruff: noqa: RUF001 - Cyrillic characters are the test data
"""The Anki package of a flashcards ticket, opened as Anki opens it: a zip holding the SQLite
collection, whose notes, note types and deck are read back with sqlite3."""

from __future__ import annotations

import io
import json
import sqlite3
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from read_api import anki

TICKET = uuid.UUID("6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f")
COMPLETED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DOCUMENTS = [{"role": "main", "filename": "biology.pdf"}]


def outputs(*cards: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"cards": {"title": "Flashcards", "output": {"language": "en", "cards": list(cards)}}}


def card(
    front: str, back: str, cloze: str | None = None, difficulty: str = "easy", **more: Any
) -> dict[str, Any]:
    return {"front": front, "back": back, "cloze": cloze, "difficulty": difficulty, **more}


PHOTOSYNTHESIS = card(
    "Where does photosynthesis take place?",
    "In the chloroplasts.",
    "Photosynthesis takes place in the [...].",
)
MITOCHONDRIA = card(
    "What produces most of a cell's ATP?",
    "The mitochondria produce most of a cell's ATP.",
    None,
    "medium",
    duplicate=True,
)


def package(*cards: dict[str, Any], ticket_id: uuid.UUID = TICKET) -> bytes:
    found = anki.report_flashcards(outputs(*cards))
    return anki.build_package(ticket_id, DOCUMENTS, found, COMPLETED)


@pytest.fixture
def collection(tmp_path: Path) -> Iterator[Any]:
    """Opens a package's `collection.anki2` and yields a function reading it."""
    opened: list[sqlite3.Connection] = []

    def open_package(data: bytes) -> sqlite3.Connection:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert sorted(archive.namelist()) == ["collection.anki2", "media"]
            path = tmp_path / f"collection-{len(opened)}.anki2"
            path.write_bytes(archive.read("collection.anki2"))
        conn = sqlite3.connect(path)
        opened.append(conn)
        return conn

    yield open_package
    for conn in opened:
        conn.close()


def notes(conn: sqlite3.Connection) -> list[tuple[str, int, list[str], list[str]]]:
    rows = conn.execute("SELECT guid, mid, flds, tags FROM notes ORDER BY id").fetchall()
    return [(guid, mid, flds.split("\x1f"), tags.split()) for guid, mid, flds, tags in rows]


def test_each_card_is_a_basic_note_and_a_recoverable_cloze_also_a_cloze_note(
    collection: Any,
) -> None:
    conn = collection(package(PHOTOSYNTHESIS, MITOCHONDRIA))

    found = [(mid, fields) for _, mid, fields, _ in notes(conn)]

    assert found == [
        (
            anki.BASIC_MODEL_ID,
            ["Where does photosynthesis take place?", "In the chloroplasts."],
        ),
        (
            anki.CLOZE_MODEL_ID,
            [
                "Photosynthesis takes place in the {{c1::chloroplasts}}.",
                "Where does photosynthesis take place?",
            ],
        ),
        (
            anki.BASIC_MODEL_ID,
            [
                "What produces most of a cell's ATP?",
                "The mitochondria produce most of a cell's ATP.",
            ],
        ),
    ]


def test_the_note_types_are_basic_and_cloze_with_fixed_ids(collection: Any) -> None:
    conn = collection(package(PHOTOSYNTHESIS))

    models = json.loads(conn.execute("SELECT models FROM col").fetchone()[0])

    assert {int(mid): (m["name"], m["type"]) for mid, m in models.items()} == {
        anki.BASIC_MODEL_ID: ("ticketflow Basic", 0),
        anki.CLOZE_MODEL_ID: ("ticketflow Cloze", 1),
    }


def test_the_cards_are_in_one_deck_named_after_the_document_with_an_id_from_the_ticket(
    collection: Any,
) -> None:
    conn = collection(package(PHOTOSYNTHESIS, MITOCHONDRIA))

    decks = json.loads(conn.execute("SELECT decks FROM col").fetchone()[0])
    card_decks = {row[0] for row in conn.execute("SELECT did FROM cards")}

    assert card_decks == {anki.deck_id(TICKET)}
    assert decks[str(anki.deck_id(TICKET))]["name"] == "Flashcards: biology.pdf (6f1c2d9e)"
    assert anki.deck_id(TICKET) != anki.deck_id(uuid.uuid4())


def test_two_builds_of_a_ticket_give_the_same_guids_so_a_reimport_updates_its_notes(
    collection: Any,
) -> None:
    edited = {**PHOTOSYNTHESIS, "back": "In the chloroplasts of plant cells."}

    first = notes(collection(package(PHOTOSYNTHESIS, MITOCHONDRIA)))
    second = notes(collection(package(edited, MITOCHONDRIA)))
    other_ticket = notes(collection(package(PHOTOSYNTHESIS, ticket_id=uuid.uuid4())))

    assert [guid for guid, *_ in first] == [guid for guid, *_ in second]
    assert len({guid for guid, *_ in first}) == 3
    assert second[0][2][1] == "In the chloroplasts of plant cells."
    assert {guid for guid, *_ in other_ticket}.isdisjoint(guid for guid, *_ in first)


def test_the_same_ticket_always_gives_the_same_bytes() -> None:
    assert package(PHOTOSYNTHESIS, MITOCHONDRIA) == package(PHOTOSYNTHESIS, MITOCHONDRIA)


def test_notes_are_tagged_with_their_difficulty_and_duplicates_as_such(collection: Any) -> None:
    conn = collection(package(PHOTOSYNTHESIS, MITOCHONDRIA))

    tags = [sorted(note_tags) for *_, note_tags in notes(conn)]

    assert tags == [
        ["difficulty::easy", "ticketflow"],
        ["difficulty::easy", "ticketflow"],
        ["difficulty::medium", "duplicate", "ticketflow"],
    ]


def test_markup_and_cloze_syntax_in_a_card_stay_text(collection: Any) -> None:
    hostile = card("What is <script>x</script>?", "{{c2::leak}} & more", "A [...] here.")

    basic, cloze = notes(collection(package(hostile)))

    assert basic[2] == [
        "What is &lt;script&gt;x&lt;/script&gt;?",
        "&#123;&#123;c2::leak&#125;&#125; &amp; more",
    ]
    assert cloze[2][0] == "A {{c1::&#123;&#123;c2::leak&#125;&#125; &amp; more}} here."


@pytest.mark.parametrize(
    ("sentence", "answer", "expected"),
    [
        (
            "Photosynthesis takes place in the [...].",
            "Photosynthesis takes place in the chloroplasts.",
            "Photosynthesis takes place in the {{c1::chloroplasts}}.",
        ),
        ("[...] is the capital of France.", "Paris", "{{c1::Paris}} is the capital of France."),
        (
            "Фотосинтез происходит в [...].",
            "В хлоропластах.",
            "Фотосинтез происходит в {{c1::хлоропластах}}.",
        ),
        ("Water boils at […] degrees.", "100", "Water boils at {{c1::100}} degrees."),
    ],
)
def test_the_deleted_term_is_recovered_from_the_answer(
    sentence: str, answer: str, expected: str
) -> None:
    assert anki.cloze_text(sentence, answer) == expected


@pytest.mark.parametrize(
    ("sentence", "answer"),
    [
        ("No blank in this sentence.", "anything"),
        ("Two [...] blanks [...].", "x"),
        ("A [...].", "A."),
        ("It is [...].", "An answer far too long to be the term deleted from a sentence, " * 2),
    ],
)
def test_no_cloze_note_when_the_deleted_term_cannot_be_told(sentence: str, answer: str) -> None:
    assert anki.cloze_text(sentence, answer) is None


def test_a_report_without_cards_is_refused() -> None:
    with pytest.raises(anki.NoFlashcards):
        anki.report_flashcards({"verdict": {"title": "Verdict", "output": {"verdict": "accept"}}})
