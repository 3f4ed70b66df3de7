# ruff: noqa: RUF001 - Cyrillic, Arabic and typographic characters are the test data
"""Extraction of uploaded PDFs and DOCX files: text and structure, limits, readable refusals."""

from __future__ import annotations

import asyncio
import io
import pickle
import re
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
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
from handlers.isolation import ExtractionPool
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


# --- archives that understate their sizes --------------------------------------------------

_CONTENT_TYPES = (
    b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
    b'content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-'
    b'package.relationships+xml"/><Override PartName="/word/document.xml" ContentType="'
    b'application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
    b"</Types>"
)
_RELS = (
    b'<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/'
    b'2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/'
    b'officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/>'
    b"</Relationships>"
)
_BODY_START = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document xmlns:w="http://'
    b'schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r><w:t>'
)
_BODY_END = b"</w:t></w:r></w:p></w:body></w:document>"
_DOS_DATE_1980_01_01 = (0 << 9) | (1 << 5) | 1


@dataclass(frozen=True)
class RawMember:
    """A ZIP member as it is written: raw deflate data, its CRC and the size it declares."""

    name: str
    deflated: bytes
    crc: int
    declared_size: int


def deflated(data: bytes) -> RawMember:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return RawMember(
        "", compressor.compress(data) + compressor.flush(), zlib.crc32(data), len(data)
    )


def inflating_member(name: str, megabytes: int, declared_size: int) -> RawMember:
    """A deflate stream of a document.xml with `megabytes` MiB of spaces in its one paragraph,
    built from one compressed MiB repeated (a full flush makes each piece independent), so a
    gigabyte costs a few milliseconds to build and about one megabyte to store."""

    def piece(data: bytes) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)

    spaces = b" " * (1024 * 1024)
    crc = zlib.crc32(_BODY_START)
    for _ in range(megabytes):
        crc = zlib.crc32(spaces, crc)
    crc = zlib.crc32(_BODY_END, crc)
    final_empty_block = b"\x03\x00"
    stream = piece(_BODY_START) + piece(spaces) * megabytes + piece(_BODY_END) + final_empty_block
    return RawMember(name, stream, crc, declared_size)


def raw_zip(members: list[RawMember]) -> bytes:
    """A ZIP archive written byte by byte, so its headers can declare any size."""
    body, directory = bytearray(), bytearray()
    for member in members:
        name = member.name.encode()
        # Both headers share: version 2.0, no flags, deflate, the time and date, the CRC, the
        # sizes, the name's length and no extra field.
        shared = [20, 0, zipfile.ZIP_DEFLATED, 0, _DOS_DATE_1980_01_01, member.crc]
        shared += [len(member.deflated), member.declared_size, len(name), 0]
        offset = len(body)
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", *shared) + name + member.deflated
        # Then: no comment, disk 0, no attributes, where the local header is.
        directory += struct.pack("<4sH5H3L2H3H2L", b"PK\x01\x02", 20, *shared, 0, 0, 0, 0, offset)
        directory += name
    count = len(members)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), len(body), 0)
    return bytes(body + directory + end)


def docx_with_member(document: RawMember) -> bytes:
    parts = [
        replace(deflated(_CONTENT_TYPES), name="[Content_Types].xml"),
        replace(deflated(_RELS), name="_rels/.rels"),
        document,
    ]
    return raw_zip(parts)


@pytest.fixture(scope="module")
def understated_bomb() -> bytes:
    """About 1 MB that declares 400 KB for a document.xml inflating to 1 GiB."""
    return docx_with_member(inflating_member("word/document.xml", 1024, 400 * 1024))


def test_honest_raw_archive_is_read() -> None:
    """The hand-written archives below are real DOCX files when they tell the truth."""
    text = b"Hello from a hand-written archive"
    honest = replace(deflated(_BODY_START + text + _BODY_END), name="word/document.xml")

    document = extract(docx_with_member(honest), DOCX_MEDIA_TYPE, DEFAULTS)

    assert document.text == text.decode()


@pytest.mark.timeout(60)
def test_bomb_understating_its_size_fails_fast_in_little_memory_in_the_extraction_process(
    understated_bomb: bytes,
) -> None:
    limits = ExtractionLimits(max_docx_uncompressed_bytes=100 * 1024 * 1024)
    pool = ExtractionPool(workers=1, timeout_s=60)
    assert len(understated_bomb) < 2 * 1024 * 1024

    async def run() -> tuple[ExtractionError, float]:
        # The first extraction starts the fork server; the bomb's own time is what counts.
        await pool.extract(docx_bytes(lambda d: d.add_paragraph("warm")), DOCX_MEDIA_TYPE, limits)
        started = time.perf_counter()
        with pytest.raises(ExtractionError) as caught:
            await pool.extract(understated_bomb, DOCX_MEDIA_TYPE, limits)
        return caught.value, time.perf_counter() - started

    error, elapsed = asyncio.run(run())

    assert error.code == "zip_bomb"
    assert error.reason.startswith(
        "The Word document is too large once decompressed (more than 100 MB)"
    )
    assert elapsed < 2.0
    assert 0 < pool.peak_rss_bytes < 256 * 1024 * 1024


def test_member_inflating_past_its_declared_size_is_refused_as_damaged() -> None:
    # 2 MiB inflated, 1 KiB declared: within the size limit, yet the directory lies.
    liar = inflating_member("word/document.xml", 2, 1024)

    error = refusal(docx_with_member(liar), DOCX_MEDIA_TYPE)

    assert error.code == "docx_damaged"
    assert "damaged" in error.reason


def test_bomb_is_refused_even_when_the_limit_is_above_what_it_declares(
    understated_bomb: bytes,
) -> None:
    started = time.perf_counter()

    error = refusal(
        understated_bomb, DOCX_MEDIA_TYPE, ExtractionLimits(max_docx_uncompressed_bytes=8 << 20)
    )

    assert error.code == "zip_bomb"
    assert "more than 8 MB" in error.reason
    assert time.perf_counter() - started < 1.0


def test_docx_member_compressed_with_bzip2_is_refused_as_damaged() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", _CONTENT_TYPES)
        archive.writestr("_rels/.rels", _RELS)
        archive.writestr("word/document.xml", _BODY_START + b"text" + _BODY_END, zipfile.ZIP_BZIP2)

    error = refusal(buffer.getvalue(), DOCX_MEDIA_TYPE)

    assert error.code == "docx_damaged"


# --- PDFs whose page content inflates beyond the limit -------------------------------------


def flate_stream(mebibytes: int) -> bytes:
    """A zlib stream of `mebibytes` MiB of one letter, built from one compressed MiB repeated."""
    mebibyte = b"x" * (1024 * 1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(mebibyte) + compressor.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(mebibytes):
        checksum = zlib.adler32(mebibyte, checksum)
    zlib_header, final_empty_block = b"\x78\xda", b"\x03\x00"
    return zlib_header + piece * mebibytes + final_empty_block + checksum.to_bytes(4, "big")


def raw_pdf(objects: list[bytes]) -> bytes:
    """A PDF of these objects (1 is the catalog) with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def stream_object(data: bytes, extra: bytes = b"") -> bytes:
    return b"<< /Length %d /Filter /FlateDecode %s>>\nstream\n%s\nendstream" % (
        len(data),
        extra,
        data,
    )


def pdf_of_inflating_pages(pages: int, mebibytes: int, *, in_forms: bool = False) -> bytes:
    """`pages` pages, each drawing its own stream of `mebibytes` MiB: as the page's content,
    or (`in_forms`) as a form XObject its one-operator content draws."""
    stream = flate_stream(mebibytes)
    kids = b" ".join(b"%d 0 R" % (3 + 3 * index) for index in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
    ]
    for index in range(pages):
        page, contents, form = 3 + 3 * index, 4 + 3 * index, 5 + 3 * index
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
            b"/Resources << /XObject << /X0 %d 0 R >> >> >>" % (contents, form)
        )
        if in_forms:
            objects.append(b"<< /Length 7 >>\nstream\n/X0 Do\n\nendstream")
            objects.append(stream_object(stream, b"/Type /XObject /Subtype /Form /BBox [0 0 1 1] "))
        else:
            objects.append(stream_object(stream))
            objects.append(stream_object(flate_stream(0), b"/Type /XObject /Subtype /Image "))
        assert page == len(objects) - 2
    return raw_pdf(objects)


@pytest.mark.parametrize("in_forms", [False, True], ids=["page content", "form xobjects"])
def test_pdf_whose_pages_inflate_past_the_limit_together_is_refused(in_forms: bool) -> None:
    # Each stream alone is far below pypdf's own per-stream limit; together they pass ours.
    pdf = pdf_of_inflating_pages(3, 5, in_forms=in_forms)
    assert len(pdf) < 64 * 1024

    error = refusal(pdf, PDF_MEDIA_TYPE, ExtractionLimits(max_pdf_decoded_bytes=8 << 20))

    assert error.code == "too_large"
    assert error.reason.startswith(
        "The PDF is too large once decompressed (more than 8 MB of page content)"
    )


def test_pdf_whose_pages_inflate_within_the_limit_is_read() -> None:
    pdf = pdf_of_inflating_pages(3, 1)

    error = refusal(pdf, PDF_MEDIA_TYPE, ExtractionLimits(max_pdf_decoded_bytes=8 << 20))

    assert error.code == "no_text"  # read to the end: the letters are no text operators


@pytest.mark.timeout(60)
def test_pdf_stream_inflating_to_a_gigabyte_is_refused_in_little_memory() -> None:
    """pypdf (6 and later) stops a single stream at its own limit; this holds it to that."""
    pdf = pdf_of_inflating_pages(1, 1024)
    pool = ExtractionPool(workers=1, timeout_s=60)

    async def run() -> ExtractionError:
        with pytest.raises(ExtractionError) as caught:
            await pool.extract(pdf, PDF_MEDIA_TYPE, ExtractionLimits())
        return caught.value

    error = asyncio.run(run())

    assert error.code in {"pdf_damaged", "too_large"}
    assert "too large" in error.reason
    assert pool.peak_rss_bytes < 512 * 1024 * 1024
