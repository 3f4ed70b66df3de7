"""Upload checks done before anything is stored: content sniffing and size bounds.

The media type comes from the bytes, never from the filename or the client's Content-Type.
Deeper checks (pages, characters, decompressed size) happen in the ingest handler.
"""

from __future__ import annotations

import io
import zipfile

from commands.errors import InvalidDocument

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def sniff_media_type(content: bytes) -> str:
    """PDF or DOCX by content, or an `InvalidDocument` with a reason a user understands."""
    if not content:
        raise InvalidDocument("The uploaded file is empty.", code="empty_document", status=422)
    # PDF readers accept the header anywhere in the first kilobyte.
    if b"%PDF-" in content[:1024]:
        return PDF
    if content.startswith(b"PK\x03\x04"):
        try:
            # Reads the central directory only; nothing is decompressed here.
            names = set(zipfile.ZipFile(io.BytesIO(content)).namelist())
        except zipfile.BadZipFile:
            raise InvalidDocument(
                "The file looks like a ZIP archive but is damaged or truncated.",
                code="damaged_document",
                status=422,
            ) from None
        if "word/document.xml" in names and "[Content_Types].xml" in names:
            return DOCX
        raise InvalidDocument(
            "The file is a ZIP archive but not a Word (DOCX) document.",
            code="unsupported_media_type",
            status=415,
        )
    raise InvalidDocument(
        "Only PDF and DOCX documents are accepted; this file is neither.",
        code="unsupported_media_type",
        status=415,
    )
