"""CommonVoice release layout and TSV index: which rows exist, which are usable, and why not.

CommonVoice TSVs are tab-separated with no quoting: a sentence may hold `"` or `'` literally, so
csv-module quote handling would corrupt rows. Lines are split as bytes and each field decoded on
its own, so one bad byte rejects one row (named by file and line), never the file.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# CommonVoice 17's column set, in release order.
CV_COLUMNS = (
    "client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes",
    "age", "gender", "accents", "variant", "locale", "segment",
)
# Metadata carried through to the mels dataset (nullable).
PASSTHROUGH = ("client_id", "gender", "age", "accents", "locale")
REQUIRED = ("path", "sentence")

# Reject reasons, shared by the row checks here and the audio checks in features/prepare.
BAD_ROW = "bad_row"
DUPLICATE = "duplicate"
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
UNDECODABLE = "undecodable"
EMPTY_AUDIO = "empty_audio"
SILENT = "silent"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"


@dataclass
class Selection:
    """The rows a run will process, the rows it refused, and counts of rows filtered by config."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)
    # Each index file read (TSV, manifest, Parquet) -> sha256 of it: what the plan's fingerprint covers.
    index_sha256: dict[str, str] = field(default_factory=dict)


def reject(id_: str, split: str, path: str, source: str, reason: str, detail: str) -> dict[str, Any]:
    return {"id": id_, "split": split, "path": path, "source": source, "reason": reason, "detail": detail}


def clip_id(path: str) -> str:
    """The clip's file stem: `common_voice_en_123.mp3` -> `common_voice_en_123`."""
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[0] if "." in base else base


def unsafe_path(path: str) -> str | None:
    """Why a TSV's clip path could reach outside the clips directory, or None: an absolute path, a `..`
    component, a URL, a backslash (a Windows separator) or a NUL byte. The row is rejected, never read."""
    if "\x00" in path:
        return "path holds a NUL byte"
    if posixpath.isabs(path) or "\\" in path:
        return f"path {path!r} is absolute or holds a backslash: clip paths are relative to clips/"
    if "://" in path:
        return f"path {path!r} is a URL: clip paths are relative to clips/"
    if ".." in path.split("/"):
        return f"path {path!r} escapes the clips directory"
    return None


def normalise_sentence(text: str) -> str:
    """Collapse whitespace runs; case and punctuation are kept (the LLM reads them)."""
    return " ".join(text.split())


def parse_tsv(data: bytes, name: str, split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Parse one split TSV; returns (rows, rejects). `name` is used in messages."""
    lines = data.split(b"\n")
    if not lines or not lines[0].strip():
        raise ValueError(f"{name}: empty file, expected a header line with {', '.join(REQUIRED)}")
    try:
        header = lines[0].rstrip(b"\r").decode("utf-8-sig").split("\t")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: header is not UTF-8 ({e})") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{name}: header lacks column(s) {', '.join(missing)}; found {', '.join(header)}")
    rows, rejects = [], []
    for lineno, raw in enumerate(lines[1:], start=2):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        source = f"{name}:{lineno}"
        fields = raw.split(b"\t")
        path_raw = fields[header.index("path")] if len(fields) > header.index("path") else b""
        path = path_raw.decode("utf-8", errors="replace").strip()
        id_ = clip_id(path) if path else source
        if len(fields) != len(header):
            rejects.append(reject(id_, split, path, source, BAD_ROW,
                                  f"expected {len(header)} tab-separated fields, found {len(fields)}"))
            continue
        row: dict[str, Any] = {}
        bad = None
        for col, value in zip(header, fields, strict=True):
            try:
                row[col] = value.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = f"column {col!r} is not valid UTF-8 ({e.reason} at byte {e.start})"
                break
        if bad:
            rejects.append(reject(id_, split, path, source, BAD_ROW, bad))
            continue
        if not path:
            rejects.append(reject(id_, split, path, source, BAD_ROW, "empty path"))
            continue
        if unsafe := unsafe_path(path):
            rejects.append(reject(id_, split, path, source, BAD_ROW, unsafe))
            continue
        sentence = normalise_sentence(row["sentence"])
        if not sentence:
            rejects.append(reject(id_, split, path, source, BAD_ROW, "empty sentence"))
            continue
        out = {
            "id": id_,
            "split": split,
            "path": path,
            "sentence": sentence,
            "source": source,
            "up_votes": _int_or_none(row.get("up_votes")),
            "down_votes": _int_or_none(row.get("down_votes")),
        }
        for col in PASSTHROUGH:
            out[col] = row.get(col) or None
        rows.append(out)
    return rows, rejects


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def select(tsvs: dict[str, bytes], *, min_up_votes: int = 0, max_down_votes: int | None = None,
           limit: int | None = None) -> Selection:
    """Parse split TSVs (in the given order) and `combine` them into one id-unique selection."""
    parts = [(split, f"{split}.tsv", *parse_tsv(data, f"{split}.tsv", split)) for split, data in tsvs.items()]
    sel = combine(parts, min_up_votes=min_up_votes, max_down_votes=max_down_votes, limit=limit)
    sel.index_sha256 = {f"{split}.tsv": hashlib.sha256(data).hexdigest() for split, data in tsvs.items()}
    return sel


def combine(parts: Iterable[tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]], *, min_up_votes: int = 0,
            max_down_votes: int | None = None, limit: int | None = None) -> Selection:
    """Parsed index files, each (split, file name, rows, rejects), in order -> one id-unique selection.

    Every layout ends here, so dedupe, filters and limits mean the same whatever was read. A clip listed in
    two splits (validated.tsv holds train's rows) is kept once, under the first split named; the same id
    twice in one split is a data error and is rejected. Vote filters are a choice, not a fault: they are
    counted, not rejected.
    """
    sel = Selection()
    seen: dict[str, tuple[str, str]] = {}
    for split, name, rows, rejects in parts:
        sel.rejects.extend(rejects)
        for row in rows:
            first, where = seen.get(row["id"], (None, None))
            if first == split:
                place = name if where == name else f"split {split!r} ({where} and {name})"
                sel.rejects.append(reject(row["id"], split, row["path"], row["source"], DUPLICATE,
                                          f"id {row['id']} appears more than once in {place}"))
                continue
            if first is not None:
                _count(sel.filtered, f"already_in_{first}")
                continue
            seen[row["id"]] = (split, name)
            if min_up_votes and (row.get("up_votes") or 0) < min_up_votes:
                _count(sel.filtered, "up_votes")
                continue
            if max_down_votes is not None and (row.get("down_votes") or 0) > max_down_votes:
                _count(sel.filtered, "down_votes")
                continue
            if limit is not None and len(sel.rows) >= limit:
                _count(sel.filtered, "limit")
                continue
            sel.rows.append(row)
    return sel


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1
