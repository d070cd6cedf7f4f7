"""Small helpers several test modules share (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

from pipeline.backends import PlainBackend
from pipeline.checkpoint import TrainState
from pipeline.step import make_optimizer


def write_checkpoint(directory: Path, model, cfg, step: int, optimizer=None) -> Path:
    """A checkpoint of `model` as the training loop writes it (the plain backend's save)."""
    directory.mkdir(parents=True, exist_ok=True)
    optimizer = optimizer or make_optimizer(model.trainable_parameters(), cfg.train)
    PlainBackend(cfg.train).save(str(directory), model, optimizer, TrainState(step=step, batch_in_epoch=step),
                                 cfg.to_dict())
    return directory
