"""Stages 1 and 2 reading and writing gs:// through gcsfs, against the local GCS emulator."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline import cache
from pipeline.config import load_config
from pipeline.prepare import MELS_DIR, REJECTS_DIR, run_prepare
from pipeline.teacher import TARGETS_DIR, run_teacher

pytestmark = pytest.mark.slow


def test_prepare_and_teacher_on_gcs(ray_local, gcs, bucket, corpus, prepared_mels):
    fs = gcs.fs()
    fs.put(str(corpus), f"{bucket}/cv-en", recursive=True)
    fs.invalidate_cache()
    release, mels, teacher = f"gs://{bucket}/cv-en", f"gs://{bucket}/out/mels", f"gs://{bucket}/out/teacher"
    cfg = load_config("tiny")

    manifest = run_prepare(cfg, release, mels)
    local = cache.check_manifest(str(prepared_mels), kind="mels")
    # Same content as the local run: same plan fingerprint, same counts.
    assert manifest["fingerprint"] == local["fingerprint"]
    assert manifest["counts"] == local["counts"]
    fs.invalidate_cache()
    files = fs.find(f"{bucket}/out/mels/{MELS_DIR}")
    assert files and all(f.endswith(".parquet") for f in files)
    ids = sorted(i for f in files for i in pq.read_table(f, filesystem=fs, columns=["id"]).column("id").to_pylist())
    local_ids = sorted(r["id"] for f in (prepared_mels / MELS_DIR).glob("*.parquet")
                       for r in pq.read_table(f, columns=["id"]).to_pylist())
    assert ids == local_ids
    assert fs.find(f"{bucket}/out/mels/{REJECTS_DIR}")
    assert not [f for f in fs.find(f"{bucket}/out") if ".tmp-" in f]
    # A second run finds the output complete.
    assert run_prepare(cfg, release, mels) == manifest

    tm = run_teacher(cfg, mels, teacher)
    assert tm["counts"]["targets"] == manifest["counts"]["clips"]
    fs.invalidate_cache()
    assert fs.find(f"{bucket}/out/teacher/{TARGETS_DIR}")
    assert cache.check_manifest(teacher, kind="teacher")["fingerprint"] == tm["fingerprint"]
