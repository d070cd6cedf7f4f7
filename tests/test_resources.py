"""Requests the cluster can never meet fail fast, naming what was asked, what the nodes have and the key to
change; on an autoscaling cluster they wait `cluster.autoscaler_timeout_s` first. The stages on a real local
Ray (2 CPUs, no GPU), as a user on a laptop meets them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.resources import ResourceUnavailable, placeable, require

ROOT = Path(__file__).resolve().parents[1]


def test_placeable_counts_whole_units_per_node():
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0}]
    assert placeable({"CPU": 1.0, "GPU": 1.0}, nodes) == 2
    assert placeable({"CPU": 3.0}, nodes) == 2 + 1
    assert placeable({"CPU": 0.5}, nodes) == 24
    assert placeable({"GPU": 1.0}, [{"CPU": 2.0}]) == 0
    assert placeable({"CPU": 5.0}, [{"CPU": 4.0}, {"CPU": 4.0}]) == 0  # never split across nodes
    assert placeable({"CPU": 0.0, "GPU": 0.0}, nodes) >= 1000


@pytest.mark.slow
def test_serving_on_a_gpu_or_more_replicas_than_fit_fails_at_once_by_name(ray_local):
    """jobs.serve's check before Serve starts: the README's `--device cuda` on a CPU-only cluster, or 3 replicas of
    one CPU on 2, is one line naming what to change, not Serve waiting for replicas that never start."""
    from pipeline.serve import require_replicas

    for overrides, asked in ((["eval.device=cuda"], "GPU 1"), (["serve.num_replicas=3"], r"3 x \[CPU 1")):
        t0 = time.monotonic()
        with pytest.raises(ResourceUnavailable, match=f"{asked}.*--replicas \\(serve.num_replicas\\)"):
            require_replicas(load_config("tiny", overrides))
        assert time.monotonic() - t0 < 10
    require_replicas(load_config("tiny"))  # one replica of one CPU fits


def test_a_gpu_teacher_on_a_cpu_cluster_fails_at_once_by_name(ray_local, prepared_mels, tmp_path):
    from pipeline.teacher import run_teacher

    t0 = time.monotonic()
    with pytest.raises(ResourceUnavailable) as err:
        run_teacher(load_config("tiny", ["teacher.device=cuda"]), str(prepared_mels), str(tmp_path / "teacher"))
    elapsed = time.monotonic() - t0
    message = str(err.value)
    assert "GPU 1" in message and "no node has GPU" in message and "CPU 2" in message, message
    assert "teacher.device" in message and "cannot add nodes" in message
    assert elapsed < 60, elapsed
    assert not (tmp_path / "teacher").exists()  # nothing was started


@pytest.mark.slow
def test_more_training_workers_than_cpus_fail_at_once(ray_local, prepared_mels, teacher_cache, tmp_path):
    from pipeline.train import run_training

    cfg = load_config("tiny", ["train.num_workers=3", "train.cpus_per_worker=1"])
    with pytest.raises(ResourceUnavailable, match=r"3 x \[CPU 1\].*hold 2 at once.*train.num_workers"):
        run_training(cfg, str(prepared_mels), str(teacher_cache), str(tmp_path / "run"))


@pytest.mark.slow
def test_an_autoscaling_cluster_gets_its_timeout(ray_local, monkeypatch):
    monkeypatch.setenv("DIVA_AUTOSCALING", "1")
    t0 = time.monotonic()
    with pytest.raises(ResourceUnavailable, match=r"waited \d+ s for the autoscaler"):
        require({"GPU": 1.0}, 1, what="a test", change="nothing", timeout_s=1.5)
    assert 1.5 <= time.monotonic() - t0 < 30
    require({"CPU": 1.0}, 2, what="a test", change="nothing", timeout_s=0)  # what fits returns at once


@pytest.mark.slow
def test_the_cache_teacher_job_without_a_config_says_what_to_change(prepared_mels, tmp_path):
    """The new user's command: no --config, so teacher.device is the default cuda; on this GPU-less machine the
    job exits 1 within a minute with one line naming the GPU and --device, instead of waiting forever."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "jobs.cache_teacher", "--mels", str(prepared_mels),
                           "--output", str(tmp_path / "teacher"), "--model", "tiny",
                           "teacher.tokenizer=tests/fixtures/tokenizer"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - t0
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "GPU" in errors[0] and "--device cpu" in errors[0], done.stderr[-2000:]
    assert elapsed < 90, elapsed  # Ray's own start-up included
