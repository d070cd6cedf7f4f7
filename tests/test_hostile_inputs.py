"""Hostile inputs (property-based): the TSV reader, the audio decoder and the config loader never crash on
random or damaged input. Each bad row comes back named (file:line and a reason), each bad clip as a reject, each
bad config as a ConfigError naming the key; a path read from a TSV never reaches outside clips/.

Examples are derandomized (the same on every run, no example database) and bounded, so the file runs in
seconds on a loaded 2-CPU machine; `pytest --hypothesis-show-statistics` prints how many ran.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import signal
import struct
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import hypothesis
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from pipeline import commonvoice as cv
from pipeline import features
from pipeline.config import Config, ConfigError, FeatureConfig, PrepareConfig, load_config

CORPUS = Path(__file__).parent / "fixtures" / "commonvoice"
CLIPS = sorted((CORPUS / "clips").glob("*.mp3"))
HEADER = "\t".join(cv.CV_COLUMNS).encode()
TRAIN_LINES = (CORPUS / "train.tsv").read_bytes().split(b"\n")[1:]
TRAIN_LINES = [line for line in TRAIN_LINES if line.strip()]

# Derandomized, no example database, no deadline (a loaded CI machine is slow at random); `_no_hang` bounds
# each example's wall time instead.
HOSTILE = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])


def hostile(max_examples: int) -> settings:
    return settings(HOSTILE, max_examples=max_examples)


def note_outcome(what: str) -> None:
    """Count an outcome in `--hypothesis-show-statistics` (outside a property: nothing)."""
    if currently_in_test_context():
        hypothesis.event(what)


@contextlib.contextmanager
def _no_hang(seconds: float = 30.0):
    """Fail (TimeoutError) instead of hanging: a blocking open() of a FIFO, a runaway decode."""
    def alarm(signum, frame):
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------------------------
# TSV reader
# --------------------------------------------------------------------------------------------------------------

# Pieces of paths that try to leave clips/ (or look as if they might): traversal, absolute, URL and Windows
# forms, NUL, and unicode look-alikes (which stay plain file names on a POSIX file system).
PATH_PIECES = ["..", ".", "", "a.mp3", "clips", "sub", "\\", "..\\..", "~", "~root", "%2e%2e", "%2f", "..%2f",
               "\u2025", "\uff0e\uff0e", "\uff0f", "\u2215", "..\u200b", "\u202e3pm.exe", "C:", "c:\\x", "file:",
               "gs:", "http:", "", "\x00", " ", "\u3000", "\r", "a\x00b.mp3", "...", "\u0085", "\ufeff"]
PATH_PREFIXES = ["", "", "", "/", "//", "./", "../", "file://", "gs://bucket/", "http://h/", "\\\\srv\\", "C:\\",
                 "\\", " /", "\t"]
hostile_paths = st.one_of(
    st.builds(lambda pre, parts: pre + "/".join(parts),
              st.sampled_from(PATH_PREFIXES), st.lists(st.sampled_from(PATH_PIECES), min_size=1, max_size=5)),
    st.text(max_size=20),
    st.sampled_from(["../x.mp3", "/etc/passwd", "gs://other/x.mp3", "a\\..\\b.mp3", "nul\x00.mp3", "a/../../x.mp3",
                     "./a.mp3", "a/./b.mp3", "..", ".", "./", "a/", "//x.mp3", "\\\\server\\share\\x.mp3",
                     "\uff0e\uff0e/x.mp3", "\u2025/x.mp3", "%2e%2e/x.mp3", "file:///etc/passwd", "x" * 5000]),
)
hostile_path_bytes = st.one_of(hostile_paths.map(lambda p: p.encode("utf-8", "surrogatepass")),
                               st.binary(max_size=12))
junk_bytes = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\r", b"\xef\xbb\xbf", b"\xc0\xaf",
                              b"\xe2\x80", b"\t", b"\n", b"\r\n", b" ", b"\x85", b"\xf4\x90\x80\x80"])


@st.composite
def mutated_line(draw) -> bytes:
    """A real CommonVoice row, damaged: fields dropped or added, bytes spliced in, the path or sentence replaced
    (a hostile path, a huge field, blanks), or the whole line replaced by random bytes."""
    line = draw(st.sampled_from(TRAIN_LINES))
    for _ in range(draw(st.integers(0, 3))):
        fields = line.split(b"\t")
        kind = draw(st.sampled_from(["drop_tab", "add_tab", "splice", "path", "path", "sentence", "huge", "random",
                                     "keep"]))
        if kind == "drop_tab" and b"\t" in line:
            i = draw(st.sampled_from([m.start() for m in re.finditer(b"\t", line)]))
            line = line[:i] + line[i + 1:]
        elif kind == "add_tab":
            i = draw(st.integers(0, len(line)))
            line = line[:i] + b"\t" + line[i:]
        elif kind == "splice":
            i = draw(st.integers(0, len(line)))
            line = line[:i] + draw(junk_bytes) + line[i:]
        elif kind == "path" and len(fields) > 1:
            fields[1] = draw(hostile_path_bytes)
            line = b"\t".join(fields)
        elif kind == "sentence" and len(fields) > 3:
            fields[3] = draw(st.sampled_from([b"", b"   ", b"\xe3\x80\x80", b"\x00", b"caf\xe9", b'"quoted"']))
            line = b"\t".join(fields)
        elif kind == "huge":
            i = draw(st.integers(0, len(fields) - 1))
            fields[i] = draw(st.sampled_from([b"x", b"\xff", b"a b "])) * draw(st.sampled_from([10_000, 200_000]))
            line = b"\t".join(fields)
        elif kind == "random":
            line = draw(st.binary(max_size=200))
    return line


@st.composite
def mutated_tsv(draw) -> bytes:
    """A mutated CommonVoice TSV: damaged rows among good ones, empty and blank lines, a BOM, CRLF line ends,
    with or without a final newline."""
    lines = draw(st.lists(st.one_of(mutated_line(), st.sampled_from([b"", b"   ", b"\r", b"\t\t"])), max_size=12))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = eol.join([HEADER, *lines]) + draw(st.sampled_from([b"", eol, eol * 3]))
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data


def random_tsv() -> st.SearchStrategy[bytes]:
    """Random bytes, on their own or under a valid header (so that they reach the row checks)."""
    return st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(lambda b: HEADER + b"\n" + b),
                     st.lists(st.lists(st.binary(max_size=12), max_size=16).map(b"\t".join), max_size=10)
                     .map(lambda rows: b"\n".join([HEADER, *rows])))


def tsv_line(path: bytes, sentence: bytes = b"A sentence.") -> bytes:
    """One CommonVoice row (13 fields) with this path."""
    return b"\t".join([b"c", path, b"s", sentence, b"", b"1", b"0", b"", b"", b"", b"", b"en", b""])


def inside_clips(path: str) -> bool:
    """Lexically: clips/<path> names clips/ or something below it, whatever the path's form."""
    full = posixpath.normpath(posixpath.join("/clips", path))
    return full == "/clips" or full.startswith("/clips/")


def check_tsv(data: bytes, name: str = "train.tsv") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """parse_tsv either refuses the file (ValueError naming it: no usable header) or accounts for every
    non-blank line exactly once, as a row whose path stays inside clips/ or a bad_row naming file:line. (A line
    of only whitespace, tabs included, is blank: it holds no path, so no clip is lost.)"""
    try:
        rows, rejects = cv.parse_tsv(data, name, "train")
    except ValueError as e:
        assert str(e).startswith(f"{name}: "), e
        note_outcome("tsv: file refused (no usable header)")
        return [], []
    note_outcome(f"tsv: {'some' if rows else 'no'} rows, {'some' if rejects else 'no'} bad rows")
    lines = data.split(b"\n")
    expected = [f"{name}:{n}" for n, raw in enumerate(lines[1:], start=2) if raw.rstrip(b"\r").strip()]
    assert sorted(r["source"] for r in rows + rejects) == sorted(expected)
    for r in rejects:
        assert r["reason"] == cv.BAD_ROW and isinstance(r["detail"], str) and r["detail"], r
        assert re.fullmatch(rf"{re.escape(name)}:\d+", r["source"]), r
    for r in rows:
        path = r["path"]
        assert path and r["sentence"] and r["id"] == cv.clip_id(path), r
        assert cv.unsafe_path(path) is None
        assert "\x00" not in path and "\\" not in path and "://" not in path and not path.startswith("/"), path
        assert inside_clips(path), path
    return rows, rejects


@hostile(300)
@given(random_tsv())
def test_random_bytes_never_crash_the_tsv_reader(data):
    check_tsv(data)


@hostile(400)
@given(mutated_tsv())
def test_mutated_tsvs_name_each_bad_row(data):
    rows, rejects = check_tsv(data)
    if rows or rejects:  # and through select: each parsed row is kept, a duplicate, or counted as filtered
        sel = cv.select({"train": data, "dev": data}, min_up_votes=1, max_down_votes=3, limit=5)
        assert len(sel.rows) + len(sel.rejects) + sum(sel.filtered.values()) == 2 * (len(rows) + len(rejects))
        assert all(r["reason"] in (cv.BAD_ROW, cv.DUPLICATE) and r["source"] for r in sel.rejects)


@hostile(400)
@given(st.lists(hostile_path_bytes, min_size=1, max_size=6))
def test_paths_from_a_tsv_stay_inside_clips(paths):
    check_tsv(b"\n".join([HEADER, *(tsv_line(p) for p in paths if b"\n" not in p and b"\t" not in p)]))


# A clips/ directory with everything a hostile release (or an extracted tarball) can hold: real clips, links that
# lead out (relative, absolute, through a linked directory, in a chain, to a FIFO), links that stay in, loops,
# dangling links, an empty file, a directory and a FIFO where a clip should be.
LINKS = {  # name in clips/ -> link target
    "out_rel.mp3": "../outside.mp3", "out_abs.mp3": "{root}/outside.mp3", "out_fifo.mp3": "../outside.fifo",
    "out_dir": "../outside_dir", "chain1.mp3": "chain2.mp3", "chain2.mp3": "../outside.mp3",
    "in_link.mp3": "sub/b.mp3", "in_abs.mp3": "{root}/clips/a.mp3", "loop.mp3": "loop.mp3",
    "loop_a.mp3": "loop_b.mp3", "loop_b.mp3": "loop_a.mp3", "dangling.mp3": "nowhere.mp3",
    "dangling_out.mp3": "../nowhere.mp3", "sub/up.mp3": "../a.mp3", "self": ".", "parent": "..",
}
TREE_PATHS = ["a.mp3", "sub/b.mp3", "empty.mp3", "dir.mp3", "fifo.mp3", "missing.mp3", "out_dir/x.mp3",
              "self/a.mp3", "self/self/sub/b.mp3", "parent/outside.mp3", "parent/clips/a.mp3", "parent/outside.fifo",
              "sub", "x" * 300 + ".mp3", "/".join(["d"] * 2000), *LINKS]


class Tree(NamedTuple):
    root: Path
    clips: Path
    usable: dict[str, str | None]  # each real clip's file name -> its reason on its own (None: usable)


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory) -> Tree:
    from pipeline.prepare import featurize_clip

    root = tmp_path_factory.mktemp("hostile").resolve()
    clips = root / "clips"
    (clips / "sub").mkdir(parents=True)
    (root / "outside_dir").mkdir()
    for src, dst in [(CLIPS[0], clips / "a.mp3"), (CLIPS[1], clips / "sub" / "b.mp3"),
                     (CLIPS[2], root / "outside.mp3"), (CLIPS[3], root / "outside_dir" / "x.mp3")]:
        dst.write_bytes(src.read_bytes())
    (clips / "empty.mp3").touch()
    (clips / "dir.mp3").mkdir()
    os.mkfifo(clips / "fifo.mp3")
    os.mkfifo(root / "outside.fifo")
    for name, target in LINKS.items():
        (clips / name).symlink_to(target.format(root=root))
    real = [clips / "a.mp3", clips / "sub" / "b.mp3", root / "outside.mp3", root / "outside_dir" / "x.mp3"]
    usable = {p.name: featurize_clip({}, str(p), FeatureConfig(), PrepareConfig())["reason"] for p in real}
    # Every real clip is usable, so an outside one that were read would come back usable, not a bad_row.
    assert set(usable.values()) == {None}
    return Tree(root, clips, usable)


def expected_reason(tree: Tree, path: str) -> str | None:
    """What prepare must make of a row's path, found independently: the real path decides."""
    real = os.path.realpath(os.path.join(tree.clips, path))
    if not real.startswith(str(tree.clips) + os.sep):
        return cv.BAD_ROW
    try:
        regular = Path(real).is_file()
    except OSError:  # a name too long to look up
        regular = False
    if not regular:
        return cv.MISSING_FILE
    if os.path.getsize(real) == 0:
        return cv.EMPTY_FILE
    return tree.usable[Path(real).name]


@hostile(60)
@given(st.lists(st.one_of(st.sampled_from(TREE_PATHS), hostile_paths), min_size=1, max_size=5))
def test_prepare_never_reads_outside_clips_nor_hangs(hostile_tree, paths):
    """Rows parsed from hostile paths go through featurize_rows (a prepare task's core) against a hostile
    clips/ tree: every row comes back, a path resolving outside clips/ is a bad_row and never read (an outside
    FIFO would block a read; an outside clip would decode), a FIFO or loop inside never hangs."""
    import torch

    from pipeline.prepare import featurize_rows

    lines = [tsv_line(p.encode("utf-8", "surrogatepass")) for p in paths if "\n" not in p and "\t" not in p]
    rows, _ = check_tsv(b"\n".join([HEADER, *lines]))
    assume(rows)
    threads = torch.get_num_threads()
    try:  # featurize_rows pins torch to one thread, as in a Ray task
        with _no_hang(30), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = featurize_rows(rows, str(hostile_tree.clips), FeatureConfig(), PrepareConfig()).to_pylist()
    finally:
        torch.set_num_threads(threads)
    assert [r["path"] for r in out] == [r["path"] for r in rows]
    for row in out:
        assert row["reason"] == expected_reason(hostile_tree, row["path"]), row
        assert (row["mel"] is None) == (row["reason"] is not None)
        assert row["reason"] is None or row["detail"], row
        note_outcome(f"clip: {row['reason'] or 'usable'}")


# --------------------------------------------------------------------------------------------------------------
# Audio decoder
# --------------------------------------------------------------------------------------------------------------

CLIP_BYTES = [p.read_bytes() for p in CLIPS[:4]]


@st.composite
def damaged_mp3(draw) -> bytes:
    """A real fixture MP3, truncated, bit-flipped, overwritten, cut or spliced with another, or with a 32-bit word
    of its first frames (ID3, frame header, Xing/LAME: frame and byte counts) set to an extreme value."""
    data = bytearray(draw(st.sampled_from(CLIP_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "flip_head", "header_word", "overwrite", "delete", "splice",
                                     "zero"]))
        n = len(data)
        if n == 0:
            break
        if kind == "truncate":
            del data[draw(st.integers(0, n)):]
        elif kind in ("flip", "flip_head"):
            for _ in range(draw(st.integers(1, 16))):
                i = draw(st.integers(0, min(n, 512) - 1 if kind == "flip_head" else n - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "header_word" and n >= 4:
            # Anywhere in the first 256 bytes, or a field of the Xing/LAME (VBR) header: flags, frame and byte
            # counts, the seek table.
            tags = [i for i in (bytes(data[:512]).find(t) for t in (b"Xing", b"Info", b"VBRI", b"LAME")) if i >= 0]
            tag = draw(st.sampled_from([None, *tags]))
            i = draw(st.integers(0, min(n, 256) - 4)) if tag is None else min(tag + 4 * draw(st.integers(0, 8)), n - 4)
            word = draw(st.sampled_from([0, 1, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1))
            data[i:i + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), word)
        elif kind == "overwrite":
            i = draw(st.integers(0, n - 1))
            junk = draw(st.binary(min_size=1, max_size=256))
            data[i:i + len(junk)] = junk
        elif kind == "delete":
            i = draw(st.integers(0, n - 1))
            del data[i:i + draw(st.integers(1, 2048))]
        elif kind == "splice":
            other = draw(st.sampled_from(CLIP_BYTES))
            i, j = draw(st.integers(0, n)), draw(st.integers(0, len(other)))
            data[i:] = other[j:]
        elif kind == "zero":
            i, k = draw(st.integers(0, n - 1)), draw(st.integers(1, 4096))
            data[i:i + k] = bytes(len(data[i:i + k]))
    return bytes(data)


@st.composite
def hostile_wav(draw) -> bytes:
    """A RIFF/WAVE file whose header says anything (format, channels, rate, bits, data size) over a short body:
    the header fields a decoder must not trust (a 1 Hz rate would make a 16 kHz decode 16000 times the file)."""
    fmt = draw(st.sampled_from([1, 3, 6, 7, 0xFFFE, 0, 2, 0x55]) | st.integers(0, 0xFFFF))
    channels = draw(st.sampled_from([1, 2, 0, 3, 255, 1024, 0xFFFF]))
    rate = draw(st.sampled_from([16000, 48000, 8000, 1, 2, 100, 0, 0xFFFFFFFF, 384000]) | st.integers(0, 2**32 - 1))
    bits = draw(st.sampled_from([16, 8, 24, 32, 64, 0, 3, 0xFFFF]))
    if fmt == 3 and draw(st.booleans()):  # float samples: NaN, inf and huge values are representable
        floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
        samples = (draw(st.lists(floats, min_size=1, max_size=8)) * 1000)[:1000]
        body = struct.pack(f"<{len(samples)}f", *samples)
        bits = 32
    else:
        body = draw(st.binary(max_size=4000))
    align = max(1, channels * bits // 8) & 0xFFFF
    declared = draw(st.sampled_from([len(body), 0, 0xFFFFFFFF, len(body) // 2, len(body) * 100]))
    byte_rate = (rate * channels * bits // 8) & 0xFFFFFFFF
    head = (b"RIFF" + struct.pack("<I", (36 + len(body)) & 0xFFFFFFFF) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, fmt, channels, rate, byte_rate, align, bits)
            + b"data" + struct.pack("<I", declared))
    return head + body


def check_decode(data: bytes, as_path: Path | None = None) -> features.Decoded | None:
    """decode returns mono float32 audio that is all finite numbers, or raises DecodeError with a message."""
    source: bytes | str = data
    if as_path is not None:
        as_path.write_bytes(data)
        source = str(as_path)
    try:
        with _no_hang(30), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = features.decode(source, 16000)
    except features.DecodeError as e:
        assert str(e)
        note_outcome("decode: DecodeError")
        return None
    note_outcome("decode: audio")
    assert decoded.audio.dtype == np.float32 and decoded.audio.ndim == 1
    assert np.isfinite(decoded.audio).all()
    assert decoded.native_rate > 0 and decoded.read_frames >= 0
    return decoded


def check_featurize(data: bytes) -> None:
    """prepare's per-clip step turns any bytes into a usable row with finite features, or a named reject."""
    from pipeline.prepare import featurize_clip

    with _no_hang(30):
        out = featurize_clip({"id": "x", "source": "train.tsv:2"}, data, FeatureConfig(), PrepareConfig())
    note_outcome(f"featurize: {out['reason'] or 'usable'}")
    if out["reason"] is None:
        mel = features.from_bytes(out["mel"], 128)
        assert np.isfinite(mel).all() and np.isfinite(out["mel_pad_value"]) and out["num_frames"] == mel.shape[1]
    else:
        assert out["reason"] in (cv.EMPTY_FILE, cv.UNDECODABLE, cv.EMPTY_AUDIO, cv.TOO_SHORT, cv.TOO_LONG, cv.SILENT)
        assert out["detail"] and "BytesIO" not in out["detail"], out["detail"]


@hostile(300)
@given(st.one_of(st.binary(max_size=2000), st.just(b""),
                 st.sampled_from([b"ID3", b"RIFF", b"fLaC", b"OggS", b"FORM", b"\xff\xfb", b"RIFF\x00\x00\x00\x00WAVE"])
                 .flatmap(lambda magic: st.binary(max_size=500).map(lambda b: magic + b))))
def test_random_bytes_never_crash_the_decoder(data):
    check_decode(data)


@hostile(150)
@given(damaged_mp3(), st.booleans())
def test_damaged_mp3s_decode_or_raise_decode_error(tmp_path_factory, data, as_path):
    decoded = check_decode(data, tmp_path_factory.mktemp("mp3") / "clip.mp3" if as_path else None)
    if decoded is not None and len(data) > 2000:
        check_featurize(data)


@hostile(250)
@given(hostile_wav())
def test_wav_headers_that_lie_are_refused_or_decoded_sanely(data):
    decoded = check_decode(data)
    if decoded is not None:
        # Never a blow-up: the decode is at most ~16 kHz / 1 kHz times the samples the file holds.
        assert len(decoded.audio) <= 16 * max(1, decoded.read_frames) + 16
    check_featurize(data)


def test_empty_and_truncated_fixture_clips(tmp_path):
    """The plain cases by name: an empty file, and each fixture clip cut to a header only and to half."""
    with pytest.raises(features.DecodeError, match="Format not recognised|Error opening"):
        features.decode(b"")
    check_featurize(b"")
    for i, clip in enumerate(CLIP_BYTES):
        for cut in (64, 417, len(clip) // 2):
            check_decode(clip[:cut])
            check_decode(clip[:cut], tmp_path / f"{i}-{cut}.mp3")
            check_featurize(clip[:cut])


# --------------------------------------------------------------------------------------------------------------
# Config loader
# --------------------------------------------------------------------------------------------------------------

def _config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config, sections included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _config_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


CONFIG_KEYS = _config_keys()
LITERAL_VALUES = ["cpu", "cuda", "xla", "tpu", "float32", "bfloat16", "int8", "left", "middle", "queries",
                  "encoder", "sum", "mean", "token_mean", "TPU", "CPU", "auto", "commonvoice", "jsonl", "nope"]
yaml_values = st.one_of(
    st.sampled_from(["1", "0", "-1", "1.5", "1e-3", "1e999", ".nan", "-.inf", "true", "false", "null", "~", "''",
                     "[]", "{}", "[a, b]", "[1, 2.5]", "{x: 1}", "{1: 2}", "{null: 1, a: 2}", "[[[]]]", "[",
                     "{", "]", "'", "!!int x", "!!float x", "!!bool maybe", "!!timestamp x", "!!binary ###",
                     "!!set {a}", "!!python/name:os.system", "? [a]\n: 1", "&a [*a]", "*a", "2020-01-01",
                     "0x10", "0o7", "1_000", "\x00", "\t", "- a\n- b", "a: b: c", "|\n  x", "%YAML 9.9\n---\n1",
                     "99999999999999999999999999", "[" * 300, "{a: [" * 50]),
    st.sampled_from(LITERAL_VALUES),
    st.text(max_size=12),
)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                      st.sampled_from(LITERAL_VALUES))
nested_garbage = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.one_of(st.sampled_from([k.rsplit(".", 1)[-1] for k in CONFIG_KEYS]), st.text(max_size=6), st.integers(),
              st.booleans(), st.none()), inner, max_size=3), max_leaves=12)
override_keys = st.one_of(st.sampled_from(CONFIG_KEYS), st.sampled_from(CONFIG_KEYS).map(lambda k: k + ".x"),
                          st.sampled_from(CONFIG_KEYS).map(lambda k: k[:-1]), st.text(max_size=12),
                          st.sampled_from(["", ".", "..", "prepare.", ".prepare", "prepare..limit", "extends",
                                           "prepare.splits.0", "train.xla.data.x", " train.lr "]))


def _prefixes(key: str) -> list[str]:
    parts = key.strip().split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p.strip(".")]


def check_config(source: str | None, overrides: list[str]) -> None:
    """load_config returns a Config or raises ConfigError; an error for one override names its key."""
    try:
        cfg = load_config(source, overrides)
    except ConfigError as e:
        message = str(e)
        assert message
        note_outcome("config: ConfigError")
        if len(overrides) == 1:
            key = overrides[0].partition("=")[0]
            names = [*_prefixes(key), overrides[0]]
            names += [repr(n) for n in (*names, key.strip())]
            assert any(n in message for n in names), (overrides, message)
        return
    assert isinstance(cfg, Config)
    note_outcome("config: loaded")


@hostile(400)
@given(override_keys, yaml_values)
def test_one_bad_override_is_a_config_error_naming_its_key(key, value):
    check_config(None, [f"{key}={value}"])


@hostile(200)
@given(st.lists(st.one_of(st.builds("{}={}".format, override_keys, yaml_values), st.text(max_size=20)),
                max_size=4), st.sampled_from([None, "tiny", "paper"]))
def test_random_overrides_never_crash_the_loader(overrides, preset):
    check_config(preset, overrides)


def _dotted(data: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out.append(prefix + str(k))
            out += _dotted(v, f"{prefix}{k}.")
    return out


@hostile(300)
@given(st.one_of(
    nested_garbage.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.dictionaries(st.sampled_from(["features", "prepare", "teacher", "model", "train", "eval", "corpus",
                                     "cluster", "extends", "bogus"]), nested_garbage, max_size=4)
    .map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    yaml_values, st.text(max_size=100),
).map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=100))
def test_random_yaml_files_never_crash_the_loader(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "mine.yaml"
    path.write_bytes(text)
    try:
        cfg = load_config(str(path))
    except ConfigError as e:
        try:
            data = yaml.safe_load(text)
        except Exception:
            data = None
        names = [str(path), *_dotted(data)] if isinstance(data, dict) else [str(path)]
        assert any(n in str(e) for n in names), (text, str(e))
        note_outcome("config: ConfigError")
        return
    assert isinstance(cfg, Config)
    note_outcome("config: loaded")


@pytest.mark.parametrize("text", ["extends: [tiny]\n", "extends: 3\n", "extends: ''\n", "extends: .\n",
                                  "extends: {a: 1}\n", "{1: 2}\n", "prepare: {1: 2, limit: 3}\n",
                                  "prepare:\n  limit: !!int x\n", "train: {lr: [\n"])
def test_yaml_files_with_odd_structure_are_config_errors(tmp_path, text):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(str(path))
