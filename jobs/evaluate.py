"""Evaluate: `python -m jobs.evaluate --model <model dir> --output <dir>
[--mels <prepare output> --teacher <teacher cache> [--split dev]] [--tasks <manifest.jsonl> ...]`.

With --mels/--teacher: the distillation gap (L2, cosine, KL between h_student and the cached h_teacher) and
first-token agreement on one split, by Ray Data batch inference (one model per actor). With --tasks (repeat
it for several manifests): free generation scored by exact/contains match and sacrebleu BLEU, and
classification by the log-probability of each label (the paper's emotion/sarcasm/humour protocol). Per
example outputs and summary.json files go under --output (layout: pipeline/evaluate.py). Manifests are
checked before anything runs: every bad row is named with its file and line.
"""

from __future__ import annotations

import argparse
import json

from jobs import _common


def run() -> int:
    from pipeline.evaluate import DEVICES, DTYPES, LABEL_SCORES, EvalConfig

    defaults = EvalConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by jobs.export (local or gs://)")
    p.add_argument("--output", required=True, help="directory for the results (local or gs://)")
    p.add_argument("--mels", help="the prepare stage's output (with --teacher: distillation metrics)")
    p.add_argument("--teacher", help="the teacher cache made from --mels with the model's LLM")
    p.add_argument("--split", default=defaults.split, help="which split of --mels (default: %(default)s)")
    p.add_argument("--tasks", action="append", default=[], metavar="MANIFEST",
                   help="a JSONL task manifest (local or gs://); may be given several times")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="for generation rows")
    p.add_argument("--label-score", choices=LABEL_SCORES, default=defaults.label_score,
                   help="classification: sum (default: the label's log-probability) or mean of its token log-probs")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="evaluate a manifest's good rows even if some are bad (they are listed in its summary)")
    p.add_argument("--device", choices=DEVICES, default=defaults.device, help="cuda: one GPU per actor")
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype)
    p.add_argument("--num-actors", type=int, default=defaults.num_actors, help="model copies (actors)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="distillation examples per pass")
    p.add_argument("--task-batch-size", type=int, default=defaults.task_batch_size, help="manifest rows per call")
    p.add_argument("--whisper", default=None, help="override the Whisper checkpoint the model dir names")
    p.add_argument("--llm", default=None, help="override the LLM checkpoint the model dir names")
    args = p.parse_args()

    from pipeline.evaluate import EvalError, read_manifests, run_evaluate
    from pipeline.export import local_model_dir, read_config

    ecfg = EvalConfig(device=args.device, dtype=args.dtype, split=args.split, batch_size=args.batch_size,
                      task_batch_size=args.task_batch_size, num_actors=args.num_actors,
                      max_new_tokens=args.max_new_tokens, label_score=args.label_score,
                      skip_bad_rows=args.skip_bad_rows, whisper=args.whisper, llm=args.llm).check()
    if bool(args.mels) != bool(args.teacher):
        raise EvalError("--mels and --teacher go together (the distillation metrics need both)")
    if not args.mels and not args.tasks:
        raise EvalError("nothing to evaluate: give --mels with --teacher, or --tasks, or both")
    # Fail fast, before Ray starts and models load: a bad model directory or manifest row.
    read_config(local_model_dir(args.model))
    if args.tasks:
        read_manifests(args.tasks, skip_bad_rows=args.skip_bad_rows)
    _common.init_ray()
    summary = run_evaluate(args.model, args.output, ecfg, mels_url=args.mels, teacher_url=args.teacher,
                           manifests=args.tasks)
    brief = {"output": args.output}
    if "distillation" in summary:
        d = summary["distillation"]
        brief["distillation"] = {"split": d["split"], "count": d["count"], "l2_mean": d["l2"]["mean"],
                                 "l2_median": d["l2"]["median"], "cosine_mean": d["cosine"]["mean"],
                                 "first_token_agreement": d["first_token_agreement"]["rate"]}
    for name, task in summary.get("tasks", {}).items():
        brief[name] = {k: task[k] for k in ("generation", "classification") if k in task} | {
            "errors": len(task["errors"]), "skipped": len(task["skipped"])}
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    _common.main(run)
