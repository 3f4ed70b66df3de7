"""The evaluation's cases: documents, pipeline, options and the reference facts (data/cases.json).

A document is named `documents/NAME.txt:KIND` (a source in data/documents, built as a PDF or a
DOCX when the case runs, see `documents.py`) or `samples/FILE` (a file of the shared sample set
beside the repository, `../shared/samples`; cases that need one are skipped when it is absent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.quality.documents import DOCX_MEDIA_TYPE, PDF_MEDIA_TYPE, build

DATA = Path(__file__).resolve().parent / "data"
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "samples"


@dataclass(frozen=True)
class Upload:
    role: str
    filename: str
    media_type: str
    content: bytes


@dataclass(frozen=True)
class Case:
    id: str
    pipeline: str
    language: str
    quick: bool
    documents: dict[str, str]
    spec: dict[str, Any] = field(repr=False)

    @property
    def questions(self) -> list[dict[str, Any]]:
        questions: list[dict[str, Any]] = self.spec.get("questions", [])
        return questions

    @property
    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = self.spec.get("options", {})
        return options

    def available(self, samples: Path = SAMPLES) -> bool:
        return all(
            not name.startswith("samples/") or (samples / name.removeprefix("samples/")).is_file()
            for name in self.documents.values()
        )

    def uploads(self, samples: Path = SAMPLES) -> tuple[Upload, ...]:
        return tuple(_upload(role, name, samples) for role, name in self.documents.items())


def _upload(role: str, name: str, samples: Path) -> Upload:
    if name.startswith("samples/"):
        path = samples / name.removeprefix("samples/")
        media_type = PDF_MEDIA_TYPE if path.suffix == ".pdf" else DOCX_MEDIA_TYPE
        return Upload(role, path.name, media_type, path.read_bytes())
    source, _, kind = name.partition(":")
    content, media_type = build(DATA / source, kind)
    return Upload(role, f"{Path(source).stem}.{kind}", media_type, content)


def load_cases(path: Path = DATA / "cases.json") -> list[Case]:
    raw = json.loads(path.read_text("utf-8"))
    return [
        Case(
            id=item["id"],
            pipeline=item["pipeline"],
            language=item["language"],
            quick=bool(item.get("quick", False)),
            documents=dict(item["documents"]),
            spec=item,
        )
        for item in raw["cases"]
    ]
