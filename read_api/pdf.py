"""A report as PDF, rendered from the same Markdown the report route returns (fpdf2).

Markdown → HTML (markdown-it, raw HTML off: the report's Markdown escapes it anyway) → fpdf2's
`write_html`. Reports are written in the document's language, so the text needs a Unicode
font: the first of the TrueType families in `FONT_CANDIDATES` that is installed is embedded.
DejaVu Sans (which Debian and Ubuntu install with fontconfig) comes first, for its bold and
monospace faces; Noto Sans (Latin, Cyrillic, Greek; SIL Open Font License) from the
`fontpkg-noto-sans` package, a dependency, is always there after it. Noto Sans ships as a
variable font, used at its default instance: making a bold instance takes fontTools tens of
seconds, so its bold text is set in the regular weight. Without any of them, the PDF uses the
core Helvetica and Courier with the Latin-1 characters they have: Cyrillic is transliterated to
Latin letters, dashes and quotes become their ASCII look-alikes, and any other character becomes
`?`.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fpdf import FPDF
from fpdf.fonts import FontFace, TextStyle
from markdown_it import MarkdownIt

MEDIA_TYPE = "application/pdf"

_CORE_ENCODING = "latin-1"
"""What fpdf2 encodes the core fonts' text in."""


@dataclass(frozen=True)
class FontFamily:
    """A TrueType family: a regular face, and the bold, italic and monospace faces it has."""

    regular: Path
    bold: Path | None = None
    italic: Path | None = None
    bold_italic: Path | None = None
    mono: Path | None = None


def _dejavu(directory: str) -> FontFamily:
    base = Path(directory)
    return FontFamily(
        regular=base / "DejaVuSans.ttf",
        bold=base / "DejaVuSans-Bold.ttf",
        italic=base / "DejaVuSans-Oblique.ttf",
        bold_italic=base / "DejaVuSans-BoldOblique.ttf",
        mono=base / "DejaVuSansMono.ttf",
    )


def _liberation(directory: str) -> FontFamily:
    base = Path(directory)
    return FontFamily(
        regular=base / "LiberationSans-Regular.ttf",
        bold=base / "LiberationSans-Bold.ttf",
        italic=base / "LiberationSans-Italic.ttf",
        bold_italic=base / "LiberationSans-BoldItalic.ttf",
        mono=base / "LiberationMono-Regular.ttf",
    )


def _packaged_noto_sans() -> FontFamily:
    """Noto Sans from `fontpkg-noto-sans` (paths that do not exist when it is missing)."""
    try:
        files = Path(str(importlib.resources.files("fontpkg_noto_sans"))) / "files"
    except ModuleNotFoundError:
        files = Path("/nonexistent/fontpkg_noto_sans/files")
    return FontFamily(
        regular=files / "NotoSans[wdth,wght].ttf",
        italic=files / "NotoSans-Italic[wdth,wght].ttf",
    )


FONT_CANDIDATES: tuple[FontFamily, ...] = (
    _dejavu("/usr/share/fonts/truetype/dejavu"),  # Debian, Ubuntu (fonts-dejavu-core)
    _dejavu("/usr/share/fonts/dejavu"),  # Fedora, Arch
    _dejavu("/usr/share/fonts/TTF"),
    _packaged_noto_sans(),
    _liberation("/usr/share/fonts/truetype/liberation"),
    _liberation("/usr/share/fonts/liberation-sans"),
)
"""Unicode fonts looked for, in order; the first whose regular face exists is used."""


@functools.cache
def unicode_font() -> FontFamily | None:
    """The first of `FONT_CANDIDATES` installed here (looked up once per process), or None."""
    for family in FONT_CANDIDATES:
        if family.regular.is_file():
            return family
    return None


def render_pdf(
    markdown: str,
    *,
    title: str | None = None,
    created_at: datetime | None = None,
    font: FontFamily | None = None,
) -> bytes:
    """The PDF of `markdown`, in `font` (core fonts when None). Blocking: run it in a thread."""
    pdf = FPDF(format="A4")
    pdf.set_title(title or _first_heading(markdown) or "Report")
    pdf.set_creator("ticketflow")
    if created_at is not None:
        pdf.set_creation_date(created_at)
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    body = _to_html(markdown)
    if font is None:
        family, mono = "helvetica", "courier"
        body = core_font_text(body)
    else:
        family, mono = _register(pdf, font)
    pdf.set_font(family, size=11)
    pdf.write_html(
        body,
        font_family=family,
        tag_styles={
            "code": FontFace(family=mono),
            "pre": TextStyle(font_family=mono, t_margin=4, l_margin=0, b_margin=0),
        },
    )
    return bytes(pdf.output())


def core_font_text(text: str) -> str:
    """`text` in the characters of the core fonts: Cyrillic transliterated, the rest `?`."""
    out: list[str] = []
    for char in text:
        try:
            char.encode(_CORE_ENCODING)
        except UnicodeEncodeError:
            out.append(_transliterate(char))
        else:
            out.append(char)
    return "".join(out)


def _register(pdf: FPDF, font: FontFamily) -> tuple[str, str]:
    family = "report"
    faces: Sequence[tuple[str, Path | None]] = (
        ("", font.regular),
        ("B", font.bold),
        ("I", font.italic),
        ("BI", font.bold_italic),
    )
    for style, path in faces:
        # A missing face falls back to the regular one, so bold text still renders.
        chosen = path if path is not None and path.is_file() else font.regular
        pdf.add_font(family, style, str(chosen))
    if font.mono is not None and font.mono.is_file():
        pdf.add_font("report-mono", "", str(font.mono))
        # write_html may ask the code font for bold (a heading holding code): same face.
        pdf.add_font("report-mono", "B", str(font.mono))
        pdf.add_font("report-mono", "I", str(font.mono))
        pdf.add_font("report-mono", "BI", str(font.mono))
        return family, "report-mono"
    return family, family


def _to_html(markdown: str) -> str:
    renderer = MarkdownIt("commonmark", {"html": False})
    return str(renderer.render(markdown))


def _first_heading(markdown: str) -> str | None:
    for line in markdown.splitlines():
        if line.startswith("# "):
            return html.unescape(line[2:].strip())
    return None


# fmt: off
_CYRILLIC = dict(zip(
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    ("a", "b", "v", "g", "d", "e", "e", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p",
     "r", "s", "t", "u", "f", "kh", "ts", "ch", "sh", "shch", "'", "y", "'", "e", "yu", "ya"),
    strict=True,
))
# fmt: on
_LOOK_ALIKES = {
    "\u2010": "-",
    "\u2011": "-",
    "\u2012": "-",
    "\u2013": "-",
    "\u2014": "-",
    "\u2212": "-",
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u201e": '"',
    "\u2026": "...",
    "\u2022": "*",
}
_NON_BREAKING = re.compile(r"[\u2000-\u200b\u202f\u205f]")


def _transliterate(char: str) -> str:
    latin = _CYRILLIC.get(char.lower())
    if latin is not None:
        return latin.capitalize() if char.isupper() else latin
    if _NON_BREAKING.match(char):
        return " "
    if char in _LOOK_ALIKES:
        return _LOOK_ALIKES[char]
    return "?"
