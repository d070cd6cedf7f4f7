"""Stage 1 on a real local Ray: outputs, rejects, resume after a crash, idempotence, plan checks."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from transformers import WhisperFeatureExtractor

from pipeline import cache, features
from pipeline import commonvoice as cv
from pipeline.config import load_config
from pipeline.prepare import MELS_DIR, REJECTS_DIR, PrepareError, run_prepare

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny(*overrides: str):
    return load_config("tiny", ["prepare.rows_per_file=8", *overrides])


def read(out: Path, sub: str) -> list[dict]:
    files = sorted((out / sub).glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def all_ids(release: Path, splits=("train", "dev", "test")) -> list[str]:
    sel = cv.select({s: (release / f"{s}.tsv").read_bytes() for s in splits})
    return [r["id"] for r in sel.rows]


def rows_by_id(tsv: Path) -> dict[str, list[str]]:
    lines = tsv.read_text(encoding="utf-8").splitlines()
    return {cv.clip_id(line.split("\t")[1]): line.split("\t") for line in lines[1:]}


def test_bundled_release(ray_local, corpus, tmp_path):
    out = tmp_path / "mels"
    manifest = run_prepare(tiny(), str(corpus), str(out))
    mels, rejects = read(out, MELS_DIR), read(out, REJECTS_DIR)
    ids = [r["id"] for r in mels]
    assert len(ids) == len(set(ids))
    # Every selected clip is either a mels row or a reject; the only reject is the over-30 s clip.
    assert sorted(ids + [r["id"] for r in rejects]) == sorted(all_ids(corpus))
    assert [r["reason"] for r in rejects] == [cv.TOO_LONG]
    assert manifest["counts"]["clips"] == len(ids) and manifest["counts"]["rejects_by_reason"] == {"too_long": 1}
    assert (out / "manifest.json").exists() and manifest["kind"] == "mels"
    assert all(len(pq.read_table(f)) <= 8 + 8 for f in (out / MELS_DIR).glob("*.parquet"))

    # Rows carry the transcript, metadata and features that restore to the extractor's input.
    tsv = rows_by_id(corpus / "train.tsv") | rows_by_id(corpus / "dev.tsv") | rows_by_id(corpus / "test.tsv")
    extractor = WhisperFeatureExtractor(feature_size=128)
    cfg = tiny().features
    for row in mels[:6]:
        fields = dict(zip(cv.CV_COLUMNS, tsv[row["id"]], strict=True))
        assert row["sentence"] == " ".join(fields["sentence"].split())
        assert row["client_id"] == fields["client_id"] and row["locale"] == "en"
        audio = features.decode(str(corpus / "clips" / row["path"])).audio
        assert row["duration_s"] == pytest.approx(len(audio) / 16000, abs=1e-4)
        restored = features.restore_row(row["mel"], row["mel_pad_value"], cfg)
        expected = extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
        assert np.abs(restored - expected).max() < 2e-3

    # A second run on the complete output does nothing and returns the same manifest.
    before = sorted(p.name for p in (out / MELS_DIR).iterdir())
    again = run_prepare(tiny(), str(corpus), str(out))
    assert again == manifest and sorted(p.name for p in (out / MELS_DIR).iterdir()) == before


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


def mp3_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="MP3")
    return buf.getvalue()


def test_bad_inputs_are_rejected_and_good_rows_kept(ray_local, corpus_copy, tmp_path):
    release = corpus_copy
    train = release / "train.tsv"
    header, *lines = train.read_bytes().split(b"\n")
    lines = [ln for ln in lines if ln]
    ids = [cv.clip_id(ln.split(b"\t")[1].decode()) for ln in lines]
    clip = {i: release / "clips" / f"{i}.mp3" for i in ids}
    damage = {}

    def take(reason):
        victim = next(i for i in ids if i not in damage and clip[i].stat().st_size < 100_000)
        damage[victim] = reason
        return victim

    clip[take(cv.MISSING_FILE)].unlink()
    clip[take(cv.EMPTY_FILE)].write_bytes(b"")
    victim = take(cv.UNDECODABLE)  # truncated: decodes, but short of its header's length
    clip[victim].write_bytes(clip[victim].read_bytes()[: clip[victim].stat().st_size // 2])
    victim = take(cv.UNDECODABLE)  # corrupt: frames overwritten mid-stream
    data = bytearray(clip[victim].read_bytes())
    data[1500:4500] = bytes(3000)
    clip[victim].write_bytes(bytes(data))
    clip[take(cv.EMPTY_AUDIO)].write_bytes(wav_bytes(np.zeros(0, np.float32), 48000))
    clip[take(cv.SILENT)].write_bytes(mp3_bytes(np.zeros(48000 * 2, np.float32), 48000))
    clip[take(cv.TOO_SHORT)].write_bytes(wav_bytes(np.full(800, 0.3, np.float32), 16000))
    # TSV-level faults: an empty sentence, undecodable text, a short row.
    empty_sentence, bad_text = take(cv.BAD_ROW), take(cv.BAD_ROW)
    for n, ln in enumerate(lines):
        fields = ln.split(b"\t")
        i = ids[n]
        if i == empty_sentence:
            fields[3] = b"  "
        elif i == bad_text:
            fields[3] = "Caf\u00e9 au lait".encode("latin-1")
        lines[n] = b"\t".join(fields)
    lines.append(b"broken\trow")
    train.write_bytes(b"\n".join([header, *lines]) + b"\n")

    out = tmp_path / "mels"
    manifest = run_prepare(tiny("prepare.splits=[train]"), str(release), str(out))
    rejects = read(out, REJECTS_DIR)
    got = {r["id"]: r for r in rejects}
    too_long = {i: cv.TOO_LONG for i in ids if i not in damage and sf.info(str(clip[i])).duration > 30}
    expected = dict(damage) | too_long | {"row": cv.BAD_ROW}  # the short row's 2nd field is its path
    assert {i: r["reason"] for i, r in got.items()} == expected
    assert "does not exist" in got[next(i for i, r in damage.items() if r == cv.MISSING_FILE)]["detail"]
    assert got[empty_sentence]["detail"] == "empty sentence" and got[empty_sentence]["source"].startswith("train.tsv:")
    assert "not valid UTF-8" in got[bad_text]["detail"]
    assert any("truncated" in r["detail"] for r in rejects)
    assert all(r["path"] is not None and r["detail"] for r in rejects)
    # Every good row is present.
    good = [r["id"] for r in read(out, MELS_DIR)]
    assert sorted(good) == sorted(i for i in ids if i not in expected)
    assert manifest["counts"]["clips"] == len(good)
    assert manifest["counts"]["rejects"] == len(expected)


def run_job(release: Path, out: Path, log: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.prepare", "--config", "tiny", "--input", str(release), "--output", str(out),
             "prepare.rows_per_file=4", "prepare.batch_size=1", *overrides],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def test_resume_after_crash_gives_the_clean_run(ray_local, corpus, tmp_path):
    clean = tmp_path / "clean"
    run_prepare(tiny("prepare.rows_per_file=4"), str(corpus), str(clean))

    out = tmp_path / "crashed"
    log = tmp_path / "job.log"
    job = run_job(corpus, out, log)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / MELS_DIR).glob("part-*.parquet"))) < 2:
        assert job.poll() is None, log.read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its whole local Ray, mid-run
    job.wait()
    assert not (out / "manifest.json").exists(), "the job finished before it could be killed"
    partial = sorted((out / MELS_DIR).glob("part-*.parquet"))
    assert 2 <= len(partial)
    # And a file cut off mid-write, as a crash during an upload or write would leave it.
    (out / MELS_DIR / "part-cut.parquet").write_bytes(partial[0].read_bytes()[:5000])
    (out / MELS_DIR / ".part-x.parquet.tmp-123").write_bytes(b"PAR1")

    # Resumed with smaller tasks (prepare.rows_per_task: a setting of memory, not of content).
    manifest = run_prepare(tiny("prepare.rows_per_file=4", "prepare.rows_per_task=2", "prepare.batch_size=2"),
                           str(corpus), str(out))
    assert not (out / MELS_DIR / "part-cut.parquet").exists()
    assert not list((out / MELS_DIR).glob(".*tmp-*"))
    resumed = {r["id"]: r for r in read(out, MELS_DIR)}
    expected = {r["id"]: r for r in read(clean, MELS_DIR)}
    assert len(resumed) == len(read(out, MELS_DIR))  # no duplicates
    assert resumed.keys() == expected.keys()
    assert all(resumed[i]["mel"] == expected[i]["mel"] for i in expected)
    assert [r["id"] for r in read(out, REJECTS_DIR)] == [r["id"] for r in read(clean, REJECTS_DIR)]
    assert manifest["counts"]["clips"] == len(expected)
    # The killed run's workers outlive its driver for a moment; fenced off, they publish nothing late.
    time.sleep(3)
    assert sorted(r["id"] for r in read(out, MELS_DIR)) == sorted(expected)


def test_another_plan_is_refused_with_what_differs(ray_local, corpus, tmp_path):
    out = tmp_path / "mels"
    run_prepare(tiny("prepare.splits=[dev]"), str(corpus), str(out))
    with pytest.raises(cache.DatasetError, match=r"max_duration_s: 30\.0 -> 20\.0"):
        run_prepare(tiny("prepare.splits=[dev]", "prepare.max_duration_s=20"), str(corpus), str(out))
    # Layout-only settings are not part of the plan: a different file size resumes/confirms.
    run_prepare(tiny("prepare.splits=[dev]", "prepare.rows_per_file=3"), str(corpus), str(out))
    replaced = run_prepare(tiny("prepare.splits=[dev]", "prepare.max_duration_s=20"), str(corpus), str(out),
                           overwrite=True)
    assert replaced["config"]["prepare"]["max_duration_s"] == 20.0
    with pytest.raises(PrepareError, match="no nosuch.tsv"):
        run_prepare(tiny("prepare.splits=[nosuch]"), str(corpus), str(tmp_path / "other"))


def test_manifest_reader_refuses_unfinished_output(tmp_path):
    fs, root = cache.filesystem(str(tmp_path))
    cache.write_json(fs, cache.join(root, cache.PLAN), {"fingerprint": "x"})
    with pytest.raises(cache.DatasetError, match="has not finished"):
        cache.check_manifest(str(tmp_path), kind="mels")
    cache.write_json(fs, cache.join(root, cache.MANIFEST), {"kind": "teacher", "fingerprint": "abc"})
    with pytest.raises(cache.DatasetError, match="expected 'mels'"):
        cache.check_manifest(str(tmp_path), kind="mels")
    assert json.loads((tmp_path / cache.MANIFEST).read_text())["kind"] == "teacher"
