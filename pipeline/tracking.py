"""Experiment tracking: the one sink the training loop logs to, fanned out to the loggers in train.loggers.

Rank 0 logs (the other ranks hold a Tracker without sinks), as Ray Train's integrations do. jsonl and
tensorboard write <output>/logs; mlflow and wandb are optional extras (pip install 'diva-ray[mlflow]',
'diva-ray[wandb]'), started through Ray's own helpers (ray.air.integrations: setup_mlflow, setup_wandb). Each
gets the run's config once, flattened to the dotted keys of overrides (train.lr), every logged step's metrics
under the JSONL's names, and the run's outcome at the end: finished, preempted (SIGTERM: MLflow's KILLED, W&B's
preempting mark) or failed. A resubmitted run (after a preemption or a train.stop_at_step) goes on in the same
MLflow and W&B runs, whose ids <output>/logs/tracking.json keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

from pipeline import PipelineError, cache, layout
from pipeline.config import Config

log = logging.getLogger(__name__)

Outcome = Literal["finished", "preempted", "failed"]
STATE_FILE = "tracking.json"  # under <output>/logs: the MLflow and W&B runs a resubmission goes on in
MLFLOW_DB = "mlflow.db"  # the default MLflow store of a local --output, under <output>/logs
# jobs.train's exit codes (pipeline.train.PREEMPTED_EXIT for a preemption), which W&B records as the run's.
EXIT_CODES: dict[str, int] = {"finished": 0, "preempted": 75, "failed": 1}
MLFLOW_STATUS: dict[str, str] = {"finished": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}
# URI schemes of MLflow's SQL stores: mlflow-skinny needs SQLAlchemy and Alembic for them (the mlflow extra has both).
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


class TrackingError(PipelineError):
    """A logger in train.loggers that cannot run: its package is missing, or it has nowhere to write."""


def require(logger: str, modules: tuple[str, ...]) -> None:
    """The packages a logger imports are installed, else an error that names the pip extra."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise TrackingError(f"train.loggers includes {logger!r}, but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'diva-ray[{logger}]' "
                            f"(or take {logger} out of train.loggers)")


def mlflow_uri(cfg: Config, output_url: str) -> str:
    """train.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite file beside the JSONL log."""
    uri = cfg.train.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    fs, root = cache.filesystem(output_url)
    if not cache.is_local(fs):
        raise TrackingError(f"train.loggers includes 'mlflow' and --output {output_url} is remote: set "
                            "train.mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to the tracking server")
    return "sqlite:///" + os.path.join(os.path.abspath(root), layout.LOGS_DIR, MLFLOW_DB)


def for_workers(cfg: Config, output_url: str) -> Config:
    """The driver's part, before anything runs: each selected logger's packages are here (an error naming the
    extra now, not in a worker), and the MLflow URI is resolved where the user's environment is."""
    loggers = cfg.train.loggers
    if "wandb" in loggers:
        require("wandb", ("wandb",))
    if "mlflow" not in loggers:
        return cfg
    uri = mlflow_uri(cfg, output_url)
    require("mlflow", ("mlflow", "sqlalchemy", "alembic") if uri.split(":")[0].split("+")[0] in SQL_SCHEMES
            else ("mlflow",))
    mlflow = dataclasses.replace(cfg.train.mlflow, tracking_uri=uri)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mlflow=mlflow))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: the config as trackers show parameters (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclasses.dataclass
class Run:
    """What a sink starts from: the config (typed, and flattened for logging), a name, the local log directory,
    and the ids of earlier submissions' runs (<output>/logs/tracking.json; a sink records its own there)."""

    cfg: Config
    params: dict[str, Any]
    name: str
    directory: str
    state: dict[str, Any]


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self, outcome: Outcome) -> None: ...


class JsonlSink:
    """<output>/logs/metrics.jsonl: one line per logged step, appended (a resumed run goes on in the same file)."""

    def __init__(self, run: Run):
        self.file = open(os.path.join(run.directory, layout.METRICS_FILE), "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def flush(self) -> None:
        self.file.flush()

    def close(self, outcome: Outcome) -> None:
        self.file.close()


class TensorBoardSink:
    """TensorBoard event files in <output>/logs."""

    def __init__(self, run: Run):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(run.directory)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, outcome: Outcome) -> None:
        self.writer.close()


class MlflowSink:
    """An MLflow run, started by Ray's setup_mlflow. The config goes in as parameters once, when the run is
    created: a resubmission reopens the run (MLflow refuses to change a parameter, and stop_at_step may)."""

    def __init__(self, run: Run):
        require("mlflow", ("mlflow",))
        from ray.air.integrations.mlflow import setup_mlflow

        m = run.cfg.train.mlflow
        uri = m.tracking_uri  # resolved by for_workers
        earlier = run.state.get("mlflow") or {}
        resume = (earlier.get("tracking_uri"), earlier.get("experiment")) == (uri, m.experiment) and \
            _mlflow_run_exists(uri, earlier.get("run_id"))
        # A new experiment in a SQLite store keeps its artifacts beside the file (MLflow's default: the cwd).
        artifacts = os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")), "mlartifacts") \
            if uri.startswith("sqlite:///") else None
        try:
            if resume:  # mlflow.start_run (called by setup_mlflow) reopens this run, and unsets the variable
                os.environ["MLFLOW_RUN_ID"] = earlier["run_id"]
            self.mlflow = setup_mlflow(tracking_uri=uri, experiment_name=m.experiment, run_name=m.run_name or run.name,
                                       create_experiment_if_not_exists=True, rank_zero_only=True,
                                       artifact_location=artifacts)
        finally:
            os.environ.pop("MLFLOW_RUN_ID", None)
        self.run_id = self.mlflow.active_run().info.run_id
        if not resume:
            self.mlflow.log_params(run.params)  # one batch (setup_mlflow's config= logs one request per key)
        run.state["mlflow"] = {"tracking_uri": uri, "experiment": m.experiment, "run_id": self.run_id}
        log.info("mlflow: %s run %s in experiment %r at %s", "resumed" if resume else "started", self.run_id,
                 m.experiment, uri)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def flush(self) -> None:
        pass  # each log_metrics call is written when it returns

    def close(self, outcome: Outcome) -> None:
        self.mlflow.end_run(status=MLFLOW_STATUS[outcome])


def _mlflow_run_exists(uri: str, run_id: str | None) -> bool:
    """Whether the store still holds the run (not deleted): else a resubmission starts a new one."""
    if not run_id:
        return False
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri=uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


class WandbSink:
    """A Weights & Biases run, started by Ray's setup_wandb under an id of ours, so that a resubmission resumes
    it (resume="allow"). Offline runs are written under <output>/logs/wandb, for `wandb sync` later."""

    def __init__(self, run: Run):
        require("wandb", ("wandb",))
        from ray.air.integrations.wandb import setup_wandb

        w = run.cfg.train.wandb
        earlier = run.state.get("wandb") or {}
        same = (earlier.get("project"), earlier.get("entity")) == (w.project, w.entity) and earlier.get("id")
        run_id = earlier["id"] if same else uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
        try:  # setup_wandb looks for an API key unless $WANDB_MODE says offline
            with _environ("WANDB_MODE", w.mode):
                self.run = setup_wandb(config=run.params, rank_zero_only=True, trial_id=run_id,
                                       trial_name=w.run_name or run.name, project=w.project, entity=w.entity,
                                       group=w.group, mode=w.mode, dir=run.directory, resume="allow")
        except ValueError as e:
            if "API key" not in str(e):
                raise
            raise TrackingError(f"train.wandb.mode=online: {e}. The training workers need WANDB_API_KEY (on a "
                                "cluster: ray job submit --runtime-env-json '{\"env_vars\": {\"WANDB_API_KEY\": ...}}'"
                                "), or set train.wandb.mode=offline") from None
        run.state["wandb"] = {"project": w.project, "entity": w.entity, "id": run_id}
        log.info("wandb: run %s (%s) in project %r, %s", run_id, "resumed" if same else "new", w.project, w.mode)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def flush(self) -> None:
        pass  # wandb's service process writes on its own

    def close(self, outcome: Outcome) -> None:
        if outcome == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=EXIT_CODES[outcome])


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


SINKS: dict[str, Callable[[Run], Sink]] = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink, "mlflow": MlflowSink,
                                           "wandb": WandbSink}


class Tracker:
    """What the training loop logs to: log, sync (at checkpoints) and close, each fanned out to the sinks. As a
    context manager it closes them with `outcome` (set by the loop), or "failed" when an exception leaves it.
    Without sinks (the ranks other than 0) it does nothing."""

    def __init__(self, sinks: list[Sink] | None = None, upload: Callable[[], None] | None = None,
                 scratch: str | None = None):
        self.sinks = list(sinks or [])
        self.upload = upload
        self.scratch = scratch  # the local copy of a remote output's logs, removed once uploaded at close
        self.outcome: Outcome = "finished"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def sync(self) -> None:
        """Everything logged so far on disk (and copied to a remote output)."""
        for sink in self.sinks:
            sink.flush()
        if self.upload:
            self.upload()

    def close(self, outcome: Outcome) -> None:
        """End every sink's run, even when one fails; re-raise the first failure unless the run failed already."""
        errors = []
        for sink in self.sinks:
            try:
                sink.close(outcome)
            except Exception as e:
                log.exception("closing the %s logger failed", type(sink).__name__)
                errors.append(e)
        self.sinks = []
        if self.upload:
            self.upload()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        if errors and outcome != "failed":
            raise errors[0]

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("failed" if exc_type else self.outcome)


def open_tracker(cfg: Config, output_url: str, config: dict[str, Any]) -> Tracker:
    """Rank 0's tracker for the loggers cfg.train.loggers names, writing <output>/logs. When the output is remote
    the logs are written in a local copy of it (what earlier submissions logged, downloaded first, so that a
    resumed run goes on in the same files), uploaded on each sync and removed at close. `config` is the run's
    config as given, logged once."""
    cfg = for_workers(cfg, output_url)
    fs, root = cache.filesystem(output_url)
    remote = not cache.is_local(fs)
    target = cache.join(root, layout.LOGS_DIR)
    local = tempfile.mkdtemp(prefix="diva-logs-") if remote else target
    os.makedirs(local, exist_ok=True)
    if remote and fs.isdir(target):
        fs.get(target + "/", local, recursive=True)
    state_path = cache.join(target, STATE_FILE)
    state = json.loads(fs.cat_file(state_path)) if fs.exists(state_path) else {}
    run = Run(cfg=cfg, params=flatten(config), name=posixpath.basename(root), directory=local, state=dict(state))
    sinks: list[Sink] = []
    try:
        for name in cfg.train.loggers:
            sinks.append(SINKS[name](run))
    except BaseException:
        Tracker(sinks, scratch=local if remote else None).close("failed")
        raise
    if run.state != state:
        fs.pipe_file(state_path, json.dumps(run.state, indent=1).encode())
        if remote:  # else the next upload would put the downloaded, older copy back
            with open(os.path.join(local, STATE_FILE), "w") as f:
                json.dump(run.state, f, indent=1)
    if not remote:
        return Tracker(sinks)
    return Tracker(sinks, lambda: fs.put(local + "/", target, recursive=True), scratch=local)
