from pipeline import commonvoice as cv

HEADER = "\t".join(cv.CV_COLUMNS).encode()


def line(path: str, sentence: str | bytes, up: int = 2, down: int = 0, gender: str = "") -> bytes:
    s = sentence if isinstance(sentence, bytes) else sentence.encode()
    fields = [b"c" * 8, path.encode(), b"s" * 8, s, b"", str(up).encode(), str(down).encode(), b"twenties",
              gender.encode(), b"", b"", b"en", b""]
    return b"\t".join(fields)


def tsv(*lines: bytes) -> bytes:
    return b"\n".join([HEADER, *lines]) + b"\n"


def test_quotes_are_literal_and_whitespace_normalised():
    rows, rejects = cv.parse_tsv(tsv(line("a.mp3", '  He said "hi,  there"\u2019s  café. '),
                                     line("b.mp3", "'Single' quotes")), "train.tsv", "train")
    assert not rejects
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["sentence"] == 'He said "hi, there"\u2019s café.'
    assert rows[1]["sentence"] == "'Single' quotes"
    assert rows[0]["gender"] is None and rows[0]["age"] == "twenties" and rows[0]["locale"] == "en"


def test_crlf_and_bom_are_tolerated():
    data = b"\xef\xbb\xbf" + tsv(line("a.mp3", "Fine.")).replace(b"\n", b"\r\n")
    rows, rejects = cv.parse_tsv(data, "dev.tsv", "dev")
    assert [r["sentence"] for r in rows] == ["Fine."] and not rejects


def test_bad_rows_are_rejected_by_line_and_reason():
    data = tsv(line("good.mp3", "Good."), line("empty.mp3", "   "), line("latin1.mp3", b"caf\xe9"),
               b"only\tthree\tfields", line("", "No path."))
    rows, rejects = cv.parse_tsv(data, "train.tsv", "train")
    assert [r["id"] for r in rows] == ["good"]
    by_id = {r["id"]: r for r in rejects}
    assert by_id["empty"]["detail"] == "empty sentence" and by_id["empty"]["source"] == "train.tsv:3"
    assert "not valid UTF-8" in by_id["latin1"]["detail"] and "'sentence'" in by_id["latin1"]["detail"]
    assert any("expected 13" in r["detail"] for r in rejects)
    assert any(r["detail"] == "empty path" and r["source"] == "train.tsv:6" for r in rejects)
    assert all(r["reason"] == cv.BAD_ROW for r in rejects)


def test_select_dedupes_across_splits_and_rejects_in_split_duplicates():
    train = tsv(line("a.mp3", "A."), line("b.mp3", "B.", up=1), line("a.mp3", "A again."))
    validated = tsv(line("a.mp3", "A."), line("c.mp3", "C.", down=3))
    sel = cv.select({"train": train, "validated": validated})
    assert [(r["id"], r["split"]) for r in sel.rows] == [("a", "train"), ("b", "train"), ("c", "validated")]
    assert [(r["id"], r["reason"]) for r in sel.rejects] == [("a", cv.DUPLICATE)]
    assert sel.filtered == {"already_in_train": 1}
    assert set(sel.index_sha256) == {"train.tsv", "validated.tsv"}

    voted = cv.select({"train": train, "validated": validated}, min_up_votes=2, max_down_votes=1)
    assert [r["id"] for r in voted.rows] == ["a"]
    assert voted.filtered == {"already_in_train": 1, "up_votes": 1, "down_votes": 1}

    limited = cv.select({"train": train}, limit=1)
    assert [r["id"] for r in limited.rows] == ["a"] and limited.filtered == {"limit": 1}


def test_bundled_release_parses_cleanly(corpus):
    tsvs = {s: (corpus / f"{s}.tsv").read_bytes() for s in ("train", "dev", "test", "validated")}
    sel = cv.select(tsvs)
    assert len(sel.rows) >= 40 and not sel.rejects
    assert all((corpus / "clips" / r["path"]).exists() for r in sel.rows)
    assert {r["split"] for r in sel.rows} == {"train", "dev", "test", "validated"}
    assert sel.filtered.get("already_in_train", 0) > 0


def test_paths_that_escape_the_clips_directory_are_bad_rows():
    hostile = ["../secret.mp3", "clips/../../x.mp3", "/etc/passwd", "gs://other-bucket/x.mp3", "a\\..\\b.mp3",
               "nul\x00.mp3"]
    rows, rejects = cv.parse_tsv(tsv(line("fine/sub.mp3", "Kept."), *(line(p, "Hostile.") for p in hostile)),
                                 "train.tsv", "train")
    assert [r["path"] for r in rows] == ["fine/sub.mp3"]
    assert sorted(r["path"] for r in rejects) == sorted(hostile)
    why = ("escapes the clips directory", "absolute or holds a backslash", "is a URL", "NUL byte")
    assert all(r["reason"] == cv.BAD_ROW and any(w in r["detail"] for w in why) for r in rejects), rejects


def test_a_symlink_leading_out_of_the_clips_directory_is_never_read(tmp_path):
    """The TSV path is clean but the file is a link to one outside clips/: rejected as bad_row by
    featurize_rows (the prepare task's core), its neighbour featurized as usual."""
    import shutil
    from pathlib import Path

    import torch

    from pipeline.config import load_config
    from pipeline.prepare import featurize_rows

    source = Path(__file__).parent / "fixtures" / "commonvoice" / "clips"
    first, second = sorted(source.glob("*.mp3"))[:2]
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(first, clips / "inside.mp3")
    outside = tmp_path / "elsewhere.mp3"
    shutil.copy(second, outside)
    (clips / "link.mp3").symlink_to(outside)
    rows, _ = cv.parse_tsv(tsv(line("inside.mp3", "In."), line("link.mp3", "Out.")), "train.tsv", "train")
    cfg = load_config("tiny")
    threads = torch.get_num_threads()
    try:  # featurize_rows pins torch to one thread, as in a Ray task
        table = featurize_rows(rows, str(clips), cfg.features, cfg.prepare).to_pylist()
    finally:
        torch.set_num_threads(threads)
    by_id = {r["id"]: r for r in table}
    assert by_id["inside"]["reason"] is None
    assert by_id["link"]["reason"] == cv.BAD_ROW and "resolves outside" in by_id["link"]["detail"]
