"""The dataset layouts prepare reads: a CommonVoice release, Hugging Face Parquet, JSONL manifests (NeMo's).

Each layout finds its index files per split and parses them into the same rows (id, split, path, sentence,
source, metadata) and row rejects; `commonvoice.combine` makes them one Selection, so prepare's plan,
resume, rejects and manifest are the same code for all. Parquet rows also carry `row`, their index in
their file, and the prepare task reads their embedded audio with `embedded_audio`. A path read from data
never leaves the dataset directory (project rule): one that would is a `bad_row` and is never read.

The parsers (`assign_splits`, `resolve_path`, `parse_jsonl`, `parse_index`) are pure; `load`, `detect`,
`read_index` and `embedded_audio` list and read files through fsspec (any URL, no Ray).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import PipelineError, cache
from pipeline import commonvoice as cv
from pipeline.config import PrepareConfig

COMMONVOICE, HF_PARQUET, JSONL = "commonvoice", "hf_parquet", "jsonl"
# Hugging Face's split keywords (datasets.data_files): a file named for one serves a split named for another.
SPLIT_SYNONYMS = (("train", "training"), ("dev", "validation", "valid", "val"),
                  ("test", "testing", "eval", "evaluation"))
# HF's sharded file names: data/train-00000-of-00002.parquet (push_to_hub); split names may hold dots.
_SHARDED = re.compile(r"^(\w+(?:\.\w+)*?)-\d{5}-of-\d{5}")
_DELIMITERS = re.compile(r"[-._ 0-9]+")
TEXT_COLUMNS = ("sentence", "text", "transcription", "transcript", "normalized_text")
JSONL_AUDIO, JSONL_TEXT = "audio_filepath", "text"
PARQUET_AUDIO = "audio"
Rows = list[dict[str, Any]]


class PrepareError(PipelineError):
    """The input does not allow this run (no recognisable layout, a split or column it lacks)."""


@dataclass
class Source:
    """What a layout read: the selection, the URL its rows' paths are relative to, and the resolved
    options (column names) that the plan's fingerprint covers ({} for CommonVoice: its plans predate them)."""

    layout: str
    selection: cv.Selection
    audio_root: str
    options: dict[str, Any] = field(default_factory=dict)


def load(input_url: str, pcfg: PrepareConfig) -> Source:
    """Read the index of `input_url` in the configured (or detected) layout."""
    fs, root = cache.filesystem(input_url)
    layout = detect(input_url, pcfg.audio_column) if pcfg.layout == "auto" else pcfg.layout
    if layout != COMMONVOICE and (pcfg.min_up_votes or pcfg.max_down_votes is not None):
        raise PrepareError(f"{input_url}: prepare.min_up_votes/max_down_votes need CommonVoice's vote columns; "
                           f"a {layout} dataset has none")
    reader = {COMMONVOICE: _commonvoice, JSONL: _jsonl, HF_PARQUET: _parquet}[layout]
    return reader(fs, root, input_url, pcfg)


def detect(input_url: str, audio_column: str | None = None) -> str:
    """The layout `input_url` holds: top-level *.tsv (CommonVoice), else JSONL manifests, else Parquet
    files with an audio column. Anything else fails in one line saying what was looked for and found."""
    fs, root = cache.filesystem(input_url)
    if not fs.isdir(root):
        raise PrepareError(f"{input_url}: not a directory (expected a dataset directory)")
    top = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    if any(name.endswith(".tsv") for name in top):
        return COMMONVOICE
    if manifest_files(fs, root):
        return JSONL
    parquet = parquet_files(fs, root)
    if parquet and audio_field(_schema(fs, root, parquet[0]), audio_column):
        return HF_PARQUET
    what = (f"Parquet files ({parquet[0]}, ...) but no audio column (a struct of bytes and path; "
            "prepare.audio_column names another)") if parquet else f"{', '.join(top[:8]) or 'nothing'}"
    raise PrepareError(f"{input_url}: no dataset layout recognised: expected a CommonVoice release (<split>.tsv "
                       "and clips/), JSONL manifests (<split>.jsonl) or Hugging Face Parquet with an audio "
                       f"column; found {what}")


def _find(fs: fsspec.AbstractFileSystem, root: str, suffixes: tuple[str, ...], depth: int) -> list[str]:
    """Files named `*<suffix>` up to `depth` directories down, relative to root, sorted; the shallowest
    level that has any wins (a dataset's index sits together). Hidden and `__` entries are skipped."""
    for level in range(1, depth + 1):
        found = set()
        for suffix in suffixes:
            for path in fs.glob(cache.join(root, *["*"] * (level - 1), f"*{suffix}")):
                rel = path[len(root):].lstrip("/")
                if not any(part.startswith((".", "__")) for part in rel.split("/")) and fs.isfile(path):
                    found.add(rel)
        if found:
            return sorted(found)
    return []


def manifest_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """JSONL manifests: `*.jsonl`, or NeMo's `*manifest.json`, at the top level or one directory down."""
    return _find(fs, root, (".jsonl", "manifest.json"), depth=2)


def parquet_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Parquet files as HF lays them out: `*.parquet`, `data/*.parquet` or `<config>/<split>/*.parquet`."""
    return _find(fs, root, (".parquet",), depth=3)


def split_of(path: str, known: set[str]) -> str | None:
    """The split a data file names, by Hugging Face's rules: `<split>-NNNNN-of-NNNNN.*` names it, else the
    first known split name among the file name's tokens (split at `-._ ` and digits), then its directories'
    (innermost first): `train.jsonl`, `train_manifest.json`, `default/validation/0000.parquet`."""
    *dirs, name = path.split("/")
    if match := _SHARDED.match(name):
        return match.group(1)
    for part in [name.split(".", 1)[0], *reversed(dirs)]:
        for token in _DELIMITERS.split(part):
            if token.lower() in known:
                return token.lower()
    return None


def assign_splits(files: list[str], splits: list[str], where: str) -> dict[str, list[str]]:
    """Requested split -> its files. A split takes the files named for it, else those named for a synonym
    (dev <- validation); if no file names any split, all of them are train (as HF reads them)."""
    known = set(splits) | {name for group in SPLIT_SYNONYMS for name in group}
    named = {f: split_of(f, known) for f in files}
    if not any(named.values()):
        named = dict.fromkeys(files, "train")
    out = {}
    for split in splits:
        synonyms = [s for group in SPLIT_SYNONYMS if split in group for s in group if s != split]
        for name in [split, *synonyms]:
            if matched := [f for f, s in named.items() if s == name]:
                out[split] = matched
                break
        else:
            found = sorted({s for s in named.values() if s})
            raise PrepareError(f"{where}: no files for split {split!r}; the dataset has: "
                               f"{', '.join(found) or 'no split names'} (set prepare.splits)")
    return out


def _commonvoice(fs: fsspec.AbstractFileSystem, root: str, url: str, pcfg: PrepareConfig) -> Source:
    """`<split>.tsv` per split, clips under `clips/` (the release as Mozilla ships it)."""
    tsvs = {}
    for split in pcfg.splits:
        try:
            tsvs[split] = fs.cat_file(cache.join(root, f"{split}.tsv"))
        except FileNotFoundError:
            present = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(cache.join(root, "*.tsv")))
            raise PrepareError(f"{url}: no {split}.tsv (split {split!r}); the release has: "
                               f"{', '.join(present) or 'no TSV files'}") from None
    try:
        sel = cv.select(tsvs, min_up_votes=pcfg.min_up_votes, max_down_votes=pcfg.max_down_votes, limit=pcfg.limit)
    except ValueError as exc:  # a TSV without the header it needs
        raise PrepareError(f"{url}/{exc}") from None
    return Source(COMMONVOICE, sel, cache.join(url.rstrip("/"), "clips"))


def _jsonl(fs: fsspec.AbstractFileSystem, root: str, url: str, pcfg: PrepareConfig) -> Source:
    """One JSON object per line, audio paths relative to the manifest's directory (NeMo's convention)."""
    files = manifest_files(fs, root)
    if not files:
        raise PrepareError(f"{url}: no JSONL manifests (<split>.jsonl or <split>_manifest.json)")
    keys = {"audio_column": pcfg.audio_column or JSONL_AUDIO, "text_column": pcfg.text_column or JSONL_TEXT,
            "id_column": pcfg.id_column}
    local_roots = tuple({os.path.abspath(root), os.path.realpath(root)}) if cache.is_local(fs) else ()
    parts, sha = [], {}
    for split, names in assign_splits(files, pcfg.splits, url).items():
        for name in names:
            data = fs.cat_file(cache.join(root, name))
            sha[name] = hashlib.sha256(data).hexdigest()
            parts.append((split, name, *parse_jsonl(data, name, split, local_roots=local_roots, **keys)))
    sel = cv.combine(parts, limit=pcfg.limit)
    sel.index_sha256 = sha
    return Source(JSONL, sel, url, {"layout": JSONL, **keys})


def resolve_path(path: str, base: str, local_roots: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """A manifest's audio path -> (its path relative to the dataset directory, None), or (path, why it may
    not be read): a URL, a backslash or NUL, an absolute path outside the dataset, `..` leading out of it.
    `base` is the manifest's directory; `local_roots` the dataset's absolute paths (none when remote)."""
    if "\x00" in path or "\\" in path:
        return path, f"path {path!r} holds a NUL byte or a backslash"
    if "://" in path:
        return path, f"path {path!r} is a URL: audio paths are relative to the manifest"
    if posixpath.isabs(path):
        full = posixpath.normpath(path)
        inside = [r.rstrip("/") + "/" for r in local_roots if full.startswith(r.rstrip("/") + "/")]
        if not inside:
            return path, f"absolute path {path!r} is outside the dataset directory"
        rel = full[len(inside[0]):]
    else:
        rel = posixpath.normpath(posixpath.join(base, path))
    if rel in (".", "..") or rel.startswith("../"):
        return path, f"path {path!r} escapes the dataset directory"
    return rel, None


def parse_jsonl(data: bytes, name: str, split: str, *, audio_column: str, text_column: str,
                id_column: str | None, local_roots: tuple[str, ...] = ()) -> tuple[Rows, Rows]:
    """One manifest -> (rows, rejects); each bad line is a `bad_row` named `<manifest>:<line>`."""
    rows, rejects = [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        source = f"{name}:{lineno}"
        row, why = _jsonl_row(raw, name, audio_column, text_column, id_column, local_roots)
        row |= {"split": split, "source": source}
        if why:
            rejects.append(cv.reject(row.get("id") or source, split, row.get("path") or "", source, cv.BAD_ROW, why))
        else:
            rows.append(row)
    return rows, rejects


def _jsonl_row(raw: bytes, name: str, audio_column: str, text_column: str, id_column: str | None,
               local_roots: tuple[str, ...]) -> tuple[dict[str, Any], str | None]:
    """One manifest line -> (row, None), or (what is known of it, why it is bad)."""
    try:
        obj = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        return {}, f"not valid JSON ({str(exc)[:200]})"
    if not isinstance(obj, dict):
        return {}, f"expected a JSON object, found {type(obj).__name__}"
    audio = obj.get(audio_column)
    if not isinstance(audio, str) or not audio:
        return {}, f"no {audio_column!r} (a path to the audio)"
    path, unsafe = resolve_path(audio, posixpath.dirname(name), local_roots)
    id_ = _scalar(obj.get(id_column)) if id_column else _strip_extension(path)
    row = {"id": id_, "path": path}
    if unsafe:
        return row, unsafe
    if not id_:
        return row, f"no {id_column!r} (the clip's id)"
    text = obj.get(text_column)
    if not isinstance(text, str):
        return row, f"no {text_column!r} (the transcript)" if text is None else f"{text_column!r} is not a string"
    row["sentence"] = cv.normalise_sentence(text)
    if not row["sentence"]:
        return row, "empty sentence"
    return row | {col: _scalar(obj.get(col)) for col in cv.PASSTHROUGH}, None


def _scalar(value: Any) -> str | None:
    """A metadata or id value as text; None for missing, empty or nested values."""
    if value is None or value == "" or isinstance(value, dict | list):
        return None
    return str(value)


def _strip_extension(path: str) -> str:
    head, base = posixpath.split(path)
    return posixpath.join(head, base.rsplit(".", 1)[0] if "." in base else base)


def _footer(fs: fsspec.AbstractFileSystem, root: str, rel: str) -> pq.FileMetaData:
    return _read(lambda path: pq.read_metadata(path, filesystem=fs), cache.join(root, rel))


def _read(read: Any, path: str) -> Any:
    """`read(path)`, a Parquet file that cannot be read failing the run in one line naming it."""
    try:
        return read(path)
    except (OSError, pa.ArrowException) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise PrepareError(f"{path}: not a readable Parquet file ({first})") from None


def _schema(fs: fsspec.AbstractFileSystem, root: str, rel: str) -> pa.Schema:
    return _footer(fs, root, rel).schema.to_arrow_schema()


def audio_field(schema: pa.Schema, name: str | None) -> str | None:
    """The audio column: `name` if given and present; else `audio`, or the first struct with a binary
    `bytes` field (HF's Audio feature: {bytes, path})."""
    if name:
        return name if name in schema.names else None
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0]
    return PARQUET_AUDIO if PARQUET_AUDIO in structs else (structs[0] if structs else None)


def _parquet(fs: fsspec.AbstractFileSystem, root: str, url: str, pcfg: PrepareConfig) -> Source:
    """HF Parquet: audio embedded in a {bytes, path} column, a text column, per-split files."""
    files = parquet_files(fs, root)
    if not files:
        raise PrepareError(f"{url}: no Parquet files (*.parquet, data/*.parquet or <config>/<split>/*.parquet)")
    by_split = assign_splits(files, pcfg.splits, url)
    first = by_split[pcfg.splits[0]][0]
    options = {"layout": HF_PARQUET, **parquet_columns(_schema(fs, root, first), pcfg, f"{url}/{first}")}
    audio, text = options["audio_column"], options["text_column"]
    parts, sha = [], {}
    for split, names in by_split.items():
        for name in names:
            index, size = read_index(fs, root, name, audio, text, pcfg.id_column)
            rows, rejects = parse_index(index, name, split)
            sha[name] = cache.fingerprint({"bytes": size, "rows": rows, "rejects": rejects})
            parts.append((split, name, rows, rejects))
    sel = cv.combine(parts, limit=pcfg.limit)
    sel.index_sha256 = sha
    return Source(HF_PARQUET, sel, url, options)


def parquet_columns(schema: pa.Schema, pcfg: PrepareConfig, where: str) -> dict[str, str | None]:
    """The audio, text and id columns, as configured or found in the first file's `schema`; refused in one
    line naming what is missing and the columns there are (a typo would otherwise reject every row)."""
    audio = audio_field(schema, pcfg.audio_column)
    text = pcfg.text_column or next((c for c in TEXT_COLUMNS if c in schema.names), None)
    missing = [f"{role} column" + (f" {name!r}" if name else "") + f" (prepare.{role}_column)"
               for role, name, found in (("audio", pcfg.audio_column, audio), ("text", text, text in schema.names),
                                         ("id", pcfg.id_column, pcfg.id_column in schema.names or not pcfg.id_column))
               if not found]
    if missing:
        looked = "" if text else f"; a text column is one of {', '.join(TEXT_COLUMNS)}"
        raise PrepareError(f"{where}: no {' and no '.join(missing)}; its columns: {', '.join(schema.names)}{looked}")
    kind = schema.field(audio).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or
            (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
        # A string column would be paths: read as local files they could lie anywhere (outside the dataset).
        raise PrepareError(f"{where}: the audio column {audio!r} (prepare.audio_column) is {kind}; the Parquet layout "
                           "reads embedded audio, a binary column or a {bytes, path} struct (for audio files by path, "
                           "write a JSONL manifest: paths relative to it)")
    return {"audio_column": audio, "text_column": text, "id_column": pcfg.id_column}


@dataclass
class Index:
    """A Parquet file's columns other than the audio, under the names rows use (sentence, id, metadata),
    its row count, and what it lacks that every row needs (each row is then a `bad_row` saying so)."""

    columns: dict[str, list[Any]]
    num_rows: int
    problems: list[str] = field(default_factory=list)


def read_index(fs: fsspec.AbstractFileSystem, root: str, name: str, audio: str, text: str,
               id_column: str | None) -> tuple[Index, int]:
    """The index of one Parquet file, and its size in bytes. Reads no audio bytes."""
    path = cache.join(root, name)
    footer = _footer(fs, root, name)
    schema = footer.schema.to_arrow_schema()
    wanted = {text: "sentence", **({id_column: "id"} if id_column else {}),
              **{c: c for c in cv.PASSTHROUGH if c not in (text, id_column)}}
    present = [c for c in wanted if c in schema.names]
    table = _read(lambda p: pq.read_table(p, filesystem=fs, columns=present), path)
    index = Index({}, footer.num_rows, [f"no column {c!r}" for c in (audio, text, id_column)
                                        if c and c not in schema.names])
    for col in present:
        try:
            index.columns[wanted[col]] = table.column(col).cast(pa.string()).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            if wanted[col] in ("sentence", "id"):
                index.problems.append(f"column {col!r} is {schema.field(col).type}, not text")
    return index, fs.size(path)


def parse_index(index: Index, name: str, split: str) -> tuple[Rows, Rows]:
    """A Parquet file's index -> (rows, rejects), each named `<file>:row <n>`. Without an id column a
    row's id is `<file without .parquet>:<n>`: unique, and stable while the file is."""
    cols = index.columns
    stem = name[: -len(".parquet")] if name.endswith(".parquet") else name
    rows, rejects = [], []
    for i in range(index.num_rows):
        id_ = cols["id"][i] if "id" in cols else f"{stem}:{i}"
        source = f"{name}:row {i}"
        sentence = cv.normalise_sentence(cols["sentence"][i] or "") if "sentence" in cols else ""
        why = "; ".join(index.problems) or ("empty id" if not id_ else None) or \
            ("empty sentence" if not sentence else None)
        if why:
            rejects.append(cv.reject(id_ or source, split, name, source, cv.BAD_ROW, why))
            continue
        rows.append({"id": id_, "split": split, "path": name, "row": i, "sentence": sentence, "source": source,
                     **{c: (cols[c][i] or None) if c in cols else None for c in cv.PASSTHROUGH}})
    return rows, rejects


def embedded_audio(fs: fsspec.AbstractFileSystem, root: str, rows: list[dict[str, Any]],
                   column: str) -> dict[tuple[str, int], bytes | None | Exception]:
    """(file, row) -> the row's audio bytes (None when the row has none), or the error reading its file.

    Only the audio column of the row groups holding the rows is read, each once per call; rows come in
    file order, so a batch touches one or two row groups.
    """
    out: dict[tuple[str, int], bytes | None | Exception] = {}
    by_file: dict[str, list[int]] = {}
    for row in rows:
        by_file.setdefault(row["path"], []).append(row["row"])
    for name, wanted in by_file.items():
        try:
            out |= _read_rows(fs, cache.join(root, name), column, wanted, name)
        except (OSError, pa.ArrowException) as exc:
            out |= {(name, i): exc for i in wanted}
    return out


def _read_rows(fs: fsspec.AbstractFileSystem, path: str, column: str, wanted: list[int],
               name: str) -> dict[tuple[str, int], bytes | None]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        nested = pa.types.is_struct(pf.schema_arrow.field(column).type)
        out = {}
        for group in sorted({bisect.bisect_right(starts, i) - 1 for i in wanted}):
            values = pf.read_row_group(group, columns=[f"{column}.bytes" if nested else column]).column(0)
            for i in (i for i in wanted if starts[group] <= i < starts[group + 1]):
                value = values[i - starts[group]].as_py()
                out[(name, i)] = value.get("bytes") if nested and value is not None else value
        return out
