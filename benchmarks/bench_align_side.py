"""Which virtual tokens should the transcript align with on a small budget: the paper's last N, or the first N?

    python benchmarks/bench_align_side.py [--mels runs/exp/mels --teacher runs/exp/teacher] [--steps 150]

The small student (Whisper tiny.en + SmolLM2-135M-Instruct, the `small` preset) trains on the alignment loss
alone (`pipeline.losses.alignment_loss`, `side` "right" = paper section 3.2.1, "left" = `train.align_side=left`)
from the same initialisation, the same batches (16 clips of the train split) and the same lr, with the frozen
encoder's outputs computed once. Every `--eval-every` steps it reports the share of aligned virtual tokens whose
nearest LLM input embedding (L2, over the whole vocabulary) is the transcript's token: on train clips and on the
held-out spoken questions. Prints both sides and the ratio left / right; writes runs/bench/align_side.json.
Needs a mels dataset and teacher cache made with --config small (`python -m jobs.corpus`, `jobs.prepare`,
`jobs.cache_teacher`, as in docs/small.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.ingest import collate  # noqa: E402
from pipeline.losses import alignment_loss  # noqa: E402
from pipeline.model import build_student  # noqa: E402


def encoded(model, cfg, mels: str, teacher: str, split: str, limit: int) -> tuple[torch.Tensor, ...]:
    """(encoder outputs [n, frames/2, d], token ids [n, Q], lengths [n]) of a split's first `limit` clips by id."""
    import pyarrow.parquet as pq

    targets = pq.read_table(f"{teacher}/targets", columns=["id", "token_ids", "target"]).to_pylist()
    targets = {r["id"]: r for r in targets}
    mels_rows = pq.read_table(f"{mels}/mels", columns=["id", "split", "mel", "mel_pad_value"]).to_pylist()
    rows = sorted((r | targets[r["id"]] for r in mels_rows if r["split"] == split and r["id"] in targets),
                  key=lambda r: r["id"])
    out = []
    for i in range(0, min(limit, len(rows)), 16):
        chunk = {k: [r[k] for r in rows[i:i + 16]] for k in ("id", "mel", "mel_pad_value", "token_ids", "target")}
        b = collate(chunk, n_mels=cfg.features.n_mels, n_frames=cfg.features.n_frames,
                    num_queries=cfg.model.num_queries, target_dtype=cfg.teacher.target_dtype)
        out.append((model.encode(b["input_features"]), b["token_ids"], b["lengths"]))
    return tuple(torch.cat(parts) for parts in zip(*out, strict=True))


@torch.no_grad()
def token_accuracy(model, data: tuple[torch.Tensor, ...], side: str, table: torch.Tensor) -> float:
    """Share of aligned virtual tokens whose nearest embedding row is the transcript's token."""
    audio, ids, lengths = data
    right = wrong = 0
    for i in range(0, len(audio), 32):
        virtual = model.project(audio[i:i + 32])
        n, q = lengths[i:i + 32].clamp(max=virtual.shape[1]), virtual.shape[1]
        pos = torch.arange(q)
        start = q - n[:, None] if side == "right" else torch.zeros_like(n)[:, None]
        picked = torch.gather(virtual, 1, (start + pos).clamp(max=q - 1)[:, :, None].expand(-1, -1, virtual.shape[2]))
        nearest = torch.cdist(picked.flatten(0, 1), table).argmin(-1).view(picked.shape[:2])
        valid = pos[None] < n[:, None]
        hits = int(((nearest == ids[i:i + 32]) & valid).sum())
        right, wrong = right + hits, wrong + int(valid.sum()) - hits
    return right / max(1, right + wrong)


def trainable_copy(base):
    """A student sharing `base`'s frozen encoder and LLM, with its own copy of the trainable parts."""
    model = copy.copy(base)
    for part in ("queries", "qformer", "projection"):
        setattr(model, part, copy.deepcopy(getattr(base, part)))
    return model


def descend(opt, params: list, loss: torch.Tensor) -> None:
    """One AdamW step on `loss`, the gradient norm clipped to 1.0 as in training."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train(base, side: str, train_data, eval_sets, table, args) -> list[dict]:
    model = trainable_copy(base)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen, log, t0 = torch.Generator().manual_seed(0), [], time.perf_counter()
    audio, ids, lengths = train_data
    for step in range(1, args.steps + 1):
        pick = torch.randint(len(audio), (16,), generator=gen)
        virtual = model.project(audio[pick])
        loss = alignment_loss(virtual, base.text_embeddings(ids[pick]), lengths[pick], side).mean()
        descend(opt, params, loss)
        if step % args.eval_every == 0:
            model.eval()
            row = {"side": side, "step": step, "loss": round(float(loss), 2),
                   "s_per_step": round((time.perf_counter() - t0) / step, 2)}
            row |= {name: round(token_accuracy(model, data, side, table), 3) for name, data in eval_sets.items()}
            model.train()
            log.append(row)
            print(json.dumps(row), flush=True)
    return log


def probe_parser(doc: str, steps: int, eval_every: int) -> argparse.ArgumentParser:
    """The options every alignment probe takes: the small corpus's datasets, the loop's length and lr."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--mels", default="runs/exp/mels")
    p.add_argument("--teacher", default="runs/exp/teacher")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clips", type=int, default=2400, help="train clips whose encoder outputs are kept")
    return p


def main() -> None:
    args = probe_parser(__doc__, steps=150, eval_every=75).parse_args()
    torch.manual_seed(0)
    cfg = load_config("small", ["model.projection=linear"])  # the paper's projection, as measured
    base = build_student(cfg, seed=0)
    train_data = encoded(base, cfg, args.mels, args.teacher, "train", args.clips)
    eval_sets = {"train": tuple(t[:64] for t in train_data),
                 "questions": encoded(base, cfg, args.mels, args.teacher, "questions", 128)}
    table = base.llm.get_input_embeddings().weight.detach()
    logs = {side: train(base, side, train_data, eval_sets, table, args) for side in ("right", "left")}
    last = {side: log[-1] for side, log in logs.items()}
    for name in eval_sets:
        ratio = last["left"][name] / max(last["right"][name], 1e-9)
        print(f"{name}: token accuracy after {args.steps} steps: right {last['right'][name]:.3f}, "
              f"left {last['left'][name]:.3f} (left / right {ratio:.2f}x)")
    save(logs, "align_side")


def save(logs: dict, name: str) -> None:
    """A probe's logs as runs/bench/<name>.json."""
    out = ROOT / "runs" / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(logs, indent=1))


if __name__ == "__main__":
    main()
