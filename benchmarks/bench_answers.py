"""Answering spoken questions in batches: the evaluation's answer pass (pipeline.qa.AnswerWorker) by block size.

    python benchmarks/bench_answers.py [--run runs/local] [--questions 16] [--blocks 1 4 16]

On the run `make demo` leaves (its mels, trained and untrained exports), the same questions are answered in
blocks of each size by one worker in this process (no Ray): the LLM's typed answer, each student's, Whisper's
transcript and the cascade's, greedy, `eval.max_new_tokens` of the run's preset. Prints the seconds per block
size, the speed-up over blocks of 1 (the baseline: one question at a time) and whether every answer, transcript
and first token equals the baseline's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import qa  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ingest import question_rows  # noqa: E402

SYSTEMS = ("student", "baseline", "cascade")


def answers(rows: list[dict]) -> list[tuple]:
    return [(r["teacher_answer"], r["transcript"], *((r[s]["answer"], r[s]["first_token"]) for s in SYSTEMS if s in r))
            for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/local", help="a `make demo` output: mels/, model/, model-untrained/")
    p.add_argument("--config", default="demo", help="the preset the run was made with (its eval settings)")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    run = Path(args.run)
    ecfg = load_config(args.config).eval
    models = {"student": str(run / "model")}
    if (run / "model-untrained").is_dir():
        models["baseline"] = str(run / "model-untrained")
    worker = qa.AnswerWorker(models, ecfg)
    rows = qa.pick(question_rows(str(run / "mels"), ecfg.split), args.questions)
    results, baseline = {}, None
    for block in [1, *[b for b in args.blocks if b != 1]]:  # the baseline first
        start = time.perf_counter()
        got = [r for i in range(0, rows.num_rows, block) for r in worker(rows.slice(i, block)).to_pylist()]
        seconds = time.perf_counter() - start
        baseline = baseline or (seconds, answers(got))
        results[block] = {"seconds": round(seconds, 1), "questions_per_s": round(rows.num_rows / seconds, 3),
                          "speedup": round(baseline[0] / seconds, 2), "same_answers": answers(got) == baseline[1]}
        print(f"blocks of {block:>3}: {seconds:6.1f} s for {rows.num_rows} questions ({len(models)} students, "
              f"max_new_tokens {ecfg.max_new_tokens}): {results[block]['speedup']:.2f}x, "
              f"same answers as one by one: {results[block]['same_answers']}", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
