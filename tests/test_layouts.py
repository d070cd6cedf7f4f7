"""Dataset layouts (pipeline/layouts.py): HF Parquet and JSONL manifests through the same prepare as CommonVoice.

Pure tests read small files built here; the end-to-end ones run stage 1 on a real local Ray over datasets
made from the same four audio files (two fixture MP3s, one re-encoded as float WAV, one as FLAC), and hold
the mels equal to those of a CommonVoice release holding the same files.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import cache, features, layouts
from pipeline import commonvoice as cv
from pipeline.config import load_config
from pipeline.prepare import MELS_DIR, REJECTS_DIR, PrepareError, plan_fingerprint, run_prepare

CLIPS = Path(__file__).parent / "fixtures" / "commonvoice" / "clips"
# Four short fixture clips; the split each goes to in every layout built here.
FIXTURE = {"a": "common_voice_en_34270166.mp3", "b": "common_voice_en_29670954.mp3",
           "c": "common_voice_en_29677076.mp3", "d": "common_voice_en_27146190.mp3"}
FILES = {"a": "a.mp3", "b": "b.wav", "c": "c.flac", "d": "d.mp3"}
SPLIT = {"a": "train", "b": "train", "c": "train", "d": "dev"}
SENTENCE = {k: f"Clip {k}, said  once." for k in FIXTURE}
AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def tiny(*overrides: str):
    return load_config("tiny", ["prepare.splits=[train, dev]", "prepare.rows_per_file=1", "prepare.batch_size=1",
                                *overrides])


def read(out: Path, sub: str) -> list[dict]:
    return [row for f in sorted((out / sub).glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    """a.mp3, d.mp3: fixture clips; b.wav: one decoded at its own rate into float WAV (the same samples);
    c.flac: one as 16-bit FLAC."""
    out = tmp_path_factory.mktemp("audio")
    for key, name in FILES.items():
        src = CLIPS / FIXTURE[key]
        if name.endswith(".mp3"):
            shutil.copy(src, out / name)
            continue
        samples, rate = sf.read(str(src), dtype="float32")
        sf.write(str(out / name), samples, rate, subtype="FLOAT" if name.endswith(".wav") else "PCM_16")
    return out


@pytest.fixture(scope="module")
def reference(ray_local, audio, tmp_path_factory) -> dict[str, dict]:
    """The four files as a CommonVoice release through prepare: key -> mels row."""
    release = tmp_path_factory.mktemp("cv")
    shutil.copytree(audio, release / "clips")
    header = "\t".join(cv.CV_COLUMNS)
    for split in ("train", "dev"):
        fields = [{"path": FILES[k], "sentence": SENTENCE[k], "locale": "en"} for k in FILES if SPLIT[k] == split]
        lines = ["\t".join(f.get(c, "") for c in cv.CV_COLUMNS) for f in fields]
        (release / f"{split}.tsv").write_text("\n".join([header, *lines]) + "\n")
    out = tmp_path_factory.mktemp("cv-mels") / "mels"
    run_prepare(tiny(), str(release), str(out))
    return {row["id"]: row for row in read(out, MELS_DIR)}


def jsonl_dataset(root: Path, audio: Path) -> dict[str, str]:
    """Manifests under manifests/ (paths relative to it), audio under wavs/, and one bad line per fault.
    Returns the expected reject reason per manifest line (`<manifest>:<line>`)."""
    shutil.copytree(audio, root / "wavs")
    (root / "wavs" / "garbage.mp3").write_bytes(b"ID3" + bytes(range(256)) * 20)
    outside = root.parent / f"{root.name}-outside.mp3"
    shutil.copy(audio / "a.mp3", outside)
    (root / "wavs" / "link.mp3").symlink_to(outside)
    (root / "manifests").mkdir()

    def entry(key: str, **extra) -> str:
        return json.dumps({"audio_filepath": f"../wavs/{FILES[key]}", "text": SENTENCE[key], "duration": 2.0,
                           **extra})

    train = [entry("a", gender="female"), entry("b"),
             json.dumps({"audio_filepath": str(root / "wavs" / "c.flac"), "text": SENTENCE["c"]}),  # absolute, inside
             '{"audio_filepath": "../wavs/a.mp3", "text": ',  # 4: cut short
             json.dumps({"audio_filepath": "../wavs/a.mp3"}),  # 5: no text
             json.dumps({"audio_filepath": "../wavs/empty.mp3", "text": "   "}),  # 6
             json.dumps({"audio_filepath": "../../x.mp3", "text": "Out."}),  # 7
             json.dumps({"audio_filepath": str(outside), "text": "Out."}),  # 8: absolute, outside
             json.dumps({"audio_filepath": "https://example.com/x.mp3", "text": "Out."}),  # 9
             json.dumps({"audio_filepath": "../wavs/link.mp3", "text": "Out."}),  # 10: a symlink leading out
             json.dumps({"audio_filepath": "../wavs/missing.mp3", "text": "Gone."}),  # 11
             json.dumps({"audio_filepath": "../wavs/garbage.mp3", "text": "Noise."})]  # 12
    (root / "manifests" / "train_manifest.jsonl").write_text("\n".join(train) + "\n")
    (root / "manifests" / "dev.jsonl").write_text(entry("d") + "\n")
    bad = {4: cv.BAD_ROW, 5: cv.BAD_ROW, 6: cv.BAD_ROW, 7: cv.BAD_ROW, 8: cv.BAD_ROW, 9: cv.BAD_ROW,
           10: cv.BAD_ROW, 11: cv.MISSING_FILE, 12: cv.UNDECODABLE}
    return {f"manifests/train_manifest.jsonl:{n}": reason for n, reason in bad.items()}


def parquet_dataset(root: Path, audio: Path) -> dict[str, str]:
    """HF's push_to_hub layout: data/<split>-NNNNN-of-NNNNN.parquet (validation serves dev), audio as
    {bytes, path}, row groups of two rows. Returns the expected reject reason per `<file>:row <n>`."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: cc0-1.0\n---\n")

    def write(name: str, rows: list[tuple[bytes | None, str | None, str | None]]) -> None:
        table = pa.table({"client_id": [f"speaker-{i}" for i in range(len(rows))],
                          "audio": pa.array([{"bytes": b, "path": p} for b, p, _ in rows], AUDIO),
                          "sentence": [s for _, _, s in rows]})
        pq.write_table(table, root / "data" / name, row_group_size=2)

    def clip(key: str) -> tuple[bytes, str, str]:
        return (audio / FILES[key]).read_bytes(), FILES[key], SENTENCE[key]

    write("train-00000-of-00002.parquet", [clip("a"), (clip("a")[0], "x.mp3", None), clip("b"),
                                           (None, "gone.mp3", "No audio."), (b"\x00" * 500, "junk.wav", "Noise.")])
    write("train-00001-of-00002.parquet", [clip("c")])
    write("validation-00000-of-00001.parquet", [clip("d")])
    name = "data/train-00000-of-00002.parquet"
    return {f"{name}:row 1": cv.BAD_ROW, f"{name}:row 3": cv.MISSING_FILE, f"{name}:row 4": cv.UNDECODABLE}


JSONL_IDS = {"a": "wavs/a", "b": "wavs/b", "c": "wavs/c", "d": "wavs/d"}
PARQUET_IDS = {"a": "data/train-00000-of-00002:0", "b": "data/train-00000-of-00002:2",
               "c": "data/train-00001-of-00002:0", "d": "data/validation-00000-of-00001:0"}
LAYOUTS = {"jsonl": (jsonl_dataset, JSONL_IDS), "hf_parquet": (parquet_dataset, PARQUET_IDS)}


# ----- pure: no Ray -----


@pytest.mark.parametrize("files, splits, expected", [
    (["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
      "data/validation-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"], ["train", "dev", "test"],
     {"train": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"],
      "dev": ["data/validation-00000-of-00001.parquet"], "test": ["data/test-00000-of-00001.parquet"]}),
    (["default/train/0000.parquet", "default/train/0001.parquet", "default/validation/0000.parquet"],
     ["train", "validation"], {"train": ["default/train/0000.parquet", "default/train/0001.parquet"],
                               "validation": ["default/validation/0000.parquet"]}),
    (["dev_manifest.json", "test_manifest.jsonl", "train.jsonl", "validated.jsonl"], ["train", "dev", "validated"],
     {"train": ["train.jsonl"], "dev": ["dev_manifest.json"], "validated": ["validated.jsonl"]}),
    (["data.parquet", "more/00001.parquet"], ["train"], {"train": ["data.parquet", "more/00001.parquet"]}),
    (["data/train.clean.100-00000-of-00001.parquet", "data/train.other.500-00000-of-00001.parquet"],
     ["train.clean.100"], {"train.clean.100": ["data/train.clean.100-00000-of-00001.parquet"]}),
])
def test_splits_come_from_file_and_directory_names_as_hf_lays_them_out(files, splits, expected):
    assert layouts.assign_splits(files, splits, "ds") == expected


def test_a_split_the_files_do_not_name_is_refused_with_what_they_have():
    with pytest.raises(PrepareError, match=r"no files for split 'test'; the dataset has: dev, latest, train"):
        layouts.assign_splits(["train.jsonl", "dev.jsonl", "latest.jsonl"], ["train", "test", "latest"], "ds")
    assert layouts.split_of("data/latest-notes.parquet", {"test"}) is None  # a token, not a substring


def test_manifest_paths_stay_inside_the_dataset():
    ok = [("../wavs/a.wav", "manifests", "wavs/a.wav"), ("a/../b.wav", "", "b.wav"),
          ("/data/ds/wavs/a.wav", "", "wavs/a.wav")]
    for path, base, rel in ok:
        assert layouts.resolve_path(path, base, ("/data/ds",)) == (rel, None)
    hostile = {"../x.wav": "escapes", "/data/other/a.wav": "outside the dataset", "/data/ds/../x.wav": "outside",
               "gs://b/a.wav": "URL", "a\\b.wav": "backslash", "a\x00.wav": "NUL"}
    for path, why in hostile.items():
        assert why in layouts.resolve_path(path, "", ("/data/ds",))[1]
    assert layouts.resolve_path("/mnt/d1/ds/a.wav", "", ("/data/ds", "/mnt/d1/ds")) == ("a.wav", None)  # a mount
    assert "outside" in layouts.resolve_path("/data/ds/a.wav", "")[1]  # remote: no absolute path is inside


def test_jsonl_bad_lines_are_named_by_line_and_reason():
    lines = [b'{"audio_filepath": "a.wav", "text": " Hi  there ", "gender": "male", "age": 30}', b"",
             b"not json", b'["a.wav"]', b'{"text": "No audio."}', b'{"audio_filepath": "b.wav", "text": 7}',
             b'{"audio_filepath": "c.wav", "text": "caf\xe9"}', b'{"audio_filepath": "d.wav", "text": ""}']
    rows, rejects = layouts.parse_jsonl(b"\n".join(lines), "train.jsonl", "train", audio_column="audio_filepath",
                                        text_column="text", id_column=None, local_roots=("/ds",))
    assert rows == [{"id": "a", "path": "a.wav", "split": "train", "source": "train.jsonl:1", "sentence": "Hi there",
                     "client_id": None, "gender": "male", "age": "30", "accents": None, "locale": None}]
    why = {r["source"]: r["detail"] for r in rejects}
    assert list(why) == [f"train.jsonl:{n}" for n in (3, 4, 5, 6, 7, 8)]
    assert "not valid JSON" in why["train.jsonl:3"] and "expected a JSON object" in why["train.jsonl:4"]
    assert "no 'audio_filepath'" in why["train.jsonl:5"] and "not a string" in why["train.jsonl:6"]
    assert "not valid JSON" in why["train.jsonl:7"] and why["train.jsonl:8"] == "empty sentence"
    assert all(r["reason"] == cv.BAD_ROW for r in rejects)
    keyed, _ = layouts.parse_jsonl(b'{"wav": "x/a.wav", "txt": "A.", "key": 12}', "m.jsonl", "dev", audio_column="wav",
                                   text_column="txt", id_column="key")
    assert [(r["id"], r["path"], r["sentence"]) for r in keyed] == [("12", "x/a.wav", "A.")]


def test_parquet_index_rows_and_bad_rows():
    index = layouts.Index({"sentence": ["A.", None, "  ", "B."], "client_id": ["s1", None, "s3", ""]}, 4)
    rows, rejects = layouts.parse_index(index, "data/train-00000-of-00001.parquet", "train")
    assert [(r["id"], r["row"], r["sentence"], r["client_id"]) for r in rows] == [
        ("data/train-00000-of-00001:0", 0, "A.", "s1"), ("data/train-00000-of-00001:3", 3, "B.", None)]
    assert [(r["source"], r["detail"]) for r in rejects] == [
        ("data/train-00000-of-00001.parquet:row 1", "empty sentence"),
        ("data/train-00000-of-00001.parquet:row 2", "empty sentence")]
    lacking = layouts.Index({"id": ["x", "y"]}, 2, ["no column 'sentence'"])
    rows, rejects = layouts.parse_index(lacking, "t.parquet", "train")
    assert not rows and [(r["id"], r["detail"]) for r in rejects] == [("x", "no column 'sentence'"),
                                                                       ("y", "no column 'sentence'")]


def test_embedded_audio_reads_only_the_rows_asked_for_across_row_groups(tmp_path):
    values = [{"bytes": bytes([i]) * 10, "path": f"{i}.wav"} for i in range(5)]
    values[3] = {"bytes": None, "path": "3.wav"}
    pq.write_table(pa.table({"audio": pa.array(values, AUDIO)}), tmp_path / "t.parquet", row_group_size=2)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    fs, root = cache.filesystem(str(tmp_path))
    rows = [{"path": "t.parquet", "row": i} for i in (4, 1, 3)] + [{"path": "bad.parquet", "row": 0}]
    got = layouts.embedded_audio(fs, root, rows, "audio")
    assert got[("t.parquet", 4)] == b"\x04" * 10 and got[("t.parquet", 1)] == b"\x01" * 10
    assert got[("t.parquet", 3)] is None and isinstance(got[("bad.parquet", 0)], Exception)


def test_auto_detection_picks_the_layout_and_nothing_recognisable_is_one_line(corpus, audio, tmp_path):
    jsonl, parquet, empty, other = (tmp_path / n for n in ("jsonl", "parquet", "empty", "other"))
    jsonl_dataset(jsonl, audio)
    parquet_dataset(parquet, audio)
    empty.mkdir()
    (other / "mels").mkdir(parents=True)  # a stage's output given as input: Parquet without audio
    pq.write_table(pa.table({"id": ["x"], "mel": [b"\x00"]}), other / "mels" / "part-0.parquet")
    (other / "notes.txt").write_text("hello")
    assert [layouts.detect(str(d)) for d in (corpus, jsonl, parquet)] == ["commonvoice", "jsonl", "hf_parquet"]
    for bad, found in [(empty, "found nothing"), (other, "no audio column"), (tmp_path / "nosuch", "not a directory")]:
        with pytest.raises(PrepareError) as err:
            run_prepare(tiny(), str(bad), str(tmp_path / "out"))  # before any Ray work
        assert found in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(PrepareError, match="no JSONL manifests"):
        run_prepare(tiny("prepare.layout=jsonl"), str(parquet), str(tmp_path / "out"))
    with pytest.raises(PrepareError, match="vote columns"):
        run_prepare(tiny("prepare.min_up_votes=2"), str(jsonl), str(tmp_path / "out"))
    with pytest.raises(PrepareError, match=r"no text column 'words' \(prepare.text_column\); its columns: "
                                           r"client_id, audio, sentence$"):
        run_prepare(tiny("prepare.text_column=words"), str(parquet), str(tmp_path / "out"))
    paths = tmp_path / "paths" / "data"  # audio by path in a string column: read, it could be any local file
    paths.mkdir(parents=True)
    pq.write_table(pa.table({"file": ["/etc/passwd"], "sentence": ["A."]}), paths / "train-00000-of-00001.parquet")
    with pytest.raises(PrepareError, match=r"the audio column 'file' \(prepare.audio_column\) is string; .* JSONL"):
        run_prepare(tiny("prepare.audio_column=file", "prepare.splits=[train]"), str(paths.parent), str(tmp_path / "o"))


def test_a_commonvoice_plan_keeps_its_fingerprint_content(corpus):
    cfg = load_config("tiny")
    plan = plan_fingerprint(cfg, layouts.load(str(corpus), cfg.prepare))
    assert set(plan["content"]) == {"schema_version", "tsv_sha256", "features", "prepare"}


# ----- end to end on a real local Ray -----


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_prepares_like_commonvoice_and_resumes(ray_local, reference, audio, tmp_path, layout):
    build, ids = LAYOUTS[layout]
    data = tmp_path / "dataset"
    expected_rejects = build(data, audio)
    out = tmp_path / "mels"
    manifest = run_prepare(tiny(), str(data), str(out))
    assert manifest["source"]["layout"] == layout and manifest["counts"]["clips_by_split"] == {"train": 3, "dev": 1}

    # The same audio gives the same features, row for row, as through a CommonVoice release.
    mels = {row["id"]: row for row in read(out, MELS_DIR)}
    assert sorted(mels) == sorted(ids.values())
    for key, id_ in ids.items():
        row, ref = mels[id_], reference[key]
        assert (row["split"], row["sentence"]) == (SPLIT[key], cv.normalise_sentence(SENTENCE[key]))
        assert row["mel"] == ref["mel"] and row["mel_pad_value"] == ref["mel_pad_value"]
        assert row["num_frames"] == ref["num_frames"] and row["duration_s"] == ref["duration_s"]
    restored = features.restore_row(mels[ids["c"]]["mel"], mels[ids["c"]]["mel_pad_value"], tiny().features)
    assert restored.shape == (128, 3000) and np.isfinite(restored).all()

    # Every bad row is named by its file and line/row, with the reason.
    rejects = {r["source"]: r for r in read(out, REJECTS_DIR)}
    assert {s: r["reason"] for s, r in rejects.items()} == expected_rejects
    assert all(r["detail"] and r["split"] == "train" and "BytesIO" not in r["detail"] for r in rejects.values())

    # A run cut short (no manifest, a file gone, one cut mid-write, a stray temporary) resumes to the same.
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    (cut / "manifest.json").unlink()
    parts = sorted((cut / MELS_DIR).glob("part-*.parquet"))
    parts[0].unlink()
    if len(parts) > 1:
        parts[1].write_bytes(parts[1].read_bytes()[:300])
    (cut / MELS_DIR / ".part-x.parquet.tmp-1").write_bytes(b"PAR1")
    resumed = run_prepare(tiny(), str(data), str(cut))
    assert {r["id"]: r["mel"] for r in read(cut, MELS_DIR)} == {i: r["mel"] for i, r in mels.items()}
    assert sorted(r["id"] for r in read(cut, REJECTS_DIR)) == sorted(r["id"] for r in read(out, REJECTS_DIR))
    assert resumed["counts"] == manifest["counts"] and resumed["fingerprint"] == manifest["fingerprint"]
    assert run_prepare(tiny(), str(data), str(cut)) == resumed  # complete: nothing to do


def test_wav_and_flac_bytes_decode_like_their_files(audio):
    """Embedded bytes go through the same decoder as a file on disk (libsndfile from memory)."""
    for name in FILES.values():
        data = (audio / name).read_bytes()
        assert np.array_equal(features.decode(data).audio, features.decode(str(audio / name)).audio)
    assert sf.info(io.BytesIO((audio / "c.flac").read_bytes())).format == "FLAC"


@pytest.mark.slow
def test_layouts_on_gcs(ray_local, gcs, bucket, corpus, audio, reference, tmp_path):
    """gs:// through gcsfs (the local emulator): detection, and Parquet's embedded audio read remotely."""
    fs = gcs.fs()
    for name, build in (("jsonl", jsonl_dataset), ("parquet", parquet_dataset)):
        build(tmp_path / name, audio)
        (tmp_path / name / "wavs" / "link.mp3").unlink(missing_ok=True)  # object stores hold no symlinks
        fs.put(str(tmp_path / name), f"{bucket}/{name}", recursive=True)
    fs.put(str(corpus / "dev.tsv"), f"{bucket}/cv/dev.tsv")
    fs.invalidate_cache()
    assert [layouts.detect(f"gs://{bucket}/{n}") for n in ("cv", "jsonl", "parquet")] == \
        ["commonvoice", "jsonl", "hf_parquet"]
    jsonl = layouts.load(f"gs://{bucket}/jsonl", tiny().prepare).selection
    ids = {r["id"] for r in jsonl.rows}
    assert {"wavs/a", "wavs/b", "wavs/d"} <= ids and "wavs/c" not in ids  # c: an absolute path, never in a bucket
    assert "outside the dataset" in next(r["detail"] for r in jsonl.rejects if r["source"].endswith(":3"))
    manifest = run_prepare(tiny(), f"gs://{bucket}/parquet", f"gs://{bucket}/out")
    assert manifest["counts"]["clips"] == 4
    rows = [r for f in fs.find(f"{bucket}/out/{MELS_DIR}") for r in pq.read_table(f, filesystem=fs).to_pylist()]
    assert {r["id"]: r["mel"] for r in rows} == {PARQUET_IDS[k]: reference[k]["mel"] for k in PARQUET_IDS}
