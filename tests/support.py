"""Helpers shared by the test suites (no fixtures here; see conftest.py)."""

from __future__ import annotations

import io
import os
import secrets
import uuid
from pathlib import Path
from typing import Any

import docx
from fastapi import FastAPI

REPO = Path(__file__).resolve().parent.parent


def samples_dir() -> Path:
    configured = os.environ.get("TF_SAMPLES_DIR")
    return Path(configured) if configured else REPO.parent / "shared" / "samples"


def sample(name: str) -> Path:
    path = samples_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"sample {name} not found in {samples_dir()} (set TF_SAMPLES_DIR)")
    return path


def short_docx() -> bytes:
    """A one-page Word document: one chunk, so the model's prompt and answer stay short."""
    document = docx.Document()
    document.add_heading("The Harbour Lighthouse", level=1)
    document.add_paragraph(
        "The harbour lighthouse was built in 1871 from local granite. Its light can be seen "
        "from 22 nautical miles away on a clear night."
    )
    document.add_paragraph(
        "The keeper cleans the 4 lamps every morning and records the weather in a logbook "
        "three times a day."
    )
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def random_tenant() -> str:
    return f"t-{secrets.token_hex(5)}"


def small_pipeline(name: str = "tiny", *, max_attempts: int = 3) -> dict[str, Any]:
    """A diamond: a → (b, c) → d."""
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}

    def subtask(sid: str, *deps: str) -> dict[str, Any]:
        return {
            "id": sid,
            "title": sid.upper(),
            "instruction": f"do {sid}",
            "depends_on": list(deps),
            "output_schema": schema,
        }

    return {
        "name": name,
        "version": 1,
        "system_prompt": "You are a test.",
        "max_attempts": max_attempts,
        "subtasks": [subtask("a"), subtask("b", "a"), subtask("c", "a"), subtask("d", "b", "c")],
    }


def short_answers(pipeline: dict[str, Any]) -> dict[str, Any]:
    """`pipeline` with every subtask answering a string of at most 20 characters in at most 24
    tokens: for tests of what happens around the model, not of what it writes."""
    for subtask in pipeline["subtasks"]:
        subtask["output_schema"] = {
            "type": "object",
            "properties": {"x": {"type": "string", "maxLength": 20}},
            "required": ["x"],
            "additionalProperties": False,
        }
        subtask["max_tokens"] = 24
    return pipeline


def documented_routes(app: FastAPI) -> list[tuple[str, str, str]]:
    """(method, template, a path of it) for each operation of the app's OpenAPI document, and
    for its documentation pages, which the document leaves out."""
    routes = []
    for template, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            path = template
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    path = path.replace("{" + parameter["name"] + "}", _path_value(parameter))
            assert "{" not in path, (method, template)
            routes.append((method.upper(), template, path))
    pages = [app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url]
    routes += [("GET", page, page) for page in pages if page]
    return routes


def _path_value(parameter: dict[str, Any]) -> str:
    schema = parameter.get("schema", {})
    if schema.get("type") == "integer":
        return "7"
    if schema.get("format") == "uuid":
        return str(uuid.uuid4())
    return "p-1"
