"""Distilling the teacher's opening, not only its first token: train.distill_positions P = 1 (the paper)
against larger P on the real small model, with the same data, steps and batch, in this process.

    python benchmarks/bench_positions.py [--output runs/positions] [--positions 1,4,16] [--config demo] [KEY=VALUE ...]

1. Once: the packaged models, the preset's spoken corpus, prepare, and the teacher with
   teacher.response_tokens = max(P) (its greedy response to every transcript and the state predicting each
   of its tokens; the first is the paper's target, so P = 1 trains on exactly the paper's targets).
2. For each P: `pipeline.train.run_training` with train.distill_positions=P (nothing else changes), export.
3. One answering pass over the held-out spoken questions (eval.max_questions of them) by every trained
   student, the untrained one and the cascade, scored against the LLM's answers to the typed questions
   (pipeline.qa): first-token agreement, KL at the first response position, answer word-F1.

Prints the table with each P's seconds per joint step (both losses; from the run's logged examples/s) and
its ratio to P = 1; writes <output>/positions.md and positions.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.config import load_config  # noqa: E402


def joint_seconds_per_step(train_dir: Path, tcfg) -> float:
    """Median wall time of a joint step (after train.align_only_steps), from the logged examples/s; the
    first logged joint interval holds the switch and is left out."""
    from pipeline.report import read_metrics

    rates = [m["examples_per_s"] for m in read_metrics(str(train_dir))
             if m["step"] > tcfg.align_only_steps + tcfg.log_every and "distill" in m]
    return tcfg.global_batch_size / statistics.median(rates)


def prepare_once(cfg, out: Path) -> tuple[str, str, dict[str, float]]:
    from jobs.local import release
    from pipeline.convert import ensure_configured
    from pipeline.prepare import run_prepare
    from pipeline.teacher import run_teacher

    seconds = {}
    t0 = time.perf_counter()
    ensure_configured([cfg.model.whisper, cfg.teacher.model, cfg.teacher.tokenizer])
    source = release(cfg, out)
    mels, teacher = str(out / "mels"), str(out / "teacher")
    run_prepare(cfg, source, mels)
    seconds["corpus + prepare"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    run_teacher(cfg, mels, teacher)
    seconds[f"teacher (K={cfg.teacher.response_tokens})"] = round(time.perf_counter() - t0, 1)
    return mels, teacher, seconds


def train_one(cfg, positions: int, mels: str, teacher: str, out: Path) -> dict:
    from pipeline.export import export_checkpoint
    from pipeline.report import read_metrics
    from pipeline.train import run_training

    run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, distill_positions=positions))
    t0 = time.perf_counter()
    run_training(run, mels, teacher, str(out / "train"))
    seconds = time.perf_counter() - t0
    export_checkpoint(str(out / "train"), str(out / "model"), overwrite=True)
    last = read_metrics(str(out / "train"))[-1]
    return {"P": positions, "train_s": round(seconds, 1),
            "s_per_joint_step": joint_seconds_per_step(out / "train", run.train),
            "last_distill": last.get("distill"), "last_align": last.get("align"), "model": str(out / "model")}


def table(results: list[dict], answers: dict, base: float) -> str:
    lines = ["| P | s / joint step | vs P = 1 | train s | first-token agreement | KL at the first position | "
             "answer word-F1 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        a = answers[f"P={r['P']}"]
        lines.append(f"| {r['P']} | {r['s_per_joint_step']:.2f} | {r['s_per_joint_step'] / base:.2f}x | "
                     f"{r['train_s']:.0f} | {a['agree']:.3f} | {a['kl']:.3f} | {a['word_f1']:.3f} |")
    for name in ("untrained", "cascade"):
        a = answers[name]
        lines.append(f"| {name} | | | | {a['agree']:.3f} | {a['kl']:.3f} | {a['word_f1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(ROOT / "runs" / "positions"))
    p.add_argument("--positions", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16],
                   help="comma-separated P values (default 1,4,16)")
    p.add_argument("--config", default="demo")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, for every run")
    args = p.parse_args()
    if 1 not in args.positions:
        p.error("--positions must include 1 (the paper): the baseline every ratio is against")
    cfg = load_config(args.config, args.overrides, values={"teacher.response_tokens": max(args.positions)})
    out = Path(args.output)

    from jobs._common import init_ray
    from pipeline.evaluate import answer_spoken_questions
    from pipeline.export import export_untrained

    init_ray()
    mels, teacher, seconds = prepare_once(cfg, out)
    results = [train_one(cfg, positions, mels, teacher, out / f"p{positions}") for positions in sorted(args.positions)]
    models = {f"P={r['P']}": r["model"] for r in results}
    models["untrained"] = export_untrained(cfg, str(out / "model-untrained"), overwrite=True)
    t0 = time.perf_counter()
    answered, answers = answer_spoken_questions(models, mels, cfg.eval)
    seconds["answers"] = round(time.perf_counter() - t0, 1)
    base = next(r["s_per_joint_step"] for r in results if r["P"] == 1)
    text = (f"{answers['count']} spoken question clips ({cfg.eval.split!r} split); {cfg.train.steps} steps of batch "
            f"{cfg.train.global_batch_size} ({cfg.train.align_only_steps} on the alignment loss alone), preset "
            f"{args.config!r}\n\n{table(results, answers, base)}\n\nseconds: {seconds}\n")
    (out / "positions.md").write_text(text)
    (out / "positions.json").write_text(json.dumps({"results": results, "answers": answers, "seconds": seconds,
                                                    "overrides": args.overrides}, indent=2) + "\n")
    with open(out / "answers.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in answered)
    print(text)


if __name__ == "__main__":
    main()
