"""Read a training run's metrics back: the loss curve as a PNG, and a short Markdown report.

The training loop writes one JSON line per logged step to <run>/logs/metrics.jsonl (rank 0, appended,
so a step re-run after a restart appears twice: the last record wins, as in TensorBoard).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline import cache

CURVES = (("loss", "total"), ("distill", "distillation (L2)"), ("align", "token alignment"))


def read_metrics(run_url: str) -> list[dict[str, Any]]:
    """One record per step, in step order (later records of a re-run step replace earlier ones)."""
    fs, root = cache.filesystem(run_url)
    path = cache.join(root, "logs", "metrics.jsonl")
    if not fs.exists(path):
        raise cache.DatasetError(f"{run_url} has no logs/metrics.jsonl: not a training run directory")
    by_step: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(fs.cat_file(path).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:  # a line cut by a crash mid-write: only the last can be
            raise cache.DatasetError(f"{path}:{n}: not JSON ({e})") from e
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(metrics: Sequence[Mapping[str, Any]], png: str, title: str = "DiVA training") -> str:
    """Both loss terms and their weighted sum against the step, log scale, with the lr on a twin axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        raise ValueError("no metrics to plot")
    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in CURVES:  # a term may be absent from some steps (no distill while aligning alone)
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 40 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(m.get(k, 1) > 0 for m in metrics for k, _ in CURVES):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(steps, [m["lr"] for m in metrics], color="grey", linestyle=":", label="lr")
    lr.set_ylabel("learning rate", color="grey")
    lines = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    # Below the axes: inside, any corner hides a curve somewhere (the distillation term starts late and high).
    ax.legend(lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4,
              fontsize=8, frameon=False)
    ax.set_title(title)
    return save_png(fig, png)


def save_png(fig: Any, png: str) -> str:
    """Write a matplotlib figure to `png` (local or any fsspec URL) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fs, path = cache.filesystem(png)
    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return png


def training_summary(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """First and last values of each loss term, and the relative drop of the distillation loss."""
    out: dict[str, Any] = {"steps": metrics[-1]["step"]}
    for key, _ in CURVES:
        values = [m[key] for m in metrics if key in m]
        out[key] = {"first": values[0], "last": values[-1]} if values else None
    distill = out["distill"]
    out["distill_drop"] = 1.0 - distill["last"] / distill["first"] if distill and distill["first"] else None
    out["examples_per_s"] = next((m["examples_per_s"] for m in reversed(metrics) if "examples_per_s" in m), None)
    return out


def markdown_table(rows: Sequence[tuple[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {fmt(value)} |" for name, value in rows]
    return "\n".join(lines)
