"""The flashcards of a completed ticket as an Anki package (`.apkg`), built with genanki.

One deck per ticket. Every card becomes a Basic note (front, back); a card whose cloze sentence
lets the deleted term be recovered also becomes a Cloze note (`{{c1::term}}`). Ids are stable, so
importing the package of the same ticket again updates its notes instead of adding copies: the
two note types have fixed ids, the deck's id is derived from the ticket id, and each note's GUID
from the ticket id, the subtask, the card's place in its output and the note type.

Cards come from a model that read an untrusted document: their text is HTML-escaped (Anki fields
are HTML) and braces are written as entities, so no card can smuggle markup or cloze syntax.
"""

from __future__ import annotations

import hashlib
import html
import io
import itertools
import re
import sqlite3
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import genanki  # type: ignore[import-untyped]  # genanki ships no type information

MEDIA_TYPE = "application/apkg"

# Fixed for ever: Anki recognises a note type by its id, so a changed id would make every
# re-import add a second "ticketflow Basic" type.
BASIC_MODEL_ID = 1_607_392_319
CLOZE_MODEL_ID = 1_607_392_320

_DECK_ID_BASE = 1 << 30
# The blank a flashcards pipeline writes in a card's cloze sentence (pipelines/flashcards.json).
_BLANK = re.compile(r"\[\s*(?:\.\.\.|…)\s*\]")
_MAX_CLOZE_TERM_CHARS = 80
_TRAILING_PUNCTUATION = ".!?;:…。"

_CSS = """.card {
  font-family: sans-serif;
  font-size: 20px;
  text-align: center;
  color: black;
  background-color: white;
}
.cloze { font-weight: bold; color: blue; }
"""

BASIC_MODEL = genanki.Model(
    BASIC_MODEL_ID,
    "ticketflow Basic",
    fields=[{"name": "Front"}, {"name": "Back"}],
    templates=[
        {
            "name": "Card 1",
            "qfmt": "{{Front}}",
            "afmt": '{{FrontSide}}<hr id="answer">{{Back}}',
        }
    ],
    css=_CSS,
)

CLOZE_MODEL = genanki.Model(
    CLOZE_MODEL_ID,
    "ticketflow Cloze",
    fields=[{"name": "Text"}, {"name": "Back Extra"}],
    templates=[
        {
            "name": "Cloze",
            "qfmt": "{{cloze:Text}}",
            "afmt": "{{cloze:Text}}<br>{{Back Extra}}",
        }
    ],
    css=_CSS,
    model_type=genanki.Model.CLOZE,
)


@dataclass(frozen=True)
class Flashcard:
    """One card of a report: where it stands in its subtask's output, and what it says."""

    subtask_id: str
    ordinal: int
    front: str
    back: str
    cloze: str | None
    difficulty: str | None
    duplicate: bool


class NoFlashcards(ValueError):
    """The report holds no cards (the ticket ran a pipeline that writes none)."""


def report_flashcards(outputs: Mapping[str, Mapping[str, Any]]) -> list[Flashcard]:
    """The cards of a report's `outputs` (`{subtask: {"output": {"cards": [...]}}}`), in order.

    Raises `NoFlashcards` when no subtask's output holds a list of cards."""
    found: list[Flashcard] = []
    writes_cards = False
    for subtask_id, entry in outputs.items():
        output = entry.get("output")
        cards = output.get("cards") if isinstance(output, Mapping) else None
        if not isinstance(cards, list):
            continue
        writes_cards = True
        for ordinal, card in enumerate(cards):
            if not isinstance(card, Mapping):
                continue
            front, back = card.get("front"), card.get("back")
            if not isinstance(front, str) or not isinstance(back, str):
                continue
            cloze, difficulty = card.get("cloze"), card.get("difficulty")
            found.append(
                Flashcard(
                    subtask_id=subtask_id,
                    ordinal=ordinal,
                    front=front,
                    back=back,
                    cloze=cloze if isinstance(cloze, str) else None,
                    difficulty=difficulty if isinstance(difficulty, str) else None,
                    duplicate=card.get("duplicate") is True,
                )
            )
    if not writes_cards:
        raise NoFlashcards("the report holds no flashcards")
    return found


def cloze_text(sentence: str, answer: str) -> str | None:
    """`sentence` (with one `[...]` blank) as Anki cloze text, the blank filled with the term
    `answer` supplies; None when the term cannot be told with confidence.

    The pipeline asks for the answer to be the sentence itself, or at least to end with the
    deleted term ("In the chloroplasts." for "Photosynthesis takes place in the [...]."): the
    term is what is left of the answer once the sentence's text after the blank is taken off its
    end and the longest piece of the text before the blank is taken off its start.
    """
    parts = _BLANK.split(sentence)
    if len(parts) != 2:
        return None
    before, after = parts
    body = answer.strip()
    tail = after.strip()
    if tail and body.casefold().endswith(tail.casefold()):
        body = body[: len(body) - len(tail)]
    body = body.rstrip().rstrip(_TRAILING_PUNCTUATION).rstrip()
    lead = before.rstrip().casefold()
    overlap = 0
    for length in range(min(len(lead), len(body)), 0, -1):
        # Whole words only: "in the" may overlap "In the chloroplasts", "he" may not.
        starts_word = length == len(lead) or not lead[-length - 1].isalnum()
        ends_word = length == len(body) or not body[length].isalnum()
        if starts_word and ends_word and lead.endswith(body[:length].casefold()):
            overlap = length
            break
    term = body[overlap:].strip()
    if not term or len(term) > _MAX_CLOZE_TERM_CHARS or _BLANK.search(term):
        return None
    return f"{_field(before)}{{{{c1::{_field(term)}}}}}{_field(after)}"


def deck_id(ticket_id: UUID) -> int:
    """The ticket's deck id: the same for every build, in the range genanki recommends."""
    digest = hashlib.sha256(b"ticketflow.deck\0" + ticket_id.bytes).digest()
    return _DECK_ID_BASE + int.from_bytes(digest[:4], "big") % _DECK_ID_BASE


def note_guid(ticket_id: UUID, card: Flashcard, kind: str) -> str:
    return str(genanki.guid_for("ticketflow", str(ticket_id), card.subtask_id, card.ordinal, kind))


def deck_name(ticket_id: UUID, documents: Sequence[Mapping[str, Any]]) -> str:
    names = ", ".join(str(d.get("filename", "")) for d in documents if d.get("filename"))
    # "::" would nest the deck under another one in Anki.
    title = (names or "document").replace("::", ":")
    return f"Flashcards: {title} ({str(ticket_id)[:8]})"


def build_deck(
    ticket_id: UUID, name: str, cards: Iterable[Flashcard]
) -> tuple[genanki.Deck, int, int]:
    """The ticket's deck, with the number of Basic and of Cloze notes in it."""
    deck = genanki.Deck(deck_id(ticket_id), name)
    basic = cloze = 0
    for card in cards:
        tags = _tags(card)
        deck.add_note(
            genanki.Note(
                model=BASIC_MODEL,
                fields=[_field(card.front), _field(card.back)],
                guid=note_guid(ticket_id, card, "basic"),
                tags=tags,
            )
        )
        basic += 1
        text = cloze_text(card.cloze, card.back) if card.cloze else None
        if text is not None:
            deck.add_note(
                genanki.Note(
                    model=CLOZE_MODEL,
                    fields=[text, _field(card.front)],
                    guid=note_guid(ticket_id, card, "cloze"),
                    tags=tags,
                )
            )
            cloze += 1
    return deck, basic, cloze


def build_package(
    ticket_id: UUID,
    documents: Sequence[Mapping[str, Any]],
    cards: Iterable[Flashcard],
    completed_at: datetime,
) -> bytes:
    """The `.apkg` file of a ticket's cards. Blocking (SQLite, zip): run it in a thread.

    Built from the ticket alone (note ids and times come from `completed_at`), so the same
    ticket always gives the same bytes."""
    deck, _, _ = build_deck(ticket_id, deck_name(ticket_id, documents), cards)
    timestamp = completed_at.timestamp()
    with tempfile.TemporaryDirectory(prefix="ticketflow-apkg-") as scratch:
        # genanki's own write_to_file leaves its SQLite file behind in the temporary directory.
        database = Path(scratch) / "collection.anki2"
        conn = sqlite3.connect(database)
        try:
            genanki.Package(deck).write_to_db(
                conn.cursor(), timestamp, itertools.count(int(timestamp * 1000))
            )
            conn.commit()
        finally:
            conn.close()
        buffer = io.BytesIO()
        stamp = completed_at.timetuple()[:6]
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as package:
            package.writestr(_entry("collection.anki2", stamp), database.read_bytes())
            package.writestr(_entry("media", stamp), "{}")
    return buffer.getvalue()


def _tags(card: Flashcard) -> list[str]:
    tags = ["ticketflow"]
    if card.difficulty:
        tags.append(f"difficulty::{_tag(card.difficulty)}")
    if card.duplicate:
        tags.append("duplicate")
    return tags


def _tag(value: str) -> str:
    return re.sub(r"\s+", "_", value.strip()) or "unknown"


def _field(text: str) -> str:
    return html.escape(text, quote=False).replace("{", "&#123;").replace("}", "&#125;")


def _entry(name: str, stamp: tuple[int, ...]) -> zipfile.ZipInfo:
    entry = zipfile.ZipInfo(name, (stamp[0], stamp[1], stamp[2], stamp[3], stamp[4], stamp[5]))
    entry.compress_type = zipfile.ZIP_DEFLATED
    return entry
