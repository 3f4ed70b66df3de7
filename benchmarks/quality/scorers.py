"""Scorers for pipeline outputs: each takes outputs and reference data and returns checks.

A check is one yes/no observation with a short label (`Check`); a table rate is the share of
checks that passed. Five kinds:

- **valid**: the model's raw text is a JSON object valid against the subtask's output schema.
- **consistent**: fields that depend on each other agree: a review's score lies in the band of
  its verdict; a recommendation's average is the mean of the five criterion scores (within 2)
  and its label follows the pipeline's rule on that mean; flashcards come in the requested
  number without repeated fronts; a Q&A answer marked answerable cites an excerpt.
- **grounded**: what the output claims to have taken from the document is there: every claimed
  section title is a line of the document (after an optional number such as `2.`), every number
  in free text, the candidate's name, e-mail, phone, skills and links, each flashcard's answer
  (half its content words occur in the document), each cited page or section (it shares a word
  or number with the answer).
- **covered**: the reference facts written by hand for the case are in the output. A fact is a
  list of alternatives; an alternative is one or more terms joined by `+`; the fact is covered
  when every term of some alternative occurs in the output text. Matching is on normalised text
  (`normalise`: case-folded, Cyrillic yo read as ie, punctuation and spaces collapsed to one
  space), by substring, so a stem (`компост`) matches every form of a word. A reference section
  is covered by a listed section when one contains the other as whole words.
- **clean**: no string of the output is a JSON Schema keyword (`type`, `items`, `maxItems`,
  ...), mentions the prompt's machinery (`JSON object`, `schema`, the fence tags), or repeats
  eight words in a row of the instruction or the system prompt.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema

_NON_WORD = re.compile(r"[^\w]+")
_NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)?")
_WORD = re.compile(r"\w{4,}")

SCHEMA_KEYWORDS = frozenset(
    {
        "type", "items", "maxitems", "minitems", "properties", "required", "enum",
        "additionalproperties", "minlength", "maxlength", "minimum", "maximum", "pattern",
        "anyof", "oneof", "allof", "const", "string", "integer", "boolean", "array", "object",
        "null", "number", "schema", "json", "json schema", "json object",
    }
)  # fmt: skip
PROMPT_PHRASES = (
    "json object",
    "json schema",
    "jsonschema",
    "the requested schema",
    "matches this",
    "reply with only",
    "untrusted data",
    "<document",
    "</document",
    "<options",
    "maxitems",
    "minitems",
    "additionalproperties",
)
ECHO_WORDS = 8

# The bands a review's score must fall in for each verdict, as the document-review pipeline
# defines them, widened by 10 points so that a borderline score is not counted against it.
VERDICT_BANDS: dict[str, tuple[int, int]] = {
    "accept": (70, 100),
    "minor_revision": (50, 89),
    "major_revision": (30, 69),
    "reject": (0, 49),
}
CRITERIA = ("technical_skills", "relevant_experience", "communication", "problem_solving", "fit")


@dataclass(frozen=True)
class Check:
    label: str
    ok: bool


def normalise(text: str) -> str:
    folded = text.casefold().replace("\N{CYRILLIC SMALL LETTER IO}", "\N{CYRILLIC SMALL LETTER IE}")
    return " ".join(_NON_WORD.sub(" ", folded).split())


def _norm_number(number: str) -> str:
    return number.replace(",", ".")


def numbers(text: str) -> set[str]:
    return {_norm_number(n) for n in _NUMBER.findall(text)}


def contains(haystack: str, needle: str) -> bool:
    """Whether normalised `needle` occurs in normalised `haystack` (an empty needle never does)."""
    wanted = normalise(needle)
    return bool(wanted) and wanted in normalise(haystack)


def contains_words(haystack: str, needle: str) -> bool:
    """Whether normalised `needle` occurs in normalised `haystack` as whole words (an empty
    needle never does): "Method" is in "Data and method", "e" is not."""
    wanted = normalise(needle)
    return bool(wanted) and f" {wanted} " in f" {normalise(haystack)} "


# What may stand before a heading's title on its line: "2.", "3.1", "IV.", "Chapter 2.".
_HEADING_NUMBER = r"(?:(?:chapter|section|part|глава|раздел|часть) )?(?:(?:\d+|[ivx]+) )*"


def is_heading_line(text: str, section: str) -> bool:
    """Whether some line of `text` is `section`, possibly after a number (normalised): a
    claimed section is a heading of the document, not any phrase or number found in it."""
    wanted = normalise(section)
    if not wanted:
        return False
    pattern = re.compile(_HEADING_NUMBER + re.escape(wanted))
    return any(pattern.fullmatch(normalise(line)) for line in text.splitlines())


def fact_covered(fact: Sequence[str], text: str) -> bool:
    return any(all(contains(text, term) for term in alt.split("+")) for alt in fact)


def strings(value: Any) -> Iterator[str]:
    """Every string value inside `value` (keys are the schema's, so they are left out)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def text_of(value: Any) -> str:
    return "\n".join(strings(value))


# -- valid ------------------------------------------------------------------------------------


def schema_valid(output: Any, schema: Mapping[str, Any]) -> bool:
    validator = jsonschema.Draft202012Validator(schema)
    return isinstance(output, dict) and not any(validator.iter_errors(output))


# -- clean ------------------------------------------------------------------------------------


def _windows(text: str, size: int) -> set[str]:
    words = normalise(text).split()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def leaks(output: Any, prompts: Iterable[str] = ()) -> list[str]:
    """The strings of `output` that echo the schema or the prompt, each with the reason."""
    echoes: set[str] = set()
    for prompt in prompts:
        echoes |= _windows(prompt, ECHO_WORDS)
    problems = []
    for value in strings(output):
        norm = normalise(value)
        lowered = value.casefold()
        if norm in SCHEMA_KEYWORDS:
            problems.append(f"{value!r} is a schema keyword")
        elif any(phrase in lowered for phrase in PROMPT_PHRASES):
            problems.append(f"{value[:60]!r} talks about the prompt")
        elif echoes & _windows(value, ECHO_WORDS):
            problems.append(f"{value[:60]!r} repeats the instructions")
    return problems


def clean(output: Any, prompts: Iterable[str] = ()) -> Check:
    problems = leaks(output, prompts)
    return Check("; ".join(problems) or "clean", not problems)


# -- consistent -------------------------------------------------------------------------------


def recommendation_for(scores: Sequence[int]) -> str:
    """The resume-screening pipeline's rule: the label its five criterion scores call for.

    Version 1 also asked for no score below 70 for strongly_recommend; version 2 goes by the
    average alone, so with a lower score both labels are accepted (`recommendations_for`)."""
    mean = sum(scores) / len(scores)
    if mean >= 85 and min(scores) >= 70:
        return "strongly_recommend"
    if mean >= 70:
        return "recommend"
    if mean >= 50:
        return "consider"
    return "reject"


def recommendations_for(scores: Sequence[int]) -> set[str]:
    labels = {recommendation_for(scores)}
    if sum(scores) / len(scores) >= 85:
        labels.add("strongly_recommend")
    return labels


def consistency(
    pipeline: str, outputs: Mapping[str, Any], options: Mapping[str, Any]
) -> list[Check]:
    checks: list[Check] = []
    if pipeline == "document-review" and isinstance(outputs.get("verdict"), dict):
        verdict = outputs["verdict"]
        low, high = VERDICT_BANDS.get(str(verdict.get("verdict")), (0, 100))
        score = verdict.get("score")
        ok = isinstance(score, int) and low <= score <= high
        checks.append(Check(f"verdict {verdict.get('verdict')} with score {score}", ok))
    if pipeline == "resume-screening" and isinstance(outputs.get("recommendation"), dict):
        scores = [
            outputs.get(c, {}).get("score") for c in CRITERIA if isinstance(outputs.get(c), dict)
        ]
        if len(scores) == len(CRITERIA) and all(isinstance(s, int) for s in scores):
            ints = [int(s) for s in scores if isinstance(s, int)]
            result = outputs["recommendation"]
            mean = sum(ints) / len(ints)
            average = result.get("average_score")
            checks.append(
                Check(
                    f"average {average} for a mean of {mean:.1f}",
                    isinstance(average, int) and abs(average - mean) <= 2,
                )
            )
            wanted = recommendations_for(ints)
            checks.append(
                Check(
                    f"{result.get('recommendation')} where the scores call for "
                    f"{' or '.join(sorted(wanted))}",
                    result.get("recommendation") in wanted,
                )
            )
    if pipeline == "flashcards" and isinstance(outputs.get("cards"), dict):
        cards = outputs["cards"].get("cards", [])
        count = options.get("count")
        if isinstance(count, int):
            checks.append(Check(f"{len(cards)} cards for {count} asked", len(cards) == count))
        fronts = [normalise(str(card.get("front", ""))) for card in cards]
        checks.append(Check("no repeated card", len(set(fronts)) == len(fronts)))
    if pipeline == "document-qa" and isinstance(outputs.get("answer"), dict):
        answer = outputs["answer"]
        if answer.get("answerable"):
            checks.append(
                Check("an answerable answer cites an excerpt", bool(answer.get("citations")))
            )
    return checks


# -- grounded ---------------------------------------------------------------------------------


def numbers_grounded(text: str, source: str, label: str) -> list[Check]:
    found = numbers(source)
    return [Check(f"{label}: number {n}", n in found) for n in sorted(numbers(text))]


def words_grounded(text: str, source: str, share: float = 0.5) -> bool:
    """Whether at least `share` of the content words (4+ letters) of `text` occur in `source`;
    a word occurs when its first five letters start a word of the source."""
    words = {w[:5] for w in _WORD.findall(normalise(text)) if not w.isdigit()}
    if not words:
        return True
    stems = {w[:5] for w in _WORD.findall(normalise(source))}
    return len(words & stems) >= share * len(words)


@dataclass(frozen=True)
class Source:
    """The document text a ticket's outputs are checked against, whole and by location."""

    text: str
    pages: Mapping[int, str]
    sections: Mapping[str, str]

    def located(self, page: int | None, heading: str | None) -> str:
        if page is not None and page in self.pages:
            return self.pages[page]
        if heading:
            return "\n".join(
                t for h, t in self.sections.items() if heading.startswith(h) or h in heading
            )
        return ""


def _review_grounding(outputs: Mapping[str, Any], source: Source) -> list[Check]:
    text = source.text
    checks = [
        Check(f"section {section!r}", is_heading_line(text, section))
        for section in (outputs.get("structure") or {}).get("sections", [])
    ]
    for subtask, field in (
        ("summary", "summary"),
        ("goal", "goal"),
        ("results_vs_conclusions", "explanation"),
        ("verdict", "rationale"),
    ):
        said = str((outputs.get(subtask) or {}).get(field, ""))
        checks += numbers_grounded(said, text, f"{subtask}.{field}")
    return checks


def _resume_grounding(outputs: Mapping[str, Any], source: Source) -> list[Check]:
    text = source.text
    details = outputs.get("extraction") or {}
    checks: list[Check] = []
    if details.get("name"):
        checks.append(Check(f"name {details['name']!r}", contains(text, details["name"])))
    contacts = details.get("contacts") or {}
    if contacts.get("email"):
        email = contacts["email"]
        checks.append(Check(f"email {email!r}", email.casefold() in text.casefold()))
    if contacts.get("phone"):
        digits = re.sub(r"\D", "", contacts["phone"])
        found = bool(digits) and digits in re.sub(r"\D", "", text)
        checks.append(Check(f"phone {contacts['phone']!r}", found))
    checks += [Check(f"link {link!r}", contains(text, link)) for link in contacts.get("links", [])]
    checks += [
        Check(f"skill {skill!r}", contains(text, skill)) for skill in details.get("skills", [])
    ]
    checks += [
        Check(f"education {item[:40]!r}", words_grounded(item, text))
        for item in details.get("education", [])
    ]
    for criterion in (*CRITERIA, "recommendation"):
        output = outputs.get(criterion) or {}
        said = str(output.get("justification", output.get("rationale", "")))
        checks += numbers_grounded(said, text, criterion)
    return checks


def _flashcards_grounding(outputs: Mapping[str, Any], source: Source) -> list[Check]:
    checks = []
    for card in (outputs.get("cards") or {}).get("cards", []):
        back = str(card.get("back", ""))
        ok = words_grounded(back, source.text) and numbers(back) <= numbers(source.text)
        checks.append(Check(f"card {str(card.get('front'))[:40]!r}", ok))
    return checks


def _qa_grounding(outputs: Mapping[str, Any], source: Source) -> list[Check]:
    answer = outputs.get("answer") or {}
    reply = str(answer.get("answer", ""))
    checks = numbers_grounded(reply, source.text, "answer")
    for citation in answer.get("citations", []):
        if not isinstance(citation, dict):
            continue
        cited = source.located(citation.get("page"), citation.get("heading"))
        shared = words_grounded(reply, cited, share=0.01) or bool(numbers(reply) & numbers(cited))
        checks.append(
            Check(f"citation of excerpt {citation.get('excerpt')}", bool(cited) and shared)
        )
    return checks


_GROUNDING = {
    "document-review": _review_grounding,
    "resume-screening": _resume_grounding,
    "flashcards": _flashcards_grounding,
    "document-qa": _qa_grounding,
}


def grounding(pipeline: str, outputs: Mapping[str, Any], source: Source) -> list[Check]:
    """One check per claim the outputs make about the document (none for unknown pipelines)."""
    scorer = _GROUNDING.get(pipeline)
    return scorer(outputs, source) if scorer is not None else []


# -- covered ----------------------------------------------------------------------------------


def coverage(
    case: Mapping[str, Any], outputs: Mapping[str, Any], question: Mapping[str, Any] | None = None
) -> list[Check]:
    checks: list[Check] = []
    pipeline = case["pipeline"]
    facts: Mapping[str, list[list[str]]] = case.get("facts", {})
    if pipeline == "document-review":
        for subtask, wanted in facts.items():
            said = text_of(outputs.get(subtask))
            checks += [Check(f"{subtask}: {' / '.join(f)}", fact_covered(f, said)) for f in wanted]
        listed = [str(s) for s in (outputs.get("structure") or {}).get("sections", [])]
        for section in case.get("sections", []):
            ok = any(
                contains_words(item, section) or contains_words(section, item) for item in listed
            )
            checks.append(Check(f"section {section}", ok))
        if "goal_stated" in case:
            stated = (outputs.get("goal") or {}).get("stated_explicitly")
            checks.append(Check("goal stated explicitly", stated is case["goal_stated"]))
    elif pipeline == "resume-screening":
        details = outputs.get("extraction") or {}
        candidate = case["candidate"]
        checks.append(
            Check("name", normalise(str(details.get("name", ""))) == normalise(candidate["name"]))
        )
        email = (details.get("contacts") or {}).get("email") or ""
        checks.append(Check("email", email.casefold() == candidate["email"].casefold()))
        years = details.get("years_of_experience")
        checks.append(
            Check(
                f"years {years} (wanted {candidate['years_of_experience']})",
                years == candidate["years_of_experience"],
            )
        )
        skills = "\n".join(str(s) for s in details.get("skills", []))
        checks += [Check(f"skill {s}", contains(skills, s)) for s in candidate["skills"]]
        label = (outputs.get("recommendation") or {}).get("recommendation")
        checks.append(Check(f"recommendation {label}", label in case["expected_recommendation"]))
    elif pipeline == "flashcards":
        said = text_of(outputs.get("cards"))
        checks += [Check(" / ".join(f), fact_covered(f, said)) for f in facts.get("cards", [])]
    elif pipeline == "document-qa" and question is not None:
        answer = outputs.get("answer") or {}
        said = str(answer.get("answer", ""))
        checks += [Check(" / ".join(f), fact_covered(f, said)) for f in question["answer"]]
        checks.append(Check("answerable", answer.get("answerable") is True))
        checks.append(
            Check(
                f"cites {question['where']}", cites(answer.get("citations", []), question["where"])
            )
        )
    return checks


def at_location(page: int | None, heading: str | None, where: Mapping[str, Any]) -> bool:
    if "page" in where:
        return bool(page == where["page"])
    return bool(heading) and contains(str(heading), str(where["heading"]))


def cites(citations: Iterable[Any], where: Mapping[str, Any]) -> bool:
    return any(
        isinstance(c, dict) and at_location(c.get("page"), c.get("heading"), where)
        for c in citations
    )
