"""The embedded default (`python -m jobs.local`, the README's run command) end to end, and the report it
ends with (metrics read back, loss curve)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FEW_QUERIES

from pipeline.report import plot_loss, read_metrics, training_summary

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def write_jsonl(run: Path, records: list[dict]) -> None:
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "distill": loss / 2, "align": loss / 4, "lr": 1e-3, "examples_per_s": 8.0}


def test_metrics_read_back_last_record_of_a_rerun_step_wins(tmp_path):
    # A worker restarted from step 2's checkpoint logs steps 3 and 4 again.
    write_jsonl(tmp_path, [record(1, 8.0), record(2, 6.0), record(3, 5.0), record(3, 4.5), record(4, 4.0)])
    metrics = read_metrics(str(tmp_path))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[2]["loss"] == 4.5
    summary = training_summary(metrics)
    assert summary["steps"] == 4 and summary["distill"] == {"first": 4.0, "last": 2.0}
    assert summary["distill_drop"] == pytest.approx(0.5)
    png = tmp_path / "loss.png"
    plot_loss(metrics, str(png))
    assert png.read_bytes()[:8] == PNG


def test_a_cut_metrics_line_is_named(tmp_path):
    write_jsonl(tmp_path, [record(1, 8.0)])
    with open(tmp_path / "logs" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    with pytest.raises(Exception, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(str(tmp_path))
    with pytest.raises(Exception, match="not a training run"):
        read_metrics(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_embedded_default_runs_end_to_end(ray_local, tmp_path):
    """The README's run command with a shorter training of a smaller student (6 steps, 64 queries: less than half the
    preset's step cost; the rest as shipped), attached to the session's Ray; its report holds real numbers and a
    second run only confirms the outputs (no training, no evaluation)."""
    out = tmp_path / "local"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "jobs.local", "--config", "tiny", "--output", str(out),
           "train.steps=6", "train.log_every=2", "train.checkpoint_every=3", FEW_QUERIES]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    for name in ("mels", "teacher", "train", "model", "eval"):
        assert (out / name).is_dir(), name
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    metrics = read_metrics(str(out / "train"))
    assert rows["train steps"] == 6 == metrics[-1]["step"]
    assert rows["train distill loss: first -> last"] == f"{metrics[0]['distill']:.4g} -> {metrics[-1]['distill']:.4g}"
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert rows["dev: examples"] == summary["distillation"]["count"] > 0
    assert rows["dev: L2 gap (mean)"] == summary["distillation"]["l2"]["mean"] > 0
    assert -1 <= rows["dev: cosine (mean)"] <= 1
    assert 0 <= rows["task sarcasm: accuracy"] <= 1
    assert report["question"]["transcript"] and Path(report["question"]["audio"]).exists()
    assert isinstance(report["question"]["answer"], str)
    assert (out / "loss.png").read_bytes()[:8] == PNG
    text = (out / "report.md").read_text()
    assert "| dev: first-token agreement |" in text and report["question"]["transcript"] in text

    evaluated = (out / "eval" / "summary.json").read_bytes()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"{out / 'train'} is at step 6 already; nothing to do" in again.stderr
    assert "already holds this evaluation" in again.stderr
    assert (out / "eval" / "summary.json").read_bytes() == evaluated
    assert [m["step"] for m in read_metrics(str(out / "train"))] == [m["step"] for m in metrics]
