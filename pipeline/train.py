"""Stage 3, train: the Q-Former learns from cached targets, on Ray Train (Train V2, TorchTrainer).

One loop for every device, read top to bottom: build the student, maybe resume, then for each step:
micro-batches -> `train_step` (pipeline.step) -> log -> checkpoint, stopping there after a SIGTERM (a
spot VM's notice, "preemption" below). What differs between CPU, FSDP2 and torch_xla SPMD is a backend
object (pipeline.backends, pipeline.xla); the checkpoint format is pipeline.checkpoint's. The teacher
never runs here: its targets come from the stage-2 cache.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import posixpath
import random
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline import cache, layout, tracking
from pipeline import checkpoint as ckpt
from pipeline.config import Config, ConfigError, from_dict
from pipeline.step import accumulation, lr_at, make_optimizer, train_step

log = logging.getLogger(__name__)


def micro_batches(shard: Any, collate: Any, micro: int, state: ckpt.TrainState,
                  world: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index in epoch, batch) forever, starting at the checkpoint's data position (TrainState.skip)."""
    epoch, skip = state.epoch, state.skip(world)
    while True:
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=micro, drop_last=True, collate_fn=collate)):
            if i >= skip:
                yield epoch, i, batch
        epoch, skip = epoch + 1, 0


def build(cfg: Config, backend: Any) -> tuple[Any, torch.optim.Optimizer]:
    """The student on the backend's device, and its optimizer (over the trainable parameters only)."""
    from pipeline.builders import load_tokenizer
    from pipeline.model import build_student

    tcfg = cfg.train
    # Built in float32: trainable weights are fp32 masters; bf16 compute is the backend's mixed precision.
    student_cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, dtype="float32"))
    model = build_student(student_cfg, load_tokenizer(cfg.teacher), seed=tcfg.seed, device=str(backend.build_device))
    if tcfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    model = backend.setup(model)
    optimizer = make_optimizer(model.trainable_parameters(), tcfg)
    backend.init_optimizer(optimizer)
    return model, optimizer


def resume(backend: Any, model: Any, optimizer: torch.optim.Optimizer, rank: int) -> ckpt.TrainState:
    """The latest checkpoint Ray Train restored for this run, else the start."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if not restored:
        return ckpt.TrainState()
    state = backend.load(resumable(stored_url(restored)), model, optimizer)
    log.info("rank %d: resumed at step %d (epoch %d, batch %d)", rank, state.step, state.epoch, state.batch_in_epoch)
    return state


def resumable(url: str) -> ckpt.Checkpoint:
    """The checkpoint Ray Train restored (`url`), every file checked before any is loaded; if one fails its
    checksum (a cut upload, a bad disk), the newest earlier checkpoint of the run that passes, with a warning
    naming both: resuming from a corrupt file would stop the run, starting over would lose it."""
    from pipeline.export import complete_checkpoints

    def name(u: str) -> str:
        return posixpath.basename(u.rstrip("/"))

    listed = complete_checkpoints(posixpath.dirname(url.rstrip("/")))  # Ray Train's run directory
    step = next((s for s, u in listed if name(u) == name(url)), -1)
    return ckpt.newest_intact([(s, u) for s, u in listed if name(u) != name(url)] + [(step, url)])


def stored_url(checkpoint: Any) -> str:
    """Where a Ray Train checkpoint lies in the run's storage, as a URL pipeline.checkpoint reads in place.
    Not `as_directory()`: on our fsspec storage it downloads into one /tmp directory per checkpoint that every
    worker of a node shares, and a worker arriving after the first finished downloads again over the files
    the first is reading (ray-project/ray#48726; our CI saw "checksum mismatch" on a two-worker resume)."""
    import pyarrow.fs as pafs

    handler = getattr(checkpoint.filesystem, "handler", None)
    if isinstance(handler, pafs.FSSpecHandler):
        return handler.fs.unstrip_protocol(checkpoint.path)
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    raise ConfigError(f"checkpoint {checkpoint.path}: storage {type(checkpoint.filesystem).__name__} is not one "
                      "run_training configures (an fsspec filesystem)")


def save(backend: Any, model: Any, optimizer: torch.optim.Optimizer, state: ckpt.TrainState, recorded: dict,
         metrics: dict[str, float], tracker: tracking.Tracker) -> None:
    """A checkpoint through the backend, reported to Ray Train with the step's metrics."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        mine = backend.save(d, model, optimizer, state, recorded)
        tracker.sync()
        ray.train.report(metrics | {"step": state.step},
                         checkpoint=ray.train.Checkpoint.from_directory(d) if mine else None)


# --- preemption: SIGTERM -> a checkpoint at the next step boundary, then a clean stop ---------------------

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): jobs.train stopped on SIGTERM with a checkpoint; resubmit to resume
_sigterm = threading.Event()


def _flag_sigterm() -> None:
    """SIGTERM sets a flag instead of running Ray's handler, which exits at once (a crash to Ray Train); a
    second SIGTERM gets Ray's handler back. Python runs handlers on the main thread and only it may set them."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        _sigterm.set()
        signal.signal(signal.SIGTERM, previous)

    _sigterm.clear()
    signal.signal(signal.SIGTERM, on_sigterm)


def watch_sigterm() -> None:
    """From here on, SIGTERM asks the loop to checkpoint and stop. The loop runs in a thread of the Ray Train
    worker actor, whose tasks run on its main thread: the handler is installed through one (`execute`, how Ray
    Train's worker group runs its own setup on the workers)."""
    if threading.current_thread() is threading.main_thread():
        _flag_sigterm()
        return
    import ray

    ray.get(ray.get_runtime_context().current_actor.execute.remote(_flag_sigterm))


def last_step(tcfg: Any) -> int:
    """Where this submission ends: train.steps, or train.stop_at_step before it."""
    return min(tcfg.steps, tcfg.stop_at_step or tcfg.steps)


def finished_step(tcfg: Any, output_url: str) -> int | None:
    """The step of the run's latest complete checkpoint under `output_url` when it has reached this submission's
    last step, else None: a caller that only wants the run done (jobs.local) need not start Ray Train to learn
    that there is nothing to do. Its weights must pass their checksums (`export.open_checkpoint`): a run whose
    last checkpoint is corrupt is not done, and training resumes from the one before it."""
    from pipeline.export import ExportError, open_checkpoint

    try:
        step = open_checkpoint(output_url).state.step
    except ExportError:
        return None  # no complete checkpoint yet
    return step if step >= last_step(tcfg) else None


def preempted(result: Any) -> bool:
    """Whether a fit ended on SIGTERM (its last report says so) rather than at its last step."""
    return bool((result.metrics or {}).get("preempted"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    import ray.train

    from pipeline.backends import any_worker, make_backend
    from pipeline.ingest import Collate
    from pipeline.losses import DivaLoss
    from pipeline.model import EncoderCache

    cfg: Config = from_dict(Config, config["worker_cfg"])
    tcfg = cfg.train
    watch_sigterm()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)
    backend = make_backend(tcfg, rank, world, ctx.get_local_rank(), threads=config["threads"])
    model, optimizer = build(cfg, backend)
    state = resume(backend, model, optimizer, rank)
    end = last_step(tcfg)
    if state.step >= end:
        log.info("rank %d: the run is at step %d of %d already; nothing to do", rank, state.step, end)
        return

    collate = Collate(n_mels=cfg.features.n_mels, n_frames=cfg.features.n_frames, num_queries=cfg.model.num_queries,
                      target_dtype=config["target_dtype"], keys=tcfg.cache_encoder,
                      distill_positions=tcfg.distill_positions)
    batches = micro_batches(ray.train.get_dataset_shard("train"), collate, tcfg.micro_batch_size, state, world)
    if tcfg.cache_encoder:
        model.encoder_cache = EncoderCache(tcfg.encoder_cache_mb * 2**20)
    loss_fn = DivaLoss.from_config(tcfg)
    align_only = loss_fn.alignment_only()
    accum = accumulation(tcfg, world)
    # Rank 0 logs (pipeline/tracking.py); its trackers end with the run: finished, preempted or failed.
    tracker = tracking.open_tracker(cfg, config["output"], config["cfg"]) if rank == 0 else tracking.Tracker()
    model.train()
    t_last, examples, waited = time.perf_counter(), 0, 0.0
    with tracker:
        for step in range(state.step, end):
            t_wait = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            waited += time.perf_counter() - t_wait  # ingest the step waited for (not hidden by prefetching)
            lr = lr_at(step, tcfg)
            result = train_step(model, [b for _, _, b in micro],
                                align_only if step < tcfg.align_only_steps else loss_fn,
                                optimizer, backend, lr=lr, grad_clip=tcfg.grad_clip)
            examples += tcfg.global_batch_size
            state = ckpt.TrainState(step=step + 1, epoch=micro[-1][0], batch_in_epoch=micro[-1][1] + 1, world=world)
            stop = any_worker(_sigterm.is_set(), world) and state.step < end  # every rank stops at the same step
            last = state.step == end or stop
            log_now = state.step % tcfg.log_every == 0 or last or step == 0
            save_now = state.step % tcfg.checkpoint_every == 0 or last
            if not (log_now or save_now):
                continue  # reading device values waits for the device: only to log or save
            metrics = step_metrics(result, accum, lr, tcfg) | backend.metrics()
            if log_now:
                now = time.perf_counter()
                metrics["examples_per_s"] = examples / max(now - t_last, 1e-9)
                metrics["data_wait"] = waited / max(now - t_last, 1e-9)  # share of the interval spent waiting for data
                t_last, examples, waited = now, 0, 0.0
                if rank == 0:
                    tracker.log(state.step, metrics)
                    log.info("step %d/%d %s", state.step, tcfg.steps,
                             " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if save_now:
                save(backend, model, optimizer, state, config["cfg"], metrics | ({"preempted": 1} if stop else {}),
                     tracker)
            if stop:
                log.warning("rank %d: SIGTERM%s: stopped at step %d of %d, checkpoint saved", rank,
                            "" if _sigterm.is_set() else " to another worker", state.step, end)
                tracker.outcome = "preempted"
                return


def step_metrics(result: Any, micro_batches: int, lr: float, tcfg: Any) -> dict[str, float]:
    """A step's logged values: each loss term's mean over the step's micro-batches (and workers)."""
    parts = result.parts.means(micro_batches)
    metrics = {"loss": parts["total"], "distill": parts["distill"], "align": parts["align"],
               "truncated": parts["truncated"], "grad_norm": float(result.grad_norm), "lr": lr}
    if tcfg.w_kl > 0:
        metrics["kl"] = parts["kl"]
    return {k: v for k, v in metrics.items() if not math.isnan(v)}  # no distill while training alignment alone


def require_workers(cfg: Config, scaling: Any) -> None:
    """The worker group's resources exist on the cluster (pipeline.resources): say so now, not never."""
    from pipeline.resources import require

    t = cfg.train
    per_worker = dict(scaling.resources_per_worker or {"CPU": 1.0})
    require(per_worker, t.num_workers, what=f"training ({t.num_workers} worker(s) on train.device={t.device})",
            change="train.num_workers, train.cpus_per_worker or train.device",
            timeout_s=cfg.cluster.autoscaler_timeout_s)


def training_input(cfg: Config, mels_url: str, teacher_url: str) -> tuple[Any, dict[str, Any]]:
    """The run's Dataset of joined rows and `training_dataset`'s info (plus `expect`, the targets' spec, and
    `materialized`): what run_training trains on and benchmarks/bench_load.py iterates."""
    from pipeline.builders import load_tokenizer
    from pipeline.ingest import training_dataset
    from pipeline.teacher import target_spec
    from pipeline.template import derive_template

    tcfg = cfg.train
    tokenizer = load_tokenizer(cfg.teacher)
    expect = target_spec(cfg.teacher, tokenizer, derive_template(tokenizer, cfg.teacher.system_prompt))
    ds, info = training_dataset(mels_url, teacher_url, expect=expect, split=tcfg.split,
                                shuffle_seed=tcfg.seed if tcfg.shuffle else None, topk=tcfg.w_kl > 0,
                                positions=tcfg.distill_positions)
    log.info("train: %s", info["counts"])
    made = (info["collate"]["n_mels"], info["collate"]["n_frames"])
    if made != (cfg.features.n_mels, cfg.features.n_frames):
        raise ConfigError(f"{mels_url} holds {made[0]}-bin log-Mels in {made[1]}-frame windows, this run's features "
                          f"are {cfg.features.n_mels} bins x {cfg.features.n_frames} frames: prepare it with the "
                          "same features.* settings")
    info |= {"expect": expect, "materialized": info["joined_on_driver"]
             or info["input_bytes"] <= tcfg.materialize_max_mb * 2**20}
    if info["materialized"]:
        # Small enough to hold: read, join and shuffle once, and let every epoch stream from memory.
        # Otherwise each epoch re-runs the whole pipeline, which for a few clips costs more than the step.
        ds = ds if info["joined_on_driver"] else ds.materialize()
        log.info("train: the %s split (%.1f MB on disk) is materialised in the object store", tcfg.split,
                 info["input_bytes"] / 2**20)
    return ds, info


def run_training(cfg: Config, mels_url: str, teacher_url: str, output_url: str) -> Any:
    """Fit (or resume: Ray Train restores <output>/train's latest checkpoint) and return the Result."""
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig

    from pipeline.backends import trainer_and_scaling
    from pipeline.builders import check_features, config_for_workers

    trainer_cls, scaling = trainer_and_scaling(cfg.train)
    require_workers(cfg, scaling)  # first: a request the cluster can never meet fails in seconds
    accumulation(cfg.train, cfg.train.num_workers)  # a batch the workers cannot split fails here, not in each worker
    tracked = tracking.for_workers(cfg, output_url)  # the loggers' packages, the MLflow URI
    check_features(cfg)
    tcfg = cfg.train
    ds, info = training_input(cfg, mels_url, teacher_url)
    fs, root = cache.filesystem(output_url)
    fs.makedirs(root, exist_ok=True)
    if cache.is_local(fs):  # the workers' working directory is not the driver's
        output_url = root = os.path.abspath(root)
    trainer = trainer_cls(
        train_loop_per_worker,
        # The run's config as given (what checkpoints record), and with local model directories made
        # absolute for the workers, whose working directory is not the driver's.
        train_loop_config={"cfg": cfg.to_dict(), "worker_cfg": config_for_workers(tracked).to_dict(),
                           "output": output_url, "target_dtype": info["expect"]["target_dtype"],
                           "threads": max(1, (os.cpu_count() or 1) // tcfg.num_workers)},
        scaling_config=scaling,
        run_config=RunConfig(name=layout.TRAIN_RUN, storage_path=root,
                             storage_filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
                             failure_config=FailureConfig(max_failures=tcfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints)),
        datasets={"train": ds},
        dataset_config=DataConfig(enable_shard_locality=False),
    )
    result = trainer.fit()
    if preempted(result):
        log.warning("train: preempted (SIGTERM) at step %d of %d: checkpoint %s; submit the same command again "
                    "to resume", result.metrics["step"], last_step(tcfg),
                    result.checkpoint.path if result.checkpoint else None)
    return result
