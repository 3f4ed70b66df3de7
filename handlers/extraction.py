"""Extract text blocks with page numbers and heading paths from uploaded PDF and DOCX files;
pure and free of I/O, so the ingest handler decides what to store or what to report."""

from __future__ import annotations

import copy
import io
import logging
import re
import threading
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import docx
from docx.document import Document as WordDocument
from docx.oxml.ns import qn
from docx.oxml.xmlchemy import BaseOxmlElement
from docx.table import Table, _Cell
from docx.text.paragraph import Paragraph
from pypdf import PageObject, PasswordType, PdfReader
from pypdf.errors import DependencyError, LimitReachedError, PyPdfError
from pypdf.generic import ArrayObject, DictionaryObject, PdfObject, StreamObject

logger = logging.getLogger(__name__)

PDF_MEDIA_TYPE = "application/pdf"
DOCX_MEDIA_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
SUPPORTED_MEDIA_TYPES = frozenset({PDF_MEDIA_TYPE, DOCX_MEDIA_TYPE})

#: Every code `ExtractionError` can carry; callers may branch on these, users see the reason.
ERROR_CODES = frozenset(
    {
        "too_large",
        "unsupported_type",
        "not_a_pdf",
        "not_a_docx",
        "pdf_encrypted",
        "docx_encrypted",
        "pdf_damaged",
        "docx_damaged",
        "no_text",
        "too_many_pages",
        "too_many_characters",
        "zip_bomb",
    }
)

#: A member inflating more than this many times its stored size is treated as a zip bomb.
MAX_COMPRESSION_RATIO = 200
# Tiny members of ordinary documents (settings, empty tables) can exceed any ratio
# and cannot hurt anyone, so the ratio is only judged above this size.
RATIO_CHECK_MIN_BYTES = 1 << 20

# The PDF specification lets a header start anywhere in the first kilobyte.
_PDF_HEADER_WINDOW = 1024
_CONTENTS, _RESOURCES, _XOBJECT = "/Contents", "/Resources", "/XObject"
# Forms drawing forms: deeper than any real document nests them.
_MAX_FORM_DEPTH = 16
_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# Password-protected Word files are OLE containers with this stream name (UTF-16).
_OLE_ENCRYPTION_STREAM = "EncryptionInfo".encode("utf-16-le")

_HEADING_STYLE = re.compile(r"^heading\s*(\d+)$", re.IGNORECASE)
_TITLE_LEVEL = 0
# Latin ligatures (ﬁ, ﬂ, …) come out of many PDF fonts and break word search.
_LIGATURES = re.compile("[\ufb00-\ufb06]")
# Soft hyphens and byte-order marks are invisible artefacts; other format characters
# (zero-width joiners, bidi marks, Arabic number signs) carry meaning and stay.
_INVISIBLE = frozenset({"\u00ad", "\ufeff"})

BlockKind = Literal["page", "heading", "paragraph", "table"]


class ExtractionError(Exception):
    """A document we refuse to extract; `reason` is written for the person who uploaded it."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __repr__(self) -> str:
        return f"ExtractionError(code={self.code!r}, reason={self.reason!r})"

    def __reduce__(self) -> tuple[type[ExtractionError], tuple[str, str]]:
        # Extraction may run in a worker process; the default pickling would drop `code`.
        return (type(self), (self.reason, self.code))


@dataclass(frozen=True)
class ExtractionLimits:
    """Upper bounds checked before each expensive step, so hostile files fail cheaply.

    `max_pages` applies to PDFs only: a DOCX has no page count until a word processor lays
    it out, and its size is already bounded by `max_docx_uncompressed_bytes`.
    `max_pdf_decoded_bytes` bounds the decompressed page content (content streams and the
    forms they draw) that text extraction reads, summed over the pages.
    """

    max_bytes: int = 25 * 1024 * 1024
    max_pages: int = 500
    max_characters: int = 2_000_000
    max_docx_uncompressed_bytes: int = 200 * 1024 * 1024
    max_pdf_decoded_bytes: int = 200 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in (
            "max_bytes",
            "max_pages",
            "max_characters",
            "max_docx_uncompressed_bytes",
            "max_pdf_decoded_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class TextBlock:
    """One structural piece of a document: a PDF page, a DOCX heading, paragraph or table."""

    text: str
    kind: BlockKind
    page: int | None = None
    heading_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtractedDocument:
    """The blocks of one document in reading order; `page_count` is None for DOCX."""

    media_type: str
    blocks: tuple[TextBlock, ...]
    page_count: int | None = None

    @property
    def text(self) -> str:
        return "\n\n".join(block.text for block in self.blocks)

    @property
    def character_count(self) -> int:
        return sum(len(block.text) for block in self.blocks)


def extract(content: bytes, media_type: str, limits: ExtractionLimits) -> ExtractedDocument:
    """Extract text blocks from a PDF or DOCX, or raise `ExtractionError` saying why not."""
    declared = media_type.split(";", 1)[0].strip().lower()
    if declared not in SUPPORTED_MEDIA_TYPES:
        raise ExtractionError(
            "Only PDF and Word (.docx) documents are supported. "
            "Please upload the document in one of these formats.",
            "unsupported_type",
        )
    if len(content) > limits.max_bytes:
        raise ExtractionError(
            f"The file is {_megabytes(len(content))} MB, which is more than the "
            f"{_megabytes(limits.max_bytes)} MB limit. Please upload a smaller file.",
            "too_large",
        )
    if declared == PDF_MEDIA_TYPE:
        document = _extract_pdf(content, limits)
    else:
        document = _extract_docx(content, limits)
    logger.debug(
        "extracted %d blocks, %d characters from a %s",
        len(document.blocks),
        document.character_count,
        declared,
    )
    return document


# --- text normalisation -------------------------------------------------------------------


def normalise_whitespace(text: str) -> str:
    """Collapse runs of spaces, drop empty lines and invisible marks; keep every script intact."""
    text = unicodedata.normalize("NFC", text)
    text = _LIGATURES.sub(lambda match: unicodedata.normalize("NFKC", match.group()), text)
    lines = []
    for raw_line in text.splitlines():
        line = "".join(
            " " if unicodedata.category(ch) == "Cc" else ch
            for ch in raw_line
            if ch not in _INVISIBLE
        )
        # str.split() without arguments knows every Unicode space (NBSP, thin space, …).
        collapsed = " ".join(line.split())
        if collapsed:
            lines.append(collapsed)
    return "\n".join(lines)


class _CharacterBudget:
    """Counts extracted characters and stops extraction as soon as the limit is passed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def spend(self, text: str) -> None:
        self.used += len(text)
        if self.used > self.limit:
            raise ExtractionError(
                f"The document contains more than {self.limit:,} characters of text, which is "
                "more than can be processed at once. Please split it into smaller parts.",
                "too_many_characters",
            )


# --- PDF ----------------------------------------------------------------------------------

_PDF_DAMAGED = (
    "The PDF file is damaged or incomplete (it may have been cut off while uploading or "
    "downloading). Please upload the complete file again."
)


class _PypdfWarnings(logging.Handler):
    """Collects pypdf's log warnings raised by this thread.

    pypdf reports many structural problems through logging rather than exceptions; the
    filter on the thread keeps concurrent extractions from seeing each other's warnings.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


def _extract_pdf(content: bytes, limits: ExtractionLimits) -> ExtractedDocument:
    if b"%PDF-" not in content[:_PDF_HEADER_WINDOW]:
        raise ExtractionError(
            "The file is not a PDF document, although it was sent as one. "
            "Please upload a real PDF or a Word (.docx) file.",
            "not_a_pdf",
        )
    # Every complete PDF ends with %%EOF; pypdf would only log its absence and carry on,
    # which turns a cut-off upload into a silent partial success.
    if b"%%EOF" not in content:
        raise ExtractionError(_PDF_DAMAGED, "pdf_damaged")

    collected = _PypdfWarnings()
    pypdf_logger = logging.getLogger("pypdf")
    pypdf_logger.addHandler(collected)
    try:
        document = _read_pdf(content, limits, collected)
    except (ExtractionError, MemoryError):
        raise
    except LimitReachedError as exc:
        # pypdf's safety limits trip on decompression bombs and on badly corrupted
        # structures alike; either way the file cannot be processed as it is.
        logger.info("pypdf refused a PDF over its safety limits: %s", exc)
        raise ExtractionError(
            "The PDF contains parts that are too large or too malformed to process safely. "
            "Please save it again as a new PDF (for example with Print to PDF) and upload that.",
            "pdf_damaged",
        ) from exc
    except (PyPdfError, RecursionError) as exc:
        logger.info("pypdf could not read the PDF: %r (warnings: %s)", exc, collected.messages)
        raise ExtractionError(_PDF_DAMAGED, "pdf_damaged") from exc
    except Exception as exc:
        # Malformed objects surface as KeyError, TypeError, ValueError, … from deep inside
        # pypdf; to the uploader they all mean the same thing.
        logger.info("pypdf failed on a malformed PDF: %r", exc)
        raise ExtractionError(_PDF_DAMAGED, "pdf_damaged") from exc
    finally:
        pypdf_logger.removeHandler(collected)
    return document


def _read_pdf(
    content: bytes, limits: ExtractionLimits, collected: _PypdfWarnings
) -> ExtractedDocument:
    reader = PdfReader(io.BytesIO(content), strict=False)
    if any("EOF marker not found" in message for message in collected.messages):
        raise ExtractionError(_PDF_DAMAGED, "pdf_damaged")
    if reader.is_encrypted:
        _unlock_pdf(reader)

    # Counting pages reads only the page tree, so a huge document is refused before
    # any content stream is decoded.
    page_count = len(reader.pages)
    if page_count > limits.max_pages:
        raise ExtractionError(
            f"The PDF has {page_count} pages, which is more than the limit of "
            f"{limits.max_pages}. Please split it into smaller parts.",
            "too_many_pages",
        )

    budget = _CharacterBudget(limits.max_characters)
    decoded = _DecodedBudget(limits.max_pdf_decoded_bytes)
    blocks: list[TextBlock] = []
    for number, page in enumerate(reader.pages, start=1):
        # Decoded here, counted, and kept by pypdf for extract_text to reuse.
        decoded.spend_page(page)
        text = normalise_whitespace(page.extract_text())
        if not text:
            continue
        budget.spend(text)
        blocks.append(TextBlock(text=text, kind="page", page=number))

    if not blocks:
        if collected.messages:
            # Structural warnings plus no text means pypdf patched up a broken file,
            # not that the pages are images.
            logger.info("no text and pypdf warnings: %s", collected.messages)
            raise ExtractionError(_PDF_DAMAGED, "pdf_damaged")
        if page_count == 0:
            raise ExtractionError(
                "The PDF has no pages, so there is no text to read.",
                "no_text",
            )
        raise ExtractionError(
            "The PDF has no text layer (it may be a scan), so there is no text to read. "
            "Please upload a PDF with selectable text, or run it through text "
            "recognition (OCR) first.",
            "no_text",
        )
    if collected.messages:
        logger.info("pypdf recovered from problems in the PDF: %s", collected.messages)
    return ExtractedDocument(media_type=PDF_MEDIA_TYPE, blocks=tuple(blocks), page_count=page_count)


class _DecodedBudget:
    """Counts the decompressed bytes of the streams that text extraction reads, page by page.

    pypdf bounds each stream on its own (75 MB in pypdf 6 and later), not their sum: a 1 MB
    file of pages each inflating a different 70 MB stream would cost gigabytes and minutes.
    A stream drawn by several pages counts once per page, as each page parses it again.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def spend_page(self, page: PageObject) -> None:
        seen: set[int] = set()
        self._spend_streams(page.get(_CONTENTS), seen)
        self._spend_forms(page.get(_RESOURCES), seen, depth=0)

    def _spend_streams(self, value: object, seen: set[int]) -> None:
        resolved = _resolved(value)
        if isinstance(resolved, ArrayObject):
            for item in resolved:
                self._spend_streams(item, seen)
        elif isinstance(resolved, StreamObject) and id(resolved) not in seen:
            seen.add(id(resolved))
            self.used += len(resolved.get_data())
            if self.used > self.limit:
                logger.warning("refusing PDF: page content inflates past %d bytes", self.limit)
                raise ExtractionError(
                    f"The PDF is too large once decompressed (more than "
                    f"{_megabytes(self.limit)} MB of page content), so it was refused for "
                    "safety. Please split it into smaller parts.",
                    "too_large",
                )

    def _spend_forms(self, resources: object, seen: set[int], depth: int) -> None:
        """Form XObjects are drawn (and parsed) like page content, nested forms included."""
        resources = _resolved(resources)
        if depth > _MAX_FORM_DEPTH or not isinstance(resources, DictionaryObject):
            return
        xobjects = _resolved(resources.get(_XOBJECT))
        if not isinstance(xobjects, DictionaryObject):
            return
        for value in xobjects.values():
            form = _resolved(value)
            if (
                isinstance(form, StreamObject)
                and form.get("/Subtype") == "/Form"
                and id(form) not in seen
            ):
                self._spend_streams(form, seen)
                self._spend_forms(form.get(_RESOURCES), seen, depth + 1)


def _resolved(value: object) -> object:
    return value.get_object() if isinstance(value, PdfObject) else value


def _unlock_pdf(reader: PdfReader) -> None:
    """Open PDFs that are only owner-protected (empty user password); refuse the rest."""
    protected = ExtractionError(
        "The PDF is password-protected, so its text cannot be read. "
        "Please remove the password and upload it again.",
        "pdf_encrypted",
    )
    try:
        result = reader.decrypt("")
    except DependencyError as exc:
        # AES needs the optional cryptography package; without it the file stays locked.
        logger.warning("cannot decrypt PDF without an extra dependency: %s", exc)
        raise protected from exc
    if result == PasswordType.NOT_DECRYPTED:
        raise protected


# --- DOCX ---------------------------------------------------------------------------------

_DOCX_DAMAGED = (
    "The Word document is damaged and cannot be opened. "
    "Please open it in Word, save it again and upload the new file."
)
_DOCX_TOO_LARGE_INFLATED = (
    "The Word document is too large once decompressed (more than {megabytes} MB), so it was "
    "refused for safety. Please remove large images or split it into smaller parts."
)
_WORD_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_INFLATE_CHUNK_BYTES = 64 * 1024


def _extract_docx(content: bytes, limits: ExtractionLimits) -> ExtractedDocument:
    if not content.startswith(_ZIP_MAGIC):
        if content.startswith(_OLE_MAGIC) and _OLE_ENCRYPTION_STREAM in content:
            raise ExtractionError(
                "The Word document is password-protected, so its text cannot be read. "
                "Please remove the password and upload it again.",
                "docx_encrypted",
            )
        raise ExtractionError(
            "The file is not a Word (.docx) document, although it was sent as one. "
            "Older .doc files are not supported: please save it as .docx or PDF.",
            "not_a_docx",
        )
    try:
        # Opening the archive reads only the central directory; nothing is inflated yet.
        archive = zipfile.ZipFile(io.BytesIO(content))
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        ValueError,
        OSError,
    ) as exc:
        logger.info("DOCX archive unreadable: %r", exc)
        raise ExtractionError(_DOCX_DAMAGED, "docx_damaged") from exc
    with archive:
        members = archive.infolist()
        names = {member.filename for member in members}
        _check_archive_sizes(members, limits)
        if "[Content_Types].xml" not in names:
            raise ExtractionError(
                "The file is a ZIP archive, not a Word (.docx) document. "
                "Please upload a .docx or PDF file.",
                "not_a_docx",
            )
        _check_inflated_sizes(archive, members, limits)

    try:
        word = docx.Document(io.BytesIO(content))
    except ValueError as exc:
        # python-docx raises ValueError for Excel or PowerPoint files sent as .docx.
        logger.info("not a Word package: %s", exc)
        raise ExtractionError(
            "The file is an Office document but not a Word (.docx) document. "
            "Please upload a .docx or PDF file.",
            "not_a_docx",
        ) from exc
    except Exception as exc:
        # python-docx has no common exception base: broken packages raise KeyError,
        # lxml syntax errors, PackageNotFoundError, …
        logger.info("python-docx could not open the document: %r", exc)
        raise ExtractionError(_DOCX_DAMAGED, "docx_damaged") from exc

    try:
        blocks = _docx_blocks(word, _CharacterBudget(limits.max_characters))
    except (ExtractionError, MemoryError):
        raise
    except Exception as exc:
        logger.info("python-docx failed while reading the body: %r", exc)
        raise ExtractionError(_DOCX_DAMAGED, "docx_damaged") from exc
    if not blocks:
        raise ExtractionError(
            "The Word document contains no text, so there is nothing to read.",
            "no_text",
        )
    return ExtractedDocument(media_type=DOCX_MEDIA_TYPE, blocks=tuple(blocks), page_count=None)


def _check_archive_sizes(members: list[zipfile.ZipInfo], limits: ExtractionLimits) -> None:
    """Judge the archive from its central directory alone, before any member is inflated.

    The directory's sizes are only what the file claims; `_check_inflated_sizes` then makes
    sure that no member inflates to more than it declares.
    """
    for member in members:
        if member.file_size < RATIO_CHECK_MIN_BYTES:
            continue
        ratio = member.file_size / max(member.compress_size, 1)
        if ratio > MAX_COMPRESSION_RATIO:
            logger.warning(
                "refusing DOCX: %s inflates %d -> %d bytes (ratio %.0f)",
                member.filename,
                member.compress_size,
                member.file_size,
                ratio,
            )
            raise ExtractionError(
                "The Word document is built in a suspicious way: it would expand to far "
                "more data than its file size suggests, so it was refused for safety.",
                "zip_bomb",
            )
    total = sum(member.file_size for member in members)
    if total > limits.max_docx_uncompressed_bytes:
        raise ExtractionError(
            f"The Word document unpacks to {_megabytes(total)} MB, which is more than the "
            f"{_megabytes(limits.max_docx_uncompressed_bytes)} MB limit. "
            "Please remove large images or split it into smaller parts.",
            "too_large",
        )


def _check_inflated_sizes(
    archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], limits: ExtractionLimits
) -> None:
    """Inflate every member in small chunks, counting the bytes really produced, and stop as
    soon as the archive passes the size limit; refuse a member that inflates to more than it
    declares.

    python-docx reads each part with `ZipFile.read`, which inflates a member's compressed data
    in one call and only then cuts it to the declared size: a directory declaring 400 KB for
    a member of 1 GB of zeros would cost the whole gigabyte of memory and many seconds. After
    this check every member is known to inflate to no more than it declares, and the declared
    sizes together are within the limit (`_check_archive_sizes`), so python-docx's reads are
    bounded too. Memory stays at one chunk whatever the archive holds, and the work done here
    is bounded by the limit.
    """
    budget = limits.max_docx_uncompressed_bytes
    total = 0
    for member in members:
        if member.compress_type not in _WORD_COMPRESSION:
            # zipfile inflates bzip2 and LZMA members without a bound on each read's output,
            # and Word never writes them.
            logger.info(
                "refusing DOCX: %s uses compression method %d",
                member.filename,
                member.compress_type,
            )
            raise ExtractionError(_DOCX_DAMAGED, "docx_damaged")
        # zipfile stops reading at `file_size`; past the budget, so that the budget decides.
        probe = copy.copy(member)
        probe.file_size = max(member.file_size, budget) + 1
        inflated = 0
        try:
            with archive.open(probe) as stream:
                while chunk := stream.read(_INFLATE_CHUNK_BYTES):
                    inflated += len(chunk)
                    total += len(chunk)
                    if total > budget:
                        lied = inflated > member.file_size
                        logger.warning(
                            "refusing DOCX: more than %d bytes inflated at %s "
                            "(declared %d bytes, inflated %d so far)",
                            budget,
                            member.filename,
                            member.file_size,
                            inflated,
                        )
                        raise ExtractionError(
                            _DOCX_TOO_LARGE_INFLATED.format(megabytes=_megabytes(budget)),
                            "zip_bomb" if lied else "too_large",
                        )
        except ExtractionError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError) as exc:
            # Bad CRCs, broken deflate streams, encrypted or truncated members.
            logger.info("DOCX member %s unreadable: %r", member.filename, exc)
            raise ExtractionError(_DOCX_DAMAGED, "docx_damaged") from exc
        if inflated > member.file_size:
            # zipfile would cut it at the declared size and fail on its checksum.
            logger.info(
                "refusing DOCX: %s inflates to %d bytes, declared %d",
                member.filename,
                inflated,
                member.file_size,
            )
            raise ExtractionError(_DOCX_DAMAGED, "docx_damaged")


def _docx_blocks(word: WordDocument, budget: _CharacterBudget) -> list[TextBlock]:
    blocks: list[TextBlock] = []
    # (level, text) pairs; Title is level 0 so it heads every later section.
    headings: list[tuple[int, str]] = []

    def add(text: str, kind: BlockKind) -> None:
        budget.spend(text)
        path = tuple(heading for _, heading in headings)
        blocks.append(TextBlock(text=text, kind=kind, heading_path=path))

    for item in _body_items(word):
        if isinstance(item, Paragraph):
            text = normalise_whitespace(item.text)
            if not text:
                continue
            level = _heading_level(item)
            if level is None:
                add(text, "paragraph")
                continue
            # A heading spans one line in the path even if it contained line breaks.
            title = " ".join(text.split())
            while headings and headings[-1][0] >= level:
                headings.pop()
            headings.append((level, title))
            add(title, "heading")
        elif isinstance(item, Table):
            text = _table_text(item)
            if text:
                add(text, "table")
    return blocks


def _body_items(word: WordDocument) -> Iterator[Paragraph | Table]:
    """Paragraphs and tables in reading order, including those inside content controls.

    `Document.iter_inner_content` skips <w:sdt> blocks, which Word uses for cover pages,
    tables of contents and template fields, so the body is walked here instead.
    """
    paragraph_tag, table_tag = qn("w:p"), qn("w:tbl")
    sdt_tag, sdt_content_tag = qn("w:sdt"), qn("w:sdtContent")
    body = word.element.body
    parent = word._body  # python-docx block items need their container as parent

    def walk(element: BaseOxmlElement) -> Iterator[Paragraph | Table]:
        for child in element.iterchildren():
            if child.tag == paragraph_tag:
                yield Paragraph(child, parent)
            elif child.tag == table_tag:
                yield Table(child, parent)
            elif child.tag == sdt_tag:
                for content in child.iterchildren(sdt_content_tag):
                    yield from walk(content)

    yield from walk(body)


def _heading_level(paragraph: Paragraph) -> int | None:
    style = paragraph.style
    name = getattr(style, "name", None) or ""
    if name.strip().lower() == "title":
        return _TITLE_LEVEL
    match = _HEADING_STYLE.match(name.strip())
    return int(match.group(1)) if match else None


def _table_text(table: Table) -> str:
    """One line per row, cells joined with " | "; merged cells appear once."""
    rows = []
    for row in table.rows:
        cells: list[str] = []
        previous: object = None
        for cell in row.cells:
            # A horizontally merged cell is returned once per grid column it spans.
            if cell._tc is previous:
                continue
            previous = cell._tc
            cells.append(" ".join(_cell_text(cell).split()))
        if any(cells):
            rows.append(" | ".join(cells))
    return normalise_whitespace("\n".join(rows))


def _cell_text(cell: _Cell) -> str:
    parts = []
    for item in cell.iter_inner_content():
        if isinstance(item, Table):
            parts.append(" / ".join(_table_text(item).splitlines()))
        else:
            parts.append(item.text)
    return " ".join(parts)


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f}".rstrip("0").rstrip(".")
