"""The embedded default: the whole pipeline on the bundled corpus, on a local Ray, in one command.

    python -m jobs.local [--output runs/local] [--config tiny] [KEY=VALUE ...]

prepare -> teacher -> train -> export -> evaluate -> ask, each stage writing under --output
(mels/, teacher/, train/, model/, eval/), then a short report: report.md (the metrics table),
loss.png (the loss curve) and one spoken question answered. Stages are idempotent, so a second run
only confirms the outputs (a crashed run resumes; training continues from its last checkpoint).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jobs import _common
from pipeline import layout

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "commonvoice"
TASKS = sorted((ROOT / "tests" / "fixtures" / "eval").glob("*.jsonl"))


def question_clip(mels_url: str, split: str) -> tuple[str, str]:
    """(audio path, transcript) of the first prepared clip of `split`: a question the model never trained on."""
    import pyarrow.parquet as pq

    from pipeline import cache, prepare

    manifest = cache.check_manifest(mels_url, kind=prepare.KIND)
    fs, root = cache.filesystem(mels_url)
    for name in sorted(manifest["files"]["mels"]):
        rows = pq.read_table(cache.join(root, "mels", name), columns=["id", "split", "path", "sentence"],
                             filesystem=fs).to_pylist()
        for row in sorted(rows, key=lambda r: r["id"]):
            if row["split"] == split:
                return cache.join(manifest["source"]["input"], "clips", row["path"]), row["sentence"]
    raise cache.DatasetError(f"{mels_url} has no {split!r} clip to ask about")


def run() -> int:
    p = _common.parser(__doc__, aliases={"--eval-split": "eval.split"})
    p.set_defaults(config="tiny")
    p.add_argument("--input", default=str(CORPUS), help="CommonVoice release (default: the bundled corpus)")
    p.add_argument("--output", default=str(ROOT / "runs" / "local"), help="where every stage writes")
    args, cfg = _common.parse(p)
    _common.init_ray()
    from pipeline.ask import answer
    from pipeline.evaluate import run_evaluate
    from pipeline.export import export_checkpoint, load_model
    from pipeline.prepare import run_prepare
    from pipeline.report import markdown_table, plot_loss, read_metrics, training_summary
    from pipeline.teacher import run_teacher
    from pipeline.train import run_training

    out = Path(args.output)
    paths = {name: str(out / name) for name in layout.LOCAL_STAGES}
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        seconds[name] = round(time.perf_counter() - t0, 1)
        return result

    mels = timed("prepare", run_prepare, cfg, args.input, paths["mels"])
    teacher = timed("teacher", run_teacher, cfg, paths["mels"], paths["teacher"])
    timed("train", run_training, cfg, paths["mels"], paths["teacher"], paths["train"])
    timed("export", export_checkpoint, paths["train"], paths["model"], overwrite=True)
    evaluation = timed("evaluate", run_evaluate, paths["model"], paths["eval"], cfg.eval, mels_url=paths["mels"],
                       teacher_url=paths["teacher"], manifests=[str(t) for t in TASKS])
    audio, transcript = question_clip(paths["mels"], cfg.eval.split)
    model, tokenizer = load_model(paths["model"])
    reply = timed("ask", answer, model, tokenizer, audio, max_new_tokens=32)

    metrics = read_metrics(paths["train"])
    plot_loss(metrics, str(out / "loss.png"), title=f"DiVA {args.config}: {metrics[-1]['step']} steps")
    trained = training_summary(metrics)
    distill = evaluation["distillation"]
    rows = [
        ("clips prepared / rejected", f"{mels['counts']['clips']} / {mels['counts']['rejects']}"),
        ("targets cached / rejected", f"{teacher['counts']['targets']} / {teacher['counts']['rejects']}"),
        ("train steps", trained["steps"]),
        *((f"train {key} loss: first -> last", f"{trained[key]['first']:.4g} -> {trained[key]['last']:.4g}")
          for key in ("distill", "align")),
        (f"{cfg.eval.split}: examples", distill["count"]),
        (f"{cfg.eval.split}: L2 gap (mean)", distill["l2"]["mean"]),
        (f"{cfg.eval.split}: cosine (mean)", distill["cosine"]["mean"]),
        (f"{cfg.eval.split}: first-token agreement", distill["first_token_agreement"]["rate"]),
    ]
    for name, task in evaluation.get("tasks", {}).items():
        if "classification" in task:
            rows.append((f"task {name}: accuracy", task["classification"]["accuracy"]))
        if "generation" in task:
            rows.append((f"task {name}: exact match / BLEU",
                         f"{task['generation']['exact_match']:.3g} / {task['generation']['bleu']:.3g}"))
    rows += [(f"seconds: {k}", v) for k, v in seconds.items()]
    report = "\n\n".join([
        f"# DiVA local run ({args.config} preset)",
        markdown_table(rows),
        "![loss](loss.png)",
        f"**Spoken question** ({Path(audio).name}): {transcript}\n\n**Answer**: {reply}",
    ]) + "\n"
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"rows": dict(rows), "question": {"audio": audio,
                                                 "transcript": transcript, "answer": reply}}, indent=2) + "\n")
    print(report)
    print(f"report: {out / 'report.md'}, loss curve: {out / 'loss.png'}")
    return 0


if __name__ == "__main__":
    _common.main(run)
