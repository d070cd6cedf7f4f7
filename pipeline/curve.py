"""Held-out learning curve: every kept checkpoint of a training run answers the same spoken questions.

A loss curve shows what training minimises; this shows what a user wants from it: first-token agreement
with the teacher, KL at the first response position and the answer's word-F1 against the LLM's answer to
the typed question (pipeline.qa), per checkpoint, beside the untrained student (step 0) and the cascade.
One answer pass serves every checkpoint, so the typed answers and the cascade are computed once.

    <out>/models/step-<N>/   each checkpoint's export (idempotent: an export already there is kept)
    <out>/examples.jsonl     every question, every system's answer and scores
    <out>/curve.json         per step: examples seen and the three means; the cascade; the constant baseline
    <out>/curve.png          the three metrics against examples seen
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline import cache

log = logging.getLogger(__name__)

CURVE_JSON, CURVE_PNG, EXAMPLES = "curve.json", "curve.png", "examples.jsonl"
METRICS = (("agree", "first-token agreement"), ("kl", "KL, first response position"),
           ("word_f1", "answer word-F1 (content words)"))


def step_name(step: int) -> str:
    return f"step-{step}"


def export_checkpoints(run: str, out: str) -> dict[int, str]:
    """Every complete checkpoint of `run`, exported under <out>/models/step-<N>: step -> model directory."""
    from pipeline.export import ExportError, complete_checkpoints, export_checkpoint

    points = complete_checkpoints(run)
    if not points:
        raise ExportError(f"{run}: no complete checkpoint to draw a curve from")
    return {step: export_checkpoint(url, cache.join(out, "models", step_name(step))) for step, url in points}


def learning_curve(run: str, mels_url: str, out: str, ecfg: Any, *, untrained: str | None = None) -> dict[str, Any]:
    """Export `run`'s checkpoints, answer `ecfg.split`'s spoken questions with all of them (and `untrained`, as
    step 0) and the cascade in one pass; write the layout above under `out` and return curve.json's content."""
    from pipeline.evaluate import answer_spoken_questions
    from pipeline.export import read_config

    models = export_checkpoints(run, out)
    if untrained is not None:
        models = {0: untrained} | models
    examples = {step: read_config(d)["source"]["config"]["train"]["global_batch_size"] * step
                for step, d in models.items()}
    answered, summary = answer_spoken_questions({step_name(s): d for s, d in models.items()}, mels_url, ecfg)
    curve = {"run": run, "split": ecfg.split, "count": summary["count"],
             "constant_baseline": summary["constant_baseline"], "cascade": summary["cascade"],
             "points": [{"step": s, "examples": examples[s], **summary[step_name(s)]} for s in sorted(models)]}
    fs, root = cache.filesystem(out)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(cache.join(root, EXAMPLES), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                     for r in answered).encode())
    cache.write_json(fs, cache.join(root, CURVE_JSON), curve)
    plot_curve(curve, cache.join(out, CURVE_PNG))
    log.info("curve: %d checkpoints on %d %s clips: %s", len(models), curve["count"], ecfg.split,
             [(p["step"], round(p["word_f1"], 3)) for p in curve["points"]])
    return curve


def plot_curve(curve: Mapping[str, Any], png: str) -> str:
    """One panel per metric against examples seen; the cascade (and, for agreement, the constant baseline)
    as horizontal lines: where the student stands against what it should approach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.report import save_png

    points: Sequence[Mapping[str, Any]] = curve["points"]
    x = [p["examples"] for p in points]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 3.6), dpi=120)
    for ax, (key, label) in zip(axes, METRICS, strict=True):
        ax.plot(x, [p[key] for p in points], marker="o", label="student")
        ax.axhline(curve["cascade"][key], color="green", linestyle="--", label="cascade")
        if key == "agree":
            ax.axhline(curve["constant_baseline"], color="grey", linestyle=":", label="constant first token")
        ax.set_ylim(0, 1.02 if key != "kl" else None)  # shares on their whole scale
        ax.set_xlabel("training examples seen")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"held-out learning curve: {curve['count']} {curve['split']} clips ({curve['run']})", fontsize=10)
    return save_png(fig, png)
