"""Stage 3, train: the Q-Former learns from cached targets, on Ray Train (Train V2, TorchTrainer).

One loop for every device. Each step: `accum` micro-batches per worker (so that
micro x accum x workers = global batch, whatever the worker count), student forward
(encoder -> Q-Former -> projection -> frozen LLM), L = w_d * L_distill + w_a * L_align
(pipeline.losses), gradients averaged over workers, clip, AdamW with linear warmup and cosine
decay. The teacher never runs here: its targets come from the stage-2 cache.

Devices: `cpu` (gloo; local runs and tests), `cuda` (NCCL; FSDP2 `fully_shard` per LLM/encoder/
Q-Former layer so frozen weights are sharded rather than copied, bf16 compute via
MixedPrecisionPolicy, fp32 master weights; `train.fsdp=true` runs the same path on CPUs over gloo,
which is how the tests check it), `xla` (torch_xla SPMD, one process per TPU host: pipeline/xla.py).
Checkpoints (every `checkpoint_every` steps and at the end) hold the trainable weights in
safetensors, the optimizer, the step, RNG states and the data position (on XLA the weights and
optimizer also as sharded torch.distributed.checkpoint files); Ray Train keeps them under
<output>/train/ and restarts failed workers from the latest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import cache
from pipeline.config import Config, from_dict

log = logging.getLogger(__name__)
RUN_NAME = "train"


def lr_at(step: int, tcfg: Any) -> float:
    """Linear warmup over the first `warmup_frac` of steps, then cosine decay to 0 (the paper's)."""
    warmup = max(1, round(tcfg.warmup_frac * tcfg.steps))
    if step < warmup:
        return tcfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, tcfg.steps - warmup)
    return tcfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def accumulation(tcfg: Any, world: int) -> int:
    per_step = tcfg.micro_batch_size * world
    if tcfg.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size {tcfg.global_batch_size} is not a multiple of "
                         f"micro_batch_size {tcfg.micro_batch_size} x {world} workers")
    return tcfg.global_batch_size // per_step


def make_optimizer(params: dict[str, torch.nn.Parameter], tcfg: Any) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (queries, projections), not on biases and norms (nanoGPT's rule)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas))


# --- checkpoints -------------------------------------------------------------------------------------


def save_checkpoint(directory: str, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    cfg: Config) -> None:
    """Trainable weights (safetensors), optimizer, step/data position, RNG states, config."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_parameters().items()}
    _write_checkpoint(directory, weights, optimizer.state_dict(), state, cfg)


def save_sharded_checkpoint(directory: str, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                            cfg: Config, rank: int) -> None:
    """The FSDP2 run's checkpoint, in the same files as the unsharded one: every rank takes part in
    gathering the full trainable weights and optimizer state (collectives); rank 0 writes them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = {k: v.full_tensor().detach().cpu().contiguous() for k, v in model.trainable_parameters().items()}
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    if rank == 0:
        _write_checkpoint(directory, weights, optim, state, cfg, optimizer_format="fqn")


def _write_checkpoint(directory: str, weights: dict[str, torch.Tensor], optim: dict[str, Any],
                      state: dict[str, Any], cfg: Config, optimizer_format: str | None = None) -> None:
    """optimizer_format "fqn": the optimizer state is keyed by parameter name (torch.distributed's
    layout), else by position (torch.optim's)."""
    from safetensors.torch import save_file

    save_file(weights, os.path.join(directory, "trainable.safetensors"))
    extra: dict[str, Any] = {"optimizer": optim, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                                         "python": random.getstate()}}
    if optimizer_format:
        extra["optimizer_format"] = optimizer_format
    torch.save(extra, os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump({"state": state, "config": cfg.to_dict()}, f, indent=2)


def load_checkpoint(directory: str, model: Any, optimizer: torch.optim.Optimizer,
                    sharded: bool = False) -> dict[str, Any]:
    """Either checkpoint into either model: an unsharded one resumes an FSDP2 run and the reverse,
    so a run can change its worker count or device between submissions."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(directory, "trainable.safetensors"))
    extra = torch.load(os.path.join(directory, "optimizer.pt"), weights_only=False)
    fqn = extra.get("optimizer_format") == "fqn"
    if sharded or fqn:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model.load_trainable(weights, check_only=True)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        optim = extra["optimizer"] if fqn else _fqn_optimizer_state(extra["optimizer"], model, optimizer)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim, options=options)
    else:
        model.load_trainable(weights)
        optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"]["torch"])
    np.random.set_state(extra["rng"]["numpy"])
    random.setstate(extra["rng"]["python"])
    with open(os.path.join(directory, "state.json")) as f:
        return json.load(f)["state"]


def _fqn_optimizer_state(osd: dict[str, Any], model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An unsharded checkpoint's optimizer state (keyed by position over the param groups, which
    make_optimizer builds in the same order every time) keyed by parameter name instead, as
    set_optimizer_state_dict reads it."""
    name_of = {id(p): name for name, p in model.trainable_parameters().items()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in osd["state"].items()}, "param_groups": groups}


# --- the loop ------------------------------------------------------------------------------------------


def _batches(shard: Any, collate: Any, micro: int, epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, index in epoch, batch) forever, starting at `skip` batches into `epoch`."""
    while True:
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=micro, drop_last=True, collate_fn=collate)):
            if i >= skip:
                yield epoch, i, batch
        epoch, skip = epoch + 1, 0


class MetricsLog:
    """Rank 0's JSONL + TensorBoard logs, under <output>/logs (copied there if the output is remote)."""

    def __init__(self, output_url: str):
        self.fs, root = cache.filesystem(output_url)
        self.remote = not cache.is_local(self.fs)
        self.local = tempfile.mkdtemp(prefix="diva-logs-") if self.remote else os.path.join(root, "logs")
        self.target = cache.join(root, "logs")
        os.makedirs(self.local, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(self.local)
        self.jsonl = open(os.path.join(self.local, "metrics.jsonl"), "a")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def sync(self) -> None:
        self.tb.flush()
        if self.remote:
            self.fs.put(self.local + "/", self.target, recursive=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    import ray.train

    from pipeline.ingest import Collate
    from pipeline.losses import DivaLoss
    from pipeline.model import build_student
    from pipeline.teacher import load_tokenizer

    cfg: Config = from_dict(Config, config["cfg"])
    tcfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if tcfg.device == "cuda" else "cpu")
    if tcfg.device == "cpu":
        torch.set_num_threads(max(1, int(config.get("threads", 1))))
    xrun = None  # torch_xla SPMD (pipeline/xla.py): one process per host; the model is built on the CPU, then sharded
    if tcfg.device == "xla":
        from pipeline import xla

        xrun = xla.SpmdRun(xla.xla_config(tcfg), seed=tcfg.seed)
        xrun.check_batch(tcfg.micro_batch_size)

    tokenizer = load_tokenizer(cfg.teacher)
    # Built in float32: trainable weights are fp32 masters; bf16 compute is FSDP2's mixed precision.
    student_cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, dtype="float32"))
    model = build_student(student_cfg, tokenizer, seed=tcfg.seed, device=str(device))
    if tcfg.activation_checkpointing:
        model.enable_activation_checkpointing()
    sharded = tcfg.device != "xla" and (tcfg.fsdp if tcfg.fsdp is not None else tcfg.device == "cuda")
    if sharded:
        _fully_shard(model, tcfg, device, world)
    if xrun:
        xrun.shard_model(model, tcfg.dtype)
    params = model.trainable_parameters()
    optimizer = make_optimizer(params, tcfg)
    if xrun:
        xrun.init_optimizer(optimizer)
    loss_fn = DivaLoss(w_distill=tcfg.w_distill, w_align=tcfg.w_align, align_reduction=tcfg.align_reduction)
    accum = accumulation(tcfg, world)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = xrun.load_checkpoint(d, model, optimizer) if xrun else load_checkpoint(d, model, optimizer, sharded)
        log.info("rank %d: resumed at step %d (epoch %d, batch %d)", rank, state["step"], state["epoch"],
                 state["batch_in_epoch"])

    collate = Collate(n_mels=cfg.features.n_mels, n_frames=cfg.features.n_frames,
                      num_queries=cfg.model.num_queries, target_dtype=config["target_dtype"])
    batches = _batches(ray.train.get_dataset_shard("train"), collate, tcfg.micro_batch_size,
                       state["epoch"], state["batch_in_epoch"])
    end = min(tcfg.steps, tcfg.stop_at_step or tcfg.steps)
    if state["step"] >= end:
        log.info("rank %d: the run is at step %d of %d already; nothing to do", rank, state["step"], end)
        return
    metrics_log = MetricsLog(config["output"]) if rank == 0 else None
    model.train()
    t_last, examples = time.perf_counter(), 0
    for step in range(state["step"], end):
        lr = lr_at(step, tcfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # total, distill, align, truncated; on XLA they stay on the device until the step's sync
        sums = xrun.loss_sums() if xrun else torch.zeros(4, dtype=torch.float64)
        for micro in range(accum):
            if sharded:  # FSDP2 reduce-scatters once per step, after the last micro-batch
                model.set_requires_gradient_sync(micro == accum - 1)
            epoch, index, batch = next(batches)
            batch = xrun.to_device(batch) if xrun else {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            virtual, h_student = model(batch["input_features"])
            text = model.text_embeddings(batch["token_ids"])
            loss, parts = loss_fn(h_student, batch["target"], virtual, text, batch["lengths"])
            (loss / accum).backward()
            sums += torch.stack([loss.detach(), parts["distill"], parts["align"],
                                 parts["truncated"].to(loss.dtype)]).to(sums)
        if world > 1 and not xrun:  # under SPMD, GSPMD reduces the gradients and the sums span the global batch
            if not sharded:  # FSDP2 reduce-scatters gradients itself
                for p in params.values():
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), tcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if xrun:
            xrun.sync()  # the step boundary: the whole step runs as one compiled graph
        examples += tcfg.global_batch_size
        state = {"step": step + 1, "epoch": epoch, "batch_in_epoch": index + 1}
        last = step + 1 == end
        log_now = (step + 1) % tcfg.log_every == 0 or last or step == 0
        save_now = (step + 1) % tcfg.checkpoint_every == 0 or last
        if xrun and not (log_now or save_now):
            continue  # reading device values waits for the device: only to log or save
        n = accum * (1 if xrun else world)
        metrics = {"loss": sums[0].item() / n, "distill": sums[1].item() / n, "align": sums[2].item() / n,
                   "truncated": sums[3].item(), "grad_norm": float(grad_norm), "lr": lr}
        if xrun:
            metrics["xla_compilations"] = xrun.compilations()
        if log_now:
            now = time.perf_counter()
            metrics["examples_per_s"] = examples / max(now - t_last, 1e-9)
            t_last, examples = now, 0
            if metrics_log:
                metrics_log.write(step + 1, metrics)
                log.info("step %d/%d loss %.4f distill %.4f align %.4f grad %.3f lr %.2e %.1f ex/s", step + 1,
                         tcfg.steps, metrics["loss"], metrics["distill"], metrics["align"], metrics["grad_norm"],
                         lr, metrics["examples_per_s"])
        if save_now:
            with tempfile.TemporaryDirectory() as d:
                if xrun:  # every host writes its own shards; Ray Train merges them into one checkpoint
                    xrun.save_checkpoint(d, model, optimizer, state, cfg, rank)
                elif sharded:  # every rank gathers, rank 0 writes
                    save_sharded_checkpoint(d, model, optimizer, state, cfg, rank)
                elif rank == 0:
                    save_checkpoint(d, model, optimizer, state, cfg)
                if rank == 0:
                    metrics_log.sync()
                ray.train.report(metrics | {"step": step + 1},
                                 checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 or xrun else None)


def _fully_shard(model: Any, tcfg: Any, device: torch.device, world: int) -> None:
    """FSDP2: each LLM, encoder and Q-Former layer its own unit (frozen weights sharded, not copied),
    the rest (embeddings, queries, projection) in the root; bf16 compute with fp32 gradient
    reductions and fp32 master weights when train.dtype=bfloat16."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if tcfg.dtype == "bfloat16" else torch.float32,
                              reduce_dtype=torch.float32)
    for layer in list(model.llm.base_model.layers) + list(model.encoder.layers) + list(model.qformer.layers):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def run_training(cfg: Config, mels_url: str, teacher_url: str, output_url: str) -> Any:
    """Fit (or resume: Ray Train restores <output>/train's latest checkpoint) and return the Result."""
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ingest import training_dataset
    from pipeline.teacher import for_workers, load_tokenizer, target_spec
    from pipeline.template import derive_template

    tokenizer = load_tokenizer(cfg.teacher)
    expect = target_spec(cfg.teacher, tokenizer, derive_template(tokenizer, cfg.teacher.system_prompt))
    tcfg = cfg.train
    ds, info = training_dataset(mels_url, teacher_url, expect=expect, split=tcfg.split,
                                  shuffle_seed=tcfg.seed if tcfg.shuffle else None)
    log.info("train: %s", info["counts"])
    if info["input_bytes"] <= tcfg.materialize_max_mb * 2**20:
        # Small enough to hold: read, join and shuffle once, and let every epoch stream from memory.
        # Otherwise each epoch re-runs the whole pipeline, which for a few clips costs more than the step.
        ds = ds.materialize()
        log.info("train: the %s split (%.1f MB on disk) is materialised in the object store", tcfg.split,
                 info["input_bytes"] / 2**20)
    fs, root = cache.filesystem(output_url)
    fs.makedirs(root, exist_ok=True)
    storage = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    trainer_cls, xla_scaling = TorchTrainer, None
    if tcfg.device == "xla":  # one torch_xla SPMD worker per host (pipeline/xla.py)
        from pipeline import xla

        xcfg = xla.xla_config(tcfg)
        trainer_cls, xla_scaling = xla.trainer(xcfg), xla.scaling_config(tcfg.num_workers, xcfg, tcfg.cpus_per_worker)
    trainer = trainer_cls(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.replace(cfg, teacher=for_workers(cfg.teacher)).to_dict(),
                           "output": output_url, "target_dtype": expect["target_dtype"],
                           "threads": max(1, (os.cpu_count() or 1) // tcfg.num_workers)},
        scaling_config=xla_scaling or ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.device == "cuda",
                                     resources_per_worker={"CPU": tcfg.cpus_per_worker,
                                                           **({"GPU": 1} if tcfg.device == "cuda" else {})}),
        run_config=RunConfig(name=RUN_NAME, storage_path=root, storage_filesystem=storage,
                             failure_config=FailureConfig(max_failures=tcfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints)),
        datasets={"train": ds},
        dataset_config=DataConfig(enable_shard_locality=False),
    )
    return trainer.fit()
