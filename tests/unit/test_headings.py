# ruff: noqa: RUF001 - Cyrillic characters are the test data
"""Heading candidates: the lines of a document's text that the structure step chooses from."""

from __future__ import annotations

from inference.headings import heading_candidates

PAPER = """Replayable Review: Event-Sourced Pipelines for LLM
Document Analysis
A. Petrova, L. Nguyen
Abstract
We study how document-processing services that call large language models can keep a
complete history. On a corpus of 1,200 course reports our prototype processed 41 tickets.
1. Introduction
Universities increasingly ask automated systems to pre-review student work: checking that a
report states its goal.
2. Method
A ticket is created when a user uploads a document and chooses a review pipeline.
Table 1. Prefix-ordered prompts: 41 tickets/min, p50 read-model lag 38 ms.
4. Threats to validity
All documents were in English and Russian; other languages may chunk differently.
5. Conclusion
Keeping the full history of an AI review pipeline is affordable.
References
[1] Fowler, M. Event Sourcing. 2005."""


def test_numbered_and_unnumbered_headings_are_found_in_order() -> None:
    assert heading_candidates(PAPER) == [
        "Abstract",
        "1. Introduction",
        "2. Method",
        "4. Threats to validity",
        "5. Conclusion",
        "References",
    ]


def test_titles_bylines_sentences_and_list_items_are_not_headings() -> None:
    text = (
        "A Title Line\n"
        "Introduction\n"
        "This paragraph explains what the study did and why it matters.\n"
        "short line without a full stop\n"
        "Results were good.\n"
        "- Bullet Item\n"
        "Conclusion\n"
        "Too short\n"
    )
    # The title is the first line; "Conclusion" is followed by a short line, not a paragraph.
    assert heading_candidates(text) == ["Introduction"]


def test_russian_chapters_are_headings_and_each_is_listed_once() -> None:
    text = (
        "Курсовая работа: компостирование\n\n"
        "Введение\n\nСтуденческие общежития производят много пищевых отходов каждый день.\n\n"
        "Глава 1. Теоретические основы компостирования\n\nКомпостирование — это разложение.\n\n"
        "Введение\n\nЕщё раз то же самое введение, повторённое в тексте документа.\n\n"
        "1. Иванов П. Р. Обращение с органическими отходами. — М., 2019."
    )
    assert heading_candidates(text) == [
        "Введение",
        "Глава 1. Теоретические основы компостирования",
    ]
    assert heading_candidates(text, limit=1) == ["Введение"]


def test_a_text_without_headings_has_no_candidates() -> None:
    assert heading_candidates("") == []
    assert heading_candidates("One long paragraph of text that has no heading at all.") == []
