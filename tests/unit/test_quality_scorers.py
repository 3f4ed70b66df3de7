"""The scorers of the quality evaluation (benchmarks/quality), on hand-made outputs: each passes
a good output and fails a bad one."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.quality import scorers
from benchmarks.quality.dataset import DATA, load_cases
from benchmarks.quality.documents import build, parse, to_pdf
from handlers.extraction import ExtractionLimits, extract
from inference.pipelines import pipeline_definition

PAPER = """Heat pumps in apartment blocks
1. Introduction
The goal of this study is to measure the savings of heat pumps.
2. Method
Twelve buildings were monitored for two winters.
3. Results
Heating costs fell by 31 percent.
4. Conclusion
Heat pumps are a workable replacement."""
SOURCE = scorers.Source(PAPER, {1: PAPER}, {"Results": "Heating costs fell by 31 percent."})
REVIEW = pipeline_definition("document-review")
PROMPTS = [REVIEW["system_prompt"], *(s["instruction"] for s in REVIEW["subtasks"])]


def failed(checks: list[scorers.Check]) -> list[str]:
    return [check.label for check in checks if not check.ok]


def test_normalising_folds_case_punctuation_and_the_russian_yo() -> None:
    assert scorers.normalise("  Объём,  Heat-Pumps! ") == "объем heat pumps"
    assert scorers.contains("Results: 31 percent", "results")
    assert not scorers.contains("Results", "")


def test_a_fact_is_covered_by_any_alternative_whose_terms_all_occur() -> None:
    assert scorers.fact_covered(["cost+31", "third"], "Costs fell by 31 percent")
    assert scorers.fact_covered(["компост"], "Компостирование сократило мусор")
    assert not scorers.fact_covered(["cost+31"], "Costs fell by a lot")


def test_schema_validity_passes_a_matching_object_and_fails_others() -> None:
    schema = next(s["output_schema"] for s in REVIEW["subtasks"] if s["id"] == "goal")

    assert scorers.schema_valid({"goal": "Measure savings.", "stated_explicitly": True}, schema)
    assert not scorers.schema_valid({"goal": "Measure savings."}, schema)
    assert not scorers.schema_valid(["not", "an", "object"], schema)


def test_a_verdict_must_lie_in_the_band_of_its_score() -> None:
    good = {"verdict": {"verdict": "accept", "score": 85, "rationale": "Sound."}}
    bad = {"verdict": {"verdict": "accept", "score": 0, "rationale": "Accepted."}}

    assert failed(scorers.consistency("document-review", good, {})) == []
    assert failed(scorers.consistency("document-review", bad, {})) == [
        "verdict accept with score 0"
    ]


def criteria(*scores: int) -> dict[str, Any]:
    return {name: {"score": s} for name, s in zip(scorers.CRITERIA, scores, strict=True)}


def test_a_recommendation_must_follow_the_criterion_scores() -> None:
    good = {
        **criteria(80, 70, 75, 65, 70),
        "recommendation": {"recommendation": "recommend", "average_score": 72},
    }
    bad = {
        **criteria(80, 70, 75, 65, 70),
        "recommendation": {"recommendation": "strongly_recommend", "average_score": 95},
    }

    assert failed(scorers.consistency("resume-screening", good, {})) == []
    assert len(failed(scorers.consistency("resume-screening", bad, {}))) == 2


@pytest.mark.parametrize(
    ("scores", "label"),
    [
        ((90, 88, 85, 86, 90), "strongly_recommend"),
        ((95, 95, 95, 95, 60), "recommend"),
        ((50, 60, 55, 50, 45), "consider"),
        ((10, 20, 30, 40, 20), "reject"),
    ],
)
def test_the_recommendation_rule_is_the_pipelines(scores: tuple[int, ...], label: str) -> None:
    assert scorers.recommendation_for(scores) == label


def test_flashcards_must_come_in_the_asked_number_without_repeats() -> None:
    card = {"front": "What is TCP?", "back": "A transport protocol."}
    other = {"front": "What is a SYN?", "back": "The first segment."}

    assert (
        failed(scorers.consistency("flashcards", {"cards": {"cards": [card, other]}}, {"count": 2}))
        == []
    )
    assert failed(
        scorers.consistency("flashcards", {"cards": {"cards": [card, card]}}, {"count": 3})
    ) == [
        "2 cards for 3 asked",
        "no repeated card",
    ]


def test_an_answerable_answer_must_cite_an_excerpt() -> None:
    good = {"answer": {"answerable": True, "answer": "12 items.", "citations": [{"page": 2}]}}
    bad = {"answer": {"answerable": True, "answer": "12 items.", "citations": []}}

    assert failed(scorers.consistency("document-qa", good, {})) == []
    assert failed(scorers.consistency("document-qa", bad, {})) == [
        "an answerable answer cites an excerpt"
    ]


def test_claimed_sections_and_numbers_must_be_in_the_document() -> None:
    good = {
        "structure": {"sections": ["1. Introduction", "Method", "Results"]},
        "summary": {"summary": "Costs fell by 31 percent."},
    }
    bad = {
        "structure": {"sections": ["type", "items", "maxItems"]},
        "summary": {"summary": "Costs fell by 45 percent."},
    }

    assert failed(scorers.grounding("document-review", good, SOURCE)) == []
    assert failed(scorers.grounding("document-review", bad, SOURCE)) == [
        "section 'type'",
        "section 'items'",
        "section 'maxItems'",
        "summary.summary: number 45",
    ]


def test_a_claimed_section_must_be_a_heading_line_not_a_word_or_number_of_the_text() -> None:
    claimed = {"structure": {"sections": ["Results", "4. Conclusion", "1", "heating costs", "e"]}}

    assert failed(scorers.grounding("document-review", claimed, SOURCE)) == [
        "section '1'",
        "section 'heating costs'",
        "section 'e'",
    ]
    chapter = "Глава 1. Теоретические основы компостирования\nТекст."  # noqa: RUF001
    assert scorers.is_heading_line(chapter, "Теоретические основы компостирования")
    assert not scorers.is_heading_line(chapter, "основы")


def test_extracted_candidate_details_must_be_in_the_resume() -> None:
    resume = "Amir Haddad. Email: amir@example.com. Phone: +31 10 555 0199. Skills: Python, Kafka."
    source = scorers.Source(resume, {}, {})
    good = {
        "extraction": {
            "name": "Amir Haddad",
            "contacts": {"email": "amir@example.com", "phone": "+31 (10) 555-0199", "links": []},
            "skills": ["Python", "Kafka"],
            "education": [],
        }
    }
    bad = {
        "extraction": {
            "name": "John Smith",
            "contacts": {"email": "john@example.com", "phone": None, "links": []},
            "skills": ["Python", "Rust"],
            "education": [],
        },
        "fit": {"score": 80, "justification": "He has 12 years of Rust."},
    }

    assert failed(scorers.grounding("resume-screening", good, source)) == []
    assert failed(scorers.grounding("resume-screening", bad, source)) == [
        "name 'John Smith'",
        "email 'john@example.com'",
        "skill 'Rust'",
        "fit: number 12",
    ]


def test_a_flashcard_answer_must_come_from_the_document() -> None:
    good = {"cards": {"cards": [{"front": "How much did costs fall?", "back": "By 31 percent."}]}}
    bad = {"cards": {"cards": [{"front": "Who invented it?", "back": "Nikola Tesla in 1888."}]}}

    assert failed(scorers.grounding("flashcards", good, SOURCE)) == []
    assert len(failed(scorers.grounding("flashcards", bad, SOURCE))) == 1


def test_a_citation_must_name_a_place_that_supports_the_answer() -> None:
    source = scorers.Source(
        "p1 opening hours\np2 12 items",
        {1: "Opening hours 9 to 20", 2: "Members borrow 12 items"},
        {},
    )
    good = {
        "answer": {"answer": "Members borrow 12 items.", "citations": [{"excerpt": 1, "page": 2}]}
    }
    bad = {
        "answer": {"answer": "Members borrow 12 items.", "citations": [{"excerpt": 1, "page": 5}]}
    }

    assert failed(scorers.grounding("document-qa", good, source)) == []
    assert failed(scorers.grounding("document-qa", bad, source)) == ["citation of excerpt 1"]


def test_coverage_counts_the_reference_facts_of_a_review() -> None:
    case = {
        "pipeline": "document-review",
        "facts": {"summary": [["heat pump"], ["31", "third"]]},
        "sections": ["Introduction", "Results"],
        "goal_stated": True,
    }
    good = {
        "summary": {"summary": "Heat pumps cut costs by a third."},
        "structure": {"sections": ["1. Introduction", "3. Results"]},
        "goal": {"stated_explicitly": True},
    }
    bad = {
        "summary": {"summary": "The document is summarised in a JSON object."},
        "structure": {"sections": ["type", "items"]},
        "goal": {"stated_explicitly": False},
    }

    assert failed(scorers.coverage(case, good)) == []
    assert len(failed(scorers.coverage(case, bad))) == 5
    # A fragment of a word covers no section: "e" is in "Introduction" and "Results" as a
    # letter, not as a word.
    fragments = {**good, "structure": {"sections": ["e", "s"]}}
    assert failed(scorers.coverage(case, fragments)) == [
        "section Introduction",
        "section Results",
    ]


def test_coverage_of_a_resume_needs_the_right_years_and_skills() -> None:
    case = {
        "pipeline": "resume-screening",
        "candidate": {
            "name": "Amir Haddad",
            "email": "a@x.org",
            "years_of_experience": 6,
            "skills": ["Kafka"],
        },
        "expected_recommendation": ["recommend"],
    }
    good = {
        "extraction": {
            "name": "Amir Haddad",
            "contacts": {"email": "a@x.org"},
            "years_of_experience": 6,
            "skills": ["Apache Kafka"],
        },
        "recommendation": {"recommendation": "recommend"},
    }
    bad = {
        "extraction": {
            "name": "Amir",
            "contacts": {"email": None},
            "years_of_experience": 0,
            "skills": [],
        },
        "recommendation": {"recommendation": "reject"},
    }

    assert failed(scorers.coverage(case, good)) == []
    assert len(failed(scorers.coverage(case, bad))) == 5


def test_coverage_of_an_answer_needs_its_facts_and_the_page_they_are_on() -> None:
    case = {"pipeline": "document-qa"}
    question = {"answer": [["12", "twelve"]], "where": {"page": 2}}
    good = {
        "answer": {
            "answerable": True,
            "answer": "Twelve items.",
            "citations": [{"page": 2, "heading": None}],
        }
    }
    bad = {
        "answer": {
            "answerable": True,
            "answer": "Five items.",
            "citations": [{"page": 1, "heading": None}],
        }
    }

    assert failed(scorers.coverage(case, good, question)) == []
    assert failed(scorers.coverage(case, bad, question)) == ["12 / twelve", "cites {'page': 2}"]


def test_a_location_is_a_page_or_a_heading() -> None:
    assert scorers.at_location(2, None, {"page": 2})
    assert not scorers.at_location(None, "Guide / Оплата", {"page": 2})
    assert scorers.at_location(None, "Guide / Оплата", {"heading": "оплата"})
    assert not scorers.at_location(None, None, {"heading": "Оплата"})


def test_schema_keywords_prompt_talk_and_echoed_instructions_are_not_clean() -> None:
    good = {"sections": ["Introduction", "Results"], "summary": "Heat pumps saved a third."}
    echoed = REVIEW["subtasks"][2]["instruction"]

    assert scorers.clean(good, PROMPTS).ok
    assert not scorers.clean({"sections": ["type", "items", "maxItems"]}, PROMPTS).ok
    assert not scorers.clean(
        {"summary": "The document is summarised in a JSON object."}, PROMPTS
    ).ok
    assert not scorers.clean({"summary": echoed}, PROMPTS).ok
    assert scorers.leaks({"s": "<document> text"}) == ["'<document> text' talks about the prompt"]


def test_every_case_of_the_data_set_is_well_formed_and_its_documents_build() -> None:
    cases = load_cases()
    pipelines = {case.pipeline for case in cases}
    assert pipelines == {"document-review", "resume-screening", "flashcards", "document-qa"}
    assert {case.language for case in cases} == {"en", "ru"}
    for pipeline in pipelines:
        assert {c.language for c in cases if c.pipeline == pipeline} == {"en", "ru"}
    in_repo = {
        name for case in cases for name in case.documents.values() if name.startswith("documents/")
    }
    assert len(in_repo) >= 12
    for name in in_repo:
        source, _, kind = name.partition(":")
        content, media_type = build(DATA / source, kind)
        document = extract(content, media_type, ExtractionLimits())
        assert document.character_count > 300, name
    for case in cases:
        for question in case.questions:
            assert question["answer"], case.id
            assert question["where"], case.id


def test_the_pdf_writer_keeps_its_page_breaks_and_refuses_text_it_cannot_show() -> None:
    content = to_pdf(parse("# Title\nFirst page.\n<<<page>>>\n## Second\nSecond page."))
    document = extract(content, "application/pdf", ExtractionLimits())

    assert document.page_count == 2
    assert "Second page." in document.blocks[1].text
    with pytest.raises(UnicodeEncodeError):
        to_pdf(parse("Привет"))
