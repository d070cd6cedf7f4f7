"""Training on torch_xla SPMD (`train.device=xla`): a Ray Train backend that starts one process per TPU
host, and `XlaBackend`, the worker side behind pipeline.backends' interface: a ("data", "fsdp") mesh
over every chip of every host, FSDPv2-style sharding, per-host input shards, one compiled graph per
step, and checkpoints of each host's own shards. Why it is built this way: docs/design.md, "XLA".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.train.backend import Backend, BackendConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, XlaConfig
from pipeline.step import LossParts

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch dimension is split over both: data-parallel replicas x FSDP shards
ENV_PREFIX = "DIVA_XLA_"


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


class XlaBackend:
    """One host's torch_xla SPMD state (device, mesh, input shardings) behind pipeline.backends' interface."""

    def __init__(self, xcfg: XlaConfig, seed: int = 0, rank: int = 0, world: int = 1, dtype: str = "float32"):
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
        self.xcfg, self.rank, self.world, self.dtype = xcfg, rank, world, dtype
        self.device = torch_xla.device()
        self.build_device = torch.device("cpu")  # the student is built on the CPU, then sharded by setup()
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

    def setup(self, model: Any, dtype: str | None = None) -> Any:
        """Move the student to the mesh, FSDPv2-style. bfloat16 (`train.dtype`, or `dtype`) applies to the
        frozen encoder and LLM only: trainable weights stay float32 (the optimizer's master copy)."""
        import torch_xla.distributed.spmd as xs

        if (dtype or self.dtype) == "bfloat16":  # weights only: buffers such as RoPE's inv_freq stay float32
            for p in [*model.llm.parameters(), *model.encoder.parameters()]:
                p.data = p.data.to(torch.bfloat16)
        model.to(self.device)
        for p in model.parameters():
            self._mark(p)
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

    def _mark(self, t: torch.Tensor) -> None:
        """FSDPv2's placement of a weight (or its gradient, or its optimizer state)."""
        import torch_xla.distributed.spmd as xs

        spec = _partition(t.shape, self.fsdp)
        if "fsdp" in spec:
            xs.mark_sharding(t, self.mesh, spec)

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

    def _place(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A full CPU tensor onto the mesh with the sharding `like` has: the route setup() takes, so the
        compiled step graph stays valid."""
        t = full.to(like.dtype).to(self.device)
        self._mark(t)
        return t

    def init_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Create the optimizer state now, as device data, so that the first step compiles the same
        graph as every later one (and a checkpoint can load into it). One update with zero gradients
        at lr 0 creates it without moving any weight; the step counters go back to 0."""
        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
                self._mark(p.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        for state in optimizer.state.values():
            if "step" in state:
                state["step"].zero_()
        self.end_step()

    # -- the step --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        yield

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        pass  # GSPMD reduces them: the step is one program over the global batch

    def zeros(self) -> LossParts:
        """Device-side running sums: read only after the step's sync."""
        return LossParts.zeros(self.device, torch.float32)

    def reduce(self, parts: LossParts) -> LossParts:
        return parts  # already sums over the global batch

    def end_step(self) -> None:
        """The step boundary: the whole step runs here as one compiled graph."""
        import torch_xla

        torch_xla.sync()

    def metrics(self) -> dict[str, float]:
        return {"xla_compilations": self.compilations()}

    @staticmethod
    def compilations() -> int:
        """XLA compilations so far in this process (persistent-cache hits included): flat from step 3 on."""
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    # -- checkpoints ---------------------------------------------------------------------------------

    def save(self, directory: str, model: Any, optimizer: torch.optim.Optimizer, state: ckpt.TrainState,
             config: dict[str, Any]) -> bool:
        """Every host, collectively: its own shards of the weights and the optimizer state (no gathering);
        rank 0 also checkpoint.json, with every host's checksums. Every host reports its directory: Ray
        Train merges them into one checkpoint."""
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()  # the last step may still be running: its outputs are what we save
        params = model.trainable_parameters()
        tensors, meta = ckpt.flatten_optimizer(_named_optimizer_state(optimizer, params))
        names = [f"{ckpt.SHARDS_DIR}/{kind}-{self.rank:05d}.safetensors" for kind in ("weights", "optimizer")]
        digests = [ckpt.write_tensors(directory, names[0], _local_shards(params)),
                   ckpt.write_tensors(directory, names[1], _local_shards(tensors, whole=self.rank == 0))]
        files = self._gather_files(names, digests)
        if self.rank == 0:
            shapes = {"weights": _shapes(params), "optimizer": _shapes(tensors)}
            ckpt.write_meta(directory, state=state, config=config, optimizer=meta, files=files, layout="sharded",
                            extra={"shapes": shapes, "xla_rng": int(xm.get_rng_state())})
        return True

    def _gather_files(self, names: list[str], digests: list[str]) -> dict[str, str]:
        """{file: sha256} over every host: fixed-size digests through the gloo group (no pickled objects)."""
        mine = torch.tensor([list(bytes.fromhex(d)) for d in digests], dtype=torch.int32)
        every = [mine]
        if self.world > 1:
            every = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(every, mine)
        files = {}
        for rank, rows in enumerate(every):
            for name, row in zip(names, rows, strict=True):
                files[name.replace(f"-{self.rank:05d}.", f"-{rank:05d}.")] = bytes(row.tolist()).hex()
        return files

    def load(self, checkpoint: ckpt.Checkpoint, model: Any, optimizer: torch.optim.Optimizer) -> ckpt.TrainState:
        """Restore in place, each tensor with its own sharding, so the compiled step graph stays valid.
        Any checkpoint works: a sharded one's shards are assembled on each host."""
        import torch_xla.core.xla_model as xm

        if not optimizer.state:  # the state must exist (and be sharded) to take the saved values
            self.init_optimizer(optimizer)
        params = model.trainable_parameters()
        weights = checkpoint.weights()
        model.load_trainable(weights, check_only=True)
        osd = checkpoint.optimizer()
        for name, p in params.items():
            p.data = self._place(weights[name], p)
            for key, value in osd["state"][name].items():
                old = optimizer.state[p][key]
                optimizer.state[p][key] = self._place(value, old) if old.device.type == "xla" else value.to(old)
        for group, saved in zip(optimizer.param_groups, osd["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        checkpoint.restore_rng()
        if "xla_rng" in checkpoint.meta:
            xm.set_rng_state(checkpoint.meta["xla_rng"])
        self.end_step()
        return checkpoint.state


def _named_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """optimizer.state_dict() keyed by parameter name (get_optimizer_state_dict would copy every sharded
    tensor to the host whole)."""
    name_of = {id(p): name for name, p in params.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": {name_of[id(p)]: dict(st) for p, st in optimizer.state.items()}, "param_groups": groups}


def _local_shards(tensors: dict[str, torch.Tensor], whole: bool = True) -> dict[str, torch.Tensor]:
    """This host's shards of sharded device tensors (one copy each: replica 0), keyed "<name>@<offsets>";
    host tensors (AdamW's step counters) whole, from one host only (`whole`). Not `.cpu()`: on a sharded
    tensor that compiles and runs a replicating program, one per tensor."""
    from torch_xla.distributed.spmd import XLAShardedTensor

    out = {}
    for name, t in tensors.items():
        if t.device.type != "xla":
            if whole:
                out[f"{name}@{','.join(['0'] * t.dim())}"] = t.detach().cpu()
            continue
        for shard in XLAShardedTensor(t.detach()).local_shards:
            if shard.replica_id != 0:
                continue
            if shard.indices is Ellipsis:  # replicated: the whole tensor
                out[f"{name}@{','.join(['0'] * t.dim())}"] = shard.data
                continue
            offsets = ",".join(str(i.start) for i in shard.indices)
            out[f"{name}@{offsets}"] = shard.data[tuple(slice(0, i.stop - i.start) for i in shard.indices)]
    return out


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[list[int], str]]:
    return {k: (list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}
