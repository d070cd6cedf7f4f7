"""Small helpers several test modules share (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.backends import PlainBackend
from pipeline.checkpoint import TrainState
from pipeline.config import load_config
from pipeline.model import build_student
from pipeline.step import make_optimizer

# The Ray Train runs of the tests use 64 queries, not the tiny preset's 448: what they check (resuming, restarting,
# stopping, reporting, side-by-side jobs) does not depend on the count, and each step costs less than half.
FEW_QUERIES = "model.num_queries=64"


def write_checkpoint(directory: Path, model, cfg, step: int, optimizer=None) -> Path:
    """A checkpoint of `model` as the training loop writes it (the plain backend's save)."""
    directory.mkdir(parents=True, exist_ok=True)
    optimizer = optimizer or make_optimizer(model.trainable_parameters(), cfg.train)
    PlainBackend(cfg.train).save(str(directory), model, optimizer, TrainState(step=step, batch_in_epoch=step, world=1),
                                 cfg.to_dict())
    return directory


def nudged_run(run: Path, *overrides: str) -> Path:
    """A training run's output as Ray Train lays it out (<run>/train/checkpoint_<date>/, step 3): the tiny student
    (with `overrides` to its config) with its trainable weights nudged off their initialisation, so that it answers
    with several tokens."""
    cfg = load_config("tiny", list(overrides))
    model = build_student(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    write_checkpoint(run / "train" / "checkpoint_2025-01-01_10-00-00.000001", model, cfg, step=3)
    return run


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out: Path) -> list[dict]:
    """Every line of a local run's logs/metrics.jsonl, re-run steps included (pipeline.report.read_metrics keeps
    only the last record of each step: what a resumed run re-ran is what the resume tests look at)."""
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def conversion_lock(models: Path) -> Iterator[None]:
    """Held while converting into conftest's `converted_models`: another worker waits, then finds the model up to
    date, rather than converting it again and replacing the directory under its readers."""
    from filelock import FileLock

    models.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models.parent / "convert.lock")):
        yield
