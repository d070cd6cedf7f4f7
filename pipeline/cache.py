"""Datasets on any fsspec URL: manifests, fingerprints, and the file checks that make stages resumable.

Every stage writes a directory of Parquet files plus `manifest.json`, written last: its presence
means the dataset is complete. A run records its plan (source + config fingerprint) in
`_plan.json` first, so a re-run into the same directory can tell "resume my own work" from
"overwrite someone else's". A Parquet file is complete iff its footer reads: a crash mid-write
leaves a footer-less file, which a resume deletes and redoes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import PipelineError, __version__
from pipeline.layout import MANIFEST, PLAN

log = logging.getLogger(__name__)


class DatasetError(PipelineError):
    """A dataset that is missing, incomplete, or made by something other than what was asked for."""


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a local path, `file://` or `gs://` URL."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def fingerprint(obj: Any) -> str:
    """sha256 of canonical JSON: equal for equal content, whatever the key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_fields(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain data, for manifests and fingerprints."""
    return dataclasses.asdict(obj)


def versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("pipeline", *packages):
        if name == "pipeline":
            out[name] = __version__
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: dict[str, Any]) -> None:
    """Write whole or not at all: object stores publish an upload only when it completes, and on
    a POSIX filesystem we write a temporary file and rename it."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, **kwargs: Any) -> None:
    """One Parquet file, published whole (see `write_json`), with a CRC per page: `read_parquet` then names a
    file whose bytes changed after it was written (a bad disk, an interrupted copy) instead of decoding them."""
    kwargs.setdefault("compression", "zstd")
    kwargs.setdefault("write_page_checksum", True)
    if is_local(fs):
        tmp = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}"
        pq.write_table(table, tmp, filesystem=fs, **kwargs)
        fs.mv(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs, **kwargs)


# What to do about a damaged dataset file (stages resume by id, so only its rows are redone).
REDO = ("delete it and the dataset's manifest.json, then re-run the stage that wrote it: the run redoes only the "
        "rows that are missing")


def file_sizes(fs: fsspec.AbstractFileSystem, directory: str) -> dict[str, int]:
    """Name -> bytes of the files in `directory` (one fresh listing; empty when it does not exist)."""
    fs.invalidate_cache(directory)
    if not fs.exists(directory):
        return {}
    return {posixpath.basename(e["name"]): e["size"] for e in fs.ls(directory, detail=True)}


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, **kwargs: Any) -> pa.Table:
    """pq.read_table with the pages' CRCs verified, and any failure as one DatasetError naming the file."""
    try:
        return pq.read_table(path, filesystem=fs, page_checksum_verification=True, **kwargs)
    except (OSError, pa.ArrowException) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise DatasetError(f"{path}: not a readable Parquet file ({first}): it is truncated or corrupt; {REDO}") \
            from None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def parquet_files(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    """Sorted Parquet files directly in `directory` (temporary and hidden files excluded)."""
    fs.invalidate_cache(directory)
    if not fs.exists(directory):
        return []
    names = fs.ls(directory, detail=False)
    return sorted(p for p in names if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))


def drop_temporaries(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    """Delete the temporary files of local writes that never reached their rename (`write_parquet`): a writer
    killed mid-write leaves one, and Ray retries its task under another name. Returns what was deleted."""
    fs.invalidate_cache(directory)
    if not fs.exists(directory):
        return []
    removed = []
    for path in sorted(p for p in fs.ls(directory, detail=False) if ".tmp-" in posixpath.basename(p)):
        try:
            fs.rm(path)
        except FileNotFoundError:  # its writer renamed it meanwhile (a stale writer of a killed run)
            continue
        removed.append(path)
    return removed


def drop_incomplete(fs: fsspec.AbstractFileSystem, directory: str) -> tuple[list[str], list[str]]:
    """Delete files a crash left unfinished (unreadable footers, stray temporaries).

    Returns (complete files, deleted files).
    """
    complete, deleted = [], drop_temporaries(fs, directory)
    if not fs.exists(directory):
        return complete, deleted
    for path in sorted(fs.ls(directory, detail=False)):
        name = posixpath.basename(path)
        if not name.endswith(".parquet"):
            continue
        try:
            pq.read_metadata(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid):
            fs.rm(path)
            deleted.append(path)
            continue
        complete.append(path)
    return complete, deleted


def read_column(fs: fsspec.AbstractFileSystem, files: list[str], column: str) -> list[Any]:
    """One column of many Parquet files, in file order (cheap: Parquet reads only that column)."""
    values: list[Any] = []
    for path in files:
        values.extend(read_parquet(fs, path, columns=[column]).column(column).to_pylist())
    return values


def check_manifest(url: str, *, kind: str, fingerprint_: str | None = None) -> dict[str, Any]:
    """Open a finished dataset's manifest, refusing an unfinished one or one of another kind."""
    fs, root = filesystem(url)
    try:
        manifest = read_json(fs, join(root, MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{join(root, MANIFEST)}: not valid JSON ({exc}): damaged or edited by hand; re-run "
                           "the stage that wrote it (it confirms or redoes what is there)") from None
    if manifest is None:
        hint = " (a run into it has not finished: re-run it to resume)" if fs.exists(join(root, PLAN)) else ""
        raise DatasetError(f"{url}: no {MANIFEST}; not a finished dataset{hint}")
    if manifest.get("kind") != kind:
        raise DatasetError(f"{url}: a {manifest.get('kind')!r} dataset, expected {kind!r}")
    _check_integrity(url, fs, root, manifest)
    if fingerprint_ is not None and manifest.get("fingerprint") != fingerprint_:
        raise DatasetError(
            f"{url}: fingerprint {manifest.get('fingerprint', '')[:12]} differs from the expected "
            f"{fingerprint_[:12]}"
        )
    return manifest


def _check_integrity(url: str, fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any]) -> None:
    """The manifest is the one the stage wrote (its checksum), and each listed file that is there has the size
    it had then (a truncated copy is caught here, by name, before a reader decodes it). Files that are gone are
    the readers' to report (training can skip them). Manifests from before checksums pass."""
    recorded = manifest.get("checksum")
    if recorded is not None and recorded != manifest_checksum(manifest):
        raise DatasetError(f"{join(root, MANIFEST)}: its checksum does not match its content: edited by hand or "
                           "damaged; re-run the stage that wrote it (it confirms or redoes what is there)")
    for sub, sizes in manifest.get("sizes", {}).items():
        found = file_sizes(fs, join(root, sub))
        for name, size in sizes.items():
            if name in found and found[name] != size:
                raise DatasetError(f"{url}/{sub}/{name}: {found[name]} bytes, but it was written with {size}: "
                                   f"truncated or replaced; {REDO}")


def manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def describe_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two nested dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def begin(output_url: str, plan: dict[str, Any], subdirs: tuple[str, ...], *,
          overwrite: bool = False) -> dict[str, Any] | None:
    """Start, resume or confirm a run writing `output_url`; `plan` = {"fingerprint", "content", ...}.

    Returns the manifest if the output is already complete for this plan (nothing to do), else
    None after recording the plan under a new `plan["run_id"]`. Refuses an output begun under
    another plan, naming what differs.
    """
    fs, root = filesystem(output_url)
    if overwrite and fs.exists(root):
        fs.rm(root, recursive=True)
    old = read_json(fs, join(root, PLAN))
    if old and old["fingerprint"] != plan["fingerprint"]:
        diff = describe_diff(old.get("content", {}), plan.get("content", {}))
        raise DatasetError(f"{output_url} holds output of another plan ({'; '.join(diff) or 'fingerprint differs'}); "
                           "choose a new output or pass --overwrite")
    manifest = read_json(fs, join(root, MANIFEST))
    if manifest and manifest.get("fingerprint") == plan["fingerprint"]:
        return manifest
    for sub in subdirs:
        fs.makedirs(join(root, sub), exist_ok=True)
    # A fencing token: writers of an earlier, killed run of this plan may outlive their driver for
    # a moment; they check it before publishing and step aside (see split_sink).
    plan["run_id"] = uuid.uuid4().hex
    write_json(fs, join(root, PLAN), plan)
    return None


def drop_duplicate_rows(fs: fsspec.AbstractFileSystem, files: list[str], write: Any = None) -> int:
    """Remove rows whose id an earlier file in `files` already holds; returns how many.

    A stale writer of a killed run can still publish a file just as a resumed run starts. The
    work is deterministic, so both copies of a row are equal: keeping the first loses nothing.
    """
    import pyarrow.compute as pc

    write = write or write_parquet
    seen: set[str] = set()
    removed = 0
    for path in files:
        ids = read_column(fs, [path], "id")
        dup = sorted(set(ids) & seen)
        if dup:
            table = pq.read_table(path, filesystem=fs)
            kept = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(dup, pa.string()))))
            if kept.num_rows:
                write(fs, path, kept)
            else:
                fs.rm(path)
            removed += table.num_rows - kept.num_rows
        seen.update(ids)
    return removed


def done_ids(output_url: str, subdirs: tuple[str, ...], *, skip: tuple[str, ...] = ()) -> tuple[set[str], list[str]]:
    """Ids already written by complete files (after deleting unfinished ones), and what was deleted.

    Files named in `skip` are not results of the per-row work (e.g. a table of TSV-row rejects).
    """
    fs, root = filesystem(output_url)
    done: set[str] = set()
    removed: list[str] = []
    for sub in subdirs:
        complete, deleted = drop_incomplete(fs, join(root, sub))
        removed += deleted
        done.update(read_column(fs, [f for f in complete if posixpath.basename(f) not in skip], "id"))
    return done, removed


def split_results(table: pa.Table, good_schema: pa.Schema, reject_schema: pa.Schema) -> tuple[pa.Table, pa.Table]:
    """Per-row work output -> (result rows, reject rows): a row is a reject iff `reason` is set."""
    import pyarrow.compute as pc

    bad = table.column("reason").is_valid()
    good = table.filter(pc.invert(bad)).select(good_schema.names).cast(good_schema)
    return good, table.filter(bad).select(reject_schema.names).cast(reject_schema)


def split_sink(output_url: str, run_id: str, rows_per_file: int, good_dir: str, good_schema: pa.Schema,
               reject_dir: str, reject_schema: pa.Schema, write_good: Any = None):
    """A Ray Data Datasink for per-row work whose rows are results or rejects (`reason` set).

    Each write task gets >= rows_per_file rows and publishes one results file and, if any, one
    rejects file under the same random name. Rejects go first: dying between the two only means
    the results are redone. A task whose run is no longer the output's current run (`run_id`
    in `_plan.json`) publishes nothing.
    """
    from ray.data import Datasink

    write_good = write_good or write_parquet

    class SplitSink(Datasink):
        @property
        def min_rows_per_write(self) -> int:
            return rows_per_file

        def write(self, blocks, ctx) -> dict[str, int]:
            table = pa.concat_tables([b if isinstance(b, pa.Table) else pa.table(b) for b in blocks])
            good, rejects = split_results(table, good_schema, reject_schema)
            fs, root = filesystem(output_url)
            current = read_json(fs, join(root, PLAN)) or {}
            if current.get("run_id") != run_id:
                return {"rows": 0, "rejects": 0, "stale": table.num_rows}
            name = f"part-{uuid.uuid4().hex[:16]}.parquet"
            if rejects.num_rows:
                write_parquet(fs, join(root, reject_dir, name), rejects)
            if good.num_rows:
                write_good(fs, join(root, good_dir, name), good)
            return {"rows": good.num_rows, "rejects": rejects.num_rows}

    return SplitSink()


@dataclasses.dataclass(frozen=True)
class Outputs:
    """A finished per-row stage's files and the ids they hold (see `collect_outputs`)."""

    good_dir: str
    reject_dir: str
    good: list[str]  # result files, sorted
    rejects: list[str]  # reject files, sorted (including the ones not checked per row)
    ids: list[str]  # ids of the result rows, in file order
    reject_ids: list[str]  # ids of every reject row

    def files(self) -> dict[str, list[str]]:
        """The manifest's `files` entry: file names per directory."""
        return {self.good_dir: [posixpath.basename(f) for f in self.good],
                self.reject_dir: [posixpath.basename(f) for f in self.rejects]}


def collect_outputs(output_url: str, good_dir: str, reject_dir: str, expected: Iterable[str], *,
                    write_good: Any = None, skip: tuple[str, ...] = ()) -> Outputs:
    """Repair and check a per-row stage's output before its manifest is written: duplicate rows a stale
    writer published are dropped (`drop_duplicate_rows`), then every `expected` id must be in exactly
    one result or reject row. Reject files named in `skip` are not per-row results (a table of TSV-row
    rejects): they are listed and counted, not checked."""
    fs, root = filesystem(output_url)
    for sub in (good_dir, reject_dir):  # every writer has returned: a temporary left now is a killed one's
        for path in drop_temporaries(fs, join(root, sub)):
            log.warning("removed %s, left by a writer that was killed mid-write (its task ran again)", path)

    def listing() -> tuple[list[str], list[str], list[str]]:
        good = parquet_files(fs, join(root, good_dir))
        rejects = parquet_files(fs, join(root, reject_dir))
        return good, rejects, [f for f in rejects if posixpath.basename(f) not in skip]

    good, rejects, per_row = listing()
    repaired = drop_duplicate_rows(fs, good, write_good) + drop_duplicate_rows(fs, per_row)
    if repaired:
        log.warning("removed %d duplicate row(s) published by a stale writer of an earlier run", repaired)
        good, rejects, per_row = listing()
    ids = read_column(fs, good, "id")
    seen = Counter(ids) + Counter(read_column(fs, per_row, "id"))
    dups = [i for i, n in seen.items() if n > 1]
    if dups:
        raise DatasetError(f"{output_url}: {len(dups)} id(s) written twice (e.g. {dups[:3]}); was another "
                           "run writing into the same output? Re-run with --overwrite")
    missing = [i for i in expected if i not in seen]
    if missing:
        raise DatasetError(f"{output_url}: {len(missing)} row(s) have no output (e.g. {missing[:3]}); "
                           "re-run to finish them")
    return Outputs(good_dir, reject_dir, good, rejects, ids, read_column(fs, rejects, "id"))


def write_manifest(output_url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Publish a finished dataset's manifest (last: its presence means the dataset is complete)."""
    fs, root = filesystem(output_url)
    manifest = {**manifest, "created_unix": int(time.time())}
    sizes = {}
    for sub, names in manifest.get("files", {}).items():
        listed = file_sizes(fs, join(root, sub))
        sizes[sub] = {name: listed[name] for name in names if name in listed}
    manifest["sizes"] = sizes  # what `check_manifest` compares a reader's listing with
    manifest["checksum"] = manifest_checksum(manifest)
    write_json(fs, join(root, MANIFEST), manifest)
    return manifest
