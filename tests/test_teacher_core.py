"""Bucketed teacher targets equal the single-sequence forward of the same frozen LLM."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pipeline.builders import load_llm, tiny_llama
from pipeline.teacher import (
    compute_targets,
    fixed_length_efficiency,
    length_buckets,
    padding_efficiency,
)
from pipeline.template import derive_template, transcript_ids

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tokenizer"

# float32 on CPU: batched and unbatched forwards differ only by reduction order.
ATOL = 1e-5

SENTENCES = [
    "Hi.",
    "What is the weather like today?",
    "Please set a timer for ten minutes and remind me to call my mother at seven o'clock this evening.",
    "Café au lait, s'il vous plaît.",
    "The quick brown fox jumps over the lazy dog.",
    "Why is the sky blue?",
    "She travelled across the country by bus, stopping in small towns along the river, "
    "and wrote a letter home from every station.",
    "ok",
    "Translate this sentence into German.",
    "東京 is far.",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def template(tokenizer):
    return derive_template(tokenizer)


@pytest.fixture(scope="module")
def id_lists(tokenizer):
    return [transcript_ids(tokenizer, s) for s in SENTENCES]


@pytest.fixture(scope="module")
def reference(model, template, id_lists):
    """Per transcript, the direct forward's final hidden state and next-token log-probs."""
    rows = [direct_forward(model, template.wrap(ids)) for ids in id_lists]
    return [(h, torch.log_softmax(logits.float(), dim=-1)) for h, logits in rows]


def direct_forward(model, ids):
    """The reference: one unpadded sequence, no mask, default positions."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1], out.logits[0, -1]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(
    ("max_tokens", "max_batch"), [(1, 64), (40, 3), (100, 64), (10_000, 64), (10_000, 4)]
)
def test_batched_targets_equal_single_sequence_forward(
    model, template, id_lists, reference, padding_side, max_tokens, max_batch
):
    targets = compute_targets(
        model,
        template,
        id_lists,
        max_tokens_per_batch=max_tokens,
        max_batch_size=max_batch,
        padding_side=padding_side,
        top_k=5,
        pad_id=3,
    )
    assert targets.hidden.shape == (len(id_lists), model.config.hidden_size)
    assert targets.hidden.dtype == np.float32
    assert targets.topk_ids.dtype == np.int32 and targets.topk_logprobs.dtype == np.float32
    for row, (h, logprobs) in enumerate(reference):
        np.testing.assert_allclose(targets.hidden[row], h.numpy(), atol=ATOL, rtol=0)
        expected_values, expected_ids = torch.topk(logprobs, 5)
        np.testing.assert_array_equal(targets.topk_ids[row], expected_ids.numpy())
        np.testing.assert_allclose(targets.topk_logprobs[row], expected_values.numpy(), atol=ATOL, rtol=0)


def test_target_is_post_final_norm(model, template, id_lists):
    """hidden_states[-1] is the final norm's output (the LM head's input) in transformers 5."""
    captured = []
    hook = model.model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        h, logits = direct_forward(model, template.wrap(id_lists[1]))
    finally:
        hook.remove()
    torch.testing.assert_close(h, captured[0][0, -1], atol=0, rtol=0)
    torch.testing.assert_close(model.lm_head(h), logits, atol=ATOL, rtol=0)
    targets = compute_targets(model, template, [id_lists[1]])
    np.testing.assert_allclose(targets.hidden[0], captured[0][0, -1].numpy(), atol=ATOL, rtol=0)


def test_top_k_is_off_by_default_and_results_are_deterministic(model, template, id_lists):
    a = compute_targets(model, template, id_lists, max_tokens_per_batch=64)
    b = compute_targets(model, template, id_lists, max_tokens_per_batch=64)
    assert a.topk_ids is None and a.topk_logprobs is None
    np.testing.assert_array_equal(a.hidden, b.hidden)


def test_empty_input(model, template):
    targets = compute_targets(model, template, [], top_k=3)
    assert targets.hidden.shape == (0, model.config.hidden_size)
    assert targets.topk_ids.shape == (0, 3)


def test_bfloat16_model_returns_float32_close_to_float32_model(tokenizer, template, id_lists):
    model32 = tiny_llama(len(tokenizer), seed=0)
    model16 = tiny_llama(len(tokenizer), seed=0, dtype=torch.bfloat16)
    h32 = compute_targets(model32, template, id_lists).hidden
    h16 = compute_targets(model16, template, id_lists).hidden
    assert h16.dtype == np.float32
    # bf16 keeps 8 bits of mantissa; the final RMSNorm makes values O(1).
    np.testing.assert_allclose(h16, h32, atol=0.1, rtol=0.05)


def test_tiny_llama_is_seeded_and_frozen(tokenizer):
    state = torch.random.get_rng_state()
    a, b, c = (tiny_llama(len(tokenizer), seed=s) for s in (0, 0, 1))
    assert torch.equal(state, torch.random.get_rng_state())
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert a.config.vocab_size == len(tokenizer)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_load_llm_from_a_local_directory(tmp_path, model, template, id_lists):
    model.save_pretrained(tmp_path)
    loaded = load_llm(tmp_path, dtype=torch.float32, local_files_only=True)
    assert not loaded.training and loaded.dtype == torch.float32
    np.testing.assert_array_equal(
        compute_targets(loaded, template, id_lists).hidden, compute_targets(model, template, id_lists).hidden
    )


def test_bad_rows_are_named(model, template):
    with pytest.raises(ValueError, match="row 1: token id 100000"):
        compute_targets(model, template, [[5], [6, 100000]])
    with pytest.raises(ValueError, match="row 0: 3010 tokens"):
        compute_targets(model, template, [[5] * 3000])
    with pytest.raises(ValueError, match="padding_side"):
        compute_targets(model, template, [[5]], padding_side="middle")


@pytest.mark.parametrize(("budget", "max_batch"), [(1, 8), (30, 8), (100, 3), (100, 100), (1000, 16)])
def test_length_buckets_cover_every_index_once_within_budget(budget, max_batch):
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    batches = length_buckets(lengths, budget, max_batch)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= max_batch
        assert len(batch) * max(lengths[i] for i in batch) <= budget or len(batch) == 1
    assert batches == length_buckets(lengths, budget, max_batch)


def test_length_buckets_pack_greedily_by_length():
    lengths = [5, 1, 3, 3, 10, 2]
    # By length: i1=1, i5=2, i2=3, i3=3, i0=5, i4=10. Budget 10: [i1, i5, i2] pads to 3*3=9 (adding i3
    # would make 12); [i3, i0] pads to 2*5=10; i4 alone. At most 2 per batch: consecutive pairs.
    assert length_buckets(lengths, 10, 8) == [[1, 5, 2], [3, 0], [4]]
    assert length_buckets(lengths, 100, 2) == [[1, 5], [2, 3], [0, 4]]
    assert length_buckets([], 10, 4) == []
    with pytest.raises(ValueError):
        length_buckets(lengths, 0, 4)


def test_padding_efficiency_on_a_known_example():
    lengths = [2, 4, 3, 1]
    # [0, 1] pads to 4: 8 processed; [2, 3] pads to 3: 6 processed; real 10.
    assert padding_efficiency(lengths, [[0, 1], [2, 3]]) == pytest.approx(10 / 14)
    assert padding_efficiency(lengths, [[0], [1], [2], [3]]) == 1.0
    assert padding_efficiency([], []) == 1.0
    assert fixed_length_efficiency(lengths, 5) == pytest.approx(10 / 20)
    with pytest.raises(ValueError):
        fixed_length_efficiency(lengths, 3)


# --- the teacher's response (teacher.response_tokens, beyond the paper) ------------------------------------------

K = 6


def greedy_by_hand(model, prompt, max_new_tokens, stops):
    """The reference response: argmax of each unpadded forward's last logits, fed back, to a stop id."""
    answer = []
    while len(answer) < max_new_tokens:
        _, logits = direct_forward(model, prompt + answer)
        answer.append(int(logits.argmax()))
        if answer[-1] in stops:
            break
    return answer


@pytest.fixture(scope="module")
def stops(model, template, id_lists):
    """Stop ids that end some responses early (a random model rarely emits its eos): the second token of
    row 1's and the first of row 4's full-length greedy response."""
    free = compute_targets(model, template, id_lists, response_tokens=K).responses
    assert all(len(r) == K for r in free)
    return sorted({free[1][1], free[4][0]})


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(("max_tokens", "max_batch"), [(1, 64), (60, 3), (10_000, 64)])
def test_response_states_equal_a_teacher_forced_forward(model, template, id_lists, stops, padding_side,
                                                        max_tokens, max_batch):
    out = compute_targets(model, template, id_lists, max_tokens_per_batch=max_tokens, max_batch_size=max_batch,
                          padding_side=padding_side, pad_id=3, response_tokens=K, stops=stops)
    lengths = [len(r) for r in out.responses]
    assert min(lengths) < K == max(lengths)  # mixed: some ended at a stop id
    for row, ids in enumerate(id_lists):
        prompt = template.wrap(ids)
        response = greedy_by_hand(model, prompt, K, set(stops))
        assert out.responses[row] == response, row
        # The reference states: one unpadded teacher-forced forward of prompt + response.
        with torch.inference_mode():
            states = model(input_ids=torch.tensor([prompt + response]), output_hidden_states=True).hidden_states[-1][0]
        expected = states[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        assert out.response_hidden[row].shape == (len(response), model.config.hidden_size)
        np.testing.assert_allclose(out.response_hidden[row], expected.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_array_equal(out.response_hidden[row][0], out.hidden[row])


def test_first_target_does_not_depend_on_the_response(model, template, id_lists, reference, stops):
    out = compute_targets(model, template, id_lists, response_tokens=K, stops=stops, top_k=4)
    for row, (h, logprobs) in enumerate(reference):
        np.testing.assert_allclose(out.hidden[row], h.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_array_equal(out.topk_ids[row], torch.topk(logprobs, 4).indices.numpy())
    assert compute_targets(model, template, id_lists).responses is None
    with pytest.raises(ValueError, match="response_tokens"):
        compute_targets(model, template, id_lists, response_tokens=-1)
