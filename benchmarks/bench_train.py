"""Stage 3 benchmark: the training step with cached targets against an online teacher, and ingest
rows/s against the rows/s that step consumes.

    python benchmarks/bench_train.py [--batch 8] [--repeats 5] [--model paper-shaped|small]
                                     [--corpus runs/bench/cv-2000]
    python benchmarks/bench_train.py --quick     # smoke run: batch 2, 2 repeats, 1 epoch of the bundled corpus

1. Step time of the cached-target step against an online teacher, padded to 448 (a) or not (b).
2. Ingest rows/s (join, shuffle, collate on a local Ray) against the rows/s the step consumes.
3. With CUDA, part 1 on the GPU in bf16: examples/s and peak memory.
What each part runs and how it is timed: docs/benchmarks.md.

Writes runs/bench/train.json. The default run takes about 5 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local instance, as in tests/conftest.py
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline import cache  # noqa: E402
from pipeline import commonvoice as cv  # noqa: E402
from pipeline.backends import PlainBackend  # noqa: E402
from pipeline.builders import load_tokenizer, tiny_llama, tiny_whisper  # noqa: E402
from pipeline.config import ModelConfig, load_config  # noqa: E402
from pipeline.ingest import Collate, collate, training_dataset  # noqa: E402
from pipeline.losses import DivaLoss  # noqa: E402
from pipeline.model import DiVA  # noqa: E402
from pipeline.prepare import MELS_SCHEMA, REJECTS_SCHEMA, featurize_rows, run_prepare  # noqa: E402
from pipeline.step import make_optimizer, train_step  # noqa: E402
from pipeline.teacher import (  # noqa: E402
    compute_targets,
    encode_targets,
    run_teacher,
    target_spec,
)
from pipeline.template import ChatTemplate, derive_template, transcript_ids  # noqa: E402

BUNDLED = ROOT / "tests" / "fixtures" / "commonvoice"
LARGE = ROOT / "runs" / "bench" / "cv-2000"
DATA_DIR = ROOT / "runs" / "bench" / "train-data"
QUERIES = 448
ENCODER_POSITIONS = 1500
WHISPER = {"d_model": 256, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
           "decoder_attention_heads": 4, "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024}
# --model: the LLM beside that Whisper. "paper-shaped" gives the step the paper's proportions (LLM ~5x the
# Whisper's parameters; encoder / Q-Former / LLM ~13/16/71% of the step's FLOPs against 12/18/70% for
# whisper-large-v3 + Llama 3 8B) and Llama 3's 4:1 grouped-query attention. "small" is bench_teacher's
# LLM: there the Whisper side dominates the step (35/42/23%), so a teacher pass is a smaller share of it.
LLAMAS = {
    "paper-shaped": {"hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 8, "num_attention_heads": 8,
                     "num_key_value_heads": 2},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2},
}
# The paper's models' shapes (whisper-large-v3, Meta-Llama-3-8B-Instruct), for the FLOP estimate only.
PAPER_WHISPER = {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 32, "encoder_ffn_dim": 5120,
                 "decoder_ffn_dim": 5120}
PAPER_LLAMA = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8}
# Max abs diff of the online targets against the float16 cache: hidden states after RMSNorm are O(1),
# float16 keeps ~3 significant digits, bf16 compute ~2.
TOLERANCE = {"float32": 1e-2, "bfloat16": 0.25}
TARGETS = {"a/cached": 1.3, "ingest/demand": 5.0}
VARIANTS = {"cached": None, "a": "padded", "b": "unpadded"}
NAMES = {"cached": "cached targets (ours)", "a": "(a) online teacher, text padded to 448",
         "b": "(b) online teacher, unpadded text"}


# --- part 1: the step ---------------------------------------------------------------------------------------


def step_flops(whisper: dict[str, int], llama: dict[str, int], seq_len: int, n_mels: int = 128,
               n_frames: int = 3000) -> dict[str, float]:
    """Per-example FLOPs (2 per multiply-add; matmuls and attention only) of a cached step's parts and of
    a padded teacher pass. Backward: 2x forward where weights train (Q-Former, projection), 1x through the
    frozen LLM (gradients for its inputs only); the frozen encoder runs forward only."""
    d, p, q = whisper["d_model"], ENCODER_POSITIONS, QUERIES
    layer = 2 * p * (4 * d * d + 2 * d * whisper["encoder_ffn_dim"]) + 4 * p * p * d
    encoder = 2 * 3 * n_mels * d * n_frames + 2 * 3 * d * d * (n_frames // 2) + whisper["encoder_layers"] * layer
    # Self- and cross-attention projections on the queries, cross keys/values on the encoder output.
    layer = (2 * q * (6 * d * d + 2 * d * whisper["decoder_ffn_dim"]) + 2 * p * 2 * d * d
             + 4 * q * q * d + 4 * q * p * d)
    h, kv = llama["hidden_size"], llama["hidden_size"] // llama["num_attention_heads"] * llama["num_key_value_heads"]
    qformer = 3 * (whisper["decoder_layers"] * layer + 2 * q * d * h)
    llm_forward = llama["num_hidden_layers"] * (
        2 * seq_len * (h * (h + 2 * kv) + h * h + 3 * h * llama["intermediate_size"]) + 4 * seq_len * seq_len * h)
    step = encoder + qformer + 2 * llm_forward
    return {"encoder": encoder, "qformer": qformer, "llm": 2 * llm_forward, "step": step,
            "teacher_padded": llm_forward, "a/cached": 1 + llm_forward / step}


def build_model(vocab: int, template: ChatTemplate, llama: dict[str, int], device: torch.device) -> DiVA:
    """The student as build_student makes it (float32 weights), at the benchmark's sizes."""
    whisper = tiny_whisper(0, 128, **WHISPER)
    llm = tiny_llama(vocab, seed=0, **llama)
    return DiVA(whisper, llm, template, ModelConfig(whisper="tiny", num_queries=QUERIES), seed=0).to(device)


def step_batches(tok: Any, model: DiVA, template: ChatTemplate, batch: int, pad_id: int) -> list[dict[str, Any]]:
    """The bundled corpus as training steps receive it (see the module docstring), in groups of `batch`."""
    cfg = load_config("tiny")
    sel = cv.select({s: (BUNDLED / f"{s}.tsv").read_bytes() for s in ("train", "dev", "test")})
    threads = torch.get_num_threads()
    work = featurize_rows(sel.rows, str(BUNDLED / "clips"), cfg.features, cfg.prepare)
    torch.set_num_threads(threads)  # featurize_rows sets 1 (one CPU per Ray task)
    good, _ = cache.split_results(work, MELS_SCHEMA, REJECTS_SCHEMA)
    rows = good.select(["id", "sentence", "mel", "mel_pad_value"]).to_pylist()
    ids = [transcript_ids(tok, r["sentence"]) for r in rows]
    hidden = compute_targets(model.llm, template, [t[:QUERIES] for t in ids], pad_id=pad_id).hidden
    blobs = encode_targets(hidden, "float16")
    out = []
    for start in range(0, max(len(rows) - batch + 1, 1), batch):  # the clips cycled when there are fewer
        chunk = [(start + j) % len(rows) for j in range(batch)]
        joined = {"id": [rows[i]["id"] for i in chunk], "mel": [rows[i]["mel"] for i in chunk],
                  "mel_pad_value": [rows[i]["mel_pad_value"] for i in chunk],
                  "token_ids": [ids[i] for i in chunk], "target": [blobs[i] for i in chunk]}
        tensors = collate(joined, n_mels=cfg.features.n_mels, n_frames=cfg.features.n_frames,
                          num_queries=QUERIES, target_dtype="float16")
        out.append({"tensors": tensors, "token_lists": [ids[i][:QUERIES] for i in chunk]})
    return out


def online_targets(llm: Any, template: ChatTemplate, token_lists: list[list[int]], width: int | None,
                   pad_id: int) -> torch.Tensor:
    """The teacher pass inside a step: prefix + transcript + suffix per row, right-padded (pads masked)
    to `width` tokens, or to the longest row when None; final-norm hidden state at the last real
    position, [B, H]. Right padding keeps every real token's position, so each row equals its own
    forward (and its cached target)."""
    rows = [template.wrap(ids) for ids in token_lists]
    width = width or max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    device = llm.device
    last = torch.tensor([len(r) - 1 for r in rows], device=device)
    with torch.no_grad():
        out = llm.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.last_hidden_state[torch.arange(len(rows), device=device), last]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One optimizer step: the training loop's own `train_step` (one micro-batch, no accumulation) on the
    plain backend, with the paper's AdamW settings and clip."""

    def __init__(self, model: DiVA, template: ChatTemplate, pad_id: int, amp: torch.dtype | None):
        tcfg = load_config("paper").train
        self.model, self.template, self.pad_id, self.amp = model, template, pad_id, amp
        self.params = model.trainable_parameters()
        self.optimizer = make_optimizer(self.params, tcfg)
        self.clip, self.lr = tcfg.grad_clip, tcfg.lr
        self.loss_fn = DivaLoss.from_config(tcfg)
        self.width = model.seq_len  # len(prefix) + 448 + len(suffix)
        self.device = model.queries.device
        self.backend = PlainBackend(dataclasses.replace(tcfg, device=self.device.type))

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def targets(self, batch: dict[str, Any], teacher: str | None) -> torch.Tensor:
        if teacher is None:
            return batch["tensors"]["target"]
        with self.autocast():
            width = self.width if teacher == "padded" else None
            return online_targets(self.model.llm, self.template, batch["token_lists"], width, self.pad_id)

    def __call__(self, batch: dict[str, Any], teacher: str | None) -> tuple[float, float, float]:
        """(wall seconds of the step, of its teacher pass, process CPU seconds of the step)."""
        sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        target = self.targets(batch, teacher)
        sync(self.device)
        t_teacher = time.perf_counter() - t0
        with self.autocast():
            train_step(self.model, [batch["tensors"] | {"target": target}], self.loss_fn, self.optimizer,
                       self.backend, lr=self.lr, grad_clip=self.clip)
        sync(self.device)
        return time.perf_counter() - t0, t_teacher, time.process_time() - c0


def bench_steps(device: torch.device, args: argparse.Namespace, batch_size: int,
                amp: torch.dtype | None) -> dict[str, Any]:
    llama = LLAMAS[args.model]
    tok = load_tokenizer(load_config("tiny").teacher)
    template = derive_template(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    model = build_model(len(tok), template, llama, device)
    batches = step_batches(tok, model, template, batch_size, pad_id)
    for b in batches:
        b["tensors"] = {k: v.to(device) for k, v in b["tensors"].items()}
    stepper = Stepper(model, template, pad_id, amp)
    dtype = "float32" if amp is None else str(amp).removeprefix("torch.")
    lengths = [len(ids) for b in batches for ids in b["token_lists"]]
    params = {k: sum(p.numel() for p in getattr(model, k).parameters()) / 1e6 for k in ("encoder", "qformer", "llm")}
    params["trainable"] = sum(p.numel() for p in stepper.params.values()) / 1e6
    print(f"\nstep on {device} ({dtype}{' autocast' if amp else ''}, {torch.get_num_threads()} threads), batch "
          f"{batch_size}: {len(batches)} distinct batches of bundled clips, transcripts "
          f"{statistics.median(lengths):.0f} tokens median, {max(lengths)} max")
    print(f"  Whisper {WHISPER}\n  Llama ({args.model}) {llama}, vocab {len(tok)}\n  {QUERIES} queries, LLM "
          f"sequence {model.seq_len}; params (M): encoder {params['encoder']:.2f}, Q-Former {params['qformer']:.2f}, "
          f"LLM {params['llm']:.2f}, trainable {params['trainable']:.2f}")

    # The online teachers must give the cached targets, or the variants would do different work.
    first = batches[0]
    diffs = {k: float((stepper.targets(first, t).float() - first["tensors"]["target"].float()).abs().max())
             for k, t in VARIANTS.items() if t}
    tol = TOLERANCE[dtype]
    if not all(d <= tol for d in diffs.values()):
        raise SystemExit(f"online teacher targets differ from the cached ones: {diffs} (tolerance {tol})")

    position = 0

    def run(name: str, steps: int) -> tuple[float, float, float]:
        nonlocal position
        sums = [0.0, 0.0, 0.0]
        for _ in range(steps):
            sums = [a + b for a, b in zip(sums, stepper(batches[position % len(batches)], VARIANTS[name]), strict=True)]
            position += 1
        return sums[0] / steps, sums[1] / steps, sums[2] / steps

    for name in VARIANTS:  # warm-up: allocator, kernels, optimizer state
        run(name, 1)
    wall: dict[str, list[float]] = {k: [] for k in VARIANTS}
    teacher: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    peak = dict.fromkeys(VARIANTS, 0)
    for _ in range(args.repeats):  # interleaved, so load from other work hits every variant alike
        for name in VARIANTS:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            w, t, c = run(name, args.steps)
            wall[name].append(w)
            teacher[name].append(t)
            cpu[name].append(c)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_teacher = {k: statistics.median(v) for k, v in teacher.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    fastest = {k: min(v) for k, v in wall.items()}  # other work on the machine only ever adds time
    flops = step_flops(WHISPER, llama, model.seq_len)
    paper = step_flops(PAPER_WHISPER, PAPER_LLAMA, model.seq_len)
    res = {"device": str(device), "dtype": dtype, "threads": torch.get_num_threads(), "batch": batch_size,
           "distinct_batches": len(batches), "whisper": WHISPER, "llama": {**llama, "vocab_size": len(tok)},
           "llama_name": args.model, "queries": QUERIES, "llm_seq_len": model.seq_len, "params_m": params,
           "target_max_abs_diff": diffs, "tolerance": tol, "steps_per_sample": args.steps,
           "step_s": wall, "teacher_s": teacher, "cpu_s": cpu, "median_step_s": med, "median_teacher_s": med_teacher,
           "median_cpu_s": med_cpu, "examples_per_s": {k: batch_size / v for k, v in med.items()},
           "a/cached": med["a"] / med["cached"], "b/cached": med["b"] / med["cached"],
           "a/cached_cpu": med_cpu["a"] / med_cpu["cached"], "b/cached_cpu": med_cpu["b"] / med_cpu["cached"],
           "min_step_s": fastest, "a/cached_min": fastest["a"] / fastest["cached"],
           "b/cached_min": fastest["b"] / fastest["cached"],
           "flops_per_example": flops, "paper_flops_per_example": paper}
    if device.type == "cuda":
        res["peak_memory_gib"] = {k: v / 2**30 for k, v in peak.items()}

    print(f"  online targets = cached ones: max abs diff (a) {diffs['a']:.1e}, (b) {diffs['b']:.1e} "
          f"(float16 cache, tolerance {tol})")
    print(f"  median of {args.repeats} interleaved samples of {args.steps} step(s) "
          f"(cached ms: {', '.join(f'{t * 1e3:.0f}' for t in wall['cached'])}):")
    for k, name in NAMES.items():
        mem = f"  peak {res['peak_memory_gib'][k]:.2f} GiB" if device.type == "cuda" else ""
        print(f"    {name:40s} {med[k] * 1e3:8.1f} ms/step (teacher pass {med_teacher[k] * 1e3:6.1f} ms, "
              f"CPU {med_cpu[k]:6.2f} s)  {res['examples_per_s'][k]:7.1f} examples/s{mem}")
    print(f"  a/cached = {res['a/cached']:.2f}x (target >= {TARGETS['a/cached']}; {res['a/cached_cpu']:.2f}x in "
          f"process CPU time)   b/cached = {res['b/cached']:.2f}x ({res['b/cached_cpu']:.2f}x CPU)")
    print(f"  fastest samples: cached {fastest['cached'] * 1e3:.0f} ms, (a) {fastest['a'] * 1e3:.0f} ms, (b) "
          f"{fastest['b'] * 1e3:.0f} ms: a/cached {res['a/cached_min']:.2f}x, b/cached {res['b/cached_min']:.2f}x")
    shares = "/".join(f"{flops[k] / flops['step']:.0%}" for k in ("encoder", "qformer", "llm"))
    paper_shares = "/".join(f"{paper[k] / paper['step']:.0%}" for k in ("encoder", "qformer", "llm"))
    print(f"  FLOP estimate per example: step {flops['step'] / 1e9:.1f} GFLOP (encoder/Q-Former/LLM {shares}), "
          f"padded teacher {flops['teacher_padded'] / 1e9:.1f}: a/cached {flops['a/cached']:.2f}x; at the paper's "
          f"sizes {paper['step'] / 1e12:.1f} TFLOP ({paper_shares}), a/cached {paper['a/cached']:.2f}x")
    return res


# --- part 2: ingest ---------------------------------------------------------------------------------------


def ensure_corpus(args: argparse.Namespace) -> Path:
    """--corpus, else runs/bench/cv-2000 (generated once with espeak-ng if it can be), else the bundled one."""
    if args.corpus:
        return args.corpus
    if args.quick:
        return BUNDLED
    if not (LARGE / "train.tsv").exists():
        if not shutil.which("espeak-ng"):
            print(f"no {LARGE} and no espeak-ng to generate it: using the bundled corpus")
            return BUNDLED
        print(f"generating a 2000-clip corpus in {LARGE} (espeak-ng) ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(LARGE),
                        "--clips", "2000"], check=True)
    return LARGE


def prepared(corpus: Path, cfg: Any) -> tuple[str, str, dict[str, float]]:
    """Stage 1 and 2 outputs for `corpus`, made once and then reused (a finished stage just confirms)."""
    out = DATA_DIR / corpus.name
    mels, teacher = str(out / "mels"), str(out / "teacher")
    wall = {}
    for name, fn, fn_args in (("prepare", run_prepare, (cfg, str(corpus), mels)),
                              ("teacher", run_teacher, (cfg, mels, teacher))):
        t0 = time.perf_counter()
        try:
            fn(*fn_args)
        except cache.DatasetError as e:  # output of an older plan (another config or pipeline version)
            print(f"  {name}: {e}; redoing it")
            fn(*fn_args, overwrite=True)
        wall[name] = time.perf_counter() - t0
    return mels, teacher, wall


def bench_ingest(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    import ray

    corpus = ensure_corpus(args)
    # The tiny preset (tiny LLM, float16 targets) with the default file sizes: the preset's 16-row files
    # are there so that tests see several files, and a read task per 16 rows is not what a real run pays.
    cfg = load_config("tiny", ["prepare.rows_per_file=1000", "teacher.rows_per_file=4096"])
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False  # progress lines would bury the figures
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        mels, teacher, stage_wall = prepared(corpus, cfg)
        tok = load_tokenizer(cfg.teacher)
        expect = target_spec(cfg.teacher, tok, derive_template(tok, cfg.teacher.system_prompt))
        ds, info = training_dataset(mels, teacher, expect=expect, split="train", shuffle_seed=0)
        coll = Collate(**info["collate"], num_queries=QUERIES)
        matched = info["counts"]["matched"]
        want = ((batch_size, info["collate"]["n_mels"], info["collate"]["n_frames"]), (batch_size, QUERIES))
        print(f"\ningest on a local Ray ({cores} CPUs, started in {ray_init:.1f} s): {corpus} -> "
              f"{DATA_DIR / corpus.name} (prepare {stage_wall['prepare']:.1f} s, teacher "
              f"{stage_wall['teacher']:.1f} s; a finished stage is reused)")
        print(f"  train split: {matched} rows joined of {info['counts']['mels']} clips, {info['num_partitions']} "
              f"join partition(s), seeded shuffle; batches of {batch_size} by iter_torch_batches + Collate")
        epochs, first = [], []
        for _ in range(args.epochs):
            rows, t_first, t0 = 0, None, time.perf_counter()
            for batch in ds.iter_torch_batches(batch_size=batch_size, drop_last=True, collate_fn=coll):
                if t_first is None:
                    t_first = time.perf_counter() - t0
                shape = tuple(batch["input_features"].shape), tuple(batch["token_ids"].shape)
                if shape != want:
                    raise SystemExit(f"collate gave shapes {shape}, not {want}")
                rows += batch_size
            epochs.append(time.perf_counter() - t0)
            first.append(t_first or 0.0)
            if rows != matched - matched % batch_size:
                raise SystemExit(f"an epoch yielded {rows} rows, not the {matched} joined (in full batches)")
    finally:
        ray.shutdown()
    wall, to_first = statistics.median(epochs), statistics.median(first)
    return {"corpus": str(corpus), "cores": cores, "rows_per_epoch": rows, "epoch_wall_s": epochs,
            "first_batch_s": first, "stage_wall_s": stage_wall, "counts": info["counts"],
            "num_partitions": info["num_partitions"], "rows_per_s": rows / wall,
            "steady_rows_per_s": (rows - batch_size) / max(wall - to_first, 1e-9)}


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="examples per optimizer step on the CPU (default 8)")
    ap.add_argument("--model", choices=sorted(LLAMAS), default="paper-shaped", help="the LLM's size (see LLAMAS)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved samples per variant (median reported)")
    ap.add_argument("--steps", type=int, default=1, help="steps per sample (their mean is one sample)")
    ap.add_argument("--epochs", type=int, default=3, help="ingest epochs (median reported)")
    ap.add_argument("--corpus", type=Path, default=None,
                    help=f"a CommonVoice-layout release for the ingest figure (default {LARGE}, else the bundled one)")
    ap.add_argument("--gpu-batch", type=int, default=32, help="examples per step on the GPU")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batch 2, 2 repeats, 1 epoch of the bundled corpus")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "train.json")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps, args.epochs = 2, 1, 1
    batch = args.batch or (2 if args.quick else 8)

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    print(f"load average at start {', '.join(f'{x:.2f}' for x in load_start)} on {os.cpu_count()} cores")
    res: dict[str, Any] = {"load_average_start": load_start, "cpu": bench_steps(torch.device("cpu"), args, batch, None)}
    cpu = res["cpu"]
    res["a/cached"] = cpu["a/cached"]
    demand = batch / cpu["median_step_s"]["cached"]
    res["step_demand_rows_per_s"] = demand
    if not args.skip_ingest:
        ing = res["ingest"] = bench_ingest(args, batch)
        res["ingest/demand"] = ing["rows_per_s"] / demand
        print(f"  median of {args.epochs} epoch(s) of {ing['rows_per_epoch']} rows: "
              f"{statistics.median(ing['epoch_wall_s']):.2f} s per epoch, the first batch after "
              f"{statistics.median(ing['first_batch_s']):.2f} s (read, join, shuffle)")
        print(f"  ingest {ing['rows_per_s']:.0f} rows/s over whole epochs ({ing['steady_rows_per_s']:.0f} rows/s after "
              f"the first batch) against the step's {demand:.2f} rows/s (batch {batch} / cached step): "
              f"{res['ingest/demand']:.0f}x (target >= {TARGETS['ingest/demand']:g})")
    if torch.cuda.is_available():
        res["cuda"] = bench_steps(torch.device("cuda"), args, args.gpu_batch, torch.bfloat16)
    res["load_average_end"] = os.getloadavg()
    res["total_bench_s"] = time.perf_counter() - t_start

    met = {k: res[k] >= v for k, v in TARGETS.items() if k in res}
    llama = LLAMAS[args.model]
    print(f"\nsummary (load average {', '.join(f'{x:.2f}' for x in res['load_average_end'])} at the end)")
    print(f"  config: Whisper d_model {WHISPER['d_model']}, {WHISPER['encoder_layers']} encoder + "
          f"{WHISPER['decoder_layers']} decoder layers; Llama ({args.model}) hidden {llama['hidden_size']}, "
          f"{llama['num_hidden_layers']} layers; {QUERIES} queries; batch {batch}; float32, "
          f"{cpu['threads']} CPU threads")
    for k, name in NAMES.items():
        print(f"  {name:40s} {cpu['median_step_s'][k] * 1e3:8.1f} ms/step")
    print(f"  a/cached {cpu['a/cached']:.2f}x   b/cached {cpu['b/cached']:.2f}x   (fastest samples "
          f"{cpu['a/cached_min']:.2f}x and {cpu['b/cached_min']:.2f}x; process CPU time {cpu['a/cached_cpu']:.2f}x and "
          f"{cpu['b/cached_cpu']:.2f}x; FLOP estimate {cpu['flops_per_example']['a/cached']:.2f}x, at the paper's "
          f"sizes {cpu['paper_flops_per_example']['a/cached']:.2f}x)")
    if "ingest" in res:
        print(f"  ingest {res['ingest']['rows_per_s']:.0f} rows/s vs the step's demand {demand:.2f} rows/s: "
              f"{res['ingest/demand']:.0f}x")
    if "cuda" in res:
        c = res["cuda"]
        print(f"  GPU bf16, batch {c['batch']}: " + ", ".join(
            f"{k} {c['examples_per_s'][k]:.0f} examples/s, peak {c['peak_memory_gib'][k]:.2f} GiB" for k in VARIANTS))
    # The benchmark itself keeps every core busy, so only the load before it started says whether other
    # work shared the machine.
    busy = res["load_average_start"][0] > 0.5 * (os.cpu_count() or 1)
    if busy:
        print(f"  NOTE: the machine was busy when the benchmark started (1-minute load average "
              f"{res['load_average_start'][0]:.2f} on {os.cpu_count()} cores): the wall-time medians may be "
              "unreliable; the fastest samples and the CPU-time ratios are steadier.")
    res["machine_busy"] = busy
    print("targets:", ", ".join(f"{k} >= {TARGETS[k]:g} {'ok' if ok else 'MISSED'}" for k, ok in met.items()))
    res["targets_met"] = met
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"written {args.out} ({res['total_bench_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
