"""Stage 1, prepare: a speech dataset -> Parquet shards of trimmed Whisper log-Mels + rejects.

The input is a CommonVoice release, Hugging Face Parquet or JSONL manifests (pipeline/layouts.py reads
each into the same selection of rows); everything below is the same for all of them.

Output layout (any fsspec URL):

    <out>/_plan.json          what this output is being made from (written first)
    <out>/mels/part-*.parquet one row per usable clip (MELS_SCHEMA)
    <out>/rejects/*.parquet   one row per clip or TSV row that could not be used (REJECTS_SCHEMA)
    <out>/manifest.json       written last: counts, config, versions, fingerprint

The per-clip work (`featurize_rows`) is pure and testable without Ray; `run_prepare` wraps it in a
streaming Ray Data pipeline. Resuming is by id: every complete output file's ids are done, the
rest is redone, so a crash at any point costs at most the files in flight.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import cache, features, layout, layouts
from pipeline import commonvoice as cv
from pipeline.config import Config, FeatureConfig, PrepareConfig

log = logging.getLogger(__name__)

KIND, MELS_DIR, REJECTS_DIR = layout.MELS_KIND, layout.MELS_DIR, layout.REJECTS_DIR
SCHEMA_VERSION = 1
# A clip whose decoded length is below this share of its header's frame count is truncated.
MIN_COMPLETE = 0.99

MELS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("sentence", pa.string()),
    ("path", pa.string()),
    *[(col, pa.string()) for col in cv.PASSTHROUGH],
    ("duration_s", pa.float32()),
    ("num_frames", pa.int32()),
    # float16 [n_mels, num_frames], row-major; see features.to_bytes / features.restore_row.
    ("mel", pa.binary()),
    ("mel_pad_value", pa.float32()),
])
REJECTS_SCHEMA = pa.schema([(c, pa.string()) for c in ("id", "split", "path", "source", "reason", "detail")])
# What featurize emits: a mels row, or a reject (mel null, reason set). `row`: a Parquet row's index in its file.
WORK_SCHEMA = pa.schema(list(MELS_SCHEMA) + [(c, pa.string()) for c in ("source", "reason", "detail")]
                        + [("row", pa.int64())])
PrepareError = layouts.PrepareError  # the input does not allow this run


def featurize_clip(row: dict[str, Any], data: bytes | str, fcfg: FeatureConfig, pcfg: PrepareConfig,
                   filters: Any = None) -> dict[str, Any]:
    """One index row + its clip (bytes, or a local path) -> a mels row, or the row with `reason` set."""
    out = {name: row.get(name) for name in WORK_SCHEMA.names}

    def rejected(reason: str, detail: str) -> dict[str, Any]:
        return out | {"reason": reason, "detail": detail, "mel": None}

    if not data or (isinstance(data, str) and os.path.getsize(data) == 0):
        return rejected(cv.EMPTY_FILE, "the clip file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = features.decode(data, fcfg.sampling_rate)
    except Exception as e:  # libsndfile raises several types for bad input; all mean the same here
        # Bytes (embedded in Parquet) are named by the row's source, not by the BytesIO's address.
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", str(row.get("source")), f"{type(e).__name__}: {e}")
        return rejected(cv.UNDECODABLE, detail[:300])
    audio, sr = decoded.audio, fcfg.sampling_rate
    duration = len(audio) / sr
    if len(audio) == 0:
        return rejected(cv.EMPTY_AUDIO, "the clip decodes to no samples")
    if decoded.complete < MIN_COMPLETE:
        declared = decoded.declared_frames / decoded.native_rate
        return rejected(cv.UNDECODABLE, f"truncated: decoded {duration:.2f} s of the {declared:.2f} s "
                                        "its header declares")
    if duration < pcfg.min_duration_s:
        return rejected(cv.TOO_SHORT, f"{duration:.3f} s < min_duration_s {pcfg.min_duration_s}")
    if len(audio) > pcfg.max_duration_s * sr:
        return rejected(cv.TOO_LONG, f"{duration:.2f} s > max_duration_s {pcfg.max_duration_s}")
    peak = float(np.abs(audio).max())
    if peak < pcfg.silence_peak:
        return rejected(cv.SILENT, f"peak amplitude {peak:.2e} < silence_peak {pcfg.silence_peak:.0e}")
    mel = features.log_mel(audio, fcfg, filters)
    return out | {
        "duration_s": duration,
        "num_frames": mel.num_frames,
        "mel": features.to_bytes(mel.frames),
        "mel_pad_value": mel.pad_value,
    }


def featurize_rows(rows: list[dict[str, Any]], clips_url: str, fcfg: FeatureConfig, pcfg: PrepareConfig,
                   filters: Any = None, audio_column: str | None = None) -> pa.Table:
    """Read and featurize a batch of rows; every input row comes back, usable or rejected.

    A row's `path` is relative to `clips_url`; a row with a `row` index has its audio embedded in that
    Parquet file's `audio_column`. Nothing is read for a row whose path resolves outside `clips_url`.
    """
    import torch

    torch.set_num_threads(1)  # one CPU per task: Ray Data parallelises across clips
    fs, root = cache.filesystem(clips_url)
    inside = os.path.realpath(root) + os.sep if cache.is_local(fs) else None
    escaped = [bool(inside) and not os.path.realpath(cache.join(root, r["path"])).startswith(inside) for r in rows]
    parquet = [r for r, out in zip(rows, escaped, strict=True) if not out and r.get("row") is not None]
    embedded = layouts.embedded_audio(fs, root, parquet, audio_column or "") if parquet else {}
    out: list[dict[str, Any]] = []
    for row, outside in zip(rows, escaped, strict=True):
        if outside:  # a symlink (or a parent) leading out
            out.append(_rejected(row, cv.BAD_ROW, f"{row['path']} resolves outside {clips_url}: not read"))
            continue
        data = embedded[(row["path"], row["row"])] if row.get("row") is not None else _clip(fs, root, row, clips_url)
        if data is None:
            out.append(_rejected(row, cv.MISSING_FILE, f"{row['source']}: no audio in column {audio_column!r}"))
        elif isinstance(data, Exception):
            out.append(_rejected(row, cv.UNDECODABLE, f"{row['path']}: {type(data).__name__}: {data}"[:300]))
        elif isinstance(data, dict):
            out.append(data)
        else:
            out.append(featurize_clip(row, data, fcfg, pcfg, filters))
    # Column-wise: several times cheaper than Table.from_pylist on rows of 100 KB blobs.
    return pa.table({f.name: pa.array([r.get(f.name) for r in out], f.type) for f in WORK_SCHEMA}, schema=WORK_SCHEMA)


def _rejected(row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {n: row.get(n) for n in WORK_SCHEMA.names} | {"reason": reason, "detail": detail, "mel": None}


def _clip(fs: Any, root: str, row: dict[str, Any], clips_url: str) -> bytes | str | dict[str, Any]:
    """A clip file's local path (libsndfile reads it directly, far cheaper than bytes through Python
    callbacks) or its bytes (remote: one request), or the reject if it is not there. A local path that is
    not a regular file (a directory, a FIFO that would block) is never opened."""
    path = cache.join(root, row["path"])
    missing = _rejected(row, cv.MISSING_FILE, f"{clips_url}/{row['path']} does not exist (as a regular file)")
    if cache.is_local(fs):
        return path if os.path.isfile(path) else missing
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError):
        return missing


def write_mels(fs: Any, path: str, table: pa.Table) -> None:
    # LZ4: float16 log-Mels gain only 10% more from zstd, at 1.6x the write time and slower reads.
    cache.write_parquet(fs, path, table, compression="lz4", row_group_size=256,
                        use_dictionary=[n for n in MELS_SCHEMA.names if n not in ("id", "mel")],
                        write_statistics=["id", "split", "duration_s", "num_frames"])


def plan_fingerprint(cfg: Config, src: layouts.Source) -> dict[str, Any]:
    """What the output's content depends on (file sizes and parallelism excluded). A CommonVoice plan
    keeps the content it has always had, so outputs made before other layouts existed still resume."""
    p = cfg.prepare
    content = {
        "schema_version": SCHEMA_VERSION,
        "features": cache.fingerprint_fields(cfg.features),
        "prepare": {k: getattr(p, k) for k in ("splits", "min_up_votes", "max_down_votes", "max_duration_s",
                                               "min_duration_s", "silence_peak", "limit")},
    }
    if src.layout == layouts.COMMONVOICE:
        content["tsv_sha256"] = src.selection.index_sha256
    else:
        content |= {"layout": src.options, "index_sha256": src.selection.index_sha256}
    return {"fingerprint": cache.fingerprint(content), "content": content}


def run_prepare(cfg: Config, input_url: str, output_url: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume, or confirm) stage 1. Returns the manifest."""
    import ray

    from pipeline.builders import check_features
    from pipeline.resources import task_retries

    check_features(cfg)  # before any work: the features must be the ones the run's Whisper reads
    t0 = time.time()
    pcfg = cfg.prepare
    src = layouts.load(input_url, pcfg)
    sel = src.selection
    plan = plan_fingerprint(cfg, src) | {"input": input_url}
    manifest = cache.begin(output_url, plan, (MELS_DIR, REJECTS_DIR), overwrite=overwrite)
    if manifest:
        log.info("%s is complete (%d clips); nothing to do", output_url, manifest["counts"]["clips"])
        return manifest
    fs, root = cache.filesystem(output_url)

    # Row-level rejects are recomputed each run (cheap, deterministic) and written whole.
    row_rejects = pa.Table.from_pylist(sel.rejects, schema=REJECTS_SCHEMA)
    cache.write_parquet(fs, cache.join(root, REJECTS_DIR, layout.ROW_REJECTS_FILE), row_rejects)

    done, removed = cache.done_ids(output_url, (MELS_DIR, REJECTS_DIR), skip=(layout.ROW_REJECTS_FILE,))
    for path in removed:
        log.warning("removed unfinished file %s (a previous run stopped while writing it)", path)
    todo = [r for r in sel.rows if r["id"] not in done]
    log.info("prepare (%s): %d clips selected, %d already done, %d to do; %d rows rejected from the index",
             src.layout, len(sel.rows), len(sel.rows) - len(todo), len(todo), len(sel.rejects))

    if todo:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        per_block = min(pcfg.rows_per_task, max(pcfg.batch_size, math.ceil(len(todo) / (4 * cpus))))
        in_schema = pa.schema([f for f in WORK_SCHEMA if f.name in todo[0]])
        todo_table = pa.Table.from_pylist(todo, schema=in_schema)
        blocks = [todo_table.slice(i, per_block) for i in range(0, len(todo), per_block)]
        clips_url, audio_column = src.audio_root, src.options.get("audio_column")
        fcfg = cfg.features
        bank = features.mel_filter_bank(fcfg)  # shipped with the tasks: workers never import librosa

        def featurize(batch: pa.Table) -> pa.Table:
            filters = features.sparse_filters(bank)
            return featurize_rows(batch.to_pylist(), clips_url, fcfg, pcfg, filters, audio_column)

        sink = cache.split_sink(output_url, plan["run_id"], pcfg.rows_per_file, MELS_DIR, MELS_SCHEMA,
                                REJECTS_DIR, REJECTS_SCHEMA, write_mels)
        # Ray Data reserves a share of the CPUs for each operator; for one map feeding one sink
        # that idles cores the decoder could use (half of them on a 2-CPU machine).
        ctx = ray.data.DataContext.get_current()
        reserving, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
        try:
            retries = task_retries(cfg.cluster)  # a task whose worker dies runs again
            ds = ray.data.from_arrow(blocks).map_batches(
                featurize, batch_size=pcfg.batch_size, batch_format="pyarrow", num_cpus=1, **retries)
            # Other resources than the map's keep Ray Data from fusing featurize into the write:
            # fused, `rows_per_file` rows would be bundled *before* decoding, into one serial task.
            ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.5, **retries})
        finally:
            ctx.op_resource_reservation_enabled = reserving

    manifest = finalize(cfg, output_url, plan, src)
    c = manifest["counts"]
    log.info("prepare: %d clips (%.2f h of audio) in %d files, %d rejects %s; %.1f s",
             c["clips"], c["audio_hours"], len(manifest["files"]["mels"]), c["rejects"],
             dict(c["rejects_by_reason"]), time.time() - t0)
    return manifest


def finalize(cfg: Config, output_url: str, plan: dict[str, Any], src: layouts.Source) -> dict[str, Any]:
    """Check the finished output (every selected row accounted for exactly once) and write the manifest."""
    fs, _ = cache.filesystem(output_url)
    sel = src.selection
    index = "tsv_sha256" if src.layout == layouts.COMMONVOICE else "index_sha256"
    out = cache.collect_outputs(output_url, MELS_DIR, REJECTS_DIR, (r["id"] for r in sel.rows),
                                write_good=write_mels, skip=(layout.ROW_REJECTS_FILE,))
    durations = cache.read_column(fs, out.good, "duration_s")
    return cache.write_manifest(output_url, {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": plan["fingerprint"],
        "source": {"input": plan["input"], "splits": cfg.prepare.splits, "layout": src.layout,
                   **src.options, index: sel.index_sha256},
        "config": {"features": cache.fingerprint_fields(cfg.features), "prepare": vars(cfg.prepare)},
        "versions": cache.versions("ray", "torch", "librosa", "soundfile", "pyarrow", "transformers"),
        "counts": {
            "clips": len(out.ids),
            "audio_hours": round(float(sum(durations)) / 3600, 4),
            "clips_by_split": dict(Counter(cache.read_column(fs, out.good, "split"))),
            "rejects": len(out.reject_ids),
            "rejects_by_reason": dict(Counter(cache.read_column(fs, out.rejects, "reason"))),
            "filtered": sel.filtered,
        },
        "files": out.files(),
    })
