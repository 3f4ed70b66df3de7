"""Safe file names from what clients send: shown and offered for download, never used as paths."""

from __future__ import annotations

import re
import unicodedata

FALLBACK = "document"
MAX_BYTES = 255
_MAX_EXTENSION_CHARS = 16

# Bidirectional controls make "evil<U+202E>fdp.exe" read as "evilexe.pdf"; U+200E, U+200F and
# U+061C are invisible marks that reorder text in a smaller way.
_BIDI_CONTROLS = frozenset(
    [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
    + ["\u200e", "\u200f", "\u061c"]
)
# Controls, surrogates (not encodable), and private use and unassigned code points.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn"})
# Characters Windows refuses in names, besides the path separators already split on.
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*]')
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"]
    + [f"{device}{n}" for device in ("COM", "LPT") for n in "0123456789¹²³"]
)


def sanitize_filename(name: str | None) -> str:
    """A name that is one path segment, NFC, printable, free of bidi controls, without a leading
    dot, not a reserved Windows device, and at most 255 bytes of UTF-8 with its extension kept;
    "document" when nothing usable is left."""
    if not name:
        return FALLBACK
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if _allowed(ch))
    cleaned = unicodedata.normalize("NFC", cleaned)
    cleaned = _WINDOWS_FORBIDDEN.sub("_", cleaned)
    cleaned = _trim(cleaned)
    if not cleaned:
        return FALLBACK
    if _is_reserved(cleaned):
        cleaned = f"_{cleaned}"
    return _shorten(cleaned)


def _allowed(ch: str) -> bool:
    return ch not in _BIDI_CONTROLS and unicodedata.category(ch) not in _DROPPED_CATEGORIES


def _trim(name: str) -> str:
    # Leading dots hide files; Windows drops trailing dots and spaces, which would change the name.
    trimmed = None
    while trimmed != name:
        trimmed, name = name, name.strip().strip(".")
    return name


def _is_reserved(name: str) -> bool:
    stem = name.split(".", 1)[0].rstrip(" ")
    return stem.upper() in _WINDOWS_RESERVED


def _shorten(name: str) -> str:
    if len(name.encode()) <= MAX_BYTES:
        return name
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > _MAX_EXTENSION_CHARS:
        stem, extension = name, ""
    suffix = f".{extension}" if extension else ""
    budget = MAX_BYTES - len(suffix.encode())
    short = stem.encode()[:budget].decode(errors="ignore")
    # Cutting may split a character sequence, and normalising it again may lengthen it a little:
    # shorten until the normalised name fits.
    while True:
        candidate = _trim(unicodedata.normalize("NFC", short + suffix))
        if len(candidate.encode()) <= MAX_BYTES:
            return candidate or FALLBACK
        short = short[:-1]
