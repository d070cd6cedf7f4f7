"""Experiment tracking (pipeline/tracking.py): the one sink the training loop logs to, with the real MLflow (a
SQLite store in tmp, read back with MlflowClient) and the real W&B (offline; its .wandb log read back with W&B's
own reader, `wandb leet inspect --json`). Every tracker must hold the run's config and the JSONL log's steps.
The wiring through a real training run (all four loggers, preempted by SIGTERM and resumed by the same command)
is tests/test_train.py's SIGTERM test, which reads the trackers back with this module's helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.config import ConfigError, load_config

WANDB = str(Path(sys.executable).parent / "wandb")
STEPS = [(1, {"loss": 3.25, "distill": 2.0, "align": 1.25, "lr": 1e-3, "examples_per_s": 12.5}),
         (2, {"loss": 2.875, "distill": 1.75, "align": 1.125, "lr": 7.5e-4, "examples_per_s": 13.0625}),
         (3, {"loss": 2.5, "distill": 1.5, "align": 1.0, "lr": 2.5e-4, "examples_per_s": 14.0})]


def read_jsonl(out: Path) -> dict[int, dict[str, float]]:
    """{step: metrics} of <out>/logs/metrics.jsonl (the last line of a step wins, as in the report)."""
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return {r.pop("step"): r for r in map(json.loads, lines)}


def state(out: Path) -> dict:
    return json.loads((out / "logs" / tracking.STATE_FILE).read_text())


def mlflow_run(out: Path):
    """(client, run) of the MLflow run <out>/logs/tracking.json names."""
    from mlflow import MlflowClient

    s = state(out)["mlflow"]
    client = MlflowClient(tracking_uri=s["tracking_uri"])
    return client, client.get_run(s["run_id"])


def mlflow_steps(client, run) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            steps.setdefault(m.step, {})[key] = m.value
    return steps


def wandb_runs(out: Path) -> list[list[dict]]:
    """The records of each offline W&B run under <out>/logs/wandb, oldest first, as W&B's reader prints them."""
    dirs = sorted((out / "logs" / "wandb").glob("offline-run-*"))
    assert dirs, f"no offline W&B run under {out}/logs/wandb"
    return [[json.loads(line) for line in subprocess.run([WANDB, "leet", "inspect", "--json", str(d)], check=True,
                                                        capture_output=True, text=True).stdout.splitlines()]
            for d in dirs]


def wandb_summary(records: list[dict]) -> tuple[dict, dict[int, dict[str, float]], int]:
    """(config, {step: metrics} without W&B's own _keys, exit code) of one run's records."""
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    steps = {r["history"]["step"]["num"]: {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
             for r in records if r["type"] == "history"}
    exit_code = next(r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit")
    return {k: v for k, v in config.items() if k != "_wandb"}, steps, exit_code


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module's runs (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def log_steps(tracker: tracking.Tracker, steps: list[tuple[int, dict[str, float]]]) -> None:
    for step, metrics in steps:
        tracker.log(step, metrics)
    tracker.sync()


# --- config and errors -----------------------------------------------------------------------------------


def test_the_loggers_are_a_typed_list_that_keeps_jsonl():
    assert load_config("tiny").train.loggers == ["jsonl", "tensorboard"]
    t = load_config("tiny", ["train.loggers=[jsonl,mlflow,wandb]", "train.wandb.mode=offline"]).train
    assert (t.loggers, t.wandb.mode, t.mlflow.experiment) == (["jsonl", "mlflow", "wandb"], "offline", "diva")
    with pytest.raises(ConfigError, match=r"train.loggers\[1\]: 'comet' is not one of 'jsonl', 'tensorboard'"):
        load_config("tiny", ["train.loggers=[jsonl,comet]"])
    with pytest.raises(ConfigError, match="must include 'jsonl': jobs.plot"):
        load_config("tiny", ["train.loggers=[tensorboard,mlflow]"])
    with pytest.raises(ConfigError, match="names a logger twice"):
        load_config("tiny", ["train.loggers=[jsonl,jsonl]"])
    with pytest.raises(ConfigError, match="train.wandb.mode: 'cloud' is not one of 'online', 'offline'"):
        load_config("tiny", ["train.wandb.mode=cloud"])


@pytest.mark.parametrize("logger", ["mlflow", "wandb"])
def test_a_logger_whose_package_is_missing_names_its_extra(logger, monkeypatch, tmp_path):
    """As on a machine without the extra: Python's own way to make an installed package unimportable."""
    monkeypatch.setitem(sys.modules, logger, None)
    cfg = load_config("tiny", [f"train.loggers=[jsonl,{logger}]"])
    message = rf"includes '{logger}', but {logger} is not installed: pip install 'diva-ray\[{logger}\]'"
    with pytest.raises(tracking.TrackingError, match=message):
        tracking.for_workers(cfg, str(tmp_path / "run"))  # the driver, before anything runs
    with pytest.raises(tracking.TrackingError, match=message):
        tracking.open_tracker(cfg, str(tmp_path / "run"), cfg.to_dict())  # a worker


def test_mlflow_needs_a_tracking_uri_for_a_remote_output(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("tiny", ["train.loggers=[jsonl,mlflow]"])
    with pytest.raises(tracking.TrackingError, match=r"--output memory://run is remote: set train.mlflow.tracking_uri"):
        tracking.for_workers(cfg, "memory://run")
    local = tracking.for_workers(cfg, str(tmp_path / "run")).train.mlflow.tracking_uri
    assert local == f"sqlite:///{tmp_path}/run/logs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.for_workers(cfg, "memory://run").train.mlflow.tracking_uri == "http://127.0.0.1:5000"
    given = load_config("tiny", ["train.loggers=[jsonl,mlflow]", "train.mlflow.tracking_uri=sqlite:////x/m.db"])
    assert tracking.for_workers(given, "memory://run").train.mlflow.tracking_uri == "sqlite:////x/m.db"


def test_wandb_online_without_an_api_key_says_how_to_give_one(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SETUP_API_KEY_HOOK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no stored login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = load_config("tiny", ["train.loggers=[jsonl,wandb]"])
    with pytest.raises(tracking.TrackingError, match="train.wandb.mode=online: .*WANDB_API_KEY.*mode=offline"):
        tracking.open_tracker(cfg, str(tmp_path / "run"), cfg.to_dict())


# --- the trackers, read back -----------------------------------------------------------------------------


def test_mlflow_holds_the_config_and_every_logged_step(mlflow_store, tmp_path):
    """Params = the flattened config, logged once; each metric's history = the JSONL log. A resubmission (another
    stop_at_step) goes on in the same run; the run ends FINISHED, KILLED (preempted) or FAILED."""
    out = tmp_path / "run"
    store = f"train.mlflow.tracking_uri={mlflow_store}"
    cfg = load_config("tiny", ["train.loggers=[jsonl,tensorboard,mlflow]", store])
    with tracking.open_tracker(cfg, str(out), cfg.to_dict()) as tracker:
        log_steps(tracker, STEPS[:2])
        tracker.outcome = "preempted"
    client, run = mlflow_run(out)
    assert run.info.status == "KILLED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "diva"
    assert run.data.params == {k: str(v) for k, v in tracking.flatten(cfg.to_dict()).items()}
    assert run.data.params["train.loggers"] == "['jsonl', 'tensorboard', 'mlflow']"
    assert mlflow_steps(client, run) == read_jsonl(out) == dict(STEPS[:2])
    assert list(out.glob("logs/events.out.tfevents.*"))

    resubmitted = load_config("tiny", ["train.loggers=[jsonl,tensorboard,mlflow]", store, "train.stop_at_step=3"])
    with tracking.open_tracker(resubmitted, str(out), resubmitted.to_dict()) as tracker:
        log_steps(tracker, STEPS[2:])
    client, again = mlflow_run(out)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.params["train.stop_at_step"] == "None"  # the config it was created with
    assert mlflow_steps(client, again) == read_jsonl(out) == dict(STEPS)

    with pytest.raises(RuntimeError, match="boom"), tracking.open_tracker(cfg, str(out), cfg.to_dict()) as tracker:
        raise RuntimeError("boom")
    assert mlflow_run(out)[1].info.status == "FAILED"


def test_wandb_offline_holds_the_config_and_every_logged_step(tmp_path):
    """The offline run's config = the flattened config; its history = the JSONL log; a preempted run exits as
    jobs.train does (75), and the resubmission resumes the same W&B run id."""
    from pipeline.train import PREEMPTED_EXIT

    out = tmp_path / "run"
    cfg = load_config("tiny", ["train.loggers=[jsonl,wandb]", "train.wandb.mode=offline"])
    with tracking.open_tracker(cfg, str(out), cfg.to_dict()) as tracker:
        log_steps(tracker, STEPS[:2])
        tracker.outcome = "preempted"
    with tracking.open_tracker(cfg, str(out), cfg.to_dict()) as tracker:
        log_steps(tracker, STEPS[2:])
    (first, second) = wandb_runs(out)
    config, steps, exit_code = wandb_summary(first)
    assert config == json.loads(json.dumps(tracking.flatten(cfg.to_dict())))
    assert config["train.wandb.mode"] == "offline" and config["train.lr"] == cfg.train.lr
    assert steps == dict(STEPS[:2]) and exit_code == PREEMPTED_EXIT == tracking.EXIT_CODES["preempted"]
    _, steps2, exit_code2 = wandb_summary(second)
    assert steps2 == dict(STEPS[2:]) and exit_code2 == 0
    run_ids = {r["run"]["run_id"] for records in (first, second) for r in records if r["type"] == "run"}
    assert run_ids == {state(out)["wandb"]["id"]}
    assert {**steps, **steps2} == read_jsonl(out)


def test_a_resumed_run_on_gcs_goes_on_in_the_same_logs(gcs, bucket):
    """A remote --output: the logs are written locally and uploaded. A resubmission (preemption, a worker restart)
    starts from what the earlier one uploaded, so metrics.jsonl keeps every step; no local copy outlives a tracker."""
    import tempfile

    def scratch() -> set[str]:
        return {p.name for p in Path(tempfile.gettempdir()).glob("diva-logs-*")}

    out, fs = f"gs://{bucket}/run", gcs.fs()
    cfg = load_config("tiny", ["train.loggers=[jsonl,tensorboard]"])
    before = scratch()
    with tracking.open_tracker(cfg, out, cfg.to_dict()) as tracker:
        log_steps(tracker, STEPS[:2])
        tracker.outcome = "preempted"
    with tracking.open_tracker(cfg, out, cfg.to_dict()) as tracker:
        log_steps(tracker, STEPS[2:])
    fs.invalidate_cache()
    lines = fs.cat(f"{bucket}/run/logs/metrics.jsonl").decode().splitlines()
    assert {r.pop("step"): r for r in map(json.loads, lines)} == dict(STEPS)
    assert len([p for p in fs.ls(f"{bucket}/run/logs") if "tfevents" in p]) == 2  # one event file per submission
    assert scratch() == before
