"""Training: schedule, accumulation, checkpoints (pure), and Ray Train runs on CPU (resume, workers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.train import accumulation, load_checkpoint, lr_at, make_optimizer, save_checkpoint


def test_warmup_then_cosine_to_zero():
    t = load_config("paper").train
    assert (t.steps, t.lr, t.warmup_frac) == (4300, 5e-5, 0.01)
    warmup = 43
    assert lr_at(0, t) == pytest.approx(t.lr / warmup)
    assert lr_at(warmup - 1, t) == pytest.approx(t.lr)
    assert lr_at(warmup, t) == pytest.approx(t.lr)
    mid = warmup + (t.steps - warmup) // 2
    assert lr_at(mid, t) == pytest.approx(t.lr * 0.5 * (1 + math.cos(math.pi * (mid - warmup) / (t.steps - warmup))))
    assert lr_at(t.steps - 1, t) < 1e-9 and lr_at(t.steps, t) == 0.0
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(warmup, t.steps))


def test_accumulation_keeps_the_global_batch():
    t = load_config("paper", ["train.global_batch_size=512", "train.micro_batch_size=8"]).train
    assert accumulation(t, 1) == 64 and accumulation(t, 8) == 8 and accumulation(t, 64) == 1
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation(t, 3)


@pytest.fixture(scope="module")
def student():
    from pipeline.model import build_student

    return build_student(load_config("tiny"))


def test_optimizer_decays_matrices_only(student):
    opt = make_optimizer(student.trainable_parameters(), load_config("tiny").train)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert any(p is student.queries for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(student.trainable_parameters())


def test_checkpoint_round_trip(student, tmp_path):
    from pipeline.model import build_student

    cfg = load_config("tiny")
    opt = make_optimizer(student.trainable_parameters(), cfg.train)
    student.queries.grad = torch.ones_like(student.queries)
    opt.step()
    save_checkpoint(str(tmp_path), student, opt, {"step": 7, "epoch": 1, "batch_in_epoch": 3}, cfg)
    fresh = build_student(cfg, seed=123)
    fresh_opt = make_optimizer(fresh.trainable_parameters(), cfg.train)
    state = load_checkpoint(str(tmp_path), fresh, fresh_opt)
    assert state == {"step": 7, "epoch": 1, "batch_in_epoch": 3}
    for name, p in student.trainable_parameters().items():
        assert torch.equal(p, fresh.trainable_parameters()[name]), name
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["config"]["model"]["num_queries"] == 448
    # Only trainable weights are saved: never the frozen LLM or encoder.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "trainable.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(student.trainable_parameters()) and not any(n.startswith(("llm.", "encoder.")) for n in names)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


# --- Ray Train on CPU ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_cache(prepared_mels, tmp_path_factory):
    from pipeline.teacher import run_teacher

    out = tmp_path_factory.mktemp("teacher") / "teacher"
    run_teacher(load_config("tiny"), str(prepared_mels), str(out))
    return out


def tiny_train(*overrides: str):
    return load_config("tiny", ["train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=4",
                                "train.log_every=1", "train.checkpoint_every=2", "train.lr=1e-3",
                                "train.warmup_frac=0.25", *overrides])


@pytest.mark.slow
def test_resume_continues_exactly(ray_local, prepared_mels, teacher_cache, tmp_path):
    from pipeline.train import run_training

    straight = tmp_path / "straight"
    run_training(tiny_train(), str(prepared_mels), str(teacher_cache), str(straight))
    expected = read_metrics(straight)
    assert [m["step"] for m in expected] == [1, 2, 3, 4]

    resumed = tmp_path / "resumed"
    first = run_training(tiny_train("train.stop_at_step=2"), str(prepared_mels), str(teacher_cache), str(resumed))
    assert first.metrics["step"] == 2
    run_training(tiny_train(), str(prepared_mels), str(teacher_cache), str(resumed))
    got = read_metrics(resumed)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(got, expected, strict=True):
        for key in ("loss", "distill", "align", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
