"""Device backends: everything the training loop asks of a device, behind one small interface.

    setup(model) -> model          place (and shard) the student
    init_optimizer(optimizer)      create optimizer state ahead of the first step (XLA), else nothing
    to_device(batch)               a collated micro-batch onto the device
    accumulating(last)             context for one micro-batch's backward (FSDP2 syncs only the last)
    reduce_gradients(params)       average gradients over workers where nobody else does
    zeros() / reduce(parts)        device accumulators for LossParts, summed over workers
    end_step()                     the step boundary (XLA runs its compiled graph here)
    save(dir, model, optimizer, state, config) -> bool   write this worker's part of a checkpoint
    load(checkpoint, model, optimizer) -> TrainState     restore in place

`any_worker(flag, world)` serves every backend: whether any worker's flag is set (the loop's preemption
stop), decided on the host so that it never waits for the device.

`PlainBackend`: CPU workers over gloo, or one GPU each over NCCL, gradients all-reduced by hand.
`FsdpBackend`: FSDP2 `fully_shard` per layer (the CUDA default; `train.fsdp=true` on CPUs). The XLA
SPMD backend is pipeline/xla.py. The loop (pipeline/train.py) knows none of their details.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt
from pipeline.step import LossParts


class PlainBackend:
    """Data parallelism without sharding: every worker holds the whole student."""

    def __init__(self, tcfg: Any, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.tcfg, self.rank, self.world = tcfg, rank, world
        self.device = torch.device(f"cuda:{local_rank}" if tcfg.device == "cuda" else "cpu")
        self.build_device = self.device  # where the student is built before setup()

    def setup(self, model: Any) -> Any:
        return model

    def init_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        yield

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world > 1:
            for p in params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)

    def zeros(self) -> LossParts:
        return LossParts.zeros(self.device, torch.float64)

    def reduce(self, parts: LossParts) -> LossParts:
        if self.world == 1:
            return parts
        stacked = parts.stack()
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return LossParts.unstack(stacked).averaged(self.world)

    def end_step(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    # -- checkpoints: the full format, gathered wherever the weights live ------------------------------

    def save(self, directory: str, model: Any, optimizer: torch.optim.Optimizer, state: ckpt.TrainState,
             config: dict[str, Any]) -> bool:
        """Every rank takes part (FSDP2 gathers with collectives); rank 0 writes. True where the directory
        is this worker's checkpoint to report."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = {k: _full(v).detach().cpu() for k, v in model.trainable_parameters().items()}
        osd = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            ckpt.write_full(directory, weights, osd, state, config)
        return self.rank == 0

    def load(self, checkpoint: ckpt.Checkpoint, model: Any, optimizer: torch.optim.Optimizer) -> ckpt.TrainState:
        """Any checkpoint into this model, sharded or not: torch.distributed.checkpoint places full tensors."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        weights = checkpoint.weights()
        model.load_trainable(weights, check_only=True)  # a clear message for names or shapes that differ
        weights = {name: weights[name] for name in model.trainable_parameters()}  # every rank in one order
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=checkpoint.optimizer(), options=options)
        checkpoint.restore_rng()
        return checkpoint.state


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it), else the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class FsdpBackend(PlainBackend):
    """FSDP2: each LLM, encoder and Q-Former layer its own unit (frozen weights sharded, not copied), the rest
    (embeddings, queries, projection) in the root; bf16 compute with fp32 gradient reductions and fp32 master
    weights when train.dtype=bfloat16. Gradients are reduce-scattered once per step, after the last
    micro-batch."""

    def setup(self, model: Any) -> Any:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.tcfg.dtype == "bfloat16" else torch.float32,
                                  reduce_dtype=torch.float32)
        for layer in [*model.llm.base_model.layers, *model.encoder.layers, *model.qformer.layers]:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self.model = model
        return model

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(last)
        yield

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        pass  # FSDP2 reduce-scatters them itself


def any_worker(flag: bool, world: int) -> bool:
    """True on every worker when `flag` is set on any: the workers stop at the same step, so none is left
    waiting alone in a collective. One int all-reduced on the host over gloo, never waiting for the device."""
    if world == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group())
    return bool(value.item())


@functools.cache
def _host_group() -> Any:
    """A group for host tensors: the default one where it is gloo (CPU, XLA), else a gloo group made once
    (NCCL takes only CUDA tensors). Every rank calls it at the same step: creating a group is collective."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def make_backend(tcfg: Any, rank: int = 0, world: int = 1, local_rank: int = 0, threads: int = 1) -> Any:
    """The backend `train.device` (and `train.fsdp`) ask for; `threads`: torch's CPU threads per worker."""
    if tcfg.device == "xla":
        from pipeline.xla import XlaBackend, xla_config

        backend = XlaBackend(xla_config(tcfg), seed=tcfg.seed, rank=rank, world=world, dtype=tcfg.dtype)
        backend.check_batch(tcfg.micro_batch_size)
        return backend
    if tcfg.device == "cpu":
        torch.set_num_threads(max(1, threads))
    sharded = tcfg.fsdp if tcfg.fsdp is not None else tcfg.device == "cuda"
    return (FsdpBackend if sharded else PlainBackend)(tcfg, rank, world, local_rank)


def trainer_and_scaling(tcfg: Any) -> tuple[Any, Any]:
    """The driver side: the Ray Train trainer class and the workers to reserve for `train.device`."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    if tcfg.device == "xla":  # one torch_xla SPMD worker per host
        from pipeline import xla

        xcfg = xla.xla_config(tcfg)
        return xla.trainer(xcfg), xla.scaling_config(tcfg.num_workers, xcfg, tcfg.cpus_per_worker)
    gpu = tcfg.device == "cuda"
    resources = {"CPU": tcfg.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    return TorchTrainer, ScalingConfig(num_workers=tcfg.num_workers, use_gpu=gpu, resources_per_worker=resources)
