"""Content sniffing of uploads: the bytes decide, never the filename."""

from __future__ import annotations

import io
import zipfile

import pytest

from commands.errors import InvalidDocument
from commands.uploads import DOCX, PDF, sniff_media_type
from tests.support import sample


def test_a_pdf_is_recognised_by_its_header() -> None:
    assert sniff_media_type(sample("research-paper.pdf").read_bytes()) == PDF


def test_a_docx_is_recognised_by_its_parts() -> None:
    assert sniff_media_type(sample("coursework-ru.docx").read_bytes()) == DOCX


def test_plain_text_named_pdf_is_refused_as_unsupported() -> None:
    with pytest.raises(InvalidDocument) as caught:
        sniff_media_type(sample("bad-not-a-pdf.pdf").read_bytes())
    assert caught.value.status == 415
    assert "PDF and DOCX" in str(caught.value)


def test_an_empty_upload_is_refused() -> None:
    with pytest.raises(InvalidDocument, match="empty"):
        sniff_media_type(b"")


def test_a_zip_that_is_not_a_word_document_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(InvalidDocument, match="not a Word"):
        sniff_media_type(buffer.getvalue())


def test_a_damaged_zip_is_refused_with_a_reason() -> None:
    content = sample("coursework-ru.docx").read_bytes()
    with pytest.raises(InvalidDocument, match="damaged"):
        sniff_media_type(content[: len(content) // 2])
