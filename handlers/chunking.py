"""Split extracted documents into overlapping, token-bounded chunks for embedding and prompts,
cutting by structure first (sections, blocks), then by sentences, then by words."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from handlers.extraction import ExtractedDocument, TextBlock

logger = logging.getLogger(__name__)

HEADING_SEPARATOR = " \N{SINGLE RIGHT-POINTING ANGLE QUOTATION MARK} "

# 1.3 tokens per word, as a fraction so budgets never suffer from float rounding.
_TOKENS_PER_WORD_NUMERATOR = 13
_TOKENS_PER_WORD_DENOMINATOR = 10

_SENTENCE_END = frozenset(
    ".!?\N{HORIZONTAL ELLIPSIS}"
    "\N{ARABIC QUESTION MARK}\N{ARABIC FULL STOP}\N{DEVANAGARI DANDA}"
    "\N{IDEOGRAPHIC FULL STOP}\N{FULLWIDTH EXCLAMATION MARK}\N{FULLWIDTH QUESTION MARK}"
)
# Closing quotes and brackets may follow the full stop: «…так.» or (see above.)
_CLOSERS = (
    "\"')]}\N{RIGHT-POINTING DOUBLE ANGLE QUOTATION MARK}"
    "\N{RIGHT DOUBLE QUOTATION MARK}\N{RIGHT SINGLE QUOTATION MARK}"
)
# "2." or "3.1." numbers a heading and "A." is an initial; neither ends a sentence.
_NOT_A_SENTENCE = re.compile(r"^(?:\d{1,2}(?:\.\d{1,2})*|\w)\.$")
_BLOCK_BREAK = "\n\n"
_WORD = re.compile(r"\S+")
# Every character str.splitlines() treats as a line boundary.
_LINE_BREAK = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough to embed, with where it came from."""

    ordinal: int
    text: str
    page: int | None
    heading: str | None
    char_count: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "char_count", len(self.text))

    @property
    def token_estimate(self) -> int:
        return estimate_tokens(self.text)


def estimate_tokens(text: str) -> int:
    """Approximate token count: ``ceil(words * 1.3)``, a word being a run of non-whitespace.

    1.3 is the usual ratio for English under subword tokenizers. It underestimates scripts
    such as Cyrillic or Arabic, which split into more pieces per word, so leave headroom in
    ``max_tokens`` when the embedding model has a hard limit. Integer arithmetic keeps the
    estimate exact, so ``estimate_tokens(chunk.text) <= max_tokens`` always holds.
    """
    words = len(text.split())
    return -(-words * _TOKENS_PER_WORD_NUMERATOR // _TOKENS_PER_WORD_DENOMINATOR)


def chunk(
    document: ExtractedDocument, *, max_tokens: int = 200, overlap_tokens: int = 30
) -> list[Chunk]:
    """Split `document` into chunks of at most `max_tokens` estimated tokens.

    Consecutive chunks of the same section share up to `overlap_tokens` (whole trailing
    sentences where they fit, otherwise trailing words), so a fact cut by a chunk border
    is still whole in one of them. Chunks never span two sections or two pages.
    """
    max_words = max_tokens * _TOKENS_PER_WORD_DENOMINATOR // _TOKENS_PER_WORD_NUMERATOR
    if max_words < 1:
        raise ValueError("max_tokens is too small to hold a single word")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError("overlap_tokens must be at least 0 and less than max_tokens")
    # Each chunk must take at least one new word, or chunking would never finish.
    overlap_words = min(
        overlap_tokens * _TOKENS_PER_WORD_DENOMINATOR // _TOKENS_PER_WORD_NUMERATOR,
        max_words - 1,
    )
    # Units this small always fit next to a full overlap, so overlap is never squeezed out.
    unit_words = max_words - overlap_words

    chunks: list[Chunk] = []
    for section in _sections(document.blocks):
        units = [unit for block in section.blocks for unit in _units(block, unit_words)]
        heading = HEADING_SEPARATOR.join(section.path) or None
        for words in _pack(units, max_words, overlap_words):
            chunks.append(Chunk(len(chunks), _render(words), section.page, heading))
    logger.debug(
        "chunked %d blocks into %d chunks (max_tokens=%d, overlap_tokens=%d)",
        len(document.blocks),
        len(chunks),
        max_tokens,
        overlap_tokens,
    )
    return chunks


@dataclass(frozen=True)
class _Word:
    """A word and the whitespace that preceded it, so chunks keep line and block breaks."""

    separator: str
    text: str

    @property
    def ends_sentence(self) -> bool:
        stripped = self.text.rstrip(_CLOSERS)
        if not stripped or stripped[-1] not in _SENTENCE_END:
            return False
        return not _NOT_A_SENTENCE.match(stripped)


@dataclass
class _Section:
    path: tuple[str, ...]
    page: int | None
    blocks: list[TextBlock]

    @property
    def only_headings(self) -> bool:
        return all(block.kind == "heading" for block in self.blocks)

    def is_parent_of(self, other: _Section) -> bool:
        return (
            other.page == self.page
            and len(other.path) > len(self.path)
            and other.path[: len(self.path)] == self.path
        )


def _sections(blocks: Sequence[TextBlock]) -> list[_Section]:
    """Group consecutive blocks by heading path and page.

    A heading with no text of its own (a title directly followed by a chapter heading) is
    folded into the next section below it, so it does not become a chunk of two words.
    """
    grouped: list[_Section] = []
    for block in blocks:
        if not block.text.split():
            continue
        last = grouped[-1] if grouped else None
        if last is not None and (last.path, last.page) == (block.heading_path, block.page):
            last.blocks.append(block)
        else:
            grouped.append(_Section(block.heading_path, block.page, [block]))

    sections: list[_Section] = []
    pending: _Section | None = None
    for section in grouped:
        if pending is not None:
            if pending.is_parent_of(section):
                section.blocks = pending.blocks + section.blocks
            else:
                sections.append(pending)
            pending = None
        if section.only_headings:
            pending = section
        else:
            sections.append(section)
    if pending is not None:
        sections.append(pending)
    return sections


def _words(block: TextBlock) -> list[_Word]:
    words: list[_Word] = []
    previous_end = 0
    for match in _WORD.finditer(block.text):
        gap = block.text[previous_end : match.start()]
        previous_end = match.end()
        if not words:
            separator = _BLOCK_BREAK
        elif _LINE_BREAK.search(gap):
            separator = "\n"
        else:
            separator = " "
        words.append(_Word(separator, match.group()))
    return words


def _units(block: TextBlock, unit_words: int) -> Iterator[list[_Word]]:
    """The largest structural pieces of a block that fit `unit_words`.

    The whole block if it fits; otherwise its rows (tables) or sentences; a piece that is
    still too long is cut into word windows.
    """
    words = _words(block)
    if len(words) <= unit_words:
        yield words
        return
    pieces = _rows(words) if block.kind == "table" else _sentences(words)
    for piece in pieces:
        for start in range(0, len(piece), unit_words):
            yield piece[start : start + unit_words]


def _sentences(words: list[_Word]) -> Iterator[list[_Word]]:
    start = 0
    for index, word in enumerate(words):
        if word.ends_sentence:
            yield words[start : index + 1]
            start = index + 1
    if start < len(words):
        yield words[start:]


def _rows(words: list[_Word]) -> Iterator[list[_Word]]:
    start = 0
    for index in range(1, len(words)):
        if words[index].separator == "\n":
            yield words[start:index]
            start = index
    yield words[start:]


def _pack(units: list[list[_Word]], max_words: int, overlap_words: int) -> Iterator[list[_Word]]:
    """Greedily fill chunks with whole units, starting each later chunk with an overlap."""
    current: list[_Word] = []
    fresh = 0  # words in `current` that are not overlap
    for unit in units:
        if fresh and len(current) + len(unit) > max_words:
            yield current
            current = _overlap(current, overlap_words)
            fresh = 0
        current = current + unit
        fresh += len(unit)
    if fresh:
        yield current


def _overlap(words: list[_Word], overlap_words: int) -> list[_Word]:
    """The longest tail of whole sentences within `overlap_words`, else the last words."""
    if overlap_words <= 0:
        return []
    first_allowed = max(len(words) - overlap_words, 1)
    for start in range(first_allowed, len(words)):
        if words[start - 1].ends_sentence or words[start].separator == _BLOCK_BREAK:
            return words[start:]
    return words[first_allowed:]


def _render(words: list[_Word]) -> str:
    if not words:
        return ""
    return words[0].text + "".join(word.separator + word.text for word in words[1:])
