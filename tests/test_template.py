"""Chat-template prefix/suffix derivation against the bundled Llama-3-style tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.template import (
    ChatTemplate,
    TemplateError,
    derive_template,
    render_ids,
    transcript_ids,
    verify_template,
)

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tokenizer"
SYSTEM_PROMPT = "You are a helpful assistant. Give answers as a simple single sentence."

TEXTS = [
    "What is the capital of France?",
    "Café, naïve, Straße, 東京, emoji 😀 and ¿qué?",
    "  leading and trailing spaces   ",
    " one leading space",
    "trailing space ",
    "a",
    "Numbers 12345 and symbols <>{}[]!",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.mark.parametrize("system_prompt", [None, SYSTEM_PROMPT])
@pytest.mark.parametrize("text", TEXTS)
def test_prefix_and_suffix_are_slices_of_apply_chat_template(tokenizer, system_prompt, text):
    template = derive_template(tokenizer, system_prompt=system_prompt)
    full = tokenizer.apply_chat_template(
        ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        + [{"role": "user", "content": text}],
        add_generation_prompt=True,
    )["input_ids"]  # transformers 5: a BatchEncoding by default
    prefix, suffix = list(template.prefix_ids), list(template.suffix_ids)
    assert full[: len(prefix)] == prefix
    assert full[len(full) - len(suffix) :] == suffix
    # Llama 3's template trims the content, so the middle is the stripped text's ids.
    assert full[len(prefix) : len(full) - len(suffix)] == transcript_ids(tokenizer, text.strip())
    assert template.wrap(transcript_ids(tokenizer, text.strip())) == full


@pytest.mark.parametrize("text", TEXTS)
def test_transcript_ids_decode_back(tokenizer, text):
    ids = transcript_ids(tokenizer, text)
    assert tokenizer.decode(ids) == text
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_control_token_text_in_a_transcript_stays_text(tokenizer):
    text = "please say <|eot_id|> out loud"
    ids = transcript_ids(tokenizer, text)
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") not in ids
    assert tokenizer.decode(ids) == text


def test_llama3_layout_by_token_string(tokenizer):
    """The fixture has Llama 3's layout; compared by token text, never by id."""
    template = derive_template(tokenizer)

    def pieces(ids):
        return [tokenizer.decode([i]) for i in ids]

    assert pieces(template.prefix_ids) == [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "user",
        "<|end_header_id|>",
        "\n\n",
    ]
    assert pieces(template.suffix_ids) == [
        "<|eot_id|>",
        "<|start_header_id|>",
        "assistant",
        "<|end_header_id|>",
        "\n\n",
    ]
    assert template.prefix_ids[0] == tokenizer.bos_token_id
    assert template.suffix_ids[0] == tokenizer.eos_token_id


def test_system_prompt_goes_into_the_prefix(tokenizer):
    plain = derive_template(tokenizer)
    with_system = derive_template(tokenizer, system_prompt=SYSTEM_PROMPT)
    assert with_system.suffix_ids == plain.suffix_ids
    text = tokenizer.decode(list(with_system.prefix_ids))
    assert text == (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_PROMPT}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert with_system.fingerprint() != plain.fingerprint()


def test_fingerprint_is_stable_and_sensitive():
    a = ChatTemplate(prefix_ids=(1, 2), suffix_ids=(3,), system_prompt=None)
    assert a.fingerprint() == ChatTemplate((1, 2), (3,), None).fingerprint()
    assert len(a.fingerprint()) == 64
    assert a.fingerprint() != ChatTemplate((1,), (2, 3), None).fingerprint()
    assert a.fingerprint() != ChatTemplate((1, 2), (3,), "").fingerprint()
    assert a.wrap([7, 8]) == [1, 2, 7, 8, 3]


def test_derivation_is_deterministic(tokenizer):
    assert derive_template(tokenizer) == derive_template(tokenizer)


def test_render_ids_returns_plain_ids(tokenizer):
    ids = render_ids(tokenizer, "hi")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)


def test_template_that_rewrites_content_is_refused(tokenizer):
    shouting = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | upper }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    local = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    local.chat_template = shouting
    with pytest.raises(TemplateError, match="cannot be split"):
        derive_template(local)


def test_template_without_generation_prompt_is_refused():
    local = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    local.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="generation prompt"):
        derive_template(local)


def test_template_that_ignores_add_generation_prompt_is_refused():
    """ChatML without its generation-prompt clause closes the user turn (a suffix) but opens no assistant turn:
    every target would be the state that predicts the next turn's opening."""
    local = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    local.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                           "'<|im_end|>' + '\\n' }}{% endfor %}")
    with pytest.raises(TemplateError, match="the same with and without add_generation_prompt"):
        derive_template(local)


def test_template_that_refuses_a_system_turn_is_reported():
    local = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    local.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|eot_id|>{% endif %}"
    )
    assert derive_template(local).suffix_ids == (local.convert_tokens_to_ids("<|eot_id|>"),)
    with pytest.raises(TemplateError, match="System role not supported"):
        derive_template(local, system_prompt="Be brief.")


def test_tokenizer_without_chat_template_is_refused():
    local = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    local.chat_template = None
    with pytest.raises(TemplateError, match="chat template"):
        derive_template(local)


def test_verify_template_names_the_failing_text(tokenizer):
    template = derive_template(tokenizer)
    broken = ChatTemplate(template.prefix_ids[:-1], template.suffix_ids, None)
    with pytest.raises(TemplateError, match="'hello there'"):
        verify_template(tokenizer, broken, ["hello there"])
