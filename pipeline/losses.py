"""DiVA's training losses (paper section 3.2, DESIGN.md section 3): pure torch, any device.

- Distillation (section 3.2.2, Lemma 1): ``||h_student - h_teacher||_2`` between the LLM's final hidden
  states (after the final norm, at the position that predicts the first response token). With the LLM's
  output matrix frozen and shared, ``h_s = h_t`` is a minimiser of ``KL(P_t || P_s)``, and the L2 distance
  is cheaper (H values, not V) and optimises more smoothly than the KL itself.
- Token alignment (section 3.2.1, Eq. 1): ``sum_n ||t_text[n] - t_audio[Q - N + n]||_2``, the transcript's
  token embeddings against the *last* N of the Q virtual tokens (the Q-Former is causal, so the last ones
  see all the others).
- Optional, beyond the paper and off by default: a KL term on the teacher's cached top-k log-probs.

Everything here keeps shapes static and never reads a tensor's value on the host (no ``.item()``, no
boolean-mask indexing, no branching on values), so the same code traces once under torch_xla; ragged
transcripts are handled with a gather index and masks built from ``lengths``. All arithmetic is float32,
whatever the input dtype: a bf16 difference of nearby hidden states loses most of its bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

AlignReduction = Literal["sum", "token_mean"]
AlignSide = Literal["right", "left"]


def distillation_loss(h_student: torch.Tensor, h_teacher: torch.Tensor) -> torch.Tensor:
    """Per-example ``||h_s - h_t||_2`` (L2 norm, not squared) in float32: [B, H], [B, H] -> [B].

    The paper's proxy for ``KL(P_t || P_s)`` (section 3.2.2, Lemma 1). Its gradient at ``h_s == h_t`` is 0.
    """
    if h_student.shape != h_teacher.shape or h_student.dim() != 2:
        raise ValueError(
            f"h_student and h_teacher must both be [B, H]; got {tuple(h_student.shape)} and {tuple(h_teacher.shape)}"
        )
    diff = h_student.float() - h_teacher.float()
    return torch.linalg.vector_norm(diff, ord=2, dim=-1)


def position_weights(mask: torch.Tensor, decay: float) -> torch.Tensor:
    """Per-position weights [B, P]: ``decay**(j-1)`` where a response token j exists (mask 1), else 0, divided
    by each row's sum, so every example's weights sum to 1 whatever its response length (float32)."""
    steps = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
    w = torch.pow(torch.full((), float(decay), device=mask.device), steps)[None, :] * mask.float()
    return w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def multi_position_distillation(h_student: torch.Tensor, h_teacher: torch.Tensor, mask: torch.Tensor,
                                decay: float = 1.0) -> torch.Tensor:
    """Beyond the paper: per-example ``sum_j w_j ||h_s[j] - h_t[j]||_2`` over the positions that predict the
    teacher's response tokens 1..P (`position_weights`: masked where the response ended, a weighted mean) -> [B].
    [B, P, H], [B, P, H], [B, P]; with P = 1 it is `distillation_loss`."""
    if h_student.shape != h_teacher.shape or h_student.dim() != 3 or mask.shape != h_student.shape[:2]:
        raise ValueError(f"expected h_student, h_teacher [B, P, H] and mask [B, P]; got {tuple(h_student.shape)}, "
                         f"{tuple(h_teacher.shape)}, {tuple(mask.shape)}")
    norms = torch.linalg.vector_norm(h_student.float() - h_teacher.float(), ord=2, dim=-1)  # [B, P]
    w = position_weights(mask, decay)
    # where, not a multiply alone: a masked position's norm (of zero-filled targets) gets no gradient at all.
    return torch.where(w > 0, norms * w, torch.zeros((), dtype=norms.dtype, device=norms.device)).sum(dim=1)


def aligned_lengths(lengths: torch.Tensor, num_virtual: int, text_width: int) -> torch.Tensor:
    """``n_b = min(lengths[b], Q, N)`` (and >= 0): how many tokens of each transcript take part in Eq. 1.

    Transcripts longer than Q keep their first Q tokens (see ``alignment_loss``).
    """
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be a 1-D integer tensor; got {lengths.dtype} {tuple(lengths.shape)}")
    return lengths.long().clamp(min=0, max=min(num_virtual, text_width))


def alignment_loss(virtual: torch.Tensor, text: torch.Tensor, lengths: torch.Tensor,
                   side: AlignSide = "right") -> torch.Tensor:
    """Per-example token alignment (paper Eq. 1, DESIGN.md section 3) in float32 -> [B].

    ``virtual`` [B, Q, H] are the Q-Former's virtual tokens; ``text`` [B, N, H] the LLM input embeddings of
    each transcript's token ids, right-padded to N (N may be smaller or larger than Q); ``lengths`` [B] the
    number of real tokens. With ``n_b = min(lengths[b], Q, N)``:

        L_align[b] = sum_{i < n_b} || text[b, i] - virtual[b, Q - n_b + i] ||_2

    i.e. the real tokens are right-aligned onto the last n_b virtual tokens (the last ones see every other
    query through the Q-Former's causal attention, section 3.2.1). The paper assumes N < Q; a transcript
    longer than Q is truncated to its first Q tokens, which then align with all Q virtual tokens (count
    such examples with ``truncated_count``). Padding text positions and virtual tokens before ``Q - n_b``
    contribute exactly 0 and get zero gradient, even if the padding holds inf/NaN.

    ``side="left"`` (beyond the paper, for short CPU runs: docs/small.md) aligns them onto the *first* n_b
    virtual tokens instead, ``virtual[b, i]``: query i then reads word i, the order in which the Whisper
    decoder it was copied from emits words, which a few thousand examples teach several times faster.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    if virtual.dim() != 3 or text.dim() != 3:
        raise ValueError(f"virtual and text must be [B, Q, H] and [B, N, H]; got {tuple(virtual.shape)}, "
                         f"{tuple(text.shape)}")
    batch, num_virtual, hidden = virtual.shape
    if text.shape[0] != batch or text.shape[2] != hidden or lengths.shape != (batch,):
        raise ValueError(f"shapes disagree: virtual {tuple(virtual.shape)}, text {tuple(text.shape)}, "
                         f"lengths {tuple(lengths.shape)}")
    width = min(num_virtual, text.shape[1])  # text positions that can ever take part (static)
    n = aligned_lengths(lengths.to(virtual.device), num_virtual, text.shape[1])  # [B]
    pos = torch.arange(width, device=virtual.device)  # text position i
    valid = pos[None, :] < n[:, None]  # [B, M]: i < n_b
    # Virtual index Q - n_b + i (right) or i (left) for real tokens; clamped into range (to Q - 1) for
    # padding, which is masked.
    start = num_virtual - n[:, None] if side == "right" else torch.zeros_like(n)[:, None]
    index = (start + pos[None, :]).clamp(max=num_virtual - 1)  # [B, M]
    picked = torch.gather(virtual, 1, index[:, :, None].expand(batch, width, hidden))  # [B, M, H]
    diff = picked.float() - text[:, :width].float()
    # where (not a multiply): padding that holds inf/NaN yields 0, and its gradient is 0 too.
    diff = torch.where(valid[:, :, None], diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    return torch.linalg.vector_norm(diff, ord=2, dim=-1).sum(dim=1)


def slot_targets(token_ids: torch.Tensor, lengths: torch.Tensor, num_virtual: int, side: AlignSide,
                 filler_id: int) -> torch.Tensor:
    """[B, Q] int64: the token each virtual-token slot should be under `alignment_loss`'s placement (the first
    n_b transcript tokens on the first or last n_b slots), `filler_id` in every other slot."""
    n = aligned_lengths(lengths.to(token_ids.device), num_virtual, token_ids.shape[1])  # [B]
    slot = torch.arange(num_virtual, device=token_ids.device)[None, :]  # [1, Q]
    start = num_virtual - n[:, None] if side == "right" else torch.zeros_like(n)[:, None]
    i = slot - start  # the transcript position a slot holds, where 0 <= i < n_b
    held = (i >= 0) & (i < n[:, None])
    width = min(num_virtual, token_ids.shape[1])
    picked = torch.gather(token_ids[:, :width].long(), 1, i.clamp(min=0, max=width - 1))
    return torch.where(held, picked, torch.full((), filler_id, dtype=torch.long, device=token_ids.device))


def token_alignment_loss(scores: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor, side: AlignSide,
                         filler_id: int) -> torch.Tensor:
    """Beyond the paper (model.projection=vocabulary): per-example cross-entropy of the slots' scores over the LLM's
    vocabulary [B, Q, V] against `slot_targets`, averaged over the Q slots, in float32 -> [B]. Eq. 1's L2 asks a
    mix of embeddings to land on one; this asks the mix to put its weight on that token: on the demo corpus 1.5x as
    many held-out tokens right after 3,200 examples (benchmarks/bench_vocabulary.py, docs/small.md)."""
    targets = slot_targets(token_ids, lengths, scores.shape[1], side, filler_id)
    ce = torch.nn.functional.cross_entropy(scores.float().transpose(1, 2), targets, reduction="none")  # [B, Q]
    return ce.mean(dim=1)


def truncated_count(lengths: torch.Tensor, num_virtual: int) -> torch.Tensor:
    """How many transcripts are longer than the Q virtual tokens (truncated in ``alignment_loss``): int64 []."""
    return (lengths > num_virtual).sum()


def kl_divergence(teacher_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || other) over the last dim of two log-prob tensors: the evaluation's next-token gap."""
    return (teacher_logprobs.exp() * (teacher_logprobs - other_logprobs)).sum(-1)


def kl_topk_loss(
    student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Per-example KL from the teacher's cached top-k next-token distribution to the student's -> [B].

    Beyond the paper (DESIGN.md section 3, optional): a direct KL term, against Lemma 1's L2 proxy.
    ``student_logits`` [B, V] are the student's logits (or log-probs: log_softmax is idempotent) over the
    full vocabulary; ``teacher_topk_ids`` / ``teacher_topk_logprobs`` [B, k] the teacher's top-k ids and
    full-vocabulary log-probs as cached by the teacher stage. The teacher distribution is renormalised over
    its top-k, ``q = softmax(teacher_topk_logprobs)``, and the student's log-probs are the full-vocabulary
    ones at those ids:

        KL[b] = sum_k q_k (log q_k - log p_s(id_k))

    This is >= 0 and 0 only when the student puts all its mass on the top-k ids in the teacher's
    proportions. Teacher entries at -inf get q = 0 and contribute 0.
    """
    ids_shape = teacher_topk_ids.shape
    if student_logits.dim() != 2 or len(ids_shape) != 2 or ids_shape != teacher_topk_logprobs.shape:
        raise ValueError(f"expected [B, V], [B, k], [B, k]; got {tuple(student_logits.shape)}, "
                         f"{tuple(teacher_topk_ids.shape)}, {tuple(teacher_topk_logprobs.shape)}")
    if teacher_topk_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"batch sizes disagree: {student_logits.shape[0]} and {teacher_topk_ids.shape[0]}")
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    ids = teacher_topk_ids.to(student_logits.device).long()
    student_at_ids = torch.gather(student_logprobs, 1, ids)  # [B, k]
    log_q = torch.log_softmax(teacher_topk_logprobs.to(student_logits.device).float(), dim=-1)
    q = log_q.exp()
    terms = q * (log_q - student_at_ids)
    return torch.where(q > 0, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(dim=-1)


@dataclass(frozen=True)
class DivaLoss:
    """The training objective: ``w_distill * mean_b L_distill + w_align * mean_b L_align [+ w_kl * mean_b KL]``.

    The paper uses both terms and needs both (section 6: distillation alone ignores text instructions,
    alignment alone is incoherent); it states no weighting, so both weights default to 1.0. The released
    training code (levanter's DiVA model) also adds them 1:1, but averages the alignment norms over all
    real tokens in the batch rather than summing them per example as Eq. 1 does: ``align_reduction=
    "token_mean"`` gives that within each micro-batch (a step averages its micro-batches' token means, so with
    accumulation it depends on how the batch is cut), ``"sum"`` (default) follows Eq. 1 and DESIGN.md and does
    not depend on the cut. The top-k KL term is off
    (``w_kl=0``) unless asked for. A term whose weight is 0 stays out of the total (but is still logged).
    """

    w_distill: float = 1.0
    w_align: float = 1.0
    w_kl: float = 0.0
    align_reduction: AlignReduction = "sum"
    position_decay: float = 1.0  # multi-position distillation (h_teacher [B, P, H]) only
    align_side: AlignSide = "right"  # the paper's last N virtual tokens; "left": the first N (alignment_loss)

    def __post_init__(self) -> None:
        weights = {"w_distill": self.w_distill, "w_align": self.w_align, "w_kl": self.w_kl}
        for name, value in weights.items():
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        if not any(weights.values()):
            raise ValueError("at least one of w_distill, w_align, w_kl must be > 0")
        if not self.position_decay > 0.0:
            raise ValueError(f"position_decay must be > 0, not {self.position_decay}")
        if self.align_reduction not in ("sum", "token_mean"):
            raise ValueError(f"align_reduction must be 'sum' or 'token_mean', not {self.align_reduction!r}")
        if self.align_side not in ("right", "left"):
            raise ValueError(f"align_side must be 'right' or 'left', not {self.align_side!r}")

    @classmethod
    def from_config(cls, tcfg: Any) -> DivaLoss:
        """The objective a `TrainConfig` names: the one the training job, the benchmarks and the tests build."""
        return cls(w_distill=tcfg.w_distill, w_align=tcfg.w_align, w_kl=tcfg.w_kl, align_reduction=tcfg.align_reduction,
                   position_decay=tcfg.position_decay, align_side=tcfg.align_side)

    def alignment_only(self) -> DivaLoss:
        """The alignment term alone (train.align_only_steps): no LLM pass."""
        return dataclasses.replace(self, w_distill=0.0, w_kl=0.0, w_align=self.w_align or 1.0)

    @property
    def needs_llm(self) -> bool:
        """Whether a term needs h_student (the LLM pass): not for the alignment loss alone."""
        return self.w_distill > 0 or self.w_kl > 0

    def __call__(
        self,
        h_student: torch.Tensor | None,
        h_teacher: torch.Tensor,
        virtual: torch.Tensor | None,
        text: torch.Tensor,
        lengths: torch.Tensor,
        *,
        student_logits: torch.Tensor | None = None,
        teacher_topk_ids: torch.Tensor | None = None,
        teacher_topk_logprobs: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        filler_id: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the scalar float32 total and detached parts for logging: ``distill`` and ``align`` (batch
        means, before weighting), ``truncated`` (int64 count), and ``kl`` when ``w_kl > 0``. Without
        `h_student` (only when no term needs it: `needs_llm`) there is no ``distill`` part. With h_teacher
        [B, P, H] (and `target_mask` [B, P]) the distillation term is `multi_position_distillation`. With the
        vocabulary projection's `scores` [B, Q, V] (and the transcripts' `token_ids`, the slots' `filler_id`) the
        alignment term is `token_alignment_loss` (a mean over slots: align_reduction does not apply)."""
        if h_student is None and self.needs_llm:
            raise ValueError("w_distill > 0 or w_kl > 0 needs h_student")
        distill = None
        if h_student is not None and h_teacher.dim() == 3:
            if target_mask is None:
                raise ValueError("h_teacher [B, P, H] needs target_mask [B, P]")
            distill = multi_position_distillation(h_student, h_teacher, target_mask, self.position_decay).mean()
        elif h_student is not None:
            distill = distillation_loss(h_student, h_teacher).mean()
        if scores is not None:
            if token_ids is None or filler_id is None:
                raise ValueError("the vocabulary projection's scores need token_ids and filler_id")
            align = token_alignment_loss(scores, token_ids, lengths, self.align_side, filler_id).mean()
        elif self.align_reduction == "sum":
            align = alignment_loss(virtual, text, lengths, self.align_side).mean()
        else:
            tokens = aligned_lengths(lengths.to(virtual.device), virtual.shape[1], text.shape[1]).sum()
            align = alignment_loss(virtual, text, lengths, self.align_side).sum() / tokens.clamp(min=1).float()
        terms = [(self.w_align, align)] + ([(self.w_distill, distill)] if distill is not None else [])
        slots = (scores if scores is not None else virtual).shape[1]
        parts = {"align": align.detach(), "truncated": truncated_count(lengths, slots).detach()}
        if distill is not None:
            parts["distill"] = distill.detach()
        if self.w_kl > 0:
            if student_logits is None or teacher_topk_ids is None or teacher_topk_logprobs is None:
                raise ValueError("w_kl > 0 needs student_logits, teacher_topk_ids and teacher_topk_logprobs")
            kl = kl_topk_loss(student_logits, teacher_topk_ids, teacher_topk_logprobs).mean()
            terms.append((self.w_kl, kl))
            parts["kl"] = kl.detach()
        total = sum(w * term for w, term in terms if w != 0)
        return total, parts


def total_loss(
    h_student: torch.Tensor,
    h_teacher: torch.Tensor,
    virtual: torch.Tensor,
    text: torch.Tensor,
    lengths: torch.Tensor,
    *,
    w_distill: float = 1.0,
    w_align: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Function form of ``DivaLoss`` (paper terms only, Eq. 1 sums): ``(total, detached parts)``."""
    return DivaLoss(w_distill=w_distill, w_align=w_align)(h_student, h_teacher, virtual, text, lengths)
