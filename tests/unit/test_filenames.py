"""File names from clients: whatever arrives, what is kept is one safe, short, readable name."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from security.filenames import FALLBACK, MAX_BYTES, sanitize_filename

BIDI_CONTROLS = [chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]]
RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"} | {
    f"{device}{n}" for device in ("COM", "LPT") for n in "0123456789¹²³"
}

names = st.one_of(
    st.none(),
    st.text(),
    st.lists(
        st.sampled_from([*"./\\ aé\u0301\u202e\u2066\x00\n:*", "CON", "lpt1", "...", ".pdf"])
    ).map("".join),
    st.text(min_size=200, max_size=400),
)


@given(names)
@example("..\\..\\windows\\system32\\CON.txt")
@example("evil\u202efdp.exe")
@example(" . .hidden")
@example("e\x00\u0301.pdf")
def test_a_sanitized_name_is_always_one_safe_segment(name: str | None) -> None:
    safe = sanitize_filename(name)
    assert safe
    assert len(safe.encode()) <= MAX_BYTES
    assert "/" not in safe
    assert "\\" not in safe
    assert not safe.startswith(".")
    assert unicodedata.is_normalized("NFC", safe)
    assert not any(unicodedata.category(ch) in {"Cc", "Cs"} for ch in safe)
    assert not any(ch in BIDI_CONTROLS for ch in safe)
    assert safe.split(".", 1)[0].rstrip(" ").upper() not in RESERVED


@given(names)
def test_sanitizing_twice_changes_nothing(name: str | None) -> None:
    once = sanitize_filename(name)
    assert sanitize_filename(once) == once


@given(
    st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N"]), min_size=1),
    st.sampled_from(["pdf", "docx", "PDF"]),
)
def test_a_long_name_is_cut_and_keeps_its_extension(stem: str, extension: str) -> None:
    name = stem * (300 // len(stem) + 1) + "." + extension
    safe = sanitize_filename(name)
    assert safe.endswith("." + extension)
    assert len(safe.encode()) <= MAX_BYTES


@given(st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), min_size=1))
def test_a_plain_name_is_kept_as_it_is(stem: str) -> None:
    name = f"{stem}.pdf"
    if stem.upper() not in RESERVED and len(name) <= MAX_BYTES:
        assert sanitize_filename(name) == name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, FALLBACK),
        ("", FALLBACK),
        ("...", FALLBACK),
        ("/etc/passwd", "passwd"),
        ("C:\\Users\\eve\\report.pdf", "report.pdf"),
        ("../../report.pdf", "report.pdf"),
        (".bashrc", "bashrc"),
        ("evil\u202efdp.exe", "evilfdp.exe"),
        ("a\u2066b\u2069.pdf", "ab.pdf"),
        ("line\nbreak.pdf", "linebreak.pdf"),
        ("Cafe\u0301.pdf", "Café.pdf"),
        ("con.txt", "_con.txt"),
        ("LPT1", "_LPT1"),
        ("COM1 .pdf", "_COM1 .pdf"),
        ("console.pdf", "console.pdf"),
        ("what?.pdf", "what_.pdf"),
        ("report.pdf. . ", "report.pdf"),
    ],
)
def test_known_names_become_what_is_expected(name: str | None, expected: str) -> None:
    assert sanitize_filename(name) == expected


def test_a_long_multibyte_name_is_cut_on_a_character_boundary() -> None:
    safe = sanitize_filename("é" * 300 + ".docx")
    assert safe == "é" * 125 + ".docx"
    assert len(safe.encode()) == 255
