"""The lines of a document's extracted text that look like section headings.

A small model asked to list a document's sections copies whatever it saw last (the answer's
shape, JSON punctuation, a sentence of the body). The structure step therefore gets the
candidates from the text itself, and the model chooses among them (`x-choices: headings` in
inference/validation.py): every section it can name is a line of the document.

A line is a candidate when it is short, starts with a capital letter (after an optional number
such as `2.`, `3.1` or `IV.`, or a word such as `Chapter 2.` / `Глава 2.`), and does not end like
a sentence or a list item. Unnumbered lines must also read like a heading rather than a title or a
byline: not the document's first line, no comma, at most six words, and followed by a line of
text of at least five words (a paragraph, not another short line).
"""

from __future__ import annotations

import re

MAX_HEADING_CHARS = 80
MAX_CANDIDATES = 30
_NUMBERED_WORDS = 10
_UNNUMBERED_WORDS = 6
_FOLLOWING_WORDS = 5

_NUMBER = re.compile(
    r"^(?:(?:chapter|section|part|глава|раздел|часть)\s+)?"
    r"(?:\d{1,2}(?:\.\d{1,2})*|[IVXivx]{1,4})\.?\s+(?=\S)",
    re.IGNORECASE,
)
_SENTENCE_END = tuple(".,;:!?\N{HORIZONTAL ELLIPSIS}")
_BULLETS = tuple("-*\N{BULLET}\N{EN DASH}\N{EM DASH}[(")


def heading_candidates(text: str, limit: int = MAX_CANDIDATES) -> list[str]:
    """The heading-like lines of `text`, each once, in the order they first occur."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    found: list[str] = []
    for index, line in enumerate(lines):
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if _is_heading(line, first=index == 0, following=following) and line not in found:
            found.append(line)
            if len(found) == limit:
                break
    return found


def _is_heading(line: str, *, first: bool, following: str) -> bool:
    if len(line) > MAX_HEADING_CHARS or line.startswith(_BULLETS):
        return False
    if line.endswith(_SENTENCE_END):
        return False
    number = _NUMBER.match(line)
    title = line[number.end() :] if number else line
    if not title[:1].isupper() or not any(c.isalpha() for c in title):
        return False
    words = len(title.split())
    if number:
        return words <= _NUMBERED_WORDS
    return (
        not first
        and "," not in title
        and words <= _UNNUMBERED_WORDS
        and len(following.split()) >= _FOLLOWING_WORDS
    )
