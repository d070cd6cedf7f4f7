"""One optimizer step, the same on every device: the training loop, the benchmark and the XLA tests
all run this function, so what a test proves of it holds for the loop users run.

`forward_loss` is one micro-batch: the student's forward and DiVA's loss (pipeline.losses), as named
`LossParts`. `train_step` accumulates micro-batches to the global batch, lets the backend reduce
gradients and loss parts across workers, clips and steps the optimizer. Device specifics (moving a
batch, FSDP2's gradient sync, XLA's step boundary) are the backend's (pipeline.backends). Nothing here
reads a device value on the host, so under torch_xla the whole step traces into one graph.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.config import ConfigError
from pipeline.losses import DivaLoss


@dataclasses.dataclass
class LossParts:
    """A step's loss terms as device tensors: summed over micro-batches (and workers) until read."""

    total: torch.Tensor
    distill: torch.Tensor
    align: torch.Tensor
    kl: torch.Tensor
    truncated: torch.Tensor  # transcripts longer than the queries (counted, not averaged)

    @classmethod
    def zeros(cls, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LossParts:
        return cls.unstack(torch.zeros(len(dataclasses.fields(cls)), device=device, dtype=dtype))

    @classmethod
    def unstack(cls, stacked: torch.Tensor) -> LossParts:
        return cls(*stacked.unbind())

    def stack(self) -> torch.Tensor:
        """One tensor for one all-reduce."""
        return torch.stack([getattr(self, f.name) for f in dataclasses.fields(self)])

    def detach(self) -> LossParts:
        return LossParts(*(getattr(self, f.name).detach() for f in dataclasses.fields(self)))

    def __add__(self, other: LossParts) -> LossParts:
        mine = self.stack()
        return LossParts.unstack(mine + other.stack().to(mine))

    def averaged(self, n: int) -> LossParts:
        """The loss terms divided by n (the truncation count stays a count): a sum over n workers -> a mean."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name) / n for f in dataclasses.fields(self)
                                            if f.name != "truncated"})

    def means(self, micro_batches: int) -> dict[str, float]:
        """Host values for logging: each loss term's mean over the step's micro-batches."""
        values = dict(zip((f.name for f in dataclasses.fields(self)), self.stack().double().cpu().tolist(),
                          strict=True))  # one device-to-host read
        return {k: v if k == "truncated" else v / micro_batches for k, v in values.items()}


def forward_loss(model: Any, batch: dict[str, torch.Tensor], loss_fn: DivaLoss) -> LossParts:
    """One micro-batch (pipeline.ingest.collate's tensors, on the model's device) -> its loss parts. The LLM
    runs only when a term needs it; without it `distill` is NaN (not computed, not logged). A batch with
    `response_ids` (train.distill_positions > 1) distils every position its `target_mask` marks."""
    virtual, h_student, scores = model(batch["input_features"], batch.get("clip_key"), llm=loss_fn.needs_llm,
                                       response_ids=batch.get("response_ids"))
    extra = {"target_mask": batch["target_mask"]} if "target_mask" in batch else {}
    if scores is not None:  # model.projection=vocabulary: the alignment term is a cross-entropy over tokens
        extra |= {"scores": scores, "token_ids": batch["token_ids"], "filler_id": model.projection.filler_id}
    if loss_fn.w_kl > 0:  # the top-k KL term needs the student's logits at the first response position
        first = h_student[:, 0] if h_student.dim() == 3 else h_student
        extra |= {"student_logits": model.llm.get_output_embeddings()(first),
                  "teacher_topk_ids": batch["topk_ids"], "teacher_topk_logprobs": batch["topk_logprobs"]}
    text = model.text_embeddings(batch["token_ids"])
    total, parts = loss_fn(h_student, batch["target"], virtual, text, batch["lengths"], **extra)
    absent = {"distill": float("nan"), "kl": 0.0}
    parts = {k: torch.full((), v, device=total.device, dtype=total.dtype) for k, v in absent.items()} | parts
    return LossParts(total=total, distill=parts["distill"], align=parts["align"], kl=parts["kl"],
                     truncated=parts["truncated"].to(total.dtype))


@dataclasses.dataclass
class StepResult:
    parts: LossParts  # summed over the step's micro-batches, averaged over workers (truncation: summed)
    grad_norm: torch.Tensor  # before clipping


def train_step(model: Any, batches: Sequence[dict[str, torch.Tensor]], loss_fn: DivaLoss,
               optimizer: torch.optim.Optimizer, backend: Any, *, lr: float, grad_clip: float) -> StepResult:
    """Accumulate `batches` (this worker's micro-batches of one global batch), then one AdamW update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    parts = backend.zeros()
    for i, batch in enumerate(batches):
        with backend.accumulating(last=i == len(batches) - 1):
            micro = forward_loss(model, backend.to_device(batch), loss_fn)
            (micro.total / len(batches)).backward()
        parts = parts + micro.detach()
    params = list(model.trainable_parameters().values())
    backend.reduce_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts = backend.reduce(parts)
    backend.end_step()
    return StepResult(parts, grad_norm)


# --- the schedule and the optimizer ------------------------------------------------------------------


def lr_at(step: int, tcfg: Any) -> float:
    """Linear warmup over the first `warmup_frac` of steps, then cosine decay to 0 (the paper's)."""
    warmup = max(1, round(tcfg.warmup_frac * tcfg.steps))
    if step < warmup:
        return tcfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, tcfg.steps - warmup)
    return tcfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def accumulation(tcfg: Any, world: int) -> int:
    """Micro-batches per worker per step, so that micro x accum x workers = the global batch."""
    per_step = tcfg.micro_batch_size * world
    if tcfg.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={tcfg.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={tcfg.micro_batch_size} x {world} workers (train.num_workers): "
                          "every worker accumulates whole micro-batches to each step")
    return tcfg.global_batch_size // per_step


def make_optimizer(params: dict[str, torch.nn.Parameter], tcfg: Any) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (queries, projections), not on biases and norms (nanoGPT's rule)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas))
