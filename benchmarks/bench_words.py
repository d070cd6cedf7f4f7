"""How exact must the question's words reach the LLM, and how fast does a Q-Former learn them on a CPU budget?

    python benchmarks/bench_words.py [--mels runs/exp/mels --teacher runs/exp/teacher] [--steps 200]

Two measurements on the `small` preset (Whisper tiny.en + SmolLM2-135M-Instruct), on held-out spoken questions:

1. **What the LLM tolerates** (no training). SmolLM2 answers, greedily, from prefix ++ middle ++ suffix, where the
   middle is the typed question's own token embeddings placed in the 32 virtual-token slots, with the slots the
   transcript does not fill holding a filler (the mean token embedding, or the " " token's), or with a share of
   its tokens swapped for random tokens of the train transcripts (a student that gets that share wrong). Word-F1
   (pipeline.qa.word_f1, content words) against the LLM's answer to the typed question.
2. **How fast the words are learned**. The alignment loss alone, left-aligned (`train.align_side=left`), from the
   same initialisation and batches (bench_align_side.py's loop): the paper's L2 (`l2`); L2 plus a cross-entropy
   over -||v - e_t||^2 / tau, whose argmax is the nearest embedding (`l2+ce`); and a cross-entropy through
   Whisper's own tied output head on Whisper-tokenized transcripts (`whisper-ce`: no projection to learn, the
   non-autoregressive transcription task alone). Reports the held-out token accuracy (nearest embedding, or the
   head's argmax for `whisper-ce`).

Needs a mels dataset and teacher cache made with --config small, as bench_align_side.py does. Writes
runs/bench/words.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_align_side import descend, encoded, probe_parser, token_accuracy, trainable_copy  # noqa: E402

from pipeline.builders import load_tokenizer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.losses import alignment_loss  # noqa: E402
from pipeline.model import build_student  # noqa: E402
from pipeline.qa import text_answers, word_f1  # noqa: E402
from pipeline.template import stop_ids  # noqa: E402


def sentences(mels: str, teacher: str, split: str, limit: int) -> list[str]:
    """The split's transcripts in `encoded`'s order: the clips with a target, by id."""
    import pyarrow.parquet as pq

    with_target = set(pq.read_table(f"{teacher}/targets", columns=["id"]).column("id").to_pylist())
    rows = pq.read_table(f"{mels}/mels", columns=["id", "split", "sentence"]).to_pylist()
    rows = sorted((r for r in rows if r["split"] == split and r["id"] in with_target), key=lambda r: r["id"])
    return [r["sentence"] for r in rows][:limit]


@torch.no_grad()
def tolerance(model, tokenizer, questions: list[str], ids: torch.Tensor, lengths: torch.Tensor,
              vocabulary: torch.Tensor, args) -> dict[str, float]:
    """Part 1: mean word-F1 of the answer from each kind of middle against the typed question's answer."""
    llm, template, q = model.llm, model.template, model.num_queries
    table = llm.get_input_embeddings().weight
    stops = sorted(stop_ids(llm, tokenizer, template))
    fillers = {"mean": table.mean(0), "space": table[tokenizer(" ", add_special_tokens=False)["input_ids"][0]]}
    gen = torch.Generator().manual_seed(0)

    def answer(middle: torch.Tensor) -> str:
        x = torch.cat([table[model.prefix_ids], middle, table[model.suffix_ids]])[None]
        out = llm.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                           max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stops,
                           pad_token_id=stops[0])
        return tokenizer.decode(out[0], skip_special_tokens=True).strip()

    scores: dict[str, list[float]] = {}
    for i, text in enumerate(questions):
        [(reference, _)] = text_answers(llm, tokenizer, template, [text], args.max_new_tokens)
        n = int(lengths[i].clamp(max=q))
        words = ids[i, :n]
        middles = {}
        for k, fill in fillers.items():
            middles[f"transcript + {k} tail"] = torch.cat([table[words], fill.expand(q - n, -1)])
            middles[f"{k} head + transcript"] = torch.cat([fill.expand(q - n, -1), table[words]])
        for wrong in args.wrong:
            swap = torch.rand(n, generator=gen) < wrong
            noisy = torch.where(swap, vocabulary[torch.randint(len(vocabulary), (n,), generator=gen)], words)
            tail = fillers["space"].expand(q - n, -1)
            middles[f"{wrong:.0%} of tokens wrong + space tail"] = torch.cat([table[noisy], tail])
        for name, middle in middles.items():
            got = answer(middle)
            scores.setdefault(name, []).append(word_f1(got, reference))
            if i < args.show:
                print(f"[{name}] {text} -> {got}", flush=True)
    means = {name: round(sum(v) / len(v), 3) for name, v in scores.items()}
    for name, value in means.items():
        print(f"part 1: answer word-F1 {value:.3f}  {name}", flush=True)
    return means


def whisper_ids(whisper_dir: str, texts: list[str], q: int) -> torch.Tensor:
    """Whisper-tokenized transcripts (as its decoder emits them: a leading space), -100-padded to q."""
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(whisper_dir)
    out = torch.full((len(texts), q), -100, dtype=torch.long)
    for i, text in enumerate(texts):
        t = tok(" " + text.strip(), add_special_tokens=False)["input_ids"][:q]
        out[i, :len(t)] = torch.tensor(t)
    return out


def objective(name: str, model, batch: dict[str, torch.Tensor], head: torch.Tensor | None, tau: float) -> torch.Tensor:
    """One batch's loss under objective `name` (left-aligned)."""
    if name == "whisper-ce":
        hidden = model.qformer(inputs_embeds=model.queries.expand(len(batch["audio"]), -1, -1),
                               encoder_hidden_states=batch["audio"], use_cache=False).last_hidden_state
        logits = hidden @ head.T
        return F.cross_entropy(logits.flatten(0, 1), batch["whisper_ids"].flatten(), ignore_index=-100)
    virtual = model.project(batch["audio"])
    loss = alignment_loss(virtual, model.text_embeddings(batch["ids"]), batch["lengths"], "left").mean()
    if name == "l2+ce":
        table = model.llm.get_input_embeddings().weight
        n = batch["lengths"].clamp(max=virtual.shape[1])
        valid = torch.arange(virtual.shape[1])[None] < n[:, None]
        logits = (2 * virtual[valid] @ table.T - (table * table).sum(1)) / tau
        loss = loss + F.cross_entropy(logits, batch["ids"][:, :virtual.shape[1]][valid], reduction="sum") / len(n)
    return loss


@torch.no_grad()
def head_accuracy(model, audio: torch.Tensor, targets: torch.Tensor, head: torch.Tensor) -> float:
    right = total = 0
    for i in range(0, len(audio), 32):
        a = audio[i:i + 32]
        hidden = model.qformer(inputs_embeds=model.queries.expand(len(a), -1, -1), encoder_hidden_states=a,
                               use_cache=False).last_hidden_state
        y = targets[i:i + 32]
        right += int(((hidden @ head.T).argmax(-1) == y)[y >= 0].sum())
        total += int((y >= 0).sum())
    return right / max(1, total)


def learn(name: str, base, train_set: dict, questions: dict, head: torch.Tensor, table: torch.Tensor,
          args) -> list[dict]:
    """Part 2: alignment-only steps under one objective, the held-out token accuracy every --eval-every steps."""
    model = trainable_copy(base)
    params = [p for n, p in model.named_parameters() if p.requires_grad
              and not (name == "whisper-ce" and n.startswith("projection"))]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen, log, t0 = torch.Generator().manual_seed(0), [], time.perf_counter()
    for step in range(1, args.steps + 1):
        pick = torch.randint(len(train_set["audio"]), (16,), generator=gen)
        loss = objective(name, model, {k: v[pick] for k, v in train_set.items()}, head, args.tau)
        descend(opt, params, loss)
        if step % args.eval_every == 0:
            model.eval()
            if name == "whisper-ce":
                acc = head_accuracy(model, questions["audio"], questions["whisper_ids"], head)
            else:
                acc = token_accuracy(model, (questions["audio"], questions["ids"], questions["lengths"]), "left", table)
            model.train()
            row = {"objective": name, "step": step, "examples": 16 * step, "loss": round(loss.item(), 3),
                   "question_token_accuracy": round(acc, 3), "s_per_step": round((time.perf_counter() - t0) / step, 2)}
            log.append(row)
            print(json.dumps(row), flush=True)
    return log


def main() -> None:
    p = probe_parser(__doc__, steps=200, eval_every=100)
    p.add_argument("--questions", type=int, default=16, help="held-out question clips for part 1")
    p.add_argument("--wrong", type=float, nargs="*", default=[0.1, 0.25, 0.5], help="shares of wrong tokens, part 1")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--show", type=int, default=2, help="print the answers for this many questions")
    p.add_argument("--objectives", nargs="*", default=["l2", "l2+ce", "whisper-ce"])
    p.add_argument("--tau", type=float, default=1.0)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = load_config("small", ["model.projection=linear"])  # the paper's projection, as measured
    base = build_student(cfg, seed=0)
    tokenizer = load_tokenizer(cfg.teacher)
    q = base.num_queries
    audio, ids, lengths = encoded(base, cfg, args.mels, args.teacher, "questions", 128)
    texts = sentences(args.mels, args.teacher, "questions", 128)
    picks = list(range(0, len(texts), max(1, len(texts) // args.questions)))[:args.questions]
    train_audio, train_ids, train_lengths = encoded(base, cfg, args.mels, args.teacher, "train", args.clips)
    vocabulary = torch.unique(train_ids[torch.arange(q)[None] < train_lengths[:, None]])
    asked = [texts[i] for i in picks]
    result = {"part1": tolerance(base, tokenizer, asked, ids[picks], lengths[picks], vocabulary, args)}

    head = _whisper_head(cfg.model.whisper)
    table = base.llm.get_input_embeddings().weight.detach()
    train_texts = sentences(args.mels, args.teacher, "train", args.clips)
    train_set = {"audio": train_audio, "ids": train_ids, "lengths": train_lengths,
                 "whisper_ids": whisper_ids(cfg.model.whisper, train_texts, q)}
    questions = {"audio": audio, "ids": ids, "lengths": lengths,
                 "whisper_ids": whisper_ids(cfg.model.whisper, texts, q)}
    result["part2"] = {name: learn(name, base, train_set, questions, head, table, args) for name in args.objectives}
    for name, log in result["part2"].items():
        print(f"part 2: {name}: held-out token accuracy {log[-1]['question_token_accuracy']:.3f} after "
              f"{log[-1]['examples']} examples")
    out = ROOT / "runs" / "bench" / "words.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def _whisper_head(whisper_dir: str) -> torch.Tensor:
    """Whisper's output head: its token embedding table (tied), frozen."""
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(whisper_dir).model.decoder.embed_tokens.weight.detach()


if __name__ == "__main__":
    main()
