# ruff: noqa: RUF001 - Cyrillic, Arabic and typographic characters are the test data
"""Chunking of extracted documents: token budget, structure, references, overlap, no lost words."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handlers.chunking import HEADING_SEPARATOR, Chunk, chunk, estimate_tokens
from handlers.extraction import (
    DOCX_MEDIA_TYPE,
    PDF_MEDIA_TYPE,
    ExtractedDocument,
    ExtractionLimits,
    TextBlock,
    extract,
)
from tests.support import sample

SAMPLES = [
    "research-paper.pdf",
    "lecture-notes-ru.pdf",
    "coursework-ru.docx",
    "resume-jane-marlow.docx",
    "real/multicolumn.pdf",
    "real/pdflatex-4-pages.pdf",
]


def document(*blocks: TextBlock) -> ExtractedDocument:
    return ExtractedDocument(media_type=DOCX_MEDIA_TYPE, blocks=blocks)


def paragraph(text: str, *path: str) -> TextBlock:
    return TextBlock(text=text, kind="paragraph", heading_path=path)


def numbered_sentences(count: int, words_each: int = 6) -> str:
    filler = " ".join(["word"] * (words_each - 2))
    return " ".join(f"Sentence {n} {filler}." for n in range(count))


def extracted(name: str) -> ExtractedDocument:
    media_type = PDF_MEDIA_TYPE if name.endswith(".pdf") else DOCX_MEDIA_TYPE
    return extract(sample(name).read_bytes(), media_type, ExtractionLimits())


def words_of(chunks: list[Chunk]) -> list[str]:
    return [word for piece in chunks for word in piece.text.split()]


# --- budget and splitting ----------------------------------------------------------------


def test_token_estimate_is_words_times_1_3_rounded_up() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("one") == 2
    assert estimate_tokens("one two three four five six seven eight nine ten") == 13


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("max_tokens", [20, 64, 200])
def test_every_chunk_of_a_sample_fits_the_token_budget(name: str, max_tokens: int) -> None:
    chunks = chunk(extracted(name), max_tokens=max_tokens, overlap_tokens=max_tokens // 5)

    assert chunks
    assert all(estimate_tokens(piece.text) <= max_tokens for piece in chunks)


def test_paragraphs_that_fit_together_share_one_chunk() -> None:
    source = document(paragraph("First short paragraph."), paragraph("Second short paragraph."))

    chunks = chunk(source)

    assert [piece.text for piece in chunks] == ["First short paragraph.\n\nSecond short paragraph."]


def test_a_paragraph_that_fits_is_never_split_across_chunks() -> None:
    first = numbered_sentences(5)
    second = "Kept whole: " + numbered_sentences(5)

    chunks = chunk(document(paragraph(first), paragraph(second)), max_tokens=52, overlap_tokens=0)

    assert [piece.text for piece in chunks] == [first, second]


def test_a_long_paragraph_is_split_between_sentences() -> None:
    chunks = chunk(document(paragraph(numbered_sentences(20))), max_tokens=40, overlap_tokens=0)

    assert len(chunks) > 1
    assert all(piece.text.endswith(".") for piece in chunks)


def test_a_sentence_longer_than_the_budget_is_cut_into_word_windows() -> None:
    sentence = " ".join(f"w{n}" for n in range(100)) + "."

    chunks = chunk(document(paragraph(sentence)), max_tokens=26, overlap_tokens=0)

    assert [len(piece.text.split()) for piece in chunks] == [20] * 5


def test_a_long_table_is_split_between_rows() -> None:
    rows = "\n".join(f"Row {n} | value {n} | note {n}" for n in range(30))
    table = TextBlock(text=rows, kind="table", heading_path=("Data",))

    chunks = chunk(document(table), max_tokens=40, overlap_tokens=0)

    assert len(chunks) > 1
    assert all(line.startswith("Row ") for piece in chunks for line in piece.text.splitlines())


def test_an_empty_document_gives_no_chunks() -> None:
    assert chunk(document()) == []


def test_an_overlap_as_large_as_the_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk(document(paragraph("text")), max_tokens=50, overlap_tokens=50)


# --- references ----------------------------------------------------------------------------


def test_pdf_chunks_keep_the_page_their_text_came_from() -> None:
    source = extracted("research-paper.pdf")
    pages = {block.page: " ".join(block.text.split()) for block in source.blocks}

    chunks = chunk(source, max_tokens=64, overlap_tokens=10)

    assert {piece.page for piece in chunks} == {1, 2}
    assert all(" ".join(piece.text.split()) in pages[piece.page] for piece in chunks)


def test_docx_chunks_carry_their_heading_path_joined_with_arrows() -> None:
    chunks = chunk(extracted("coursework-ru.docx"))

    assert [piece.heading for piece in chunks][:2] == [
        "Курсовая работа: система предварительной проверки студенческих работ › Введение",
        "Курсовая работа: система предварительной проверки студенческих работ"
        " › Глава 1. Обзор существующих решений",
    ]
    assert all(piece.page is None for piece in chunks)


def test_a_title_without_text_of_its_own_opens_the_first_chapter_chunk() -> None:
    chunks = chunk(extracted("coursework-ru.docx"))

    assert chunks[0].text.startswith(
        "Курсовая работа: система предварительной проверки студенческих работ\n\nВведение\n\n"
    )


def test_chunks_without_headings_have_no_heading() -> None:
    chunks = chunk(document(paragraph("No headings here.")))

    assert chunks[0].heading is None
    assert HEADING_SEPARATOR == " › "


def test_ordinals_count_up_and_char_counts_match_the_text() -> None:
    chunks = chunk(extracted("real/pdflatex-4-pages.pdf"), max_tokens=64)

    assert [piece.ordinal for piece in chunks] == list(range(len(chunks)))
    assert all(piece.char_count == len(piece.text) for piece in chunks)


# --- overlap -----------------------------------------------------------------------------


def test_consecutive_chunks_of_a_section_start_with_the_previous_last_sentence() -> None:
    chunks = chunk(document(paragraph(numbered_sentences(30))), max_tokens=40, overlap_tokens=10)

    assert len(chunks) > 2
    for previous, current in itertools.pairwise(chunks):
        last_sentence = "Sentence " + previous.text.rsplit("Sentence ", 1)[1]
        assert current.text.startswith(last_sentence + " ")


def test_overlap_falls_back_to_trailing_words_inside_a_long_sentence() -> None:
    sentence = " ".join(f"w{n}" for n in range(60))

    chunks = chunk(document(paragraph(sentence)), max_tokens=26, overlap_tokens=6)

    assert chunks[1].text.split()[:4] == chunks[0].text.split()[-4:]


def test_chunks_of_different_sections_do_not_overlap() -> None:
    source = document(
        paragraph(numbered_sentences(8), "Part one"),
        paragraph(numbered_sentences(8), "Part two"),
    )

    chunks = chunk(source, max_tokens=200, overlap_tokens=30)

    assert [piece.heading for piece in chunks] == ["Part one", "Part two"]
    assert words_of(chunks) == numbered_sentences(8).split() * 2


def test_chunks_of_different_pdf_pages_do_not_overlap() -> None:
    source = extracted("research-paper.pdf")

    chunks = chunk(source, max_tokens=10_000, overlap_tokens=30)

    assert [piece.text for piece in chunks] == [block.text for block in source.blocks]


def test_chunking_is_deterministic() -> None:
    source = extracted("lecture-notes-ru.pdf")

    assert chunk(source, max_tokens=50) == chunk(source, max_tokens=50)


# --- properties --------------------------------------------------------------------------

# A fixed alphabet keeps generation fast while still mixing scripts, punctuation that ends
# sentences, joiners and ligatures.
_ALPHABET = (
    "abcXYZ019.,;:!?-|()[]\"'"
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБЯ"
    "حَبيبيءآأؤإئةتثجخدذرزسشصضطظعغفقكلمنهوى؟"
    "漢字。！？…«»“”’\u200d\u200c\ufb01\u00ad\U0001f600"
)
_words = st.text(alphabet=_ALPHABET, min_size=1, max_size=12) | st.sampled_from(
    ["end.", "Да!", "2.", "A.", "«так.»", "حَبيبي؟", "|"]
)
_separators = st.sampled_from([" ", "  ", "\n", "\t", "\u00a0", " \n "])


@st.composite
def _block_text(draw: st.DrawFn) -> str:
    words = draw(st.lists(_words, max_size=60))
    separators = draw(st.lists(_separators, min_size=len(words), max_size=len(words)))
    return "".join(sep + word for sep, word in zip(separators, words, strict=True))


_blocks = st.builds(
    TextBlock,
    text=_block_text(),
    kind=st.sampled_from(["page", "heading", "paragraph", "table"]),
    page=st.none() | st.integers(1, 3),
    heading_path=st.lists(st.sampled_from(["A", "B", "Глава"]), max_size=2).map(tuple),
)
_documents = st.lists(_blocks, max_size=8).map(lambda blocks: document(*blocks))
_budgets = st.integers(2, 60).flatmap(
    lambda max_tokens: st.tuples(st.just(max_tokens), st.integers(0, max_tokens - 1))
)


@given(source=_documents, budget=_budgets)
def test_chunking_never_loses_a_word(source: ExtractedDocument, budget: tuple[int, int]) -> None:
    max_tokens, overlap_tokens = budget

    chunks = chunk(source, max_tokens=max_tokens, overlap_tokens=overlap_tokens)

    assert set(source.text.split()) <= set(words_of(chunks))


@given(source=_documents, max_tokens=st.integers(2, 60))
def test_without_overlap_chunks_hold_every_word_once_in_order(
    source: ExtractedDocument, max_tokens: int
) -> None:
    chunks = chunk(source, max_tokens=max_tokens, overlap_tokens=0)

    assert words_of(chunks) == source.text.split()


@given(source=_documents, budget=_budgets)
def test_no_chunk_ever_exceeds_the_token_budget(
    source: ExtractedDocument, budget: tuple[int, int]
) -> None:
    max_tokens, overlap_tokens = budget

    chunks = chunk(source, max_tokens=max_tokens, overlap_tokens=overlap_tokens)

    assert all(0 < estimate_tokens(piece.text) <= max_tokens for piece in chunks)
