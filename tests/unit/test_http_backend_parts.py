"""The pieces of the HTTP inference backends that need no server: Retry-After, the server
rotation, error messages and which backend the settings build."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from inference.backends import LlamaCppBackend
from inference.sglang import (
    DEFAULT_RETRY_AFTER_S,
    MAX_RETRY_AFTER_S,
    OpenAICompatibleBackend,
    ServerRotation,
    SGLangBackend,
    error_message,
    parse_retry_after,
)
from ticketflow.bootstrap import inference_backend
from ticketflow.settings import Settings

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_retry_after_in_seconds_is_taken_as_is() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 2.5 ") == 2.5


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    header = format_datetime(NOW + timedelta(seconds=30), usegmt=True)

    assert parse_retry_after(header, now=NOW) == pytest.approx(30.0)


def test_retry_after_in_the_past_means_no_wait() -> None:
    header = format_datetime(NOW - timedelta(minutes=5), usegmt=True)

    assert parse_retry_after(header, now=NOW) == 0.0
    assert parse_retry_after("-3") == 0.0


@pytest.mark.parametrize("header", [None, "", "soon", "nan"])
def test_a_missing_or_unreadable_retry_after_gives_the_default(header: str | None) -> None:
    assert parse_retry_after(header) == DEFAULT_RETRY_AFTER_S


def test_an_enormous_retry_after_is_capped() -> None:
    assert parse_retry_after("86400") == MAX_RETRY_AFTER_S


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_servers_are_used_in_turn() -> None:
    rotation = ServerRotation(["http://a", "http://b", "http://c"])

    firsts = [rotation.candidates()[0] for _ in range(4)]

    assert firsts == ["http://a", "http://b", "http://c", "http://a"]


def test_a_server_that_just_failed_is_tried_last_until_its_rest_is_over() -> None:
    clock = Clock()
    rotation = ServerRotation(["http://a", "http://b"], skip_failed_s=5.0, clock=clock)
    rotation.failed("http://a")

    assert [rotation.candidates()[0] for _ in range(2)] == ["http://b", "http://b"]
    assert rotation.candidates()[-1] == "http://a"
    clock.now += 5.0
    assert {rotation.candidates()[0] for _ in range(2)} == {"http://a", "http://b"}


def test_when_every_server_failed_the_oldest_failure_is_tried_first() -> None:
    clock = Clock()
    rotation = ServerRotation(["http://a", "http://b"], clock=clock)
    rotation.failed("http://b")
    clock.now += 1
    rotation.failed("http://a")

    assert rotation.candidates() == ["http://b", "http://a"]


def test_a_success_clears_a_failure() -> None:
    rotation = ServerRotation(["http://a", "http://b"])
    rotation.failed("http://a")
    rotation.succeeded("http://a")

    assert {rotation.candidates()[0] for _ in range(2)} == {"http://a", "http://b"}


def test_server_urls_are_cleaned_and_checked() -> None:
    assert ServerRotation([" http://a:1/ ", ""]).urls == ("http://a:1",)
    with pytest.raises(ValueError, match="http"):
        ServerRotation(["a:30000"])
    with pytest.raises(ValueError, match="at least one"):
        ServerRotation([" "])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"error": {"message": "bad schema"}}, "bad schema"),
        ({"object": "error", "message": "too long", "code": 400}, "too long"),
        ({"detail": "Not Found"}, "Not Found"),
    ],
)
def test_error_messages_are_read_from_the_usual_shapes(
    body: dict[str, object], message: str
) -> None:
    assert error_message(httpx.Response(400, json=body)) == message


def test_an_error_without_json_gives_its_text() -> None:
    assert error_message(httpx.Response(502, text="bad gateway\n")) == "bad gateway"


async def test_the_settings_choose_the_backend() -> None:
    assert isinstance(inference_backend(Settings()), LlamaCppBackend)

    sglang = inference_backend(
        Settings(
            inference_backend="sglang",
            sglang_url="http://gpu-1:30000, http://gpu-2:30000/",
            sglang_chat_template="llama3",
            sglang_model="meta-llama/Llama-3.1-8B-Instruct",
        )
    )
    openai = inference_backend(Settings(inference_backend="openai", sglang_url="http://r:8000"))
    try:
        assert isinstance(sglang, SGLangBackend)
        assert sglang.servers.urls == ("http://gpu-1:30000", "http://gpu-2:30000")
        assert sglang.chat_template == "llama3"
        assert sglang.model_name == "meta-llama/Llama-3.1-8B-Instruct"
        assert isinstance(openai, OpenAICompatibleBackend)
        assert openai.response_format == "json_schema"
    finally:
        await sglang.aclose()
        await openai.aclose()


def test_a_url_that_is_not_http_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="TF_SGLANG_URL"):
        Settings(sglang_url="gpu-1:30000")
