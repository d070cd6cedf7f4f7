"""Training checkpoints: one format for every device, and no pickle anywhere on the way back in.

    <dir>/checkpoint.json            written last (its presence = complete): the format, the data position,
                                     the optimizer's param groups and non-tensor state, the RNG states, the
                                     run's config, and the sha256 of every other file
    <dir>/trainable.safetensors      the trainable weights, by parameter name
    <dir>/optimizer.safetensors      the optimizer's tensors, "<parameter name>/<key>" (AdamW: step, exp_avg, ...)
    <dir>/sharded/{weights,optimizer}-NNNNN.safetensors
                                     instead of the two above on torch_xla SPMD: each host's own shards
                                     (`<name>@<offsets>` keys), which `read_weights` assembles

The optimizer state is keyed by parameter name, as torch.distributed.checkpoint's
`get_optimizer_state_dict(full_state_dict=True)` gives it for plain and FSDP2 models alike, so any
checkpoint resumes any worker count and device (XLA reads the full format too). Reading refuses a
directory holding a pickle (by name, or by its first bytes) before it opens anything, and verifies
every file it reads against its checksum.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline import PipelineError, cache

log = logging.getLogger(__name__)

FORMAT, VERSION = "diva-ray-checkpoint", 2
META, WEIGHTS, OPTIMIZER, SHARDS_DIR = "checkpoint.json", "trainable.safetensors", "optimizer.safetensors", "sharded"
# Files that are (or usually are) pickles: torch.save, pickle, DCP's .metadata, PyTorch's .bin weights.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".distcp", ".metadata")
PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container (its data.pkl is a pickle)


class CheckpointError(PipelineError):
    """A checkpoint (or model directory) that is missing, incomplete, corrupt or unsafe to read."""


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Where a run is: optimizer steps done, and the data position: the epoch, and the micro-batches each of the
    `world` workers that wrote it had read into that epoch (None: a checkpoint from before the count was kept)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    world: int | None = None

    def skip(self, world: int) -> int:
        """Micro-batches each of `world` workers passes over to resume here: as many examples of the epoch in all as
        were read, so a run resumed on another worker count neither repeats nor leaves out part of the epoch
        (rounded down: a few repeat when the count does not divide). Which rows a worker reads is the split's."""
        return self.batch_in_epoch if self.world is None else self.batch_in_epoch * self.world // world


# --- safety -------------------------------------------------------------------------------------------


def refuse_pickles(url: str, what: str = "checkpoint") -> None:
    """Raise CheckpointError if `url` (a directory, searched recursively) holds a pickle file. Nothing is
    unpickled to decide: names first, then the first bytes of every other file but *.safetensors, which only
    the safetensors parser reads (it never unpickles) and whose first 8 bytes are its header's length, which
    can read as a pickle's opening bytes (a 640-byte header opens with 0x80 0x02)."""
    fs, root = cache.filesystem(url)
    for path in sorted(fs.find(root)):
        name = path.rsplit("/", 1)[-1]
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{url}: refusing a {what} that holds {name!r}, a pickle file by its name "
                                  "(loading it could run arbitrary code); only safetensors and JSON are read")
        if name.endswith(".safetensors"):
            continue
        with fs.open(path, "rb") as f:
            head = f.read(4)
        if head[:2] in PICKLE_MAGIC or head == ZIP_MAGIC:
            raise CheckpointError(f"{url}: refusing a {what} that holds {name!r}, whose first bytes are a pickle's "
                                  "(or torch.save's); only safetensors and JSON are read")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- RNG states as JSON ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy and Python RNG states, as JSON values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --- the optimizer state, flat ------------------------------------------------------------------------


def flatten_optimizer(osd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A name-keyed optimizer state dict -> (tensors "<name>/<key>", JSON: param groups and other values)."""
    tensors, scalars = {}, {}
    for name, entries in osd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach()  # moved to the host where it is written
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in meta["scalars"].items()}
    for key, value in tensors.items():
        name, _, entry = key.rpartition("/")
        state.setdefault(name, {})[entry] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- writing ----------------------------------------------------------------------------------------------


def write_tensors(directory: str, name: str, tensors: Mapping[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> str:
    """One safetensors file in a local directory; returns its sha256 (for the checkpoint's JSON)."""
    data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    path = os.path.join(directory, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return sha256(data)


def write_meta(directory: str, *, state: TrainState, config: Mapping[str, Any], optimizer: Mapping[str, Any],
               files: Mapping[str, str], layout: str = "full", extra: Mapping[str, Any] | None = None) -> None:
    """checkpoint.json, last: every other file is written and checksummed before it."""
    meta = {"format": FORMAT, "version": VERSION, "layout": layout, "state": dataclasses.asdict(state),
            "optimizer": optimizer, "rng": rng_state(), "files": dict(files), "config": dict(config),
            **(extra or {})}
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=1)


def write_full(directory: str, weights: Mapping[str, torch.Tensor], osd: Mapping[str, Any], state: TrainState,
               config: Mapping[str, Any]) -> None:
    """A whole checkpoint from full (unsharded) weights and a name-keyed optimizer state dict."""
    tensors, optimizer = flatten_optimizer(osd)
    files = {WEIGHTS: write_tensors(directory, WEIGHTS, weights),
             OPTIMIZER: write_tensors(directory, OPTIMIZER, tensors)}
    write_meta(directory, state=state, config=config, optimizer=optimizer, files=files)


# --- reading ----------------------------------------------------------------------------------------------


class Checkpoint:
    """A checkpoint directory (local or any fsspec URL) opened for reading: refused if it holds a pickle or
    is not in this format; every file read is checked against the checksum checkpoint.json records."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = cache.filesystem(url)
        if not self.fs.isdir(self.root):
            raise CheckpointError(f"{url}: no such checkpoint directory")
        refuse_pickles(url)
        self.meta = self._read_meta()
        self._checked: dict[str, bytes] = {}  # bytes `verify` checked, until their one read

    def _read_meta(self) -> dict[str, Any]:
        names = {p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)}
        if META not in names:
            old = " (an older layout: state.json + optimizer.pt; it cannot be resumed or exported)" \
                if "state.json" in names else ""
            raise CheckpointError(f"{self.url}: incomplete checkpoint: no {META}{old}")
        try:
            meta = json.loads(self.fs.cat_file(cache.join(self.root, META)))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.url}/{META}: not valid JSON ({exc})") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CheckpointError(f"{self.url}/{META}: format {meta.get('format')!r} v{meta.get('version')}, "
                                  f"expected {FORMAT!r} v{VERSION}")
        return meta

    @property
    def state(self) -> TrainState:
        return TrainState(**self.meta["state"])

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    @property
    def sharded(self) -> bool:
        return self.meta["layout"] == "sharded"

    def weight_files(self) -> dict[str, str]:
        """The files holding the trainable weights (not the optimizer's), name -> sha256."""
        return {k: v for k, v in self.meta["files"].items() if k == WEIGHTS or k.startswith(f"{SHARDS_DIR}/weights-")}

    def verified(self, name: str) -> bytes:
        """One of the files checkpoint.json lists, its bytes checked against the sha256 recorded there (or as
        `verify` checked and kept them: a file is read from storage once)."""
        if name in self._checked:
            return self._checked.pop(name)
        expected = self.meta["files"].get(name)
        if expected is None:
            raise CheckpointError(f"{self.url}: {name} is not one of the files {META} lists")
        try:
            data = self.fs.cat_file(cache.join(self.root, name))
        except FileNotFoundError:
            raise CheckpointError(f"{self.url}: incomplete checkpoint: {name} is missing") from None
        if sha256(data) != expected:
            raise CheckpointError(f"{self.url}/{name}: checksum mismatch (the file is truncated or corrupt)")
        return data

    def verify(self, weights_only: bool = False) -> Checkpoint:
        """Check every file (or only the weights') against its checksum before anything is loaded: a reader that
        must not stop half-way through loading (resume) or that may take an older checkpoint instead checks first."""
        for name in self.weight_files() if weights_only else self.meta["files"]:
            self._checked[name] = self.verified(name)
        return self

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """One of the checkpoint's safetensors files, verified."""
        data = self.verified(name)
        try:
            tensors = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types for a malformed header
            raise CheckpointError(f"{self.url}/{name}: not a readable safetensors file ({exc})") from None
        # Sorted: safetensors.load's order varies between processes, and ranks that load a state dict with
        # collectives (FSDP2) must walk it in the same order.
        return dict(sorted(tensors.items()))

    def _assembled(self, kind: str) -> dict[str, torch.Tensor]:
        """Full tensors from every host's shards of `kind` (weights or optimizer)."""
        names = sorted(n for n in self.meta["files"] if n.startswith(f"{SHARDS_DIR}/{kind}-"))
        shapes = self.meta["shapes"][kind]
        full = {k: torch.empty(shape, dtype=getattr(torch, dtype)) for k, (shape, dtype) in shapes.items()}
        for name in names:
            for key, data in self.tensors(name).items():
                tensor, _, offsets = key.rpartition("@")
                starts = [int(o) for o in offsets.split(",") if o]
                full[tensor][tuple(slice(o, o + n) for o, n in zip(starts, data.shape, strict=True))] = data
        return full

    def weights(self) -> dict[str, torch.Tensor]:
        """The full trainable weights, by parameter name."""
        return self._assembled("weights") if self.sharded else self.tensors(WEIGHTS)

    def optimizer(self) -> dict[str, Any]:
        """The name-keyed optimizer state dict (as get_optimizer_state_dict(full_state_dict=True) gives it)."""
        tensors = self._assembled("optimizer") if self.sharded else self.tensors(OPTIMIZER)
        return unflatten_optimizer(tensors, self.meta["optimizer"])

    def restore_rng(self) -> None:
        set_rng_state(self.meta["rng"])


def newest_intact(candidates: Sequence[tuple[int, str]], *, weights_only: bool = False) -> Checkpoint:
    """The newest of `candidates` ((step, URL), oldest first) that opens and whose files pass their checksums
    (`Checkpoint.verify`). A newer one that fails is skipped with a warning naming it and why, so a run whose
    last checkpoint was cut by a crash or a bad copy resumes or exports the one before it, saying so."""
    problems: list[str] = []
    for step, url in reversed(candidates):
        try:
            opened = Checkpoint(url).verify(weights_only)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s (step %d): %s", url, step, exc)
            problems.append(str(exc))
            continue
        if problems:
            log.warning("taking checkpoint %s (step %d), the newest that passes its checksums", url, step)
        return opened
    raise CheckpointError("no checkpoint passes its checksums: " + ("; ".join(problems) or "none given"))
