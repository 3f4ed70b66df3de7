"""Turns the data set's plain-text documents into the PDF and DOCX files that tickets upload.

The source format is deliberately small: `# ` and `## ` start headings (levels 1 and 2), a blank
line ends a paragraph, and a line `<<<page>>>` starts a new page (PDF only; DOCX has no pages).
PDFs are written by a minimal writer (Helvetica, WinAnsi encoding, so Latin text only); DOCX by
python-docx with Word's heading styles, which the extractor reads as headings.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

from docx import Document

PAGE_BREAK = "<<<page>>>"
PDF_MEDIA_TYPE = "application/pdf"
DOCX_MEDIA_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


@dataclass(frozen=True)
class Block:
    kind: str  # "h1", "h2", "p" or "page"
    text: str = ""


def parse(source: str) -> list[Block]:
    blocks: list[Block] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(Block("p", " ".join(paragraph)))
            paragraph.clear()

    for raw in source.splitlines():
        line = raw.strip()
        if not line:
            flush()
        elif line == PAGE_BREAK:
            flush()
            blocks.append(Block("page"))
        elif line.startswith("## "):
            flush()
            blocks.append(Block("h2", line[3:].strip()))
        elif line.startswith("# "):
            flush()
            blocks.append(Block("h1", line[2:].strip()))
        else:
            # Every non-blank line of a paragraph block is its own paragraph when it follows a
            # heading directly; lists in the sources are written one item a line.
            flush()
            paragraph.append(line)
    flush()
    return blocks


def to_docx(blocks: list[Block]) -> bytes:
    document = Document()
    for block in blocks:
        if block.kind == "h1":
            document.add_heading(block.text, level=1)
        elif block.kind == "h2":
            document.add_heading(block.text, level=2)
        elif block.kind == "p":
            document.add_paragraph(block.text)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


_PAGE_WIDTH, _PAGE_HEIGHT, _MARGIN = 595, 842, 60
_STYLES = {"h1": ("F2", 14, 20, 70), "h2": ("F2", 12, 17, 80), "p": ("F1", 10, 13, 100)}


def _pdf_string(text: str) -> str:
    encoded = text.encode("cp1252")  # raises for text the standard fonts cannot show
    escaped = encoded.decode("latin-1").replace("\\", "\\\\").replace("(", "\\(")
    return "(" + escaped.replace(")", "\\)") + ")"


def to_pdf(blocks: list[Block]) -> bytes:
    """A PDF with one text layer per page; pages break where the source says or when full."""
    pages: list[list[str]] = [[]]
    y = _PAGE_HEIGHT - _MARGIN
    for block in blocks:
        if block.kind == "page":
            pages.append([])
            y = _PAGE_HEIGHT - _MARGIN
            continue
        font, size, leading, width = _STYLES[block.kind]
        if block.kind != "p":
            y -= leading // 2
        for line in textwrap.wrap(block.text, width=width) or [""]:
            if y < _MARGIN:
                pages.append([])
                y = _PAGE_HEIGHT - _MARGIN
            pages[-1].append(f"BT /{font} {size} Tf {_MARGIN} {y} Td {_pdf_string(line)} Tj ET")
            y -= leading
        y -= 4
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"",  # the page tree, written once the page objects are numbered
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>",
    ]
    kids: list[int] = []
    for lines in pages:
        stream = "\n".join(lines).encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        content = len(objects)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents %d 0 R"
            b" /Resources << /Font << /F1 3 0 R /F2 4 0 R >> >> >>"
            % (_PAGE_WIDTH, _PAGE_HEIGHT, content)
        )
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % kid for kid in kids),
        len(kids),
    )
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    )
    return out.getvalue()


def build(path: Path, kind: str) -> tuple[bytes, str]:
    """The file made from the source at `path`, as `kind` ("pdf" or "docx"), and its type."""
    blocks = parse(path.read_text("utf-8"))
    if kind == "pdf":
        return to_pdf(blocks), PDF_MEDIA_TYPE
    if kind == "docx":
        return to_docx(blocks), DOCX_MEDIA_TYPE
    raise ValueError(f"unknown document kind {kind!r}")
