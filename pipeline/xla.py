"""Training on torch_xla SPMD (`train.device=xla`): the Ray Train backend and what the shared loop in
pipeline/train.py asks of the device (issue 5).

Why SPMD, and why a backend of our own: Ray Train reserves TPU slices one worker per TPU VM host, but
its torch TPU runtime runs one process per chip, while torch_xla SPMD wants one process per host
owning all its chips and compiles one program for the whole mesh (GSPMD inserts the collectives).
So each Ray worker here is one host: `XlaSpmdBackend` sets the PJRT device, the multislice
(MegaScale) variables and a gloo process group - for coordination and the distributed checkpoint's
plan exchange only; in SPMD mode there is no `xla` process group and gradients are never
all-reduced by hand. `SpmdRun` is the worker side: `xr.use_spmd()` before any XLA tensor, the
persistent compilation cache, a ("data", "fsdp") mesh over every device of every host (a hybrid
ICI x DCN mesh across slices), FSDPv2-style sharding, per-host input sharding, the step's sync and
sharded checkpoints.

- Sharding (FSDPv2's rules, without its wrapper so parameter names - and so checkpoints - stay the
  model's own): every parameter of the frozen LLM and encoder and of the trainable Q-Former,
  queries and projection is split along its largest dimension that the fsdp axis divides (else
  replicated); each transformer layer's output is sharded on the batch dimension and gets an
  optimization barrier in backward, as FSDPv2 does, so that GSPMD gathers one layer's weights at a
  time. Gradients and optimizer state follow their parameters' sharding.
- Input: each host feeds its own `micro_batch_size` rows from its Ray Data shard; `ShardingSpec(...,
  minibatch=True)` makes them that host's slice of one global batch sharded over (data, fsdp). So
  the global micro-batch is `micro_batch_size x hosts`, as on CPU/GPU with one worker per host, and
  the accumulation count is the same.
- Steps: nothing in a step reads a device value on the host (losses are summed on the device, and
  transformers gets explicit causal masks instead of inspecting position ids); one
  `torch_xla.sync()` at the step boundary runs the step as one compiled graph. The optimizer state
  is created before the first step, so that graph is compiled once and every later step (and a
  resumed run, from the persistent cache on TPU) reuses it. The loop reads the loss sums after the
  sync, and only when it logs or checkpoints.
- Checkpoints: torch.distributed.checkpoint with torch_xla's SPMD planners; each host writes only
  its own shards of the trainable weights and the optimizer state into its Ray Train checkpoint
  directory, which Ray Train merges into one checkpoint on the run's storage (any fsspec URL,
  gs:// included) and restores on resume, like the CPU path's. Rank 0 adds what the CPU path's
  checkpoint holds for export and bookkeeping: `trainable.safetensors` (full tensors, gathered from
  the hosts' shards over gloo), `state.json` and the RNG states.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.train.backend import Backend, BackendConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from pipeline.config import ConfigError, XlaConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch dimension is split over both: data-parallel replicas x FSDP shards
ENV_PREFIX = "DIVA_XLA_"
STATE_FILE, WEIGHTS_FILE, RNG_FILE = "state.json", "trainable.safetensors", "rng.pt"


def from_env(xcfg: XlaConfig, environ: typing.Mapping[str, str] | None = None) -> XlaConfig:
    """`xcfg` with any DIVA_XLA_<FIELD> variable of the environment laid over it: a cluster can name
    its slice where it is defined (e.g. the RayJob manifest's DIVA_XLA_TOPOLOGY=4x4) rather than in
    every job's overrides. The same variables carry the driver's settings to the workers."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(XlaConfig)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(XlaConfig):
        name = ENV_PREFIX + f.name.upper()
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            values[f.name] = int(raw) if hints[f.name] in (int, int | None) else raw
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    return dataclasses.replace(xcfg, **values)


def to_env(xcfg: XlaConfig) -> dict[str, str]:
    """The inverse of from_env (None fields left out)."""
    return {ENV_PREFIX + k.upper(): str(v) for k, v in dataclasses.asdict(xcfg).items() if v is not None}


def xla_config(tcfg: Any) -> XlaConfig:
    """The run's settings: `train.xla`, with the environment's DIVA_XLA_* variables over it."""
    return from_env(tcfg.xla)


# --- the Ray Train backend (driver side) --------------------------------------------------------------------


@dataclass
class XlaSpmdConfig(BackendConfig):
    """Backend config for one torch_xla SPMD process per host."""

    xla: XlaConfig = dataclasses.field(default_factory=XlaConfig)

    @property
    def backend_cls(self):
        return XlaSpmdBackend

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.xla)


def _setup_worker(world_rank: int, world: int, addr: str, port: int, env: dict[str, str], timeout_s: int) -> None:
    """On each worker, before the training function and before torch_xla starts its runtime."""
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(world_rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", rank=world_rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))


def _shutdown_worker() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class XlaSpmdBackend(Backend):
    """Worker setup for torch_xla SPMD: PJRT device, MegaScale variables across slices, a gloo group."""

    def on_start(self, worker_group: Any, backend_config: XlaSpmdConfig) -> None:
        from ray.train._internal.utils import get_address_and_port
        from ray.util.tpu import get_tpu_coordinator_env_vars

        xcfg = backend_config.xla
        env = {"PJRT_DEVICE": xcfg.pjrt_device, **to_env(xcfg)}
        if xcfg.pjrt_device == "CPU" and xcfg.cpu_num_devices:
            env["CPU_NUM_DEVICES"] = str(xcfg.cpu_num_devices)
        addr, port = worker_group.execute_single(0, get_address_and_port)
        world = len(worker_group)
        slices = worker_group.get_worker_group_context().num_slices \
            if hasattr(worker_group, "get_worker_group_context") else 1
        per_slice = max(1, world // slices)
        futures = []
        for rank in range(world):
            worker_env = dict(env)
            if slices > 1:  # libtpu's multislice runtime meets at worker 0's address
                worker_env.update(get_tpu_coordinator_env_vars(coordinator_address=addr, num_slices=slices,
                                                               slice_id=min(rank // per_slice, slices - 1)))
            futures.append(worker_group.execute_single_async(
                rank, _setup_worker, world_rank=rank, world=world, addr=addr, port=port, env=worker_env,
                timeout_s=xcfg.timeout_s))
        ray.get(futures)

    def on_shutdown(self, worker_group: Any, backend_config: XlaSpmdConfig) -> None:
        try:
            ray.get(worker_group.execute_async(_shutdown_worker), timeout=60)
        except ray.exceptions.GetTimeoutError:
            log.warning("xla: process group shutdown timed out")


class XlaSpmdTrainer(DataParallelTrainer):
    """A Train V2 data-parallel trainer whose workers are torch_xla SPMD hosts."""

    def __init__(self, train_loop_per_worker: Any, *, xla: XlaConfig | None = None, **kwargs: Any):
        super().__init__(train_loop_per_worker, backend_config=XlaSpmdConfig(xla or XlaConfig()), **kwargs)


def trainer(xcfg: XlaConfig) -> Callable[..., XlaSpmdTrainer]:
    """What run_training calls in place of TorchTrainer (same arguments)."""
    return functools.partial(XlaSpmdTrainer, xla=xcfg)


def scaling_config(num_workers: int, xcfg: XlaConfig, cpus_per_worker: float = 1.0) -> Any:
    """One worker per host. On TPU it reserves whole hosts of the slice(s): Ray derives the chips per
    host from topology and accelerator_type."""
    from ray.train import ScalingConfig

    if xcfg.pjrt_device != "TPU":
        return ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": cpus_per_worker})
    if not xcfg.chips_per_host and not (xcfg.topology and xcfg.accelerator_type):
        raise ConfigError("train.device=xla on TPU needs the slice's topology and accelerator_type (e.g. "
                         "DIVA_XLA_TOPOLOGY=2x2x4 DIVA_XLA_ACCELERATOR_TYPE=TPU-V4), or chips_per_host for one host")
    chips = xcfg.chips_per_host
    if not chips:
        from ray.util.tpu import get_tpu_worker_resources

        chips = get_tpu_worker_resources(topology=xcfg.topology, accelerator_type=xcfg.accelerator_type)[1]["TPU"]
    resources = {"TPU": chips, "CPU": cpus_per_worker}
    return ScalingConfig(num_workers=num_workers, use_tpu=True, topology=xcfg.topology,
                         accelerator_type=xcfg.accelerator_type, resources_per_worker=resources,
                         placement_strategy="SPREAD")


# --- the worker side ---------------------------------------------------------------------------------------


def _partition(shape: torch.Size, fsdp: int) -> tuple[str | None, ...]:
    """FSDPv2's rule: the largest dimension on the fsdp axis - here the largest that it divides."""
    spec: list[str | None] = [None] * len(shape)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec[dim] = "fsdp"
            break
    return tuple(spec)


def _explicit_causal_mask(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Hand the LLM and the Q-Former a ready 4-D causal mask. Without a mask, transformers checks the
    position ids for packed sequences on the host (`.all()` on a device tensor) in every forward: a
    host sync that stalls the step's tracing until the device is idle. A 4-D mask is used as is."""
    embeds = kwargs.get("inputs_embeds")
    if kwargs.get("attention_mask") is None and embeds is not None:
        n = embeds.shape[1]
        blocked = torch.ones(n, n, dtype=torch.bool, device=embeds.device).triu(1)
        mask = torch.zeros(n, n, dtype=embeds.dtype, device=embeds.device).masked_fill(
            blocked, torch.finfo(embeds.dtype).min)
        kwargs = {**kwargs, "attention_mask": mask[None, None]}
    return args, kwargs


class SpmdRun:
    """One host's torch_xla SPMD state: device, mesh, input shardings."""

    def __init__(self, xcfg: XlaConfig, seed: int = 0):
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        os.environ.setdefault("PJRT_DEVICE", xcfg.pjrt_device)
        if xcfg.pjrt_device == "CPU" and xcfg.cpu_num_devices:
            os.environ.setdefault("CPU_NUM_DEVICES", str(xcfg.cpu_num_devices))
        if xcfg.compilation_cache and not torch_xla._XLAC._xla_computation_cache_is_initialized():
            # On TPU a restarted or resumed run loads its graphs from here instead of recompiling (the
            # CPU client writes entries but cannot load them).
            path = os.path.expanduser(xcfg.compilation_cache)
            os.makedirs(path, exist_ok=True)
            xr.initialize_cache(path, readonly=False)
        xr.use_spmd()  # before any XLA tensor exists
        self.xcfg = xcfg
        self.device = torch_xla.device()
        self.mesh = self._mesh(xcfg)
        self.fsdp = self.mesh.shape()["fsdp"]
        self.local_devices = xr.addressable_runtime_device_count()
        xm.set_rng_state(seed)
        self._specs: dict[int, Any] = {}
        log.info("xla: process %d/%d, %d devices (%d here), mesh %s", xr.process_index(), xr.process_count(),
                 xr.global_runtime_device_count(), self.local_devices, dict(self.mesh.shape()))

    @staticmethod
    def _mesh(xcfg: XlaConfig) -> Any:
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        n = xr.global_runtime_device_count()
        attributes = xr.global_runtime_device_attributes()
        slices = len({a["slice_index"] for a in attributes}) if attributes and "slice_index" in attributes[0] else 1
        per_slice = n // slices
        if per_slice % xcfg.data:
            raise ValueError(f"xla.data={xcfg.data} does not divide the {per_slice} devices of a slice")
        ici = (xcfg.data, per_slice // xcfg.data)
        if xcfg.pjrt_device == "TPU":  # device order follows the physical torus; slices on the data axis
            dcn = (slices, 1) if slices > 1 else None
            return xs.HybridMesh(ici_mesh_shape=ici, dcn_mesh_shape=dcn, axis_names=MESH_AXES)
        return xs.Mesh(np.arange(n), ici, MESH_AXES)

    # -- model and data -----------------------------------------------------------------------------

    def check_batch(self, micro_batch_size: int) -> None:
        if micro_batch_size % self.local_devices:
            raise ValueError(f"train.micro_batch_size={micro_batch_size} (rows per host) must be a multiple of the "
                             f"{self.local_devices} XLA devices of a host")

    def shard_model(self, model: Any, dtype: str = "float32") -> Any:
        """Move the student to the mesh, FSDPv2-style. bfloat16 applies to the frozen encoder and
        LLM only: trainable weights stay float32 (the optimizer's master copy)."""
        import torch_xla.distributed.spmd as xs

        if dtype == "bfloat16":  # weights only: buffers such as RoPE's inv_freq stay float32
            for p in [*model.llm.parameters(), *model.encoder.parameters()]:
                p.data = p.data.to(torch.bfloat16)
        model.to(self.device)
        for p in model.parameters():
            spec = _partition(p.shape, self.fsdp)
            if "fsdp" in spec:
                xs.mark_sharding(p, self.mesh, spec)
        layers = [*model.llm.base_model.layers, *model.encoder.layers, *model.qformer.layers]
        for layer in layers:
            layer.register_forward_hook(self._shard_output)
            xs.apply_backward_optimization_barrier(layer)
        for causal in (model.llm.base_model, model.qformer):
            causal.register_forward_pre_hook(_explicit_causal_mask, with_kwargs=True)
        if getattr(model, "activation_checkpointing", False):
            # torch.utils.checkpoint's recomputation would be merged back into the forward by XLA's common
            # subexpression elimination (no memory saved); torch_xla's own fences it with optimization
            # barriers. It is reentrant only, which works here: the LLM layers' inputs derive from the
            # trainable virtual tokens, so they require grad.
            from torch_xla.utils.checkpoint import checkpoint

            for module in model.llm.modules():
                if getattr(module, "gradient_checkpointing", False):
                    module._gradient_checkpointing_func = checkpoint
        return model

    def _shard_output(self, module: Any, args: Any, output: Any) -> None:
        """A layer's hidden states [B, T, d] stay split on the batch: GSPMD then gathers weights, not activations."""
        import torch_xla.distributed.spmd as xs

        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1:
            xs.mark_sharding(hidden, self.mesh, (BATCH_AXES,) + (None,) * (hidden.dim() - 1))

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This host's rows -> its slice of the global batch, split over (data, fsdp) on dim 0."""
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.spmd as xs

        out = {}
        for key, t in batch.items():
            if t.dim() not in self._specs:
                self._specs[t.dim()] = xs.ShardingSpec(self.mesh, (BATCH_AXES,) + (None,) * (t.dim() - 1),
                                                       minibatch=True)
            out[key] = xm.send_cpu_data_to_device(t, self.device, self._specs[t.dim()])[0]
        return out

    def init_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Create the optimizer state now, as device data, so that the first step compiles the same
        graph as every later one (and a checkpoint can load into it). One update with zero gradients
        at lr 0 creates it without moving any weight; the step counters go back to 0."""
        import torch_xla.distributed.spmd as xs

        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
                spec = _partition(p.shape, self.fsdp)
                if "fsdp" in spec:
                    xs.mark_sharding(p.grad, self.mesh, spec)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        for state in optimizer.state.values():
            if "step" in state:
                state["step"].zero_()
        self.sync()

    def loss_sums(self) -> torch.Tensor:
        """Device-side running sums (total, distill, align, truncated): read only after a sync."""
        return torch.zeros(4, dtype=torch.float32, device=self.device)

    def sync(self) -> None:
        """The step boundary: the whole step runs here as one compiled graph."""
        import torch_xla

        torch_xla.sync()

    @staticmethod
    def compilations() -> int:
        """XLA compilations so far in this process (persistent-cache hits included): flat from step 3 on."""
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str, model: Any, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], cfg: Any, rank: int) -> None:
        """Every host, collectively: its shards of the trainable weights and optimizer state (DCP);
        rank 0 also the full trainable weights (for export), the state and the RNG states."""
        import torch.distributed.checkpoint as dcp
        import torch_xla.core.xla_model as xm
        from safetensors.torch import save_file
        from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

        params = model.trainable_parameters()
        xm.wait_device_ops()  # the last step may still be running: its outputs are what we save
        weights = self._full_weights(params, rank)
        dcp.save({"model": params, "optim": optimizer.state_dict()}, storage_writer=dcp.FileSystemWriter(directory),
                 planner=SPMDSavePlanner())
        if rank == 0:
            save_file(weights, os.path.join(directory, WEIGHTS_FILE))
            torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "xla": xm.get_rng_state()}, os.path.join(directory, RNG_FILE))
            with open(os.path.join(directory, STATE_FILE), "w") as f:
                json.dump({"state": state, "config": cfg.to_dict()}, f, indent=2)

    @staticmethod
    def _full_weights(params: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor] | None:
        """Full CPU copies of the sharded weights, on rank 0: every host sends the shards it holds (one
        copy of each, replica 0) over the gloo group. Not `.cpu()`: on a sharded tensor that compiles and
        runs a replicating program, one per tensor (hundreds of compilations at the first checkpoint)."""
        from torch_xla.distributed.spmd import XLAShardedTensor

        mine = {}
        for name, p in params.items():
            mine[name] = [(tuple(shard.indices) if shard.indices is not Ellipsis else Ellipsis,
                           shard.data[tuple(slice(0, i.stop - i.start) for i in shard.indices)]
                           if shard.indices is not Ellipsis else shard.data)
                          for shard in XLAShardedTensor(p.detach()).local_shards if shard.replica_id == 0]
        parts = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object(mine, parts, dst=0)
        if rank != 0:
            return None
        full = {}
        for name, p in params.items():
            full[name] = torch.empty(p.shape, dtype=p.dtype)
            for part in parts:
                for index, data in part[name]:
                    full[name][index] = data
        return full

    def load_checkpoint(self, directory: str, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore in place: each host reads the shards it owns."""
        import torch.distributed.checkpoint as dcp
        import torch_xla.core.xla_model as xm
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

        if not os.path.exists(os.path.join(directory, ".metadata")):
            raise FileNotFoundError(f"{directory} is not an XLA (distributed) checkpoint: no .metadata; "
                                    "a checkpoint from another device cannot resume train.device=xla")
        if not optimizer.state:  # DCP loads in place: the optimizer state must exist (and be sharded) first
            self.init_optimizer(optimizer)
        target = {"model": model.trainable_parameters(), "optim": optimizer.state_dict()}
        dcp.load(target, storage_reader=dcp.FileSystemReader(directory), planner=SPMDLoadPlanner())
        optimizer.load_state_dict(target["optim"])
        rng = torch.load(os.path.join(directory, RNG_FILE), weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        xm.set_rng_state(rng["xla"])
        self.sync()
        with open(os.path.join(directory, STATE_FILE)) as f:
            return json.load(f)["state"]
