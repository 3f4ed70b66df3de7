"""A report as PDF: rendered from the report's Markdown, its text read back with pypdf; and which
of JSON, Markdown and PDF an `Accept` header asks for."""

from __future__ import annotations

import io
import re
import uuid
from datetime import UTC, datetime

import pypdf
import pytest

from projections.report import ReportSource, SubtaskOutcome, render_markdown
from read_api import pdf
from read_api.routes.reports import report_format

COMPLETED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def markdown(filename: str, summary: str, points: list[str]) -> str:
    return render_markdown(
        ReportSource(
            ticket_id=uuid.UUID("6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f"),
            tenant="acme",
            pipeline_name="document-review",
            pipeline_version=3,
            documents=[{"role": "main", "filename": filename}],
            completed_at=COMPLETED,
            subtasks=[
                SubtaskOutcome("summary", "Summary", (), {"summary": summary, "points": points}),
                SubtaskOutcome(
                    "verdict", "Verdict", ("summary",), {"verdict": "accept", "confidence": 0.8}
                ),
            ],
        )
    )


def text_of(document: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(document))
    # Extraction may break lines anywhere a PDF line ends: compare with whitespace collapsed.
    return re.sub(r"\s+", " ", " ".join(page.extract_text() for page in reader.pages))


ENGLISH = markdown("paper.pdf", "The paper measures <b>latency</b>.", ["Fast reads", "Slow writes"])
RUSSIAN = markdown(
    "лекция.pdf", "Фотосинтез происходит в хлоропластах.", ["Световая фаза", "Темновая фаза"]
)


@pytest.fixture(params=["unicode font", "packaged font", "core fonts"])
def font(request: pytest.FixtureRequest) -> pdf.FontFamily | None:
    if request.param == "core fonts":
        return None
    if request.param == "packaged font":
        return packaged_font()
    found = pdf.unicode_font()
    assert found is not None, "the packaged Noto Sans is always a candidate"
    return found


def packaged_font() -> pdf.FontFamily:
    """Noto Sans from the `fontpkg-noto-sans` dependency, there on every machine."""
    font = next(f for f in pdf.FONT_CANDIDATES if "fontpkg_noto_sans" in str(f.regular))
    assert font.regular.is_file()
    return font


def test_every_section_of_the_report_is_in_the_pdf_s_text(font: pdf.FontFamily | None) -> None:
    document = pdf.render_pdf(ENGLISH, created_at=COMPLETED, font=font)

    text = text_of(document)

    assert document.startswith(b"%PDF-")
    for expected in (
        "Document review: paper.pdf (main)",
        "Pipeline: document-review v3",
        "Ticket: 6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f",
        "Completed: 2026-03-01 12:00:00 UTC",
        "Verdict: accept",
        "Confidence: 0.8",
        "Summary: The paper measures <b>latency</b>.",
        "Fast reads",
        "Slow writes",
    ):
        assert expected in text
    assert text.index("Verdict") < text.index("Summary")


@pytest.mark.parametrize("packaged", [False, True], ids=["found font", "packaged font"])
def test_russian_text_is_embedded_as_written_with_a_unicode_font(packaged: bool) -> None:
    font = packaged_font() if packaged else pdf.unicode_font()
    assert font is not None

    text = text_of(pdf.render_pdf(RUSSIAN, font=font))

    assert "Document review: лекция.pdf (main)" in text
    assert "Summary: Фотосинтез происходит в хлоропластах." in text
    assert "Световая фаза" in text


def test_without_a_unicode_font_russian_text_is_transliterated() -> None:
    text = text_of(pdf.render_pdf(RUSSIAN, font=None))

    assert "Document review: lektsiya.pdf (main)" in text
    assert "Summary: Fotosintez proiskhodit v khloroplastakh." in text
    assert "Svetovaya faza" in text


def test_characters_the_core_fonts_lack_become_look_alikes_or_question_marks() -> None:
    assert pdf.core_font_text("Ёж — «да» “no” 中") == 'Ezh - «da» "no" ?'


def test_the_pdf_is_titled_after_the_report_s_heading() -> None:
    reader = pypdf.PdfReader(io.BytesIO(pdf.render_pdf(ENGLISH, font=None)))

    assert reader.metadata is not None
    assert reader.metadata.title == "Document review: paper.pdf (main)"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "json"),
        ("application/json", "json"),
        ("*/*", "json"),
        ("text/html", "json"),
        ("text/markdown", "markdown"),
        ("application/pdf", "pdf"),
        ("application/json, application/pdf", "pdf"),
        ("application/json, application/pdf;q=0.5", "json"),
        ("application/*, application/pdf;q=0.9", "json"),
        ("text/markdown;q=0.4, application/pdf;q=0.8", "pdf"),
        ("application/pdf, text/markdown", "pdf"),
        ("text/markdown, application/pdf", "markdown"),
        ("application/pdf;q=0", "json"),
    ],
)
def test_accept_chooses_json_markdown_or_pdf(accept: str | None, expected: str) -> None:
    assert report_format(accept) == expected
