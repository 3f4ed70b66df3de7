"""`ticketflow run` arguments: documents with roles, options, the upload they become, and the
documents it refuses before any server starts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support import sample, short_docx
from ticketflow.bootstrap import extraction_limits, extraction_pool
from ticketflow.cli import app
from ticketflow.run import (
    RunFailed,
    check_documents,
    parse_documents,
    parse_options,
    upload_fields,
)
from ticketflow.settings import Settings


@pytest.fixture
def resume(tmp_path: Path) -> Path:
    path = tmp_path / "cv.docx"
    path.write_bytes(b"cv")
    return path


@pytest.fixture
def vacancy(tmp_path: Path) -> Path:
    path = tmp_path / "job.docx"
    path.write_bytes(b"job")
    return path


def test_a_plain_document_has_the_main_role(resume: Path) -> None:
    assert parse_documents(resume, []) == [("main", resume)]


def test_documents_with_roles_keep_their_order(resume: Path, vacancy: Path) -> None:
    documents = parse_documents(None, [f"resume={resume}", f"vacancy={vacancy}"])

    assert documents == [("resume", resume), ("vacancy", vacancy)]


@pytest.mark.parametrize(
    ("value", "words"),
    [("cv.docx", "ROLE=PATH"), ("=cv.docx", "ROLE=PATH"), ("resume=/nowhere.docx", "not a file")],
)
def test_a_malformed_document_argument_is_explained(value: str, words: str) -> None:
    with pytest.raises(RunFailed, match=words):
        parse_documents(None, [value])


def test_a_role_given_twice_is_refused(resume: Path, vacancy: Path) -> None:
    with pytest.raises(RunFailed, match="once"):
        parse_documents(None, [f"resume={resume}", f"resume={vacancy}"])


def test_no_document_at_all_is_refused() -> None:
    with pytest.raises(RunFailed, match="give a document"):
        parse_documents(None, [])


def test_option_values_are_json_when_they_parse_and_strings_otherwise() -> None:
    options = parse_options(None, ["count=5", "difficulty=easy", "question=How fast is it?"])

    assert options == {"count": 5, "difficulty": "easy", "question": "How fast is it?"}


def test_single_options_override_the_json_object() -> None:
    assert parse_options('{"count": 3, "difficulty": "hard"}', ["count=7"]) == {
        "count": 7,
        "difficulty": "hard",
    }


@pytest.mark.parametrize(
    ("options_json", "pairs", "words"),
    [("[1]", [], "JSON object"), ("{", [], "not valid JSON"), (None, ["count"], "KEY=VALUE")],
)
def test_malformed_options_are_explained(
    options_json: str | None, pairs: list[str], words: str
) -> None:
    with pytest.raises(RunFailed, match=words):
        parse_options(options_json, pairs)


def test_one_main_document_is_uploaded_as_file() -> None:
    handle = io.BytesIO(b"pdf")

    files, data = upload_fields([("main", "paper.pdf", handle)], "document-review", {})

    assert files == [("file", ("paper.pdf", handle))]
    assert data == {"pipeline": "document-review"}


def test_documents_with_roles_are_uploaded_as_files_with_one_role_each() -> None:
    cv, job = io.BytesIO(b"cv"), io.BytesIO(b"job")

    files, data = upload_fields(
        [("resume", "cv.docx", cv), ("vacancy", "job.docx", job)],
        "resume-screening",
        {"note": "é"},
    )

    assert files == [("files", ("cv.docx", cv)), ("files", ("job.docx", job))]
    assert data["roles"] == ["resume", "vacancy"]
    assert json.loads(data["options"]) == {"note": "é"}


def test_the_command_refuses_a_malformed_document_before_starting_anything() -> None:
    result = CliRunner().invoke(app, ["run", "--pipeline", "resume-screening", "--document", "cv"])

    assert result.exit_code == 2
    assert "ROLE=PATH" in result.output


def test_documents_the_stack_would_refuse_are_refused_with_its_reason(tmp_path: Path) -> None:
    settings = Settings()
    pool, limits = extraction_pool(settings, 1), extraction_limits(settings)
    good = tmp_path / "lighthouse.docx"
    good.write_bytes(short_docx())
    check_documents([("main", good), ("paper", sample("research-paper.pdf"))], pool, limits)
    refused = {
        "bad-encrypted.pdf": "password-protected",
        "bad-truncated.pdf": "damaged or incomplete",
        "bad-no-text-layer.pdf": "no text layer",
        "bad-not-a-pdf.pdf": "Only PDF and DOCX",
    }
    for name, words in refused.items():
        with pytest.raises(RunFailed, match=words) as caught:
            check_documents([("main", good), ("other", sample(name))], pool, limits)
        assert str(caught.value).startswith(f"{name}: ")


def test_run_refuses_a_bad_document_before_starting_a_stack(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(
        app,
        ["run", str(sample("bad-encrypted.pdf"))],
        env={"TF_DATA_DIR": str(data_dir), "COLUMNS": "200"},
    )
    assert result.exit_code == 1
    assert "bad-encrypted.pdf: The PDF is password-protected" in result.output
    assert "starting ticketflow" not in result.output
    assert not data_dir.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["run", "{paper}", "--tenant", "ACME"],
        ["submit", "{paper}", "--tenant", "ACME"],
        ["status", "00000000-0000-0000-0000-000000000001", "--tenant", "ACME"],
        ["report", "00000000-0000-0000-0000-000000000001", "--user", ""],
    ],
)
def test_a_tenant_or_user_no_token_can_carry_is_a_usage_error(
    args: list[str], tmp_path: Path
) -> None:
    paper = str(sample("research-paper.pdf"))
    result = CliRunner().invoke(
        app,
        [arg.format(paper=paper) for arg in args],
        env={"TF_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"},
    )
    assert result.exit_code == 2, result.output
    assert "must be 1-" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "data").exists()
