"""Corrupted files stop a stage with one line naming the file and what is wrong, never a bare pyarrow or
Ray traceback: a truncated and a bit-flipped Parquet file in the mels dataset and in a teacher cache, a
hand-edited manifest, a truncated checkpoint file; jobs exit 1. Real local Ray, real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs._common import expected_error
from pipeline import cache
from pipeline.config import load_config
from pipeline.ingest import training_dataset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY_STARTED = "Started a local Ray instance"  # what ray.init logs when a job starts its own Ray


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def first_file(dataset: Path, sub: str, split: str | None = None) -> Path:
    """The first file in name order; with `split`, the first holding rows of that split (file names are random, and
    a reader filtering on the split skips a file whose statistics rule it out without reading its pages)."""
    files = sorted((dataset / sub).glob("*.parquet"))
    if split is not None:
        files = [f for f in files if split in pq.read_table(f, columns=["split"])["split"].to_pylist()]
    return files[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    """One bit in the middle of the file (its data pages): same size, other content."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    # The job ends on its one line, not on an uncaught exception (Ray may log the failed task above it).
    assert done.stderr.rstrip().splitlines()[-1] == errors[0], done.stderr[-3000:]
    return errors[0]


def test_a_truncated_mels_file_is_named_before_any_work(prepared_mels, tmp_path):
    mels = copy(prepared_mels, tmp_path / "mels")
    bad = first_file(mels, "mels")
    truncate(bad)
    done = job("jobs.cache_teacher", "--config", "tiny", "--mels", str(mels), "--output", str(tmp_path / "teacher"))
    line = one_error_line(done)
    assert bad.name in line and "truncated or replaced" in line and "written with" in line, line
    assert RAY_STARTED not in done.stderr, done.stderr[-3000:]  # the job checks its input before starting Ray
    assert not (tmp_path / "teacher" / "manifest.json").exists()


def test_a_bit_flipped_mels_file_is_named_when_read(ray_local, prepared_mels, teacher_cache, tmp_path):
    mels = copy(prepared_mels, tmp_path / "mels")
    bad = first_file(mels, "mels", split="train")  # the split training reads
    flip(bad)
    with pytest.raises(Exception) as err:  # noqa: PT011 - Ray may wrap it; what matters is the error inside
        training_dataset(str(mels), str(teacher_cache), num_partitions=2)[0].materialize()  # read by Ray Data
    inner = expected_error(err.value)
    assert isinstance(inner, cache.DatasetError), err.value
    assert bad.name in str(inner) and "not a readable Parquet file" in str(inner), inner


def test_a_corrupt_teacher_cache_stops_training_with_one_line(prepared_mels, teacher_cache, tmp_path):
    teacher = copy(teacher_cache, tmp_path / "teacher")
    bad = first_file(teacher, "targets")
    flip(bad)
    args = ("jobs.train", "--config", "tiny", "--mels", str(prepared_mels), "--teacher", str(teacher),
            "--output", str(tmp_path / "run"), "train.steps=1")
    done = job(*args)
    line = one_error_line(done)
    assert bad.name in line and "not a readable Parquet file" in line, line
    assert RAY_STARTED in done.stderr, done.stderr[-3000:]  # its sizes are intact: found by reading, on Ray
    truncate(bad)
    done = job(*args)
    line = one_error_line(done)
    assert bad.name in line and "truncated or replaced" in line, line
    assert RAY_STARTED not in done.stderr, done.stderr[-3000:]


def test_a_hand_edited_manifest_is_refused(prepared_mels, tmp_path):
    mels = copy(prepared_mels, tmp_path / "mels")
    path = mels / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["counts"]["clips"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(cache.DatasetError, match=r"manifest.json: its checksum does not match its content"):
        training_dataset(str(mels), str(mels))
    path.write_text(path.read_text()[:-20])
    with pytest.raises(cache.DatasetError, match=r"manifest.json: not valid JSON"):
        cache.check_manifest(str(mels), kind="mels")


def test_a_truncated_checkpoint_file_stops_export_with_one_line(tmp_path):
    from helpers import write_checkpoint

    from pipeline.model import build_student

    cfg = load_config("tiny")
    run = write_checkpoint(tmp_path / "ckpt", build_student(cfg, seed=0), cfg, step=3)
    truncate(run / "trainable.safetensors")
    line = one_error_line(job("jobs.export", "--checkpoint", str(run), "--output", str(tmp_path / "model")))
    assert "trainable.safetensors: checksum mismatch" in line, line
