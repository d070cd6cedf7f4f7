"""The spoken corpus generator: sentences, held-out questions, the plan, and a real 20-clip render
(hibari + espeak-ng + libsndfile MP3, no mocks) read back by the pipeline's own readers."""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline import commonvoice as cv
from pipeline import features
from pipeline import sentences as text
from pipeline import speech_corpus as sc
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SEED, CLIPS, QUESTIONS = 5, 20, 4
ARGS = {"clips": CLIPS, "questions": QUESTIONS, "seed": SEED}

needs_tts = pytest.mark.skipif(shutil.which("espeak-ng") is None or importlib.util.find_spec("hibari") is None,
                               reason="needs espeak-ng and hibari-tts")


def test_sentences_are_many_distinct_and_mixed():
    got = sc.generate_sentences(0, 3000)
    texts = [s.text for s in got]
    assert len({sc.normalise(t) for t in texts}) == 3000
    assert all(t[0].isupper() and t[-1] in ".?!" for t in texts)
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) >= sc.MIN_WORDS and max(lengths) <= sc.MAX_WORDS and 6 <= statistics.mean(lengths) <= 10
    # About half questions, a fifth requests, the rest statements.
    shares = {k: n / 3000 for k, n in Counter(s.kind for s in got).items()}
    assert 0.42 <= shares[text.QUESTION] <= 0.56 and 0.15 <= shares[text.REQUEST] <= 0.26
    assert 0.24 <= shares[text.STATEMENT] <= 0.38
    assert sc.generate_sentences(0, 3000) == got and sc.generate_sentences(1, 3000) != got


def test_held_out_questions_never_appear_among_sentences():
    held_out = {sc.normalise(q) for q in sc.eval_questions()}
    assert len(held_out) == len(text.EVAL_QUESTIONS) >= 60
    assert all(q.endswith("?") and accepted for q, accepted in text.EVAL_QUESTIONS)
    # The templates do make some of them: the generator drops them.
    geography = next(f for f in text.FAMILIES if f.name == "geography" and f.kind == text.QUESTION)
    assert "What is the capital of France?" in text.expanded(geography)
    assert not held_out & {sc.normalise(s.text) for s in sc.generate_sentences(2, 8000)}


def test_grammar_helpers():
    assert [text.words(n) for n in (7, 21, 100, 366)] == ["seven", "twenty-one", "one hundred",
                                                          "three hundred and sixty-six"]
    assert text.past("buy some milk") == "bought some milk" and text.past("tidy the room") == "tidied the room"
    assert text.past("plan a trip") == "planned a trip" and text.past("bake bread") == "baked bread"
    assert [text.with_article(w) for w in ("owl", "hour", "unicorn", "orange coat")] == [
        "an owl", "an hour", "a unicorn", "an orange coat"]


def test_plan_is_deterministic_with_disjoint_splits():
    plan = sc.plan_corpus(3, 300, 10)
    assert sc.tsv_files(plan) == sc.tsv_files(sc.plan_corpus(3, 300, 10))
    assert sc.tsv_files(plan) != sc.tsv_files(sc.plan_corpus(4, 300, 10))
    fewer = sc.tsv_files(sc.plan_corpus(3, 300, 2))  # --questions changes only questions.tsv
    assert {n: d for n, d in fewer.items() if n != "questions.tsv"} == {
        n: d for n, d in sc.tsv_files(plan).items() if n != "questions.tsv"}
    by_split = {s: {c.sentence for c in plan if c.split == s} for s in (*sc.SPLITS, sc.QUESTIONS_SPLIT)}
    assert all(by_split.values())
    assert sum(len(s) for s in by_split.values()) == len(set().union(*by_split.values()))
    # --questions N spreads its N over the list, which runs by topic: not its first N (ten capitals).
    everything = sc.eval_questions()
    assert by_split[sc.QUESTIONS_SPLIT] == {everything[i * len(everything) // 10] for i in range(10)}
    assert sum("capital" in q for q in by_split[sc.QUESTIONS_SPLIT]) <= 2
    assert sc.spread(everything, len(everything)) == everything and sc.spread(everything, 0) == []
    assert len({c.number for c in plan}) == len(plan) == 300 + 2 * 10
    release = [c for c in plan if c.split != sc.QUESTIONS_SPLIT]
    assert Counter(c.voice.engine for c in release)["espeak"] == round(sc.ESPEAK_SHARE * 300)
    # A sentence spoken twice is spoken by two different voices.
    voices: dict[str, list[str]] = {}
    for c in release:
        voices.setdefault(c.sentence, []).append(c.voice.name)
    assert max(len(v) for v in voices.values()) >= 2
    assert all(len(set(v)) == len(v) for v in voices.values())


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("speech") / "release"
    return out, sc.build_corpus(out, workers=2, **ARGS)


def tsv_rows(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert tuple(lines[0].split("\t")) == cv.CV_COLUMNS
    return [dict(zip(cv.CV_COLUMNS, line.split("\t"), strict=True)) for line in lines[1:]]


@pytest.mark.slow
@needs_tts
def test_release_is_what_the_pipeline_reads(release):
    import torch

    from pipeline.prepare import featurize_rows

    out, summary = release
    sel = cv.select({s: (out / f"{s}.tsv").read_bytes() for s in sc.SPLITS})
    assert not sel.rejects and len(sel.rows) == CLIPS
    assert sorted(r["path"] for r in tsv_rows(out / "validated.tsv")) == sorted(r["path"] for r in sel.rows)
    sentences = {s: {r["sentence"] for r in tsv_rows(out / f"{s}.tsv")} for s in (*sc.SPLITS, "questions")}
    assert all(sentences.values())
    assert sum(map(len, sentences.values())) == len(set().union(*sentences.values()))
    asked = tsv_rows(out / "questions.tsv")
    assert len(asked) == 2 * QUESTIONS
    assert {r["sentence"] for r in asked} == set(sc.spread(sc.eval_questions(), QUESTIONS))

    cfg = load_config("tiny")
    threads = torch.get_num_threads()
    try:  # featurize_rows pins torch to one thread (as in a Ray task); the rest of the session should not be
        table = featurize_rows(sel.rows, str(out / "clips"), cfg.features, cfg.prepare)
    finally:
        torch.set_num_threads(threads)
    assert table.column("reason").null_count == CLIPS
    for row in sel.rows + asked:
        decoded = features.decode(str(out / "clips" / row["path"]))
        assert decoded.native_rate == sc.SAMPLE_RATE and decoded.declared_frames == decoded.read_frames
        assert 0.8 <= len(decoded.audio) / 16000 <= 8.0

    assert summary["rendered"] == CLIPS + 2 * QUESTIONS and summary["counts"]["clips"]["questions"] == 8
    assert set(summary["clips_by_engine"]) == {"hibari", "espeak"}
    assert 1.0 <= summary["mean_clip_s"] <= 5.0 and summary["render"]["clips_per_s"] > 0


@pytest.mark.slow
@needs_tts
def test_rerun_reuses_clips_and_renders_identically(release):
    out, _ = release
    files = sorted(out.glob("*.tsv")) + [out / sc.SUMMARY_FILE]
    before = {p: p.read_bytes() for p in files}
    assert sc.build_corpus(out, **ARGS)["rendered"] == 0
    assert {p: p.read_bytes() for p in files} == before

    # A clip lost in a crash is rendered again, to the same bytes; the TSVs do not change.
    victim = sorted((out / "clips").glob("*.mp3"))[0]
    data = victim.read_bytes()
    victim.unlink()
    assert sc.build_corpus(out, workers=1, **ARGS)["rendered"] == 1
    assert victim.read_bytes() == data
    assert all(p.read_bytes() == before[p] for p in files if p.suffix == ".tsv")

    with pytest.raises(sc.CorpusError, match="another corpus.*seed"):
        sc.build_corpus(out, **(ARGS | {"seed": SEED + 1}))


@pytest.mark.slow
@needs_tts
def test_job_prints_nothing_new_and_one_line_errors(release):
    out, _ = release
    cmd = [sys.executable, "-m", "jobs.corpus", "--output", str(out), "--clips", str(CLIPS),
           "--questions", str(QUESTIONS)]
    done = subprocess.run([*cmd, "--seed", str(SEED)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "nothing new" in done.stdout and f"{CLIPS} clips" in done.stdout
    refused = subprocess.run([*cmd, "--seed", str(SEED + 1)], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "--overwrite" in refused.stderr


@pytest.mark.slow
def test_smollm2_answers_a_handful_of_held_out_questions(real_models):
    handful = text.EVAL_QUESTIONS[:: len(text.EVAL_QUESTIONS) // 4][:4]
    answers = sc.answer_questions([q for q, _ in handful], max_new_tokens=16,
                                 models_dir=str(real_models))
    assert [sc.answer_ok(a, accepted) for (_, accepted), a in zip(handful, answers, strict=True)] == [True] * 4, answers
