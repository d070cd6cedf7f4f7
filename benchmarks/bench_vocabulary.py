"""The vocabulary projection (`model.projection=vocabulary`) against the paper's linear one, on a small CPU budget.

    python benchmarks/bench_vocabulary.py [--mels runs/exp/mels --teacher runs/exp/teacher] [--steps 300]

Both students are the `small` preset's (Whisper tiny.en + SmolLM2-135M-Instruct, 32 queries, left-aligned:
`train.align_side=left`), built from the same seed and trained on the alignment term alone, from the same batches
(16 train clips a step) at the same lr, with the frozen encoder's outputs computed once (bench_align_side.py's loop):

- `linear`: the paper's projection and its L2 alignment (Eq. 1);
- `vocabulary`: Whisper's own output head over the LLM's vocabulary, the virtual tokens mixes of the LLM's
  embeddings, the alignment term a cross-entropy against each slot's token (pipeline.losses.token_alignment_loss).

Every --eval-every steps, on held-out spoken questions: the share of transcript tokens each slot gets right (the
nearest LLM embedding for `linear`, the highest score for `vocabulary`), and the answer word-F1 (pipeline.qa, content
words) of the student's greedy answers against the LLM's answers to the typed questions. Prints both and the ratio
vocabulary / linear; writes runs/bench/vocabulary.json. Needs a mels dataset and teacher cache made with --config
small or demo (the same features and LLM), e.g. a `make demo` run's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_align_side import descend, encoded, probe_parser, save, token_accuracy, trainable_copy  # noqa: E402
from bench_words import sentences  # noqa: E402

from pipeline.ask import llm_inputs  # noqa: E402
from pipeline.builders import load_tokenizer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.losses import DivaLoss  # noqa: E402
from pipeline.model import build_student  # noqa: E402
from pipeline.qa import greedy_batch, text_answers, word_f1  # noqa: E402
from pipeline.template import stop_ids  # noqa: E402

KINDS = ("linear", "vocabulary")


def alignment(model, loss: DivaLoss, audio: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The alignment term of a batch of encoder outputs, as the training step computes it."""
    virtual, scores = model.slots(audio, mix=False)  # as an alignment-only step: the vocabulary mix is not read
    extra = {} if scores is None else {"scores": scores, "token_ids": ids, "filler_id": model.projection.filler_id}
    total, _ = loss(None, torch.zeros(len(audio), 1), virtual, model.text_embeddings(ids), lengths, **extra)
    return total


@torch.no_grad()
def slot_accuracy(model, audio: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> float:
    """Share of the (left-aligned) transcript tokens whose slot picks them."""
    if model.cfg.projection == "linear":
        return token_accuracy(model, (audio, ids, lengths), "left", model.llm.get_input_embeddings().weight)
    picked = torch.cat([model.slots(audio[i:i + 32])[1].argmax(-1) for i in range(0, len(audio), 32)])
    real = torch.arange(picked.shape[1])[None] < lengths.clamp(max=picked.shape[1])[:, None]
    return float(((picked == ids[:, :picked.shape[1]]) & real).sum() / real.sum())


@torch.no_grad()
def answers_f1(model, tokenizer, audio: torch.Tensor, references: list[str], max_new_tokens: int) -> tuple[float, list]:
    virtual = model.project(audio)
    embeds = llm_inputs(model, model.template, virtual=virtual)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    got = [a for a, _ in greedy_batch(model.llm, tokenizer, stop_ids(model.llm, tokenizer, model.template),
                                      max_new_tokens, mask, inputs_embeds=embeds)]
    return sum(word_f1(a, r) for a, r in zip(got, references, strict=True)) / len(got), got


def run(kind: str, cfg, data: dict, tokenizer, args) -> list[dict]:
    base = build_student(cfg, tokenizer, seed=0)
    model = trainable_copy(base)
    model.eval()  # no dropout in either (the Q-Former's config has none; as in training's frozen parts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    loss = DivaLoss.from_config(cfg.train).alignment_only()  # the job's alignment term (left: the configs above)
    audio, ids, lengths = data["train"]
    gen, log, t0 = torch.Generator().manual_seed(0), [], time.perf_counter()
    for step in range(0, args.steps + 1):
        if step:
            pick = torch.randint(len(audio), (16,), generator=gen)
            descend(opt, params, alignment(model, loss, audio[pick], ids[pick], lengths[pick]))
        if step % args.eval_every == 0:
            trained_s = time.perf_counter() - t0
            q_audio, q_ids, q_lengths = data["questions"]
            f1, got = answers_f1(model, tokenizer, data["asked"], data["references"], args.max_new_tokens)
            row = {"projection": kind, "step": step, "examples": 16 * step,
                   "question_token_accuracy": round(slot_accuracy(model, q_audio, q_ids, q_lengths), 3),
                   "answer_word_f1": round(f1, 3), "s_per_step": round(trained_s / max(step, 1), 2),
                   "answers": [f"{q} -> {a}" for q, a in zip(data["texts"][:3], got[:3], strict=False)]}
            log.append(row)
            print(json.dumps(row), flush=True)
            t0 += time.perf_counter() - t0 - trained_s  # evaluation time is not training time
    return log


def main() -> None:
    p = probe_parser(__doc__, steps=300, eval_every=100)
    p.add_argument("--questions", type=int, default=24, help="held-out question clips answered at each evaluation")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    configs = {kind: load_config("small", [f"model.projection={kind}", "train.align_side=left"]) for kind in KINDS}
    tokenizer = load_tokenizer(configs["linear"].teacher)
    base = build_student(configs["linear"], tokenizer, seed=0)  # the encoder is the same for both
    questions = encoded(base, configs["linear"], args.mels, args.teacher, "questions", 128)
    texts = sentences(args.mels, args.teacher, "questions", 128)
    picks = list(range(0, len(texts), max(1, len(texts) // args.questions)))[:args.questions]
    asked = [texts[i] for i in picks]
    references = [a for a, _ in text_answers(base.llm, tokenizer, base.template, asked, args.max_new_tokens)]
    data = {"train": encoded(base, configs["linear"], args.mels, args.teacher, "train", args.clips),
            "questions": questions, "asked": questions[0][picks], "texts": asked, "references": references}
    del base
    logs = {kind: run(kind, configs[kind], data, tokenizer, args) for kind in KINDS}
    last = {kind: log[-1] for kind, log in logs.items()}
    for key in ("question_token_accuracy", "answer_word_f1"):
        base = last["linear"][key]
        ratio = f"vocabulary / linear {last['vocabulary'][key] / base:.1f}x" if base > 0 else "linear at 0: no ratio"
        print(f"{key} after {args.steps} steps ({16 * args.steps} examples): linear {base:.3f}, "
              f"vocabulary {last['vocabulary'][key]:.3f} ({ratio})")
    save(logs, "vocabulary")


if __name__ == "__main__":
    main()
