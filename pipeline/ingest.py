"""The training stage's input: mels rows joined with their cached teacher targets, batched to static shapes.

`collate` is pure (numpy/torch, no Ray): rows -> fixed-shape tensors, so XLA compiles one graph.
`training_dataset` is the thin Ray Data wrapper: it checks that the two datasets belong together,
counts what does and does not join (on the driver, from the `id` columns alone), and returns a
lazy Dataset that reads, joins and (optionally) shuffles the rows when a trainer iterates it - or, for a
split of one join partition, the rows already joined on the driver and held in the object store.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline import cache
from pipeline.layout import MELS_DIR, MELS_KIND, REJECTS_DIR, TARGETS_DIR

if TYPE_CHECKING:
    import ray.data
    import torch

log = logging.getLogger(__name__)

MEL_COLUMNS = ["id", "mel", "mel_pad_value"]
TARGET_COLUMNS = ["id", "token_ids", "target"]
TOPK_COLUMNS = ["topk_ids", "topk_logprobs"]  # read when the training run uses the KL term (train.w_kl > 0)
RESPONSE_COLUMNS = ["response_ids", "response_target"]  # read when train.distill_positions > 1
# Bytes of input per join partition: about one Ray Data block (128 MiB), so a partition's join fits
# a reduce task's memory several times over.
PARTITION_BYTES = 128 * 2**20
# Bytes of input a shuffle's map task (the join's, the sort's) gathers before partitioning it. Ray Data's
# default (1 GiB) had one task hold the whole split up to that size, several copies of it while sorting: the
# ingest's memory grew with the corpus (benchmarks/bench_load.py). One join partition's worth bounds it.
SHUFFLE_BATCH_BYTES = PARTITION_BYTES
NO_ROW = "no_row"  # a clip with neither a target nor a teacher reject: the cache lacks it
_TARGET_DTYPES = ("bfloat16", "float16")
# With a shuffle seed, rows carry their place in the epoch (see `_shuffle`).
SHUFFLE_KEY = "shuffle_key"


# --- pure core ---------------------------------------------------------------------------------------------------


def collate(
    batch: dict[str, np.ndarray | list],
    *,
    n_mels: int,
    n_frames: int = 3000,
    num_queries: int = 448,
    target_dtype: str,
    distill_positions: int = 1,
) -> dict[str, torch.Tensor]:
    """Joined rows -> tensors whose shapes depend on the batch size alone (XLA compiles each shape once).

    `input_features` [B, n_mels, n_frames] float32 is `features.restore_row` of each row;
    `token_ids` [B, num_queries] int64 holds each transcript's first `num_queries` tokens, right-padded
    with 0; `lengths` [B] int64 is the ORIGINAL token count (not clipped), so the loss can count
    truncation and clamp it itself; `target` [B, H] float32 is `teacher.decode_target` of each row.
    Rows that carry the teacher's top-k (`topk_ids`, `topk_logprobs`) give them as [B, k] tensors.
    With `distill_positions` P > 1 (rows carry the teacher's response): `target` is [B, P, H], the states
    predicting response tokens 1..P, zero past a row's response; `target_mask` [B, P] float32 is 1 where a
    response token exists; `response_ids` [B, P - 1] int64 is the response's first P - 1 tokens (the
    student's teacher-forced inputs), right-padded with 0 (causal: padding reaches only masked positions).
    """
    import torch

    from pipeline.features import from_bytes

    if target_dtype not in _TARGET_DTYPES:
        raise ValueError(f"target_dtype must be one of {sorted(_TARGET_DTYPES)}, not {target_dtype!r}")
    mels, pads = batch["mel"], np.asarray(batch["mel_pad_value"], dtype=np.float32)
    ids = batch.get("id")
    size = len(mels)
    if not size:
        raise ValueError("an empty batch has no target size H")

    def row(i: int) -> str:
        return f"row {i}" + (f" ({ids[i]})" if ids is not None else "")

    # The padded buffer is written once: stored frames (float16 -> float32) then the pad value.
    features = np.empty((size, n_mels, n_frames), dtype=np.float32)
    for i, blob in enumerate(mels):
        if len(blob) % (2 * n_mels):
            raise ValueError(f"{row(i)}: mel has {len(blob)} bytes, not whole float16 frames of {n_mels} bins "
                             "(is n_mels the mels dataset's?)")
        frames = from_bytes(blob, n_mels)
        t = frames.shape[1]
        if t > n_frames:
            raise ValueError(f"{row(i)}: {t} stored frames exceed n_frames {n_frames}")
        features[i, :, :t] = frames
        features[i, :, t:] = pads[i]

    token_lists = [np.asarray(t, dtype=np.int64).reshape(-1) for t in batch["token_ids"]]
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=size)
    # Vectorised right-padding/truncation: gather position j of row i from the concatenated tokens
    # where j < min(length, num_queries), else 0. A trailing 0 keeps the gather in bounds when empty.
    flat = np.concatenate([*token_lists, np.zeros(1, dtype=np.int64)])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cols = np.arange(num_queries, dtype=np.int64)
    keep = cols[None, :] < np.minimum(lengths, num_queries)[:, None]
    token_ids = np.where(keep, flat[np.where(keep, starts[:, None] + cols[None, :], len(flat) - 1)], 0)

    out = {
        "input_features": torch.from_numpy(features),
        "token_ids": torch.from_numpy(np.ascontiguousarray(token_ids, dtype=np.int64)),
        "lengths": torch.from_numpy(lengths),
        "target": _decode_targets(list(batch["target"]), target_dtype),
    }
    if distill_positions > 1:
        out |= _response_positions(batch, distill_positions, out["target"].shape[1], target_dtype, row)
    if "topk_ids" in batch:  # the teacher's top-k next tokens, for the optional KL term: [B, k] each
        out["topk_ids"] = torch.from_numpy(np.stack([np.asarray(t, dtype=np.int64) for t in batch["topk_ids"]]))
        out["topk_logprobs"] = torch.from_numpy(
            np.stack([np.asarray(t, dtype=np.float32) for t in batch["topk_logprobs"]]))
    return out


def _decode_targets(blobs: list[bytes], target_dtype: str) -> torch.Tensor:
    """Equal-sized target blobs -> float32 [n, H]: exactly teacher.decode_target, for all rows at once (bf16
    has no numpy dtype)."""
    import torch

    widths = {len(b) for b in blobs}
    if len(widths) > 1:
        raise ValueError(f"targets of different sizes in one batch: {sorted(widths)} bytes")
    raw = np.frombuffer(b"".join(blobs), dtype=np.int16).reshape(len(blobs), -1).copy()
    return torch.from_numpy(raw).view(getattr(torch, target_dtype)).float()


def _response_positions(batch: dict[str, Any], positions: int, hidden: int, target_dtype: str,
                        row: Any) -> dict[str, torch.Tensor]:
    """`target` [B, P, H], `target_mask` [B, P] and `response_ids` [B, P - 1] from the response columns."""
    import torch

    if "response_ids" not in batch:
        raise ValueError(f"distill_positions={positions} needs the teacher's response columns "
                         "(a cache made with teacher.response_tokens > 0)")
    size = len(batch["response_ids"])
    target = torch.zeros(size, positions, hidden)
    mask = torch.zeros(size, positions)
    response_ids = torch.zeros(size, positions - 1, dtype=torch.long)
    for i, (ids, blob) in enumerate(zip(batch["response_ids"], batch["response_target"], strict=True)):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(blob) != 2 * hidden * len(ids) or not len(ids):
            raise ValueError(f"{row(i)}: response_target has {len(blob)} bytes for {len(ids)} response tokens "
                             f"of {hidden} values")
        n = min(len(ids), positions)
        target[i, :n] = _decode_targets([blob], target_dtype).view(len(ids), hidden)[:n]
        mask[i, :n] = 1.0
        m = min(len(ids), positions - 1)
        response_ids[i, :m] = torch.from_numpy(ids[:m])
    return {"target": target, "target_mask": mask, "response_ids": response_ids}


class Collate(NumpyBatchCollateFn):
    """`collate` with its settings bound, for `iter_torch_batches(collate_fn=Collate(...), device=...)`.

    Ray Data deprecates plain functions as collate_fn (2.47); a NumpyBatchCollateFn gets the same
    numpy batches. Picklable, so Ray Train workers can receive it.
    """

    def __init__(self, *, n_mels: int, n_frames: int = 3000, num_queries: int = 448, target_dtype: str,
                 keys: bool = False, distill_positions: int = 1):
        self.kwargs = {"n_mels": n_mels, "n_frames": n_frames, "num_queries": num_queries, "target_dtype": target_dtype,
                       "distill_positions": distill_positions}
        self.keys = keys

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = collate(batch, **self.kwargs)
        if self.keys:  # each clip's key, for the encoder cache (train.cache_encoder)
            import torch

            out["clip_key"] = torch.from_numpy(clip_keys(batch["id"]))
        return out


def clip_keys(ids: Iterable[str]) -> np.ndarray:
    """A clip's 63-bit key (blake2b of its id): what caches keyed by clip take as a tensor."""
    return shuffle_key(ids, seed=-1)


def shuffle_key(ids: Iterable[str], seed: int) -> np.ndarray:
    """A row's place in a shuffled epoch: 63 bits of blake2b(seed, id).

    A function of the seed and the id alone, so the order does not depend on how Ray Data happened
    to split, join or schedule the rows (which is what makes `random_shuffle(seed=...)` after a hash
    join irreproducible: its output depends on its input's block order).
    """
    salt = int(seed).to_bytes(16, "little", signed=True)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, salt=salt).digest(), "little") >> 1 for i in ids),
        dtype=np.int64,
    )


def shuffled_order(ids: Sequence[str], seed: int) -> list[str]:
    """The order in which a `training_dataset(..., shuffle_seed=seed)` epoch yields these ids."""
    keys = shuffle_key(ids, seed)
    return [ids[i] for i in sorted(range(len(ids)), key=lambda i: (keys[i], ids[i]))]


# --- Ray Data wrapper --------------------------------------------------------------------------------------------


def training_dataset(
    mels_url: str,
    teacher_url: str,
    *,
    expect: dict[str, Any] | None = None,
    split: str = "train",
    shuffle_seed: int | None = None,
    num_partitions: int | None = None,
    skip_missing_files: bool = False,
    topk: bool = False,
    positions: int = 1,
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """(Dataset of joined rows: id, mel, mel_pad_value, token_ids, target; what joined and what did not).

    Refuses (cache.DatasetError) an unfinished dataset, a teacher cache for another model/template
    than `expect` (`teacher.target_spec` of the caller's LLM) or made from another mels dataset, an
    unknown split, a split where nothing joins, and files a manifest lists that are gone - unless
    `skip_missing_files`: then their rows are left out and named in the counts. Rows are joined on `id`
    (Ray Data's hash join over `num_partitions`, default one per ~128 MiB of input; a split of one partition
    is read and joined at once on the driver, the same rows in the same order) and, with
    `shuffle_seed`, put in `shuffled_order` (the same in every execution): docs/design.md, "Ingest".
    `topk`: also the teacher's cached top-k columns (the KL term's targets). `positions` > 1: also the
    teacher's response columns, refusing a cache made with fewer response tokens (train.distill_positions).
    """
    mels, teacher = _opened(mels_url, teacher_url, expect, split, topk, positions)
    mel_files, mel_bytes, missing_mels = _listed_files(mels_url, MELS_DIR, mels["files"][MELS_DIR])
    target_files, target_bytes, missing_targets = _listed_files(teacher_url, TARGETS_DIR, teacher["files"][TARGETS_DIR])
    reject_files, _, _ = _listed_files(teacher_url, REJECTS_DIR, teacher["files"].get(REJECTS_DIR, []))
    missing = {"mels": missing_mels, "targets": missing_targets}
    if (missing_mels or missing_targets) and not skip_missing_files:
        raise cache.DatasetError(
            f"files listed in the manifests are gone: {_describe_missing(missing)}; re-run the stage that made "
            "them (delete its manifest.json first: the run then redoes only what is missing), or pass "
            "skip_missing_files to train without their rows")

    counts, mels_in_split = _count(mels_url, mel_files, teacher_url, target_files, reject_files, split)
    _check_join(counts, split, mels_url, teacher_url)
    share = mels_in_split / max(1, sum(mels["counts"]["clips_by_split"].values()))
    # What the split's rows weigh on disk (Parquet, compressed): the join's and the cache's yardstick.
    input_bytes = int(mel_bytes * share + target_bytes)
    if num_partitions is None:
        num_partitions = max(1, math.ceil(input_bytes / PARTITION_BYTES))
    info: dict[str, Any] = {
        "split": split,
        **counts,
        "missing_files": missing,
        "hidden_size": teacher["target"]["hidden_size"],
        # What `collate` needs from the data (add num_queries from the model config).
        "collate": {"n_mels": mels["config"]["features"]["n_mels"], "n_frames": _n_frames(mels["config"]["features"]),
                    "target_dtype": teacher["target"]["target_dtype"]},
        "mels_fingerprint": mels["fingerprint"],
        "target_fingerprint": teacher["target_fingerprint"],
        "shuffle_seed": shuffle_seed,
        "input_bytes": input_bytes,
        "num_partitions": num_partitions,
    }
    target_columns = TARGET_COLUMNS + (TOPK_COLUMNS if topk else []) + (RESPONSE_COLUMNS if positions > 1 else [])
    info["joined_on_driver"] = num_partitions == 1 and input_bytes <= PARTITION_BYTES
    if info["joined_on_driver"]:
        ds = _joined_on_driver(mels_url, mel_files, teacher_url, target_files, target_columns, split, shuffle_seed)
    else:
        with _shuffle_batches(SHUFFLE_BATCH_BYTES):
            left = _read_parquet(mels_url, mel_files, MEL_COLUMNS, [("split", "==", split)])
            right = _read_parquet(teacher_url, target_files, target_columns)
            ds = left.join(right, join_type="inner", num_partitions=num_partitions, on=("id",))
            if shuffle_seed is not None:
                ds = _shuffle(ds, shuffle_seed)
    log.info("ingest: %s split of %s joined with %s%s: %s", split, mels_url, teacher_url,
             " (on the driver)" if info["joined_on_driver"] else "", info["counts"])
    return ds, info


def _joined_on_driver(mels_url: str, mel_files: list[str], teacher_url: str, target_files: list[str],
                      target_columns: list[str], split: str, shuffle_seed: int | None) -> ray.data.Dataset:
    """The same rows in the same order as the Ray Data join (and sort), for a split of one join partition: read and
    joined here with pyarrow, then put in the object store. Ray Data's hash join starts its aggregator actors
    first: 13 s against 1.4 s here for 41 rows on 2 cores (benchmarks/bench_join.py)."""
    import ray.data

    left = _read_columns(mels_url, mel_files, MEL_COLUMNS, filters=[("split", "==", split)])
    right = _read_columns(teacher_url, target_files, target_columns)
    where = pc.index_in(left.column("id"), value_set=right.column("id").combine_chunks())  # ids are unique
    found = pc.is_valid(where)
    table = left.filter(found)
    picked = right.drop_columns(["id"]).take(where.filter(found))
    for name in picked.column_names:
        table = table.append_column(name, picked.column(name))
    if shuffle_seed is not None:
        table = table.append_column(SHUFFLE_KEY, pa.array(shuffle_key(table.column("id").to_pylist(), shuffle_seed)))
        table = table.take(pc.sort_indices(table, [(SHUFFLE_KEY, "ascending"), ("id", "ascending")]))
    return ray.data.from_arrow(table)


@contextlib.contextmanager
def _shuffle_batches(limit: int) -> Iterator[None]:
    """Datasets made inside copy the current DataContext: theirs batch shuffle input up to `limit` bytes
    (or less, if the caller's context already says so). The caller's context is left as it was."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.shuffle_input_batch_bytes
    if saved > limit:  # (<= 0: no batching at all, one task per block: already bounded)
        ctx.shuffle_input_batch_bytes = limit
    try:
        yield
    finally:
        ctx.shuffle_input_batch_bytes = saved


def _opened(mels_url: str, teacher_url: str, expect: dict[str, Any] | None, split: str,
            topk: bool, positions: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two manifests, refusing a pair that does not belong together or lacks what is asked for."""
    from pipeline.teacher import open_teacher

    mels = cache.check_manifest(mels_url, kind=MELS_KIND)
    teacher = open_teacher(teacher_url, expect)
    made_from = teacher["input"]["fingerprint"]
    if made_from != mels["fingerprint"]:
        raise cache.DatasetError(
            f"{teacher_url} holds targets made from another mels dataset ({teacher['input']['url']}, fingerprint "
            f"{made_from[:12]}) than {mels_url} (fingerprint {mels['fingerprint'][:12]}); run the teacher stage on "
            f"{mels_url}")
    if topk and not teacher["target"].get("top_k"):
        raise cache.DatasetError(f"{teacher_url} holds no top-k log-probs (made with teacher.top_k=0): the KL term "
                                 "(train.w_kl > 0) needs a cache made with teacher.top_k > 0")
    held = teacher.get("response_tokens", 0)
    if positions > 1 and held < positions:
        raise cache.DatasetError(f"{teacher_url} holds the teacher's states at {held} response position(s) (made "
                                 f"with teacher.response_tokens={held}): train.distill_positions={positions} needs a "
                                 f"cache made with teacher.response_tokens >= {positions}")
    splits = mels["source"]["splits"]
    if split not in splits:
        raise cache.DatasetError(f"{mels_url} has no split {split!r}; it holds {', '.join(splits)}")
    return mels, teacher


def _check_join(counts: dict[str, Any], split: str, mels_url: str, teacher_url: str) -> None:
    c = counts["counts"]
    if c["matched"] == 0:
        raise cache.DatasetError(f"nothing to train on: none of the {c['mels']} {split!r} clips in {mels_url} has a "
                                 f"target in {teacher_url} ({c['targets']} targets)")
    if c["mels_without_target"] or c["targets_without_mels"] > c["targets_in_other_splits"]:
        log.warning("ingest: %d of %d %r clips have no target %s; %d targets have no mels row at all",
                    c["mels_without_target"], c["mels"], split, counts["mels_without_target_by_reason"],
                    c["targets_without_mels"] - c["targets_in_other_splits"])


def _n_frames(features: dict[str, Any]) -> int:
    return features["chunk_length_s"] * features["sampling_rate"] // features["hop_length"]


def _listed_files(url: str, sub: str, names: list[str]) -> tuple[list[str], int, list[str]]:
    """(paths of the listed files that exist, their total bytes, listed names that do not) - one listing."""
    fs, root = cache.filesystem(url)
    directory = cache.join(root, sub)
    sizes = cache.file_sizes(fs, directory)
    present = [n for n in names if n in sizes]
    return ([cache.join(directory, n) for n in present], sum(sizes[n] for n in present),
            [n for n in names if n not in sizes])


def _describe_missing(missing: dict[str, list[str]]) -> str:
    return "; ".join(f"{len(names)} {kind} file(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                     for kind, names in missing.items() if names)


def _read_columns(url: str, paths: list[str], columns: list[str],
                  filters: list[tuple[str, str, Any]] | None = None) -> pa.Table:
    """Some columns of many Parquet files, read in parallel (one request per file matters on gs://)."""
    fs, _ = cache.filesystem(url)
    if not paths:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        tables = list(pool.map(lambda p: cache.read_parquet(fs, p, columns=columns, filters=filters), paths))
    return pa.concat_tables(tables)


def _count(mels_url: str, mel_files: list[str], teacher_url: str, target_files: list[str],
           reject_files: list[str], split: str) -> tuple[dict[str, Any], int]:
    """What joins and what does not, from the id columns alone (a few bytes per row)."""
    clips = _read_columns(mels_url, mel_files, ["id", "split"])
    clip_ids = clips.column("id").combine_chunks()
    targets = _read_columns(teacher_url, target_files, ["id"]).column("id").combine_chunks()
    rejects = _read_columns(teacher_url, reject_files, ["id", "reason"])
    for name, ids in (("mels", clip_ids), ("teacher", targets)):
        if pc.count_distinct(ids).as_py() != len(ids):
            seen = pc.value_counts(ids)
            dup = seen.field("values").filter(pc.greater(seen.field("counts"), 1))
            raise cache.DatasetError(f"the {name} dataset holds {len(dup)} id(s) more than once (e.g. "
                                     f"{dup[:3].to_pylist()}): the join would repeat their rows")
    in_split = clip_ids.filter(pc.equal(clips.column("split").combine_chunks(), split))
    joined = pc.is_in(in_split, value_set=targets)
    matched = pc.sum(joined).as_py() or 0
    # Why a clip has no target: the teacher's reject reason, or NO_ROW when the cache lacks it.
    lacking = in_split.filter(pc.invert(joined))
    where = pc.index_in(lacking, value_set=rejects.column("id").combine_chunks())
    reasons = pc.take(rejects.column("reason").combine_chunks(), where).to_pylist()
    targets_with_clip = pc.sum(pc.is_in(targets, value_set=clip_ids)).as_py() or 0
    counts = {
        "mels": len(in_split),
        "targets": len(targets),
        "matched": matched,
        "mels_without_target": len(in_split) - matched,
        "targets_without_mels": len(targets) - matched,
        # Of those, targets of clips in another split (expected) - the rest have no clip at all.
        "targets_in_other_splits": targets_with_clip - matched,
    }
    return ({"counts": counts,
             "mels_without_target_by_reason": dict(Counter(r or NO_ROW for r in reasons))}, len(in_split))


def _read_parquet(url: str, paths: list[str], columns: list[str],
                  filters: list[tuple[str, str, Any]] | None = None) -> ray.data.Dataset:
    """One Ray Data read task per file (files are sized by the stages' rows_per_file), via fsspec."""
    import ray.data

    fs, _ = cache.filesystem(url)

    def read(batch: pa.Table) -> Iterator[pa.Table]:
        for path in batch.column("path").to_pylist():
            yield cache.read_parquet(fs, path, columns=columns, filters=filters)

    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, len(paths))).map_batches(
        read, batch_size=1, batch_format="pyarrow")


def _shuffle(ds: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """Sort by `shuffle_key` (ties, never seen in practice, by id).

    The key column stays: dropping it would add a map after the sort, and a map's blocks come out
    in the order its tasks finish unless `preserve_order` is set - which Ray Train's DataConfig
    replaces with its own execution options. Nothing after the sort, nothing to reorder.
    """

    def add_key(batch: pa.Table) -> pa.Table:
        return batch.append_column(SHUFFLE_KEY, pa.array(shuffle_key(batch.column("id").to_pylist(), seed)))

    return ds.map_batches(add_key, batch_format="pyarrow", batch_size=None).sort([SHUFFLE_KEY, "id"])


def question_rows(mels_url: str, split: str) -> pa.Table:
    """A prepared split's id, sentence and log-Mel columns, for evaluating answers to its clips."""
    mels = cache.check_manifest(mels_url, kind=MELS_KIND)
    if split not in mels["source"]["splits"]:
        raise cache.DatasetError(f"{mels_url} has no split {split!r}; it holds {', '.join(mels['source']['splits'])}")
    files, _, missing = _listed_files(mels_url, MELS_DIR, mels["files"][MELS_DIR])
    if missing:
        raise cache.DatasetError(f"files listed in the manifest are gone: {_describe_missing({'mels': missing})}")
    table = _read_columns(mels_url, files, ["id", "split", "sentence", "mel", "mel_pad_value"])
    return table.filter(pc.equal(table.column("split"), split)).drop_columns(["split"]).sort_by("id")
