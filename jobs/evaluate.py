"""Evaluate: `python -m jobs.evaluate --model <model dir> --output <dir>
[--mels <prepare output> --teacher <teacher cache> [--split dev]] [--tasks <manifest.jsonl> ...]`.

With --mels/--teacher: the distillation gap (L2, cosine, KL between h_student and the cached h_teacher) and
first-token agreement on one split, by Ray Data batch inference (one model per actor). With --tasks (repeat
it for several manifests): free generation scored by exact/contains match and sacrebleu BLEU, and
classification by the log-probability of each label (the paper's emotion/sarcasm/humour protocol). Per
example outputs and summary.json files go under --output (layout: pipeline/evaluate.py). Manifests are
checked before anything runs: every bad row is named with its file and line. The other flags are the
config's eval.* keys (--split is eval.split, --device eval.device, ...). With eval.answers=true (the small
presets) the split's spoken questions are also answered by the model and the cascade, and by --baseline (the
untrained student, `jobs.export --untrained`) when given, and scored against the LLM's typed answers.
"""

from __future__ import annotations

from jobs import _common

ALIASES = {f"--{key.replace('_', '-')}": f"eval.{key}" for key in (
    "split", "max_new_tokens", "label_score", "skip_bad_rows", "device", "dtype", "num_actors", "batch_size",
    "task_batch_size", "whisper", "llm")}


def run() -> int:
    p = _common.parser(__doc__, aliases=ALIASES)
    p.add_argument("--model", required=True, help="model directory written by jobs.export (local or gs://)")
    p.add_argument("--output", required=True, help="directory for the results (local or gs://)")
    p.add_argument("--mels", help="the prepare stage's output (with --teacher: distillation metrics)")
    p.add_argument("--teacher", help="the teacher cache made from --mels with the model's LLM")
    p.add_argument("--baseline", help="with eval.answers: a model directory to answer beside --model "
                                      "(the untrained student, from jobs.export --untrained)")
    p.add_argument("--tasks", action="append", default=[], metavar="MANIFEST",
                   help="a JSONL task manifest (local or gs://); may be given several times")
    args, cfg = _common.parse(p)

    from pipeline.evaluate import EvalError, read_manifests, run_evaluate
    from pipeline.export import read_config

    if bool(args.mels) != bool(args.teacher):
        raise EvalError("--mels and --teacher go together (the distillation metrics need both)")
    if not args.mels and not args.tasks:
        raise EvalError("nothing to evaluate: give --mels with --teacher, or --tasks, or both")
    # Fail fast, before Ray starts and models load: a bad model directory or manifest row.
    for model in filter(None, (args.model, args.baseline)):
        read_config(model)
    if args.tasks:
        read_manifests(args.tasks, skip_bad_rows=cfg.eval.skip_bad_rows)
    _common.init_ray()
    summary = run_evaluate(args.model, args.output, cfg.eval, mels_url=args.mels, teacher_url=args.teacher,
                           manifests=args.tasks, baseline=args.baseline, cluster=cfg.cluster)
    brief = {"output": args.output}
    if "distillation" in summary:
        d = summary["distillation"]
        brief["distillation"] = {"split": d["split"], "count": d["count"], "l2_mean": d["l2"]["mean"],
                                 "l2_median": d["l2"]["median"], "cosine_mean": d["cosine"]["mean"],
                                 "first_token_agreement": d["first_token_agreement"]["rate"]}
    if "answers" in summary:
        a = summary["answers"]
        brief["answers"] = {"count": a["count"], "constant_baseline": a["constant_baseline"]} | {
            name: a[name] for name in ("baseline", "student", "cascade") if name in a}
    for name, task in summary.get("tasks", {}).items():
        brief[name] = {k: task[k] for k in ("generation", "classification") if k in task} | {
            "errors": len(task["errors"]), "skipped": len(task["skipped"])}
    return _common.print_json(brief)


if __name__ == "__main__":
    _common.main(run)
