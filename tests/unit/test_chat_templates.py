"""The chat templates that turn messages into text for SGLang's native `/generate`."""

from __future__ import annotations

import typing

import pytest

from inference.sglang import CHAT_TEMPLATES, render_chat
from ticketflow.settings import Settings

MESSAGES = (
    {"role": "system", "content": "You review documents."},
    {"role": "user", "content": "Is this a study?"},
)


def test_chatml_renders_each_turn_and_opens_the_assistant_turn() -> None:
    assert render_chat(MESSAGES, "chatml") == (
        "<|im_start|>system\nYou review documents.<|im_end|>\n"
        "<|im_start|>user\nIs this a study?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_llama3_renders_headers_and_leaves_the_bos_token_to_the_server() -> None:
    text = render_chat(MESSAGES, "llama3")

    assert text == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou review documents.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nIs this a study?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert "<|begin_of_text|>" not in text


def test_llama3_trims_message_contents_like_its_template() -> None:
    messages = ({"role": "user", "content": "  spaced out \n"},)

    assert "\n\nspaced out<|eot_id|>" in render_chat(messages, "llama3")


def test_chatml_keeps_message_contents_byte_for_byte() -> None:
    messages = ({"role": "user", "content": "  spaced out \n"},)

    assert "<|im_start|>user\n  spaced out \n<|im_end|>" in render_chat(messages, "chatml")


ASSISTANT_OPENERS = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_prompts_that_share_their_first_messages_share_a_text_prefix(template: str) -> None:
    shared = (
        {"role": "system", "content": "You review documents."},
        {"role": "user", "content": "<document>A long document.</document>"},
    )
    prefix = render_chat(shared, template).removesuffix(ASSISTANT_OPENERS[template])

    first = render_chat((*shared, {"role": "user", "content": "Summarise it."}), template)
    second = render_chat((*shared, {"role": "user", "content": "Score it."}), template)

    assert first.startswith(prefix)
    assert second.startswith(prefix)
    assert "A long document." in prefix


def test_an_unknown_template_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="chatml, llama3"):
        render_chat(MESSAGES, "alpaca")


def test_a_message_without_a_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role and content"):
        render_chat(({"content": "hi"},), "chatml")


def test_the_settings_offer_exactly_the_shipped_templates() -> None:
    annotation = Settings.model_fields["sglang_chat_template"].annotation
    assert set(typing.get_args(annotation)) == set(CHAT_TEMPLATES)


def test_a_gguf_without_a_chat_template_gets_the_format_of_its_architecture() -> None:
    from inference.backends import chat_format_for

    gemma = {"general.architecture": "gemma3"}
    assert chat_format_for(gemma, None, "llama-2") == "gemma"
    assert chat_format_for(gemma, "chatml", "chatml") == "chatml"
    own = {"general.architecture": "gemma3", "tokenizer.chat_template": "{{ messages }}"}
    assert chat_format_for(own, None, "chat_template.default") == "chat_template.default"
    assert chat_format_for({"general.architecture": "llama"}, None, "llama-2") == "llama-2"
