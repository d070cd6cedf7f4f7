"""Chat-template prefix and suffix token ids around one user turn, derived from any tokenizer.

Both sides of DiVA's distillation place something between the same two id sequences: the teacher
puts the transcript's tokens there, the student its virtual tokens (DESIGN.md section 2). The ids
come from the LLM's own chat template with the generation prompt, so the last position is the one
that predicts the first response token. They are derived, never hard-coded: the template is
rendered around two different sentinel texts, the token ids the two renderings share at the start
and at the end are the prefix and the suffix, and the split is then checked to reproduce
`apply_chat_template` exactly on sample texts.

Transcripts must be whitespace-normalised (the mels stage writes them so): Llama 3's template trims
message content, so a transcript with surrounding whitespace tokenizes differently alone than
inside the chat.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from pipeline import PipelineError

# Two sentinels whose first and last characters differ, so their first and last tokens differ in
# any tokenizer and the shared ids stop exactly at the content boundary.
SENTINELS: tuple[str, str] = ("Zephyr quilts jump over 71 vexed gnomes", "Oh, 9 wry elks bid adieu!")

# Whitespace-normalised texts the split must reproduce, like the transcripts it will wrap.
SAMPLE_TEXTS: tuple[str, ...] = (
    "What is the weather like today?",
    "hello",
    "Play 3 songs by the Beatles, please.",
    "I'd like a café au lait — naïve, but nice.",
    "¿Dónde está la estación? 東京 is far. 😀",
    '"Quoted" text (with brackets) and symbols: $5 & 10%',
    "x",
)


class TemplateError(PipelineError, ValueError):
    """The tokenizer's chat template cannot be split into a prefix and a suffix around one user turn
    (an expected failure: jobs report it and exit 1)."""


@dataclass(frozen=True)
class ChatTemplate:
    """The ids before and after the user's content in a one-turn chat with the generation prompt."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    system_prompt: str | None = None

    def wrap(self, token_ids: Iterable[int]) -> list[int]:
        """prefix + token_ids + suffix: the teacher's input for a transcript's ids."""
        return [*self.prefix_ids, *token_ids, *self.suffix_ids]

    def fingerprint(self) -> str:
        """sha256 of the ids and the system prompt, for manifests that must refuse a mismatch."""
        payload = json.dumps(
            {
                "prefix_ids": list(self.prefix_ids),
                "suffix_ids": list(self.suffix_ids),
                "system_prompt": self.system_prompt,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hashlib.sha256(payload.encode("ascii")).hexdigest()


def transcript_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of the transcript alone: no BOS/EOS, and control-token strings in the text (say a
    literal "<|eot_id|>") are encoded as plain text, so a transcript can never inject a turn
    boundary."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

def stop_ids(llm: Any, tokenizer: Any, template: ChatTemplate) -> set[int]:
    """Ids that end the LLM's answer (its turn): the tokenizer's eos; the template's end-of-turn token (the suffix's
    first token when it is a special token, e.g. Llama 3's <|eot_id|>, ChatML's <|im_end|>); and the
    eos ids a pretrained checkpoint declares in its generation_config.json (not the placeholder
    defaults of a model built in code)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if template.suffix_ids and (template.suffix_ids[0] in added and added[template.suffix_ids[0]].special):
        ids.add(int(template.suffix_ids[0]))
    generation = getattr(llm, "generation_config", None)
    if generation is not None and not getattr(generation, "_from_model_config", True):
        eos = generation.eos_token_id
        ids.update(int(i) for i in ([eos] if isinstance(eos, int) else eos or []))
    return ids


def render_ids(tokenizer: PreTrainedTokenizerBase, text: str, system_prompt: str | None = None,
               generation_prompt: bool = True) -> list[int]:
    """apply_chat_template's ids for one user turn, with the generation prompt unless told otherwise.

    return_dict=False: in transformers 5 `apply_chat_template(..., tokenize=True)` returns a
    BatchEncoding unless told otherwise.
    """
    messages = [{"role": "user", "content": text}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )
    # ValueError: no chat template; jinja2's TemplateError: the template's own raise_exception, e.g.
    # a model whose template refuses a system turn.
    except (ValueError, jinja2.TemplateError) as exc:
        raise TemplateError(f"{_name(tokenizer)}: cannot apply its chat template: {exc}") from exc
    return [int(i) for i in ids]


def derive_template(
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
    check_texts: Sequence[str] = SAMPLE_TEXTS,
) -> ChatTemplate:
    """Split the tokenizer's chat template around one user turn (the paper trains without a
    system prompt, hence the default), and verify the split on `check_texts`."""
    first, second = (render_ids(tokenizer, s, system_prompt) for s in SENTINELS)
    shortest = min(len(first), len(second))
    n_prefix = _common_prefix_len(first, second)
    n_suffix = _common_prefix_len(first[::-1], second[::-1])
    n_suffix = min(n_suffix, shortest - n_prefix)
    if n_suffix == 0:
        raise TemplateError(
            f"{_name(tokenizer)}: the chat template adds nothing after the user turn "
            "(no generation prompt), so no position predicts the first response token"
        )
    if render_ids(tokenizer, SENTINELS[0], system_prompt, generation_prompt=False) == first:
        raise TemplateError(
            f"{_name(tokenizer)}: the chat template renders the same with and without add_generation_prompt: "
            "it opens no assistant turn, so the last position would predict the next turn's header, not the "
            "first response token"
        )
    template = ChatTemplate(
        prefix_ids=tuple(first[:n_prefix]),
        suffix_ids=tuple(first[len(first) - n_suffix :]),
        system_prompt=system_prompt,
    )
    verify_template(tokenizer, template, (*SENTINELS, *check_texts))
    return template


def verify_template(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, texts: Iterable[str]) -> None:
    """Raise TemplateError unless prefix + transcript_ids(text) + suffix equals apply_chat_template
    for every text (fails when the template rewrites content or BPE merges across the boundary)."""
    for text in texts:
        expected = render_ids(tokenizer, text, template.system_prompt)
        got = template.wrap(transcript_ids(tokenizer, text))
        if got != expected:
            raise TemplateError(
                f"{_name(tokenizer)}: the chat template cannot be split around the user turn: for "
                f"text {text!r}, apply_chat_template gives {expected} but prefix + transcript + suffix "
                f"gives {got} (prefix {list(template.prefix_ids)}, suffix {list(template.suffix_ids)})"
            )


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
