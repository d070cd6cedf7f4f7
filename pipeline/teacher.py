"""The teacher stage's pure core: the frozen LLM's distillation targets for each transcript.

For every transcript the LLM reads prefix + transcript + suffix (the chat template around one user
turn, with the generation prompt). Its last position predicts the first response token; the hidden
state there, after the final norm (the LM head's input), is h_teacher in
L_distill = ||h_student - h_teacher||_2 (paper section 3.2.2, DESIGN.md section 3). It is computed
once, here, and cached. Sequences are grouped into length buckets so that padding wastes little
compute, and every result equals the single-sequence forward of the same model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pipeline.template import ChatTemplate

PaddingSide = Literal["left", "right"]

# A tiny Llama 3 shaped model (grouped-query attention, Llama 3's RoPE base) for tests and the local
# default, where no weights may be downloaded.
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "tie_word_embeddings": False,
}


def tiny_llama(
    vocab_size: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """A random-initialised LlamaForCausalLM sized to `vocab_size` (use len(tokenizer)), in eval
    mode with gradients off. The same seed gives the same weights; the global RNG is untouched."""
    config = LlamaConfig(vocab_size=vocab_size, **{**TINY_LLAMA, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _frozen(model.to(device=device, dtype=dtype))


def load_llm(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    attn_implementation: str | None = None,
    local_files_only: bool = False,
) -> PreTrainedModel:
    """A real causal LM checkpoint (hub id or local directory) in `dtype` on `device`, in eval mode
    with gradients off: the frozen teacher."""
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local_files_only}
    if revision is not None:
        kwargs["revision"] = revision
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(os.fspath(name_or_path), **kwargs)
    return _frozen(model.to(device))


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def length_buckets(lengths: Sequence[int], max_tokens_per_batch: int, max_batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length so that padding wastes little compute.

    Indices are sorted by (length, index) and packed greedily: a batch grows while its padded size
    (batch size x its longest length) stays within `max_tokens_per_batch` and it holds at most
    `max_batch_size` sequences. A sequence longer than the budget gets a batch of its own.
    Deterministic; every index appears exactly once; batches come shortest first.
    """
    if max_tokens_per_batch < 1 or max_batch_size < 1:
        raise ValueError(
            f"max_tokens_per_batch ({max_tokens_per_batch}) and max_batch_size ({max_batch_size}) "
            "must both be >= 1"
        )
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so lengths[i] is the longest in the batch if it joins.
        if current and (
            len(current) + 1 > max_batch_size or (len(current) + 1) * lengths[i] > max_tokens_per_batch
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / processed tokens (batch size x longest length, summed over batches); 1.0 means
    no padding. An empty input wastes nothing and gives 1.0."""
    real = sum(lengths[i] for batch in batches for i in batch)
    processed = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return real / processed if processed else 1.0


def fixed_length_efficiency(lengths: Sequence[int], padded_length: int) -> float:
    """Real tokens / processed tokens when every sequence is padded to `padded_length` (the
    baseline that bucketing is measured against, e.g. the student's fixed 448-query layout)."""
    too_long = [n for n in lengths if n > padded_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} sequences exceed padded_length {padded_length} (longest {max(too_long)})"
        )
    return sum(lengths) / (len(lengths) * padded_length) if lengths else 1.0


@dataclass(frozen=True)
class TeacherTargets:
    """Per transcript, in input order: h_teacher, and optionally the top-k next-token ids and
    log-probs at the same position (for an optional KL term beyond the paper)."""

    hidden: np.ndarray  # float32 [n, H]
    topk_ids: np.ndarray | None = None  # int32 [n, k], most likely first
    topk_logprobs: np.ndarray | None = None  # float32 [n, k]


def compute_targets(
    model: PreTrainedModel,
    template: ChatTemplate,
    token_id_lists: Sequence[Sequence[int]],
    *,
    max_tokens_per_batch: int = 16384,
    max_batch_size: int = 64,
    padding_side: PaddingSide = "right",
    top_k: int = 0,
    pad_id: int = 0,
) -> TeacherTargets:
    """Run the frozen LLM on template.wrap(ids) for every transcript, in length buckets, and return
    the final-norm hidden state at each sequence's last real position.

    The model's own device and dtype are used (set them with `tiny_llama`/`load_llm`); results are
    returned as float32 whatever the dtype. Padding (with `pad_id`, any valid id: padded positions
    are masked out) goes on `padding_side`; position ids count real tokens only, so each result
    equals the forward of that sequence alone. Top-k log-probs are log_softmax(lm_head(h)), which
    is the model's next-token distribution for Llama-style heads (the premise of the paper's
    Lemma 1: P = softmax(O h)).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    vocab_size = model.get_input_embeddings().num_embeddings
    if top_k < 0 or top_k > vocab_size:
        raise ValueError(f"top_k must be between 0 and the vocabulary size {vocab_size}, not {top_k}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the vocabulary (size {vocab_size})")

    sequences = [template.wrap(ids) for ids in token_id_lists]
    _check_sequences(sequences, vocab_size, getattr(model.config, "max_position_embeddings", None))
    lengths = [len(s) for s in sequences]
    n = len(sequences)
    hidden = np.empty((n, model.config.hidden_size), dtype=np.float32)
    topk_ids = np.empty((n, top_k), dtype=np.int32) if top_k else None
    topk_logprobs = np.empty((n, top_k), dtype=np.float32) if top_k else None

    device = model.device
    # LlamaForCausalLM is `lm_head(model(...).last_hidden_state)`. In transformers 5.23
    # (models/llama/modeling_llama.py) LlamaModel.forward returns last_hidden_state =
    # self.norm(hidden_states): it is POST final norm. `output_hidden_states=True` gives the same
    # tensor as hidden_states[-1], because `capture_outputs(tie_last_hidden_states=True)`
    # (utils/output_capturing.py) overwrites the last recorded layer output with last_hidden_state.
    # We read last_hidden_state from the base model directly: the same values without computing
    # logits over the whole vocabulary at every position. Tests check it against both
    # hidden_states[-1] and a forward hook on model.model.norm.
    base = model.base_model
    head = model.get_output_embeddings()
    with torch.inference_mode():
        for batch in length_buckets(lengths, max_tokens_per_batch, max_batch_size):
            input_ids, attention_mask, position_ids, last = _pad_batch(
                [sequences[i] for i in batch], padding_side, pad_id
            )
            out = base(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                use_cache=False,
            )
            h = out.last_hidden_state[torch.arange(len(batch), device=device), last.to(device)]
            index = np.asarray(batch)
            hidden[index] = h.float().cpu().numpy()
            if top_k:
                logprobs = torch.log_softmax(head(h).float(), dim=-1)
                values, ids = torch.topk(logprobs, top_k, dim=-1)
                topk_ids[index] = ids.cpu().numpy().astype(np.int32)
                topk_logprobs[index] = values.cpu().numpy()
    return TeacherTargets(hidden=hidden, topk_ids=topk_ids, topk_logprobs=topk_logprobs)


def _check_sequences(sequences: Sequence[Sequence[int]], vocab_size: int, max_positions: int | None) -> None:
    """Fail with the offending row's index rather than deep inside the model (or, on a GPU, with
    an unreadable device-side assert)."""
    for row, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"row {row}: empty sequence (an empty transcript with an empty template)")
        if max_positions is not None and len(seq) > max_positions:
            raise ValueError(
                f"row {row}: {len(seq)} tokens with the template exceed the model's {max_positions} positions"
            )
        if min(seq) < 0 or max(seq) >= vocab_size:
            bad = next(t for t in seq if not 0 <= t < vocab_size)
            raise ValueError(
                f"row {row}: token id {bad} is outside the model's vocabulary (size {vocab_size})"
            )


def _pad_batch(
    sequences: Sequence[Sequence[int]], padding_side: PaddingSide, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids, attention mask, position ids (0.. over real tokens only, whichever side is
    padded) and the index of each row's last real position."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = width - len(seq) if padding_side == "left" else 0
        input_ids[row, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, start : start + len(seq)] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    last = torch.full_like(lengths, width - 1) if padding_side == "left" else lengths - 1
    return input_ids, attention_mask, position_ids, last
