"""The embedded default: the whole pipeline on one machine, on a local Ray, in one command.

    python -m jobs.local [--output runs/local] [--config demo] [KEY=VALUE ...]

With the `demo` preset (the default; `small` is the long run): the packaged Whisper tiny.en and
SmolLM2-135M-Instruct (converted once into models/), a spoken corpus rendered under --output/corpus,
then prepare -> teacher -> export of the untrained student -> train -> export -> evaluate (distillation
gap and answers to held-out spoken questions, beside the untrained student and the cascade) -> ask.
With `tiny`: the bundled corpus and tiny random models, in a few minutes. Every stage writes under
--output and is idempotent, so a second run only confirms the outputs. The run ends with report.md /
report.json (metrics, answers to several spoken questions) and loss.png.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from jobs import _common
from pipeline import layout

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_SHOWN = 6
log = logging.getLogger(__name__)


def question_clip(mels_url: str, split: str) -> tuple[str, str]:
    """(audio path, transcript) of the first prepared clip of `split`: a question the model never trained on."""
    import pyarrow.parquet as pq

    from pipeline import cache

    manifest = cache.check_manifest(mels_url, kind=layout.MELS_KIND)
    fs, root = cache.filesystem(mels_url)
    for name in sorted(manifest["files"][layout.MELS_DIR]):
        rows = pq.read_table(cache.join(root, layout.MELS_DIR, name), columns=["id", "split", "path", "sentence"],
                             filesystem=fs).to_pylist()
        for row in sorted(rows, key=lambda r: r["id"]):
            if row["split"] == split:
                return cache.join(manifest["source"]["input"], "clips", row["path"]), row["sentence"]
    raise cache.DatasetError(f"{mels_url} has no {split!r} clip to ask about")


def release(cfg: Any, out: Path) -> str:
    """The CommonVoice release to train on: the spoken corpus (rendered under --output), or the one named."""
    from pipeline.speech_corpus import build_corpus

    c = cfg.corpus
    if c.release != "spoken":
        given = Path(c.release)
        return str(given if given.exists() or given.is_absolute() else ROOT / given)
    build_corpus(out / "corpus", clips=c.clips, questions=c.questions, seed=c.seed, workers=c.workers)
    return str(out / "corpus")


def stages(cfg: Any, out: Path, seconds: dict[str, float]) -> dict[str, Any]:
    """Every stage in turn (each idempotent), timed into `seconds`; what the report needs."""
    from pipeline.convert import ensure_configured
    from pipeline.evaluate import run_evaluate
    from pipeline.export import export_checkpoint, export_untrained
    from pipeline.prepare import run_prepare
    from pipeline.teacher import run_teacher
    from pipeline.train import finished_step, run_training

    paths = {name: str(out / name) for name in layout.LOCAL_STAGES} | {"untrained": str(out / "model-untrained")}

    def timed(name: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        seconds[name] = round(time.perf_counter() - t0, 1)
        return result

    timed("models", ensure_configured, [cfg.model.whisper, cfg.teacher.model, cfg.teacher.tokenizer])
    source = timed("corpus", release, cfg, out)
    got = {"paths": paths, "mels": timed("prepare", run_prepare, cfg, source, paths["mels"])}
    got["teacher"] = timed("teacher", run_teacher, cfg, paths["mels"], paths["teacher"])
    baseline = None
    if cfg.eval.answers:
        baseline = timed("export untrained", export_untrained, cfg, paths["untrained"], overwrite=True)
    done = finished_step(cfg.train, paths["train"])  # a re-run need not start Ray Train to learn that it is done
    if done is None:
        timed("train", run_training, cfg, paths["mels"], paths["teacher"], paths["train"])
    else:
        log.info("train: %s is at step %d already; nothing to do", paths["train"], done)
    timed("export", export_checkpoint, paths["train"], paths["model"], overwrite=True)
    tasks = [str(t if Path(t).exists() else ROOT / t) for t in cfg.eval.tasks]
    got["evaluation"] = timed("evaluate", run_evaluate, paths["model"], paths["eval"], cfg.eval,
                              mels_url=paths["mels"], teacher_url=paths["teacher"], manifests=tasks, baseline=baseline,
                              cluster=cfg.cluster)
    got["question"] = question_clip(paths["mels"], cfg.eval.split)
    got["reply"] = timed("ask", ask_one, paths["model"], got["question"][0])
    return got


def ask_one(model_dir: str, audio: str) -> str:
    from pipeline.ask import answer
    from pipeline.export import load_model

    model, tokenizer = load_model(model_dir)
    return answer(model, tokenizer, audio, max_new_tokens=40)


def metric_rows(cfg: Any, got: dict[str, Any], trained: dict[str, Any]) -> list[tuple[str, Any]]:
    split, distill = cfg.eval.split, got["evaluation"]["distillation"]
    rows = [
        ("clips prepared / rejected", f"{got['mels']['counts']['clips']} / {got['mels']['counts']['rejects']}"),
        ("targets cached / rejected", f"{got['teacher']['counts']['targets']} / {got['teacher']['counts']['rejects']}"),
        ("train steps", trained["steps"]),
        *((f"train {key} loss: first -> last", f"{trained[key]['first']:.4g} -> {trained[key]['last']:.4g}")
          for key in ("distill", "align") if trained[key]),
        (f"{split}: examples", distill["count"]),
        (f"{split}: L2 gap (mean)", distill["l2"]["mean"]),
        (f"{split}: cosine (mean)", distill["cosine"]["mean"]),
        (f"{split}: first-token agreement", distill["first_token_agreement"]["rate"]),
    ]
    for name, task in got["evaluation"].get("tasks", {}).items():
        if "classification" in task:
            rows.append((f"task {name}: accuracy", task["classification"]["accuracy"]))
        if "generation" in task:
            rows.append((f"task {name}: exact match / BLEU",
                         f"{task['generation']['exact_match']:.3g} / {task['generation']['bleu']:.3g}"))
    return rows


def one_line(text: str) -> str:
    """An answer as one line of the report's list (generated text may hold blank lines; an empty one says so)."""
    return " ".join(text.split()) or "*(no answer: it ended its turn at once)*"


def answers_section(answers: dict[str, Any], out: Path) -> str:
    """The three systems side by side, and a few questions with every answer."""
    systems = [s for s in ("baseline", "student", "cascade") if s in answers]
    names = {"baseline": "untrained student", "student": "trained student", "cascade": "cascade (Whisper -> LLM)"}
    lines = [f"## Spoken questions ({answers['count']} clips of the {answers['split']!r} split)", "",
             "| system | first-token agreement | KL at the first position | answer word-F1 vs the typed question's |",
             "|---|---|---|---|"]
    lines += [f"| {names[s]} | {answers[s]['agree']:.3f} | {answers[s]['kl']:.3f} | {answers[s]['word_f1']:.3f} |"
              for s in systems]
    lines += ["", "Constant baseline (always the teacher's most common first token): "
              f"{answers['constant_baseline']:.3f}", ""]
    examples = [json.loads(line) for line in (out / "eval" / "answers" / "examples.jsonl").read_text().splitlines()]
    for row in examples[:EXAMPLES_SHOWN]:
        lines.append(f"- **{row['sentence']}**  \n  LLM, typed: {one_line(row['teacher_answer'])}  \n" + "  \n".join(
            f"  {names[s]}: {one_line(row[s]['answer'])}" for s in systems))
    return "\n".join(lines)


def run() -> int:
    p = _common.parser(__doc__, aliases={"--eval-split": "eval.split", "--input": "corpus.release"})
    p.set_defaults(config="demo")
    p.add_argument("--output", default=str(ROOT / "runs" / "local"), help="where every stage writes")
    args, cfg = _common.parse(p)
    _common.init_ray()
    from pipeline.report import markdown_table, plot_loss, read_metrics, training_summary

    out, seconds, t0 = Path(args.output), {}, time.perf_counter()
    got = stages(cfg, out, seconds)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    metrics = read_metrics(got["paths"]["train"])
    plot_loss(metrics, str(out / "loss.png"), title=f"DiVA {args.config}: {metrics[-1]['step']} steps")
    rows = metric_rows(cfg, got, training_summary(metrics)) + [(f"seconds: {k}", v) for k, v in seconds.items()]
    audio, transcript = got["question"]
    parts = [f"# DiVA local run ({args.config} preset)", markdown_table(rows), "![loss](loss.png)"]
    if "answers" in got["evaluation"]:
        parts.append(answers_section(got["evaluation"]["answers"], out))
    parts.append(f"**Spoken question** ({Path(audio).name}): {transcript}\n\n"
                 f"**Answer** (jobs.ask): {one_line(got['reply'])}")
    report = "\n\n".join(parts) + "\n"
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({
        "rows": dict(rows), "answers": got["evaluation"].get("answers"),
        "question": {"audio": audio, "transcript": transcript, "answer": got["reply"]}}, indent=2) + "\n")
    print(report)
    print(f"report: {out / 'report.md'}, loss curve: {out / 'loss.png'}")
    return 0


if __name__ == "__main__":
    _common.main(run)
