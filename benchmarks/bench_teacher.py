"""Stage 2 benchmark: teacher-target throughput of length bucketing against fixed 448-token padding.

    python benchmarks/bench_teacher.py [--n 512] [--tsv runs/bench/cv-2000/train.tsv]
                                       [--max-tokens 4096] [--max-batch-size 64] [--repeats 3]
    python benchmarks/bench_teacher.py --device cuda --dtype bfloat16   # record GPU bf16 figures

Both paths compute the same targets (the LLM's final-norm hidden state at the last position of
prefix + transcript + suffix, DESIGN.md section 3) with the same frozen model, in this process:
  ours:     pipeline.teacher.compute_targets, sequences grouped in length buckets
            (--max-tokens padded tokens per batch, at most --max-batch-size sequences)
  original: every transcript right-padded to 448 tokens, wrapped in the template (so every row is
            len(prefix) + 448 + len(suffix) positions, padding masked), fixed batches of
            --baseline-batch, hidden state taken at the last real position
The baseline reads the base model's last_hidden_state like ours (no LM head over every
position), so the ratio measures padding and batching only. Its results are checked against
ours (max abs diff within a stated tolerance) before any figure is printed.

The model is a tiny-but-not-trivial random Llama (hidden 256, MLP 688, 4 layers, 4 heads, 2 KV
heads; the fixture tokenizer's vocabulary), float32 on CPU with torch threads = all cores by
default. Transcripts: the bundled corpus's sentences (tests/fixtures/commonvoice/validated.tsv)
cycled and shuffled up to --n, or a larger CommonVoice-style TSV with --tsv (column `sentence`;
sampled down to --n, or all of it with --n 0). Transcripts over 448 tokens are truncated for both
paths (and counted). Each path is warmed up first, then timed --repeats times, interleaved; the
figures are medians of wall-clock time (the process's CPU time is printed too: steadier when other
work shares the cores). The default run takes about 1.5 minutes on 2 idle cores, dominated by the
original path. Writes runs/bench/teacher.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.builders import tiny_llama  # noqa: E402
from pipeline.teacher import (  # noqa: E402
    compute_targets,
    fixed_length_efficiency,
    length_buckets,
    padding_efficiency,
)
from pipeline.template import ChatTemplate, derive_template, transcript_ids  # noqa: E402

TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "tokenizer"
BUNDLED_TSV = ROOT / "tests" / "fixtures" / "commonvoice" / "validated.tsv"
QUERIES = 448  # the original's fixed transcript length (the student's number of virtual tokens)
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max abs diff allowed between the two paths' targets (hidden states after RMSNorm, values of order
# 1): float32 differs only by reduction order (padded vs bucketed attention), 16-bit by rounding.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.02}
TARGETS = {"ours_padding_efficiency": 0.9}


def read_sentences(tsv: Path) -> list[str]:
    """The `sentence` column of a CommonVoice TSV (tab-separated, no quoting), whitespace-normalised
    as the mels stage writes transcripts."""
    with tsv.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if "sentence" not in (rows.fieldnames or []):
            raise SystemExit(f"{tsv}: no `sentence` column (columns: {rows.fieldnames})")
        return [" ".join((row["sentence"] or "").split()) for row in rows]


def pick(sentences: list[str], n: int, seed: int) -> list[str]:
    """n sentences: the corpus cycled up to n (or sampled down to n), shuffled; all with n == 0."""
    rng = random.Random(seed)
    if n <= 0:
        out = list(sentences)
    elif n <= len(sentences):
        out = rng.sample(sentences, n)
    else:
        out = (sentences * (n // len(sentences) + 1))[:n]
    rng.shuffle(out)
    return out


def baseline_targets(model, template: ChatTemplate, id_lists: Sequence[Sequence[int]], *, batch_size: int,
                     pad_id: int) -> np.ndarray:
    """The original implementation's teacher pass: each transcript right-padded to QUERIES tokens
    and wrapped in the template, run in fixed batches, hidden state at the last real position.

    Row layout: prefix + transcript + suffix + pads, width len(prefix) + QUERIES + len(suffix);
    with right padding the real tokens keep positions 0.. and the pads are masked, so each result
    equals the sequence's own forward."""
    width = len(template.prefix_ids) + QUERIES + len(template.suffix_ids)
    device = model.device
    hidden = np.empty((len(id_lists), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(id_lists), batch_size):
            rows = [template.wrap(ids) for ids in id_lists[start : start + batch_size]]
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, seq in enumerate(rows):
                input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention_mask[r, : len(seq)] = 1
            last = torch.tensor([len(seq) - 1 for seq in rows], device=device)
            out = model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   use_cache=False)
            h = out.last_hidden_state[torch.arange(len(rows), device=device), last]
            hidden[start : start + len(rows)] = h.float().cpu().numpy()
    return hidden


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="transcripts to run (0: all of --tsv)")
    ap.add_argument("--tsv", type=Path, default=None, help=f"a TSV with a `sentence` column (default {BUNDLED_TSV})")
    ap.add_argument("--max-tokens", type=int, default=4096, help="ours: padded tokens per batch")
    ap.add_argument("--max-batch-size", type=int, default=64, help="ours: sequences per batch")
    ap.add_argument("--baseline-batch", type=int, default=8, help="original: fixed batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "teacher.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    template = derive_template(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    model = tiny_llama(len(tok), dtype=DTYPES[args.dtype], device=device, **MODEL)

    tsv = args.tsv or BUNDLED_TSV
    texts = pick(read_sentences(tsv), args.n, args.seed)
    full = [transcript_ids(tok, t) for t in texts]
    id_lists = [ids[:QUERIES] for ids in full]
    truncated = sum(len(ids) > QUERIES for ids in full)
    lengths = [len(template.wrap(ids)) for ids in id_lists]  # teacher input tokens per transcript
    width = len(template.prefix_ids) + QUERIES + len(template.suffix_ids)
    batches = length_buckets(lengths, args.max_tokens, args.max_batch_size)
    eff_ours = padding_efficiency(lengths, batches)
    eff_base = fixed_length_efficiency(lengths, width)
    real_tokens = sum(lengths)
    print(f"{len(texts)} transcripts from {tsv} ({truncated} truncated to {QUERIES} tokens); "
          f"{real_tokens} real tokens with the template, {real_tokens / len(texts):.1f} per transcript "
          f"(median {statistics.median(lengths)}, max {max(lengths)})")
    print(f"model: LlamaForCausalLM {MODEL}, vocab {len(tok)}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads")

    def ours() -> np.ndarray:
        return compute_targets(model, template, id_lists, max_tokens_per_batch=args.max_tokens,
                               max_batch_size=args.max_batch_size, pad_id=pad_id).hidden

    def original() -> np.ndarray:
        return baseline_targets(model, template, id_lists, batch_size=args.baseline_batch, pad_id=pad_id)

    # Warm-up (allocator, kernels, thread pools), then check the two paths agree on every row.
    t0 = time.perf_counter()
    warm = id_lists[: max(args.baseline_batch, 16)]
    compute_targets(model, template, warm, max_tokens_per_batch=args.max_tokens,
                    max_batch_size=args.max_batch_size, pad_id=pad_id)
    baseline_targets(model, template, warm, batch_size=args.baseline_batch, pad_id=pad_id)
    sync(device)

    times: dict[str, list[float]] = {"ours": [], "original": []}
    cpu: dict[str, list[float]] = {"ours": [], "original": []}
    results: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):  # interleaved, so load from other work hits both paths alike
        for name, fn in (("ours", ours), ("original", original)):
            sync(device)
            c0, w0 = time.process_time(), time.perf_counter()
            results[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    max_diff = float(np.abs(results["ours"] - results["original"]).max())
    tol = TOLERANCE[args.dtype]
    if not max_diff <= tol:
        raise SystemExit(f"the two paths disagree: max abs diff {max_diff:.3g} > tolerance {tol:g}")

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: len(texts) / med[k] for k in med}
    tok_rate = {k: real_tokens / med[k] for k in med}
    processed = {"ours": sum(len(b) * max(lengths[i] for i in b) for b in batches),
                 "original": len(texts) * width}
    speedup = rate["ours"] / rate["original"]
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    speedup_cpu = med_cpu["original"] / med_cpu["ours"]
    res = {
        "transcripts": len(texts), "tsv": str(tsv), "truncated": truncated, "real_tokens": real_tokens,
        "model": {**MODEL, "vocab_size": len(tok)}, "dtype": args.dtype, "device": str(device),
        "threads": torch.get_num_threads(), "max_tokens_per_batch": args.max_tokens,
        "max_batch_size": args.max_batch_size, "baseline_batch": args.baseline_batch,
        "baseline_width": width, "ours_batches": len(batches),
        "original_batches": -(-len(texts) // args.baseline_batch), "processed_tokens": processed,
        "ours_padding_efficiency": eff_ours, "original_padding_efficiency": eff_base,
        "wall_s": times, "median_wall_s": med, "transcripts_per_s": rate, "real_tokens_per_s": tok_rate,
        "cpu_s": cpu, "median_cpu_s": med_cpu, "speedup": speedup, "speedup_cpu": speedup_cpu,
        "max_abs_diff": max_diff, "tolerance": tol,
        "total_bench_s": time.perf_counter() - t0,
    }

    print(f"\nsame targets: max abs diff {max_diff:.2e} over {len(texts)} rows (tolerance {tol:g})")
    print(f"median of {args.repeats} repeats (wall s: ours {', '.join(f'{t:.2f}' for t in times['ours'])}; "
          f"original {', '.join(f'{t:.2f}' for t in times['original'])}):")
    names = {"ours": f"ours: buckets <= {args.max_tokens} tok, <= {args.max_batch_size} seq",
             "original": f"original: padded to {width}, batch {args.baseline_batch}"}
    eff = {"ours": eff_ours, "original": eff_base}
    for k, name in names.items():
        print(f"  {name:40s} padding eff {eff[k]:.3f}  {processed[k]:8d} processed tok  "
              f"{rate[k]:8.1f} transcripts/s  {tok_rate[k]:9.0f} real tok/s  ({med[k]:.2f} s)")
    print(f"  speed-up ours/original = {speedup:.1f}x wall ({speedup_cpu:.1f}x in process CPU time: "
          f"ours {med_cpu['ours']:.2f} s, original {med_cpu['original']:.2f} s)")
    print(f"  padding efficiency ours {eff_ours:.3f} (target >= 0.9), "
          f"original {eff_base:.3f} (processed-token ratio {processed['original'] / processed['ours']:.1f}x)")

    met = {k: res[k] >= v for k, v in TARGETS.items()}
    print("\ntargets:", ", ".join(f"{k} {'ok' if ok else 'MISSED'}" for k, ok in met.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
