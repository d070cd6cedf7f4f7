"""Ray Train runs on CPU stopped and resumed: a stop at a step, a corrupted checkpoint, a SIGKILLed worker and a
spot VM's SIGTERM, each resumed by the same command into the losses of an uninterrupted run. Apart from
tests/test_train.py so that the suite's two workers (scripts/test.sh) can run the two modules side by side."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import FEW_QUERIES, read_metrics

from pipeline.checkpoint import Checkpoint
from pipeline.config import load_config

TINY_TRAIN = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=6", "train.log_every=1",
              "train.checkpoint_every=2", "train.lr=1e-3", "train.warmup_frac=0.25", FEW_QUERIES]


def tiny_train(*overrides: str):
    return load_config("tiny", [*TINY_TRAIN, *overrides])


@pytest.fixture(scope="module")
def straight(ray_local, prepared_mels, teacher_cache, tmp_path_factory) -> list[dict]:
    """The metrics of an uninterrupted `tiny_train()` run: what a resumed or restarted run must equal."""
    from pipeline.train import run_training

    out = tmp_path_factory.mktemp("straight") / "run"
    run_training(tiny_train(), str(prepared_mels), str(teacher_cache), str(out))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    return metrics


def assert_same_losses(got: list[dict], expected: list[dict]) -> None:
    by_step = {m["step"]: m for m in got}  # the last record of a step wins (re-run steps log twice)
    assert sorted(by_step) == [m["step"] for m in expected]
    for b in expected:
        a = by_step[b["step"]]
        for key in ("loss", "distill", "align", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def signal_the_worker(out: Path, *, after_step: int, signum: int) -> list[int]:
    """Send the training worker `signum` from a thread once <out>'s metrics.jsonl holds `after_step` steps;
    the trainer runs on the calling (main) thread, as in a job. Returns the list the signalled pid goes into."""
    from ray._private.state import actors  # the GCS's actor table (ray.util.state needs the dashboard)

    jsonl, sent = out / "logs" / "metrics.jsonl", []

    def send() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= after_step:
                table = actors().values()
                workers = [a for a in table if a["State"] == "ALIVE" and "TrainWorker" in a["ActorClassName"]]
                assert len(workers) == 1, [(a["ActorClassName"], a["State"]) for a in table]
                os.kill(workers[0]["Pid"], signum)
                sent.append(workers[0]["Pid"])
                return
            time.sleep(0.05)

    threading.Thread(target=send, daemon=True).start()
    return sent


@pytest.mark.slow
def test_resume_continues_exactly_and_a_killed_worker_restarts_from_the_last_checkpoint(
        ray_local, prepared_mels, teacher_cache, straight, tmp_path):
    """A run stopped at step 4 (train.stop_at_step) whose step-4 checkpoint was then corrupted (one bit of its
    optimizer file) and submitted again resumes from step 2's, the newest that passes its checksums: its first new
    step is 3. In that resumed run the training worker is SIGKILLed once step 3 is logged: Ray Train's FailureConfig
    restarts the worker group, which resumes from the latest intact checkpoint (step 2's or a new step 4's, never
    the start) and ends where an uninterrupted run ends, every step's losses equal to it."""
    from pipeline.export import complete_checkpoints
    from pipeline.train import run_training

    out = tmp_path / "resumed"
    first = run_training(tiny_train("train.stop_at_step=4"), str(prepared_mels), str(teacher_cache), str(out))
    assert first.metrics["step"] == 4
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert [step for step, _ in complete_checkpoints(str(out))] == [2, 4]
    optimizer = Path(complete_checkpoints(str(out))[-1][1]) / "optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0x10
    optimizer.write_bytes(bytes(data))
    # Step 3 is logged (line 5) after the resumed run fell back to step 2's checkpoint: kill then.
    killed = signal_the_worker(out, after_step=5, signum=signal.SIGKILL)
    result = run_training(tiny_train("train.max_failures=1"), str(prepared_mels), str(teacher_cache), str(out))
    assert killed, "the worker was never killed"
    assert result.error is None and result.metrics["step"] == 6
    got = read_metrics(out)
    steps = [m["step"] for m in got]
    assert steps[:5] == [1, 2, 3, 4, 3] and min(steps[4:]) == 3, steps  # resumed at step 2, restarted no earlier
    assert len(steps[4:]) > len(set(steps[4:])), f"no step ran twice, so no restart happened: {steps}"
    assert_same_losses(got, straight)


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary_and_the_same_command_resumes(
        ray_local, prepared_mels, teacher_cache, straight, tmp_path, monkeypatch, caplog):
    """A spot VM's notice: SIGTERM to the training worker after step 2. It finishes its step, checkpoints there and
    the run ends cleanly: no restart (train.max_failures=1 would allow one), the job exits PREEMPTED_EXIT and says
    where it stopped. The same command again resumes, and every step's losses equal an uninterrupted run's. No
    periodic checkpoints (checkpoint_every=100): the one to resume from is the SIGTERM's.

    With all four loggers (tests/test_loggers.py reads them back), this is also their wiring through a real
    training run: the preemption ends the MLflow run KILLED and the W&B run with exit code 75, and the same command
    goes on in both runs to the last step; each holds the config and the JSONL log's steps, under its names."""
    from ray._private.state import actors
    from test_loggers import mlflow_run, mlflow_steps, read_jsonl, state, wandb_runs, wandb_summary

    from jobs import train as job
    from pipeline import tracking
    from pipeline.export import resolve_checkpoint
    from pipeline.train import PREEMPTED_EXIT

    out = tmp_path / "spot"
    overrides = [*TINY_TRAIN, "train.checkpoint_every=100", "train.max_failures=1",
                 "train.loggers=[jsonl,tensorboard,mlflow,wandb]", "train.wandb.mode=offline",
                 f"train.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    params = tracking.flatten(load_config("tiny", overrides).to_dict())
    monkeypatch.setattr("sys.argv", ["jobs.train", "--config", "tiny", "--mels", str(prepared_mels), "--teacher",
                                     str(teacher_cache), "--output", str(out), *overrides])
    sent = signal_the_worker(out, after_step=2, signum=signal.SIGTERM)
    with caplog.at_level("WARNING", logger="pipeline.train"):
        assert job.run() == PREEMPTED_EXIT
    assert sent, "the worker was never signalled"
    steps = [m["step"] for m in read_metrics(out)]
    stopped = steps[-1]
    assert 3 <= stopped < 6 and steps == list(range(1, stopped + 1)), steps  # no step ran twice: no restart
    checkpoint = resolve_checkpoint(str(out))
    assert Checkpoint(checkpoint).state.step == stopped
    assert f"preempted (SIGTERM) at step {stopped} of 6: checkpoint {checkpoint}" in caplog.text
    worker = next(a for a in actors().values() if a["Pid"] == sent[0])
    assert "SIGTERM" not in str(worker["DeathCause"]), worker  # Ray Train ended it once its loop returned
    logged = read_jsonl(out)
    assert {"loss", "distill", "align", "lr", "examples_per_s", "data_wait"} <= set(logged[1]), logged
    assert all(0.0 <= m["data_wait"] <= 1.0 for m in logged.values()), logged  # a share of each interval
    client, run = mlflow_run(out)
    assert run.info.status == "KILLED" and mlflow_steps(client, run) == logged
    (records,) = wandb_runs(out)
    assert wandb_summary(records) == (json.loads(json.dumps(params)), logged, tracking.EXIT_CODES["preempted"])

    assert job.run() == 0
    got = read_metrics(out)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert_same_losses(got, straight)  # to float32 rounding: two uninterrupted runs differ by as much
    logged = read_jsonl(out)
    client, again = mlflow_run(out)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.params == {k: str(v) for k, v in params.items()}
    assert mlflow_steps(client, again) == logged
    first, second = wandb_runs(out)
    config, wandb_steps, exit_code = wandb_summary(second)
    assert config == json.loads(json.dumps(params)) and exit_code == 0
    assert {**wandb_summary(first)[1], **wandb_steps} == logged
    assert {r["run"]["run_id"] for r in first + second if r["type"] == "run"} == {state(out)["wandb"]["id"]}
    assert list(out.glob("logs/events.out.tfevents.*"))
