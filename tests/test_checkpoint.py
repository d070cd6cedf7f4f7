"""The one checkpoint format: safetensors + JSON, checksums verified, and no pickle ever opened."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_checkpoint

from pipeline import checkpoint as ckpt
from pipeline.backends import PlainBackend
from pipeline.config import load_config
from pipeline.export import ExportError, ModelDirError, export_checkpoint, load_model
from pipeline.step import make_optimizer


class Payload:
    """Unpickling this creates a file: the proof that a load path unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def student(cfg):
    from pipeline.model import build_student

    model = build_student(cfg)
    opt = make_optimizer(model.trainable_parameters(), cfg.train)
    model.queries.grad = torch.ones_like(model.queries)
    opt.step()
    return model, opt


@pytest.fixture
def checkpoint(student, cfg, tmp_path) -> Path:
    model, opt = student
    return write_checkpoint(tmp_path / "ck", model, cfg, step=4, optimizer=opt)


def fresh(cfg):
    from pipeline.model import build_student

    model = build_student(cfg, seed=9)
    return model, make_optimizer(model.trainable_parameters(), cfg.train)


def test_the_layout_is_safetensors_and_json_with_checksums(checkpoint):
    assert sorted(p.name for p in checkpoint.iterdir()) == ["checkpoint.json", "optimizer.safetensors",
                                                            "trainable.safetensors"]
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    assert (meta["format"], meta["version"], meta["layout"]) == ("diva-ray-checkpoint", 2, "full")
    assert meta["state"] == {"step": 4, "epoch": 0, "batch_in_epoch": 4, "world": 1}
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        assert meta["files"][name] == ckpt.sha256((checkpoint / name).read_bytes())
    assert [g["weight_decay"] for g in meta["optimizer"]["param_groups"]] == [0.1, 0.0]
    assert "queries" in meta["optimizer"]["param_groups"][0]["params"]  # param groups name their parameters


def test_rng_states_round_trip_through_json():
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.set_rng_state(state)
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "extra.pkl", "pytorch_model.bin", "notes.txt"])
def test_a_planted_pickle_is_refused_by_resume_and_export_and_never_unpickled(checkpoint, cfg, tmp_path, name):
    """The payload would create `marker` if anything unpickled it; `notes.txt` is a pickle under an innocent
    name, caught by its first bytes."""
    marker = tmp_path / "unpickled"
    (checkpoint / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ckpt.CheckpointError, match=f"refusing a checkpoint that holds '{name}'"):
        PlainBackend(cfg.train).load(ckpt.Checkpoint(str(checkpoint)), *fresh(cfg))
    with pytest.raises(ExportError, match=f"refusing a checkpoint that holds '{name}'"):
        export_checkpoint(str(checkpoint), str(tmp_path / "model"))
    assert not marker.exists()


def test_a_planted_pickle_in_a_model_directory_is_refused(checkpoint, tmp_path):
    model_dir = Path(export_checkpoint(str(checkpoint), str(tmp_path / "model")))
    marker = tmp_path / "unpickled"
    torch.save({"x": Payload(marker)}, model_dir / "pytorch_model.bin")
    shutil.copy(model_dir / "pytorch_model.bin", model_dir / "weights.data")  # torch.save's zip, renamed
    with pytest.raises(ModelDirError, match="refusing a model directory that holds 'pytorch_model.bin'"):
        load_model(str(model_dir))
    os.remove(model_dir / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match="'weights.data', whose first bytes are a pickle's"):
        load_model(str(model_dir))
    assert not marker.exists()


def test_a_safetensors_file_whose_header_length_reads_as_pickle_magic_is_not_refused(tmp_path):
    """A safetensors file opens with its header's length (u64, little-endian): 640 bytes read 0x80 0x02, a
    pickle's protocol-2 opening. The parser that reads it never unpickles, so it is not refused."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "weights-00000.safetensors"
    for pad in range(700):  # the metadata's length moves the header's
        save_file({"w": torch.zeros(2)}, str(path), metadata={"k": "a" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] in ckpt.PICKLE_MAGIC
    ckpt.refuse_pickles(str(tmp_path))
    assert torch.equal(load_file(str(path))["w"], torch.zeros(2))


def test_a_corrupt_or_truncated_file_fails_its_checksum(checkpoint, cfg):
    data = bytearray((checkpoint / "optimizer.safetensors").read_bytes())
    data[-5] ^= 0x01
    (checkpoint / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors: checksum mismatch"):
        PlainBackend(cfg.train).load(ckpt.Checkpoint(str(checkpoint)), *fresh(cfg))
    weights = checkpoint / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match="trainable.safetensors: checksum mismatch"):
        ckpt.Checkpoint(str(checkpoint)).weights()


def test_an_old_or_foreign_layout_is_refused_with_a_message(checkpoint, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(checkpoint / "trainable.safetensors", old)
    (old / "state.json").write_text(json.dumps({"state": {"step": 1}, "config": {}}))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint.json .an older layout"):
        ckpt.Checkpoint(str(old))
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    (checkpoint / "checkpoint.json").write_text(json.dumps(meta | {"version": 1}))
    with pytest.raises(ckpt.CheckpointError, match="expected 'diva-ray-checkpoint' v2"):
        ckpt.Checkpoint(str(checkpoint))
    (checkpoint / "checkpoint.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.json: not valid JSON"):
        ckpt.Checkpoint(str(checkpoint))
