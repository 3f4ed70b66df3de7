# ruff: noqa: RUF001 - Cyrillic, Arabic and typographic characters are the test data
"""Extraction of uploaded PDFs and DOCX files: text and structure, limits, readable refusals."""

from __future__ import annotations

import io
import pickle
import re
import time
import zipfile
from collections.abc import Callable
from typing import Any

import docx
import pytest
from docx.oxml import parse_xml
from docx.oxml.ns import nsdecls
from pypdf import PageObject, PdfWriter

from handlers.extraction import (
    DOCX_MEDIA_TYPE,
    ERROR_CODES,
    PDF_MEDIA_TYPE,
    ExtractedDocument,
    ExtractionError,
    ExtractionLimits,
    extract,
    normalise_whitespace,
)
from tests.support import sample

DEFAULTS = ExtractionLimits()
ARABIC = re.compile("[\u0600-\u06ff]")
CYRILLIC_WORD = re.compile("[а-яё]{4,}", re.IGNORECASE)
BAD_SAMPLES = [
    ("bad-encrypted.pdf", "pdf_encrypted", "The PDF is password-protected"),
    ("bad-truncated.pdf", "pdf_damaged", "damaged or incomplete"),
    ("bad-not-a-pdf.pdf", "not_a_pdf", "not a PDF document"),
    ("bad-no-text-layer.pdf", "no_text", "has no text layer (it may be a scan)"),
]
REAL_PDFS = [
    "real/google-doc-document.pdf",
    "real/habibi.pdf",
    "real/multicolumn.pdf",
    "real/pdflatex-4-pages.pdf",
]
BOMB_INFLATED_BYTES = 300 * 1024 * 1024


def media_type_of(name: str) -> str:
    return PDF_MEDIA_TYPE if name.endswith(".pdf") else DOCX_MEDIA_TYPE


def extract_sample(name: str, limits: ExtractionLimits = DEFAULTS) -> ExtractedDocument:
    return extract(sample(name).read_bytes(), media_type_of(name), limits)


def refusal(
    content: bytes, media_type: str, limits: ExtractionLimits = DEFAULTS
) -> ExtractionError:
    with pytest.raises(ExtractionError) as caught:
        extract(content, media_type, limits)
    return caught.value


def forbid(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError(f"{name} must not be called")

    monkeypatch.setattr(owner, name, fail)


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    calls: list[int] = []
    original: Callable[..., Any] = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def docx_bytes(build: Callable[[Any], None]) -> bytes:
    document = docx.Document()
    build(document)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """A minimal valid DOCX whose document.xml inflates to 300 MB of zeros (~300 KB stored)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/'
            '2006/content-types"><Default Extension="rels" ContentType="application/'
            'vnd.openxmlformats-package.relationships+xml"/><Override PartName="/word/'
            'document.xml" ContentType="application/vnd.openxmlformats-officedocument.'
            'wordprocessingml.document.main+xml"/></Types>',
        )
        archive.writestr(
            "_rels/.rels",
            '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/'
            'package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.'
            "openxmlformats.org/officeDocument/2006/relationships/officeDocument"
            '" Target="word/document.xml"/></Relationships>',
        )
        megabyte_of_zeros = bytes(1024 * 1024)
        with archive.open("word/document.xml", "w") as member:
            for _ in range(BOMB_INFLATED_BYTES // len(megabyte_of_zeros)):
                member.write(megabyte_of_zeros)
    return buffer.getvalue()


# --- text and structure ------------------------------------------------------------------


def test_research_paper_text_is_extracted_page_by_page() -> None:
    document = extract_sample("research-paper.pdf")

    assert document.page_count == 2
    assert [block.page for block in document.blocks] == [1, 2]
    assert document.blocks[0].text.startswith("Replayable Review: Event-Sourced Pipelines")
    assert "3. Results" in document.blocks[1].text


def test_coursework_docx_yields_cyrillic_paragraphs_under_their_headings() -> None:
    document = extract_sample("coursework-ru.docx")

    introduction = next(block for block in document.blocks if block.kind == "paragraph")
    assert introduction.heading_path == (
        "Курсовая работа: система предварительной проверки студенческих работ",
        "Введение",
    )
    assert CYRILLIC_WORD.search(introduction.text)


def test_docx_chapter_headings_replace_each_other_in_the_heading_path() -> None:
    document = extract_sample("coursework-ru.docx")

    conclusion = [block for block in document.blocks if block.heading_path[-1] == "Заключение"]
    assert [block.kind for block in conclusion] == ["heading", "paragraph"]
    assert all(len(block.heading_path) == 2 for block in conclusion)


def test_docx_subheadings_nest_under_their_chapter() -> None:
    def build(document: Any) -> None:
        document.add_heading("Methods", level=1)
        document.add_heading("Sampling", level=2)
        document.add_paragraph("We sampled 300 works.")
        document.add_heading("Results", level=1)
        document.add_paragraph("Agreement was 78 percent.")

    document = extract(docx_bytes(build), DOCX_MEDIA_TYPE, DEFAULTS)

    paths = {block.text: block.heading_path for block in document.blocks}
    assert paths["We sampled 300 works."] == ("Methods", "Sampling")
    assert paths["Agreement was 78 percent."] == ("Results",)


def test_docx_table_rows_are_cells_joined_with_bars() -> None:
    def build(document: Any) -> None:
        document.add_heading("Budget", level=1)
        table = document.add_table(rows=2, cols=2)
        for row, values in zip(table.rows, [("Item", "Cost"), ("Server", "10 €")], strict=True):
            for cell, value in zip(row.cells, values, strict=True):
                cell.text = value

    document = extract(docx_bytes(build), DOCX_MEDIA_TYPE, DEFAULTS)

    table = next(block for block in document.blocks if block.kind == "table")
    assert table.text == "Item | Cost\nServer | 10 €"
    assert table.heading_path == ("Budget",)


def test_docx_text_inside_a_content_control_is_extracted() -> None:
    def build(document: Any) -> None:
        document.add_paragraph("Plain paragraph.")
        document.element.body.insert(
            0,
            parse_xml(
                f"<w:sdt {nsdecls('w')}><w:sdtContent><w:p><w:r>"
                "<w:t>Cover page inside a content control.</w:t>"
                "</w:r></w:p></w:sdtContent></w:sdt>"
            ),
        )

    document = extract(docx_bytes(build), DOCX_MEDIA_TYPE, DEFAULTS)

    assert [block.text for block in document.blocks] == [
        "Cover page inside a content control.",
        "Plain paragraph.",
    ]


@pytest.mark.parametrize("name", REAL_PDFS)
def test_real_world_pdf_extracts_non_empty_text(name: str) -> None:
    document = extract_sample(name)

    assert document.blocks
    assert all(block.text.strip() for block in document.blocks)


def test_arabic_pdf_keeps_its_arabic_letters() -> None:
    document = extract_sample("real/habibi.pdf")

    assert ARABIC.search(document.text)
    assert "habibi" in document.text


def test_pdf_locked_only_against_editing_is_still_read() -> None:
    writer = PdfWriter(clone_from=sample("research-paper.pdf"))
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)

    document = extract(buffer.getvalue(), PDF_MEDIA_TYPE, DEFAULTS)

    assert document.page_count == 2


def test_whitespace_is_collapsed_without_touching_cyrillic_or_arabic() -> None:
    raw = "  Привет,\u00a0\tмир \n\n\n حَبيبي\u00ad  habibi \r\n  \x00 ﬁnal  "

    assert normalise_whitespace(raw) == "Привет, мир\nحَبيبي habibi\nfinal"


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "code", "phrase"), BAD_SAMPLES)
def test_bad_sample_is_refused_with_a_readable_reason(name: str, code: str, phrase: str) -> None:
    error = refusal(sample(name).read_bytes(), PDF_MEDIA_TYPE)

    assert error.code == code
    assert phrase in error.reason
    assert error.reason[0].isupper()
    assert error.reason.endswith(".")
    assert not re.search(r"pypdf|Error|Exception|xref|stream", error.reason)


def test_each_bad_sample_has_its_own_error_code() -> None:
    codes = {refusal(sample(name).read_bytes(), PDF_MEDIA_TYPE).code for name, _, _ in BAD_SAMPLES}

    assert len(codes) == len(BAD_SAMPLES)
    assert codes <= ERROR_CODES


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 0.75, 0.95, 0.999])
def test_pdf_cut_off_anywhere_is_refused_as_damaged(fraction: float) -> None:
    content = sample("real/pdflatex-4-pages.pdf").read_bytes()

    error = refusal(content[: int(len(content) * fraction)], PDF_MEDIA_TYPE)

    assert error.code == "pdf_damaged"


def test_cut_off_pdf_with_a_forged_end_marker_is_still_refused_as_damaged() -> None:
    content = sample("research-paper.pdf").read_bytes()

    error = refusal(content[: len(content) // 2] + b"\n%%EOF\n", PDF_MEDIA_TYPE)

    assert error.code == "pdf_damaged"


def test_pdf_sent_as_docx_is_refused_as_not_a_docx() -> None:
    error = refusal(sample("research-paper.pdf").read_bytes(), DOCX_MEDIA_TYPE)

    assert error.code == "not_a_docx"


def test_plain_zip_sent_as_docx_is_refused_as_not_a_docx() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")

    error = refusal(buffer.getvalue(), DOCX_MEDIA_TYPE)

    assert error.code == "not_a_docx"


def test_refusal_survives_the_trip_from_a_worker_process() -> None:
    error = refusal(sample("bad-encrypted.pdf").read_bytes(), PDF_MEDIA_TYPE)

    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes

    assert (copy.code, copy.reason) == (error.code, error.reason)


def test_unsupported_media_type_is_refused() -> None:
    error = refusal(b"hello", "text/plain")

    assert error.code == "unsupported_type"
    assert "PDF and Word" in error.reason


def test_media_type_parameters_are_ignored() -> None:
    document = extract(
        sample("research-paper.pdf").read_bytes(), "Application/PDF; charset=binary", DEFAULTS
    )

    assert document.page_count == 2


# --- limits ------------------------------------------------------------------------------


def test_file_over_the_byte_limit_is_refused_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forbid(monkeypatch, zipfile.ZipFile, "__init__")

    error = refusal(
        sample("coursework-ru.docx").read_bytes(), DOCX_MEDIA_TYPE, ExtractionLimits(max_bytes=1000)
    )

    assert error.code == "too_large"
    assert "MB" in error.reason


def test_pdf_over_the_page_limit_is_refused_before_any_text_is_extracted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forbid(monkeypatch, PageObject, "extract_text")

    error = refusal(
        sample("real/pdflatex-4-pages.pdf").read_bytes(),
        PDF_MEDIA_TYPE,
        ExtractionLimits(max_pages=3),
    )

    assert error.code == "too_many_pages"
    assert "4 pages" in error.reason


def test_pdf_extraction_stops_at_the_page_that_passes_the_character_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = count_calls(monkeypatch, PageObject, "extract_text")
    first_page = extract_sample("real/pdflatex-4-pages.pdf").blocks[0].text
    calls.clear()

    error = refusal(
        sample("real/pdflatex-4-pages.pdf").read_bytes(),
        PDF_MEDIA_TYPE,
        ExtractionLimits(max_characters=len(first_page) + 1),
    )

    assert error.code == "too_many_characters"
    assert len(calls) == 2


def test_docx_over_the_character_limit_is_refused() -> None:
    error = refusal(
        sample("coursework-ru.docx").read_bytes(),
        DOCX_MEDIA_TYPE,
        ExtractionLimits(max_characters=500),
    )

    assert error.code == "too_many_characters"


def test_docx_unpacking_beyond_the_limit_is_refused_without_opening_a_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forbid(monkeypatch, zipfile.ZipFile, "open")

    error = refusal(
        sample("coursework-ru.docx").read_bytes(),
        DOCX_MEDIA_TYPE,
        ExtractionLimits(max_docx_uncompressed_bytes=100_000),
    )

    assert error.code == "too_large"


def test_zip_bomb_docx_is_refused_without_inflating_it(
    zip_bomb: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    forbid(monkeypatch, zipfile.ZipFile, "open")
    started = time.perf_counter()

    error = refusal(zip_bomb, DOCX_MEDIA_TYPE)

    assert error.code == "zip_bomb"
    assert "refused for safety" in error.reason
    assert time.perf_counter() - started < 1.0


def test_zip_bomb_is_refused_even_when_the_size_limit_would_allow_it(zip_bomb: bytes) -> None:
    generous = ExtractionLimits(max_docx_uncompressed_bytes=10 * BOMB_INFLATED_BYTES)

    error = refusal(zip_bomb, DOCX_MEDIA_TYPE, generous)

    assert error.code == "zip_bomb"
