"""DiVA's losses against hand-computed values and plain-Python references (paper section 3.2, Eq. 1, Lemma 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pipeline.losses import (
    DivaLoss,
    aligned_lengths,
    alignment_loss,
    distillation_loss,
    kl_topk_loss,
    total_loss,
    truncated_count,
)

T = torch.tensor
NAN, INF = float("nan"), float("inf")


def reference_alignment(virtual: list, text: list, lengths: list[int], side: str = "right") -> list[float]:
    """Eq. 1 with plain loops: right-align min(len, Q, N) tokens onto the last virtual tokens (or, side
    "left", onto the first ones)."""
    out = []
    for v, t, length in zip(virtual, text, lengths, strict=True):
        q, n = len(v), min(length, len(v), len(t))
        first = q - n if side == "right" else 0
        total = 0.0
        for i in range(n):
            total += math.sqrt(sum((a - b) ** 2 for a, b in zip(t[i], v[first + i], strict=True)))
        out.append(total)
    return out


def reference_kl(student_logits: list[float], ids: list[int], teacher_logprobs: list[float]) -> float:
    """sum_k q_k (log q_k - log p_s(id_k)), q = the teacher's top-k renormalised, p_s over the full vocab."""
    log_z_s = math.log(sum(math.exp(x) for x in student_logits))
    log_z_t = math.log(sum(math.exp(x) for x in teacher_logprobs))
    total = 0.0
    for i, lp in zip(ids, teacher_logprobs, strict=True):
        log_q = lp - log_z_t
        total += math.exp(log_q) * (log_q - (student_logits[i] - log_z_s))
    return total


# --- distillation (section 3.2.2) ------------------------------------------------------------------------


def test_distillation_is_the_l2_norm_not_squared():
    h_s = T([[3.0, 0.0, 0.0], [1.0, 2.0, 2.0], [6.0, 8.0, 0.0], [1.0, 2.0, 2.0]])
    h_t = T([[0.0, 4.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss = distillation_loss(h_s, h_t)
    assert loss.shape == (4,) and loss.dtype == torch.float32
    assert loss.tolist() == [5.0, 0.0, 10.0, 3.0]


def test_distillation_gradient_is_finite_at_zero_distance():
    h_s = T([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    h_t = T([[1.0, 2.0], [0.0, 4.0]])
    distillation_loss(h_s, h_t).sum().backward()
    # d||x||/dx = x / ||x||: 0 at x = 0 (no NaN), (3, -4) / 5 otherwise.
    torch.testing.assert_close(h_s.grad, T([[0.0, 0.0], [0.6, -0.8]]))


def test_distillation_computes_in_float32_from_bf16():
    h_s = T([[256.0, 0.0]], dtype=torch.bfloat16)
    h_t = T([[1.0078125, 0.0]], dtype=torch.bfloat16)  # 1 + 2^-7, exact in bf16
    loss = distillation_loss(h_s, h_t)
    assert loss.dtype == torch.float32
    assert loss.tolist() == [254.9921875]  # exact in float32; bf16 arithmetic would round it to 255
    assert (h_s - h_t)[0, 0].float().item() == 255.0


def test_distillation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[B, H\]"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        distillation_loss(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3))


# --- token alignment (section 3.2.1, Eq. 1) -------------------------------------------------------------

# Q = 4 virtual tokens, text padded to N = 3 < Q, H = 2; 99 marks padding.
VIRTUAL_A = [
    [[7, 7], [7, 7], [1, 1], [2, 2]],
    [[0, 0], [1, 0], [0, 1], [2, 2]],
    [[1, 2], [3, 4], [5, 6], [7, 8]],
]
TEXT_A = [
    [[4, 5], [7, 14], [99, 99]],  # n=2 -> virtual[2:4]: |(3,4)| + |(5,12)| = 5 + 13
    [[4, 4], [6, 9], [10, 17]],  # n=3 -> virtual[1:4]: |(3,4)| + |(6,8)| + |(8,15)| = 5 + 10 + 17
    [[99, 99], [99, 99], [99, 99]],  # n=0 -> 0
]
LENGTHS_A = [2, 3, 0]
EXPECTED_A = [18.0, 32.0, 0.0]

# Q = 3, text padded to N = 5 > Q.
VIRTUAL_B = [
    [[1, 1], [2, 2], [3, 3]],
    [[0, 0], [1, 0], [0, 1]],
    [[5, 5], [5, 5], [1, 2]],
]
TEXT_B = [
    [[4, 5], [7, 14], [11, 18], [-50, 7], [30, 1]],  # len 5 > Q: first 3 tokens on virtual[0:3]: 5 + 13 + 17
    [[3, 4], [7, 8], [0, 3], [99, 99], [99, 99]],  # len 3 == Q: |(3,4)| + |(6,8)| + |(0,2)| = 5 + 10 + 2
    [[4, 6], [99, 99], [99, 99], [99, 99], [99, 99]],  # len 1 -> virtual[2]: |(3,4)| = 5
]
LENGTHS_B = [5, 3, 1]
EXPECTED_B = [35.0, 17.0, 5.0]


@pytest.mark.parametrize(
    ("virtual", "text", "lengths", "expected"),
    [(VIRTUAL_A, TEXT_A, LENGTHS_A, EXPECTED_A), (VIRTUAL_B, TEXT_B, LENGTHS_B, EXPECTED_B)],
    ids=["N<Q", "N>Q"],
)
def test_alignment_hand_computed(virtual, text, lengths, expected):
    loss = alignment_loss(T(virtual, dtype=torch.float32), T(text, dtype=torch.float32), T(lengths))
    assert loss.dtype == torch.float32
    assert loss.tolist() == expected
    assert reference_alignment(virtual, text, lengths) == expected


def test_alignment_length_equal_to_q_and_n():
    virtual = [[[0, 0], [1, 1]]]
    text = [[[3, 4], [7, 9]]]  # |(3,4)| + |(6,8)| = 15
    assert alignment_loss(T(virtual, dtype=torch.float32), T(text, dtype=torch.float32), T([2])).tolist() == [15.0]


def test_alignment_lengths_beyond_the_padded_width_are_clamped():
    # len 5 > N = 3 (< Q = 4): all 3 text rows, on virtual[1:4]; same as saying len 3.
    virtual, text = T(VIRTUAL_A, dtype=torch.float32), T(TEXT_A, dtype=torch.float32)
    assert torch.equal(alignment_loss(virtual, text, T([5, 5, 5])), alignment_loss(virtual, text, T([3, 3, 3])))
    assert aligned_lengths(T([-1, 0, 2, 3, 9]), 4, 3).tolist() == [0, 0, 2, 3, 3]


def test_truncated_count():
    assert truncated_count(T(LENGTHS_B), 3).tolist() == 1
    assert truncated_count(T(LENGTHS_A), 4).tolist() == 0
    assert truncated_count(T([449, 448, 10, 1000], dtype=torch.int32), 448).tolist() == 2
    assert truncated_count(T([449, 448]), 448).dtype == torch.int64


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("q", "n"), [(6, 3), (6, 6), (4, 9), (1, 1), (5, 1)])
def test_alignment_matches_the_loop_reference(q, n, side):
    gen = torch.Generator().manual_seed(q * 10 + n)
    batch, hidden = 7, 5
    virtual = torch.randn(batch, q, hidden, generator=gen, dtype=torch.float64)
    text = torch.randn(batch, n, hidden, generator=gen, dtype=torch.float64)
    lengths = T([0, 1, n, q, q + 1, max(n - 1, 0), 2 * max(n, q)])
    got = alignment_loss(virtual, text, lengths, side)
    expected = reference_alignment(virtual.tolist(), text.tolist(), lengths.tolist(), side)
    torch.testing.assert_close(got, T(expected, dtype=torch.float32))


def test_left_alignment_hand_computed_and_its_gradient_stays_on_the_first_tokens():
    # Q = 3 virtual tokens, transcript of 2 tokens (+ 1 padding holding NaN): virtual 0 and 1 take part.
    virtual = T([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]], requires_grad=True)
    text = T([[[4.0, 4.0], [0.0, 0.0], [NAN, NAN]]])
    loss = alignment_loss(virtual, text, T([2]), "left")
    torch.testing.assert_close(loss, T([5.0 + 2.0]))  # ||(3, 4)|| + ||(0, -2)||
    loss.sum().backward()
    assert (virtual.grad[0, 2] == 0).all() and (virtual.grad[0, :2].abs().sum(-1) > 0).all()
    assert torch.equal(DivaLoss(align_side="left", w_distill=0.0)(None, T([[0.0]]), virtual, text, T([2]))[0],
                       loss.detach()[0])


def _random_case(q: int = 5, n: int = 7, hidden: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    virtual = torch.randn(4, q, hidden, generator=gen)
    text = torch.randn(4, n, hidden, generator=gen)
    lengths = T([0, 2, q, n])  # empty, short, == Q, > Q (truncated)
    return virtual, text, lengths


def test_alignment_ignores_padding_and_unused_virtual_tokens():
    virtual, text, lengths = _random_case()
    q = virtual.shape[1]
    base = alignment_loss(virtual, text, lengths)
    assert (base[1:] > 0).all() and base[0] == 0
    for filler in (0.0, 1e6, NAN, INF):
        v, t = virtual.clone(), text.clone()
        for b, length in enumerate(lengths.tolist()):
            n = min(length, q, text.shape[1])
            t[b, n:] = filler  # padding, and real tokens past Q (truncated away)
            v[b, : q - n] = filler  # virtual tokens before Q - n
        assert torch.equal(alignment_loss(v, t, lengths), base), filler


def test_alignment_gradient_is_zero_off_the_aligned_positions():
    virtual, text, lengths = _random_case()
    q = virtual.shape[1]
    text[0, :] = NAN  # an empty transcript's padding must not poison the gradient
    text[1, 2:] = INF
    virtual.requires_grad_(True)
    text.requires_grad_(True)
    alignment_loss(virtual, text, lengths).sum().backward()
    assert torch.isfinite(virtual.grad).all() and torch.isfinite(text.grad).all()
    for b, length in enumerate(lengths.tolist()):
        n = min(length, q, text.shape[1])
        assert (virtual.grad[b, : q - n] == 0).all()
        assert (text.grad[b, n:] == 0).all()
        assert (virtual.grad[b, q - n :].abs().sum(-1) > 0).all()
        assert (text.grad[b, :n].abs().sum(-1) > 0).all()
        # The loss is symmetric in the pair: each aligned text row gets minus its virtual row's gradient.
        torch.testing.assert_close(text.grad[b, :n], -virtual.grad[b, q - n :])


def test_alignment_computes_in_float32_from_bf16():
    virtual = T([[[7.0], [256.0]]], dtype=torch.bfloat16)
    text = T([[[1.0078125], [5.0]]], dtype=torch.bfloat16)
    loss = alignment_loss(virtual, text, T([1]))
    assert loss.dtype == torch.float32
    assert loss.tolist() == [254.9921875]


def test_alignment_rejects_bad_shapes():
    with pytest.raises(ValueError):
        alignment_loss(torch.zeros(2, 4, 3), torch.zeros(2, 3, 5), T([1, 1]))
    with pytest.raises(ValueError):
        alignment_loss(torch.zeros(2, 4, 3), torch.zeros(2, 3, 3), T([1, 1, 1]))
    with pytest.raises(ValueError, match="integer"):
        alignment_loss(torch.zeros(2, 4, 3), torch.zeros(2, 3, 3), T([1.0, 1.0]))


# --- the total (DESIGN.md section 3) --------------------------------------------------------------------


def _total_inputs():
    h_s = T([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])  # distill [5, 0, 10], mean 5
    h_t = torch.zeros(3, 2)
    virtual = T(VIRTUAL_A, dtype=torch.float32, requires_grad=True)  # align [18, 32, 0], mean 50/3
    return h_s, h_t, virtual, T(TEXT_A, dtype=torch.float32), T(LENGTHS_A)


def test_total_loss_weighting_and_parts():
    h_s, h_t, virtual, text, lengths = _total_inputs()
    total, parts = DivaLoss()(h_s, h_t, virtual, text, lengths)
    assert total.shape == () and total.requires_grad
    torch.testing.assert_close(total, T(5.0 + 50.0 / 3.0))
    assert set(parts) == {"distill", "align", "truncated"}
    assert not any(p.requires_grad for p in parts.values())
    torch.testing.assert_close(parts["distill"], T(5.0))
    torch.testing.assert_close(parts["align"], T(50.0 / 3.0))
    assert parts["truncated"].tolist() == 0

    total, _ = DivaLoss(w_distill=2.0, w_align=0.5)(h_s, h_t, virtual, text, lengths)
    torch.testing.assert_close(total, T(2.0 * 5.0 + 0.5 * 50.0 / 3.0))
    total, _ = total_loss(h_s, h_t, virtual, text, lengths, w_distill=2.0, w_align=0.5)
    torch.testing.assert_close(total, T(2.0 * 5.0 + 0.5 * 50.0 / 3.0))


def test_total_loss_token_mean_reduction():
    # The released code's reduction: alignment norms averaged over the batch's real tokens (2 + 3 + 0).
    h_s, h_t, virtual, text, lengths = _total_inputs()
    total, parts = DivaLoss(align_reduction="token_mean")(h_s, h_t, virtual, text, lengths)
    torch.testing.assert_close(parts["align"], T(50.0 / 5.0))
    torch.testing.assert_close(total, T(5.0 + 10.0))
    _, parts = DivaLoss(align_reduction="token_mean")(h_s, h_t, virtual, text, T([0, 0, 0]))
    assert parts["align"].tolist() == 0.0


def test_total_loss_zero_weight_drops_the_term_but_logs_it():
    h_s, h_t, virtual, text, lengths = _total_inputs()
    h_s.requires_grad_(True)
    text = text.clone()
    text[0, 0, 0] = NAN  # a broken alignment input cannot reach the total when its weight is 0
    total, parts = DivaLoss(w_align=0.0)(h_s, h_t, virtual, text, lengths)
    torch.testing.assert_close(total, T(5.0))
    assert parts["align"].isnan()
    total.backward()
    assert virtual.grad is None  # no alignment term in the graph


def test_total_loss_counts_truncation():
    virtual, text = T(VIRTUAL_B, dtype=torch.float32), T(TEXT_B, dtype=torch.float32)
    total, parts = DivaLoss(w_distill=0.0)(torch.zeros(3, 2), torch.zeros(3, 2), virtual, text, T(LENGTHS_B))
    assert parts["truncated"].tolist() == 1
    torch.testing.assert_close(total, T((35.0 + 17.0 + 5.0) / 3.0))


@pytest.mark.parametrize(
    "kwargs",
    [{"w_distill": -1.0}, {"w_align": float("nan")}, {"w_distill": 0.0, "w_align": 0.0}, {"align_reduction": "x"},
     {"align_side": "middle"}],
)
def test_total_loss_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        DivaLoss(**kwargs)


def test_the_objective_is_the_one_the_config_names():
    from pipeline.config import load_config

    overrides = ["teacher.top_k=8", "train.w_kl=0.25", "train.w_align=0.5", "train.align_reduction=token_mean"]
    small = load_config("small", overrides).train
    loss = DivaLoss.from_config(small)
    assert (loss.w_distill, loss.w_align, loss.w_kl, loss.align_reduction, loss.align_side) == (
        1.0, 0.5, 0.25, "token_mean", "left")
    align = loss.alignment_only()
    parts = (align.w_distill, align.w_kl, align.w_align, align.align_side, align.needs_llm)
    assert parts == (0.0, 0.0, 0.5, "left", False)
    assert DivaLoss.from_config(load_config("paper").train) == DivaLoss()  # the paper's: Eq. 1 and 2, 1:1
    assert DivaLoss(w_align=0.0).alignment_only().w_align == 1.0  # alignment alone keeps a term to train


# --- optional top-k KL (beyond the paper) ---------------------------------------------------------------

STUDENT_LOGITS = [[2.0, 0.5, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
TOPK_IDS = [[0, 4, 1], [3, 2, 0]]
TOPK_LOGPROBS = [[-0.4, -1.6, -2.3], [-0.1, -3.0, -4.0]]


def test_kl_topk_matches_a_direct_computation():
    got = kl_topk_loss(T(STUDENT_LOGITS), T(TOPK_IDS), T(TOPK_LOGPROBS))
    expected = [reference_kl(s, i, t) for s, i, t in zip(STUDENT_LOGITS, TOPK_IDS, TOPK_LOGPROBS, strict=True)]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, T(expected))
    # Row 2 by hand: the student is uniform over 5 tokens, so KL = sum q log q + log 5.
    q = [math.exp(x) for x in TOPK_LOGPROBS[1]]
    q = [x / sum(q) for x in q]
    assert expected[1] == pytest.approx(sum(x * math.log(x) for x in q) + math.log(5))


def test_kl_topk_accepts_log_probs_and_ignores_inf_entries():
    logits = T(STUDENT_LOGITS)
    base = kl_topk_loss(logits, T(TOPK_IDS), T(TOPK_LOGPROBS))
    torch.testing.assert_close(kl_topk_loss(torch.log_softmax(logits, -1), T(TOPK_IDS), T(TOPK_LOGPROBS)), base)
    with_dead = kl_topk_loss(logits[:1], T([[0, 4, 1, 2]]), T([[-0.4, -1.6, -2.3, -INF]]))
    torch.testing.assert_close(with_dead, base[:1])


def test_kl_topk_with_the_full_vocabulary_is_the_true_kl():
    gen = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(4, 11, generator=gen), torch.randn(4, 11, generator=gen)
    lp_t, lp_s = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    values, ids = torch.topk(lp_t, 11, dim=-1)
    true_kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    torch.testing.assert_close(kl_topk_loss(student, ids, values), true_kl)
    torch.testing.assert_close(kl_topk_loss(teacher, ids, values), torch.zeros(4), atol=1e-6, rtol=0)
    # Truncated to the top 3 it is still >= 0.
    values, ids = torch.topk(lp_t, 3, dim=-1)
    assert (kl_topk_loss(student, ids, values) >= 0).all()


def test_total_loss_with_kl_term():
    h_s, h_t, virtual, text, lengths = _total_inputs()
    logits = T(STUDENT_LOGITS + [[1.0, 1.0, 1.0, 1.0, 1.0]])
    ids, lps = T(TOPK_IDS + [[1, 2, 3]]), T(TOPK_LOGPROBS + [[-1.0, -1.0, -1.0]])
    kl = kl_topk_loss(logits, ids, lps).mean()
    loss = DivaLoss(w_kl=0.5)
    total, parts = loss(h_s, h_t, virtual, text, lengths, student_logits=logits, teacher_topk_ids=ids,
                        teacher_topk_logprobs=lps)
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(total, T(5.0 + 50.0 / 3.0) + 0.5 * kl)
    with pytest.raises(ValueError, match="w_kl"):
        loss(h_s, h_t, virtual, text, lengths)


# --- Lemma 1, numerically ---------------------------------------------------------------------------------


def test_lemma1_l2_to_zero_drives_the_kl_to_zero():
    """With a shared output matrix O, h_s = h_t gives KL(softmax(O h_t) || softmax(O h_s)) = 0, and along the
    line h_t + a (h_s - h_t) the KL shrinks with the L2 distance (it is convex in a with its minimum at 0)."""
    gen = torch.Generator().manual_seed(0)
    vocab, hidden = 64, 8
    out = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    h_t = torch.randn(1, hidden, generator=gen, dtype=torch.float64)
    h_s = torch.randn(1, hidden, generator=gen, dtype=torch.float64)
    log_p_t = torch.log_softmax(h_t @ out.T, -1)

    def kl(h: torch.Tensor) -> float:
        log_p_s = torch.log_softmax(h @ out.T, -1)
        return float((log_p_t.exp() * (log_p_t - log_p_s)).sum())

    alphas = [1.0, 0.8, 0.6, 0.4, 0.2, 0.05, 0.0]
    l2s = [float(distillation_loss(h_t + a * (h_s - h_t), h_t)) for a in alphas]
    kls = [kl(h_t + a * (h_s - h_t)) for a in alphas]
    assert all(x > y for x, y in zip(l2s, l2s[1:], strict=False)) and l2s[-1] == 0.0
    assert all(x > y for x, y in zip(kls, kls[1:], strict=False)) and kls[-1] == 0.0
    assert kls[0] > 1e-3
    # The optional top-k KL with k = V agrees with this direct KL.
    values, ids = torch.topk(log_p_t, vocab, dim=-1)
    assert float(kl_topk_loss(h_s @ out.T, ids, values)) == pytest.approx(kls[0], rel=1e-5)


# --- static shapes: nothing reads a tensor's value, so torch_xla traces it once ---------------------------------


def test_losses_never_read_tensor_values():
    """Under FakeTensorMode (shapes and dtypes, no data) .item(), branching on a tensor's value and
    dynamic-shape ops such as boolean-mask indexing raise; forward and backward must get through."""
    with FakeTensorMode():
        virtual, text = torch.randn(4, 5, 3, requires_grad=True), torch.randn(4, 7, 3, requires_grad=True)
        h_s, h_t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
        lengths = torch.empty(4, dtype=torch.long)
        kwargs = {"student_logits": torch.randn(4, 9, requires_grad=True),
                  "teacher_topk_ids": torch.empty(4, 2, dtype=torch.int32), "teacher_topk_logprobs": torch.randn(4, 2)}
        for reduction in ("sum", "token_mean"):
            total, parts = DivaLoss(w_kl=1.0, align_reduction=reduction)(h_s, h_t, virtual, text, lengths, **kwargs)
            total.backward()
            assert total.shape == () and parts["truncated"].dtype == torch.int64
        assert virtual.grad.shape == virtual.shape and text.grad.shape == text.shape


def test_losses_compile_without_graph_breaks():
    torch._dynamo.reset()
    virtual, text, lengths = _random_case()
    align = torch.compile(alignment_loss, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(align(virtual, text, lengths), alignment_loss(virtual, text, lengths))
    h_s, h_t = torch.randn(4, 3), torch.randn(4, 3)
    kwargs = {"student_logits": torch.randn(4, 9), "teacher_topk_ids": T([[0, 1], [2, 3], [4, 5], [6, 7]]),
              "teacher_topk_logprobs": torch.randn(4, 2)}
    for reduction in ("sum", "token_mean"):
        loss = DivaLoss(w_kl=1.0, align_reduction=reduction)
        got, got_parts = torch.compile(loss.__call__, backend="aot_eager", fullgraph=True)(
            h_s, h_t, virtual, text, lengths, **kwargs)
        want, want_parts = loss(h_s, h_t, virtual, text, lengths, **kwargs)
        torch.testing.assert_close(got, want)
        for key, value in want_parts.items():
            torch.testing.assert_close(got_parts[key], value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_losses_on_cuda_match_cpu():
    virtual, text, lengths = _random_case()
    h_s, h_t = torch.randn(4, 3), torch.randn(4, 3)
    want, want_parts = DivaLoss()(h_s, h_t, virtual, text, lengths)
    got, got_parts = DivaLoss()(h_s.cuda(), h_t.cuda(), virtual.cuda().bfloat16(), text.cuda().bfloat16(),
                                lengths.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-2)
    assert got_parts["truncated"].cpu().tolist() == want_parts["truncated"].tolist()
