"""Training input on a real local Ray: the join of mels and teacher targets, its counts, refusals,
static-shape collation, and a shuffle order that is a function of the seed alone."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import builders, cache, ingest, layout, prepare, teacher
from pipeline.config import FeatureConfig, load_config
from pipeline.features import restore_row
from pipeline.ingest import Collate, collate, shuffled_order, training_dataset
from pipeline.teacher import decode_target, encode_targets, run_teacher
from pipeline.template import derive_template

pytestmark = pytest.mark.slow
FEATURES = FeatureConfig()


def rows_of(directory: Path) -> list[dict]:
    return [r for f in sorted(directory.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def teacher_cache(prepared_mels, tmp_path_factory) -> Path:
    """Targets for the prepared corpus in several files (so that one can go missing); transcripts over
    30 tokens (4 train clips, 1 dev) are rejected, so that some clips have no target."""
    out = tmp_path_factory.mktemp("ingest") / "teacher"
    cfg = load_config("tiny", ["teacher.rows_per_file=16", "teacher.rows_per_call=16",
                               "teacher.max_transcript_tokens=30"])
    run_teacher(cfg, str(prepared_mels), str(out))
    assert len(list((out / teacher.TARGETS_DIR).glob("*.parquet"))) >= 2
    return out


@pytest.fixture(scope="module")
def sources(prepared_mels, teacher_cache) -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
    """(mels rows by id, target rows by id, teacher reject reasons by id), read straight from the files."""
    clips = {r["id"]: r for r in rows_of(prepared_mels / prepare.MELS_DIR)}
    targets = {r["id"]: r for r in rows_of(teacher_cache / teacher.TARGETS_DIR)}
    rejects = {r["id"]: r["reason"] for r in rows_of(teacher_cache / teacher.REJECTS_DIR)}
    return clips, targets, rejects


@pytest.fixture(scope="module")
def joined(prepared_mels, teacher_cache) -> tuple[list[dict], dict]:
    ds, info = training_dataset(str(prepared_mels), str(teacher_cache), split="train", num_partitions=2)
    return ds.take_all(), info


def test_layout_names_are_the_stages_own():
    assert (ingest.MELS_KIND, ingest.MELS_DIR) == (prepare.KIND, prepare.MELS_DIR) == (layout.MELS_KIND,
                                                                                          layout.MELS_DIR)
    assert (ingest.TARGETS_DIR, ingest.REJECTS_DIR) == (teacher.TARGETS_DIR, teacher.REJECTS_DIR)


def test_join_yields_exactly_the_ids_in_both(joined, sources):
    rows, info = joined
    clips, targets, rejects = sources
    train = {i for i, r in clips.items() if r["split"] == "train"}
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert set(ids) == train & targets.keys()
    rejected = train & rejects.keys()
    others = len(targets) - len(train & targets.keys())
    # Some train clips were rejected by the teacher; dev and test clips have targets that must not join.
    assert rejected and train - rejected <= targets.keys() and others > 0
    assert info["counts"] == {"mels": len(train), "targets": len(targets), "matched": len(train) - len(rejected),
                              "mels_without_target": len(rejected), "targets_without_mels": others,
                              "targets_in_other_splits": others}
    assert info["mels_without_target_by_reason"] == {teacher.TOO_LONG: len(rejected)}
    assert info["missing_files"] == {"mels": [], "targets": []}
    assert info["collate"] == {"n_mels": 128, "n_frames": 3000, "target_dtype": "float16"}
    assert info["hidden_size"] == 64 and info["num_partitions"] == 2
    for row in rows:
        assert set(row) == {"id", "mel", "mel_pad_value", "token_ids", "target"}
        clip, target = clips[row["id"]], targets[row["id"]]
        assert row["mel"] == clip["mel"] and row["mel_pad_value"] == clip["mel_pad_value"]
        assert row["target"] == target["target"] and list(row["token_ids"]) == target["token_ids"]


def as_batch(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in ("id", "mel", "mel_pad_value", "token_ids", "target")}


def test_collate_restores_features_and_targets_exactly(joined):
    rows, _ = joined
    rows = sorted(rows, key=lambda r: r["id"])[:6]
    out = collate(as_batch(rows), n_mels=128, target_dtype="float16")
    assert {k: (tuple(v.shape), v.dtype) for k, v in out.items()} == {
        "input_features": ((6, 128, 3000), torch.float32), "token_ids": ((6, 448), torch.int64),
        "lengths": ((6,), torch.int64), "target": ((6, 64), torch.float32)}
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(out["input_features"][i].numpy(),
                                      restore_row(row["mel"], row["mel_pad_value"], FEATURES))
        np.testing.assert_array_equal(out["target"][i].numpy(), decode_target(row["target"], "float16"))
        n = len(row["token_ids"])
        assert 0 < n < 448 and out["lengths"][i] == n
        assert out["token_ids"][i, :n].tolist() == list(row["token_ids"]) and not out["token_ids"][i, n:].any()


def test_collate_truncates_to_num_queries_and_keeps_the_true_length(joined):
    rows, _ = joined
    rows = sorted(rows, key=lambda r: r["id"])[:3]
    rows[1] = rows[1] | {"token_ids": [7, 9]}  # shorter than num_queries: padded
    rows[2] = rows[2] | {"token_ids": np.array([], dtype=np.int32)}  # none at all
    out = collate(as_batch(rows), n_mels=128, num_queries=4, target_dtype="float16")
    assert len(rows[0]["token_ids"]) > 4
    assert out["token_ids"].tolist() == [list(rows[0]["token_ids"][:4]), [7, 9, 0, 0], [0, 0, 0, 0]]
    assert out["lengths"].tolist() == [len(rows[0]["token_ids"]), 2, 0]


def test_collate_decodes_bfloat16_targets_and_names_bad_rows(joined):
    rows, _ = joined
    rows = sorted(rows, key=lambda r: r["id"])[:2]
    hidden = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32) * 50
    blobs = encode_targets(hidden, "bfloat16")
    out = collate(as_batch(rows) | {"target": blobs}, n_mels=128, target_dtype="bfloat16")
    np.testing.assert_array_equal(out["target"].numpy(), np.stack([decode_target(b, "bfloat16") for b in blobs]))
    assert len(rows[0]["mel"]) % (2 * 127)
    with pytest.raises(ValueError, match=f"row 0 \\({rows[0]['id']}\\): mel has .* bytes, not whole float16 frames"):
        collate(as_batch(rows), n_mels=127, target_dtype="float16")
    with pytest.raises(ValueError, match="stored frames exceed n_frames 10"):
        collate(as_batch(rows), n_mels=128, n_frames=10, target_dtype="float16")
    with pytest.raises(ValueError, match="target_dtype must be one of"):
        collate(as_batch(rows), n_mels=128, target_dtype="float32")


def test_batches_have_static_shapes_and_the_seed_fixes_the_order(prepared_mels, teacher_cache, joined, gcs, bucket):
    """On gs:// (the local GCS emulator): Ray Data's tasks read through gcsfs, as every stage does."""
    rows, _ = joined
    fs = gcs.fs()
    fs.put(str(prepared_mels), f"{bucket}/mels", recursive=True)
    fs.put(str(teacher_cache), f"{bucket}/teacher", recursive=True)
    fs.invalidate_cache()
    ds, info = training_dataset(f"gs://{bucket}/mels", f"gs://{bucket}/teacher", shuffle_seed=7, num_partitions=2)
    # Clips are told apart by their restored features (their transcripts, hence targets, may repeat).
    by_features = {hashlib.sha256(restore_row(r["mel"], r["mel_pad_value"], FEATURES).tobytes()).hexdigest(): r["id"]
                   for r in rows}
    assert len(by_features) == len(rows)
    shapes, order = set(), []
    for batch in ds.iter_torch_batches(batch_size=4, drop_last=True, collate_fn=Collate(**info["collate"])):
        shapes.add(tuple((k, tuple(v.shape), v.dtype) for k, v in batch.items()))
        order += [by_features[hashlib.sha256(f.numpy().tobytes()).hexdigest()] for f in batch["input_features"]]
    assert shapes == {(("input_features", (4, 128, 3000), torch.float32), ("token_ids", (4, 448), torch.int64),
                       ("lengths", (4,), torch.int64), ("target", (4, 64), torch.float32))}
    ids = sorted(r["id"] for r in rows)
    assert len(order) == len(ids) // 4 * 4
    # The epoch's order is a function of the seed and the ids alone: the same in every execution.
    assert order == shuffled_order(ids, 7)[: len(order)]
    assert shuffled_order(ids, 7) != shuffled_order(ids, 8) and sorted(shuffled_order(ids, 8)) == ids
    assert shuffled_order(ids, 7) != ids


def test_a_split_of_one_partition_is_joined_on_the_driver_into_the_same_rows(prepared_mels, teacher_cache, joined):
    """Below one join partition the rows are joined on the driver (no Ray Data join), already in the object store:
    every column of every row equals Ray Data's join (the `joined` fixture, two partitions), and the seeded order
    is `shuffled_order`, as the Ray Data sort's is (test_batches_have_static_shapes_and_the_seed_fixes_the_order)."""
    from ray.data.dataset import MaterializedDataset

    by_ray, ray_info = joined
    for seed in (None, 7):
        ds, info = training_dataset(str(prepared_mels), str(teacher_cache), split="train", shuffle_seed=seed)
        assert info["joined_on_driver"] and not ray_info["joined_on_driver"] and isinstance(ds, MaterializedDataset)
        here = pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None)).to_pylist()
        if seed is not None:
            assert [r["id"] for r in here] == shuffled_order(sorted(r["id"] for r in here), seed)
            assert {r.pop(ingest.SHUFFLE_KEY) for r in here} == set(ingest.shuffle_key([r["id"] for r in here], seed))
        key = lambda row: row["id"]  # noqa: E731 - the join alone promises no order
        assert sorted(here, key=key) == sorted(({k: _plain(v) for k, v in r.items()} for r in by_ray), key=key)


def _plain(value: Any) -> Any:
    """A value of `Dataset.take_all` (numpy for list columns) as pyarrow's to_pylist gives it."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def test_shuffles_gather_at_most_one_partition(prepared_mels, teacher_cache):
    """The join's and the sort's map tasks gather at most SHUFFLE_BATCH_BYTES of input each (Ray Data's 1 GiB
    default had one task hold the whole split: memory grew with the corpus, benchmarks/bench_load.py); the
    caller's DataContext is left as it was."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.shuffle_input_batch_bytes
    ds, _ = training_dataset(str(prepared_mels), str(teacher_cache), split="train", shuffle_seed=0, num_partitions=2)
    assert ds.context.shuffle_input_batch_bytes == ingest.SHUFFLE_BATCH_BYTES < before
    assert ctx.shuffle_input_batch_bytes == before


def test_missing_files_are_refused_or_counted(prepared_mels, teacher_cache, sources, tmp_path):
    clips, targets, rejects = sources
    mels, cached = tmp_path / "mels", tmp_path / "teacher"
    shutil.copytree(prepared_mels, mels)
    shutil.copytree(teacher_cache, cached)
    # A targets file holding train clips, and a mels file, vanish; the manifests still list them.
    train = {i for i, r in clips.items() if r["split"] == "train"}
    def ids(f: Path) -> set[str]:
        return set(pq.read_table(f, columns=["id"]).column("id").to_pylist())

    target_file = max(sorted((cached / teacher.TARGETS_DIR).glob("*.parquet")), key=lambda f: len(ids(f) & train))
    lost_targets = ids(target_file)
    mel_file = min(sorted((mels / prepare.MELS_DIR).glob("*.parquet")), key=lambda f: len(ids(f) & lost_targets))
    lost_clips = ids(mel_file)
    target_file.unlink()
    mel_file.unlink()

    with pytest.raises(cache.DatasetError, match=f"1 mels file\\(s\\) \\({mel_file.name}\\); 1 targets file\\(s\\) "
                                                 f"\\({target_file.name}\\).*skip_missing_files"):
        training_dataset(str(mels), str(cached))

    ds, info = training_dataset(str(mels), str(cached), skip_missing_files=True)
    in_split = train - lost_clips
    kept = targets.keys() - lost_targets
    expected = in_split & kept
    assert in_split & lost_targets and kept - clips.keys() == set()  # some train clips lost their target
    assert info["missing_files"] == {"mels": [mel_file.name], "targets": [target_file.name]}
    assert info["counts"] == {
        "mels": len(in_split), "targets": len(kept), "matched": len(expected),
        "mels_without_target": len(in_split - kept), "targets_without_mels": len(kept) - len(expected),
        # Targets of clips whose file vanished have no clip at all; only the rest are "other split".
        "targets_in_other_splits": len((kept & (clips.keys() - lost_clips)) - expected)}
    assert info["counts"]["targets_without_mels"] > info["counts"]["targets_in_other_splits"]
    assert info["mels_without_target_by_reason"] == {teacher.TOO_LONG: len(in_split & rejects.keys()),
                                                     ingest.NO_ROW: len(in_split & lost_targets)}
    assert sorted(r["id"] for r in ds.take_all()) == sorted(expected)


def edit_manifest(directory: Path, edit) -> None:
    """Make the manifest another run's (checksum included: a hand edit alone is refused as such)."""
    path = directory / cache.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest["checksum"] = cache.manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


def test_mismatched_datasets_are_refused_with_the_reason(prepared_mels, teacher_cache, tmp_path):
    other = tmp_path / "teacher"
    shutil.copytree(teacher_cache, other)
    edit_manifest(other, lambda m: m["input"].update(fingerprint="f" * 64, url="/elsewhere/mels"))
    with pytest.raises(cache.DatasetError, match=r"targets made from another mels dataset \(/elsewhere/mels, "
                                                 r"fingerprint ffffffffffff\) than .* run the teacher stage on"):
        training_dataset(str(prepared_mels), str(other))

    tok = builders.load_tokenizer(load_config("tiny").teacher)
    expect = teacher.target_spec(load_config("tiny", ["teacher.tiny_seed=1"]).teacher, tok, derive_template(tok))
    with pytest.raises(cache.DatasetError, match="another model/template.*revision"):
        training_dataset(str(prepared_mels), str(teacher_cache), expect=expect)
    with pytest.raises(cache.DatasetError, match="no split 'validated'; it holds train, dev, test"):
        training_dataset(str(prepared_mels), str(teacher_cache), split="validated")
    with pytest.raises(cache.DatasetError, match="a 'mels' dataset, expected 'teacher'"):
        training_dataset(str(prepared_mels), str(prepared_mels))
    (other / cache.MANIFEST).unlink()
    with pytest.raises(cache.DatasetError, match="not a finished dataset"):
        training_dataset(str(prepared_mels), str(other))
