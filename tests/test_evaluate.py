"""Evaluate: distillation metrics against a direct recomputation, log-prob classification against a plain
forward and a known answer, generation scores against sacrebleu, bad manifest rows, and the Ray run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sacrebleu
import torch
from helpers import write_checkpoint

from pipeline import PipelineError, cache
from pipeline.ask import answer, llm_inputs, load_audio, prompt_template
from pipeline.config import load_config
from pipeline.evaluate import (
    EvalConfig,
    EvalError,
    ManifestError,
    classify,
    contains_match,
    corpus_bleu,
    distill_metrics,
    evaluate_distillation,
    evaluation_inputs,
    exact_match,
    label_logprobs,
    normalise,
    read_manifest,
    read_manifests,
    resolve_audio,
    run_evaluate,
    weighted_f1,
)
from pipeline.export import export_checkpoint, load_model, read_config
from pipeline.features import restore_row
from pipeline.model import build_student
from pipeline.teacher import decode_target
from pipeline.template import transcript_ids

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "tests" / "fixtures" / "eval"
CLIPS = ROOT / "tests" / "fixtures" / "commonvoice" / "clips"
MANIFESTS = [EVAL / "repeat.jsonl", EVAL / "sarcasm.jsonl", EVAL / "emotion.jsonl"]
SARCASM = "Respond whether the input is sarcastic. Answer with a simple yes or no."
EMOTIONS = ["Neutral", "Joy", "Sadness", "Anger", "Surprise", "Fear", "Disgust"]
MAX_NEW_TOKENS = 6


def nudged_checkpoint(ck: Path, *overrides: str, seed: int = 11, step: int = 3) -> Path:
    """A tiny student moved off its initialisation (as training would), checkpointed at `step`."""
    cfg = load_config("tiny", list(overrides))
    model = build_student(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ck.mkdir(parents=True)
    return write_checkpoint(ck, model, cfg, step=step)


def export_tiny(root: Path, *overrides: str, seed: int = 11) -> Path:
    """A tiny student moved off its initialisation (as training would), checkpointed and exported."""
    ck = nudged_checkpoint(root / "checkpoint", *overrides, seed=seed)
    return Path(export_checkpoint(str(ck), str(root / "model")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def features():
    return load_audio(CLIPS / "common_voice_en_35680426.mp3")


def write_mixed_manifest(root: Path) -> Path:
    """Line 1 good, line 2 an undecodable clip (found when read), line 3 a missing clip (a bad row)."""
    clips = root / "clips"
    clips.mkdir()
    shutil.copy(CLIPS / "common_voice_en_34270166.mp3", clips / "good.mp3")
    (clips / "broken.mp3").write_bytes(b"\0" * 2048)
    row = {"task": "classification", "instruction": SARCASM, "labels": ["Yes", "No"], "reference": "No"}
    manifest = root / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(row | {"audio": f"clips/{n}.mp3"}) + "\n"
                                for n in ("good", "broken", "absent")))
    return manifest


@pytest.fixture(scope="module")
def evaluated(ray_local, model_dir, prepared_mels, teacher_cache, tmp_path_factory) -> tuple[Path, dict]:
    """One run of the Ray wrapper: the dev split's distillation metrics, the three fixture manifests and one
    with an unreadable clip and a bad row (skipped)."""
    root = tmp_path_factory.mktemp("eval")
    manifests = [str(m) for m in MANIFESTS] + [str(write_mixed_manifest(root))]
    ecfg = EvalConfig(split="dev", batch_size=4, max_new_tokens=MAX_NEW_TOKENS, skip_bad_rows=True)
    summary = run_evaluate(str(model_dir), str(root / "out"), ecfg, mels_url=str(prepared_mels),
                           teacher_url=str(teacher_cache), manifests=manifests)
    return root / "out", summary


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- scorers ---------------------------------------------------------------------------------------------------


def test_normalised_exact_and_contains_match():
    assert normalise("  The Answer:\tParis!  ") == "the answer paris"
    assert normalise("“Mind the gap,” he said — twice…") == "mind the gap he said twice"
    assert normalise("It’s ¿NEVER? too late") == "its never too late"
    assert exact_match("Paris.", "paris") and not exact_match("Paris, France", "Paris")
    assert contains_match("I think it's Paris, France.", "paris france")
    assert contains_match("Yes.", "yes") and not contains_match("I know.", "no")
    assert not contains_match("anything", "...")  # an empty normalised reference matches nothing


def test_bleu_is_sacrebleus_corpus_bleu():
    hyps = ["the cat sat on the mat", "a quick brown fox jumps", "hello there", "Thank you."]
    refs = ["the cat sat on a mat", "the quick brown fox jumped", "hello there general", "Thank you."]
    score, signature = corpus_bleu(hyps, refs)
    expected = sacrebleu.corpus_bleu(hyps, [refs])
    assert score == pytest.approx(expected.score) and 0 < score < 100
    assert signature.startswith("nrefs:1") and "tok:13a" in signature
    assert corpus_bleu(refs, refs)[0] == pytest.approx(100.0)


def test_weighted_f1_by_hand():
    refs = ["a", "a", "a", "b"]
    preds = ["a", "b", "a", "b"]
    # a: P 1, R 2/3 -> F1 0.8 (support 3); b: P 1/2, R 1 -> F1 2/3 (support 1)
    assert weighted_f1(refs, preds) == pytest.approx((3 * 0.8 + 1 * 2 / 3) / 4)
    assert weighted_f1(["x", "y"], ["x", "y"]) == 1.0 and weighted_f1([], []) is None


def test_distill_metrics_at_known_gaps(loaded, features):
    """h_teacher = h_student: no gap, same first token; = -h_student: cosine -1, L2 twice the norm."""
    model, _ = loaded
    batch = torch.cat([features, load_audio(CLIPS / "common_voice_en_34270166.mp3")])
    with torch.no_grad():
        h = model(batch).h_student
    same = distill_metrics(model, batch, h)
    np.testing.assert_allclose(same["l2"], 0, atol=1e-5)
    np.testing.assert_allclose(same["cosine"], 1, atol=1e-5)
    np.testing.assert_allclose(same["kl"], 0, atol=1e-6)
    assert same["agree"].all() and (same["student_token"] == same["teacher_token"]).all()
    opposite = distill_metrics(model, batch, -h)
    np.testing.assert_allclose(opposite["cosine"], -1, atol=1e-5)
    np.testing.assert_allclose(opposite["l2"], 2 * h.norm(dim=-1).numpy(), rtol=1e-5)
    assert not opposite["agree"].any() and (opposite["kl"] > 0).all()
    assert same["l2"].dtype == np.float64 and same["student_token"].dtype == np.int64


# --- classification by label log-probs ---------------------------------------------------------------------------


def full_forward_logprobs(model, prompt: torch.Tensor, ids: list[int]) -> list[float]:
    """Independent of the KV cache: one forward over prompt ++ label tokens, no cache. `prompt` is
    `llm_inputs` (the audio prompt's embeddings)."""
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        seq = torch.cat([prompt, embed(torch.tensor([ids]))], dim=1)
        logprobs = torch.log_softmax(model.llm(inputs_embeds=seq, use_cache=False).logits[0].float(), dim=-1)
    start = prompt.shape[1] - 1  # the position that predicts the label's first token
    return [float(logprobs[start + k, t]) for k, t in enumerate(ids)]


def test_label_log_probs_equal_a_plain_full_sequence_forward(loaded, features):
    model, tokenizer = loaded
    for instruction in (None, SARCASM):
        template = prompt_template(model, tokenizer, instruction)
        labels = [transcript_ids(tokenizer, x) for x in ["Yes", "No", *EMOTIONS]]
        assert max(len(ids) for ids in labels) >= 4  # the tiny tokenizer splits these: the multi-token path runs
        got = label_logprobs(model, template, features, labels)
        prompt = llm_inputs(model, template, features)
        for ids, lp in zip(labels, got, strict=True):
            np.testing.assert_allclose(lp, full_forward_logprobs(model, prompt, ids), rtol=0, atol=1e-4)
            assert all(x < 0 for x in lp)


def test_classification_picks_the_label_the_model_scores_highest(loaded, features):
    """Against brute-force scoring of every label with plain forwards, by the sum and by the mean."""
    model, tokenizer = loaded
    template = prompt_template(model, tokenizer, "Respond in a single word what emotion the input exhibits.")
    prompt = llm_inputs(model, template, features)
    brute = [full_forward_logprobs(model, prompt, transcript_ids(tokenizer, x)) for x in EMOTIONS]
    for how, score in (("sum", sum), ("mean", lambda v: sum(v) / len(v))):
        best, _ = classify(model, tokenizer, template, features, EMOTIONS, how)
        scores = [score(v) for v in brute]
        assert best == EMOTIONS[int(np.argmax(scores))], how
        assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-3, "near tie: the comparison would mean little"
    # The sum and the mean disagree on these labels (of 2 to 5 tokens): the choice matters and is honoured.
    by_sum, _ = classify(model, tokenizer, template, features, EMOTIONS, "sum")
    by_mean, _ = classify(model, tokenizer, template, features, EMOTIONS, "mean")
    sums, means = [sum(v) for v in brute], [sum(v) / len(v) for v in brute]
    assert (by_sum == by_mean) == (int(np.argmax(sums)) == int(np.argmax(means)))


def test_classification_follows_a_known_answer(model_dir, features):
    """Make the LM head put almost all the next-token mass on one label's (single) token: that label must win,
    whichever it is, and whatever the prompt would otherwise prefer."""
    model, tokenizer = load_model(str(model_dir))  # a copy of its own: its head is edited
    labels = ["A", "B", "C", "D"]  # Hendrycks et al.'s multiple-choice labels; one token each here
    ids = [transcript_ids(tokenizer, x) for x in labels]
    assert all(len(i) == 1 for i in ids)
    template = prompt_template(model, tokenizer, "Answer A, B, C or D.")
    with torch.no_grad():
        h = model.llm.base_model(inputs_embeds=llm_inputs(model, template, features)).last_hidden_state[0, -1]
    head = model.llm.get_output_embeddings().weight
    original = head.detach().clone()
    before, _ = classify(model, tokenizer, template, features, labels)
    for target in ("C", "A", "D"):
        if target == before:
            continue
        with torch.no_grad():
            head.copy_(original)
            head[ids[labels.index(target)][0]] = 20 * h / h.norm()
        best, per_token = classify(model, tokenizer, template, features, labels)
        assert best == target
        assert per_token[labels.index(target)][0] > -1e-3  # p(target) ~ 1


# --- manifests ---------------------------------------------------------------------------------------------------


def test_fixture_manifests_resolve_audio_relative_to_their_directory():
    rows, errors = read_manifest(str(EVAL / "emotion.jsonl"))
    assert not errors and len(rows) == 3
    assert rows[0].audio == str(CLIPS / "common_voice_en_29670954.mp3") and rows[0].labels == tuple(EMOTIONS)
    assert rows[0].id == "emotion:1" and rows[0].where == f"{EVAL / 'emotion.jsonl'}:1"
    rows, _ = read_manifest(str(EVAL / "repeat.jsonl"))
    assert [r.instruction is None for r in rows] == [False, False, True]
    assert json.loads(rows[2].meta) == {"note": "no instruction: the question is answered as asked"}
    assert resolve_audio("gs://b/eval/qa.jsonl", "../clips/a.mp3") == "gs://b/clips/a.mp3"
    assert resolve_audio("gs://b/eval/qa.jsonl", "gs://c/a.mp3") == "gs://c/a.mp3"
    assert resolve_audio("eval/qa.jsonl", "/abs/a.mp3") == "/abs/a.mp3"


def write_bad_manifest(path: Path) -> dict[int, str]:
    """A manifest with good and bad rows; -> {line: the reason its error must give}."""
    clip = str(CLIPS / "common_voice_en_34270166.mp3")
    good = {"task": "classification", "audio": clip, "instruction": SARCASM, "labels": ["Yes", "No"],
            "reference": "No"}
    lines = [
        json.dumps(good),                                                                 # 1 good
        "{not json",                                                                      # 2
        json.dumps(good | {"audio": "clips/absent.mp3"}),                                 # 3
        json.dumps(good | {"task": "translation"}),                                       # 4
        json.dumps({k: v for k, v in good.items() if k != "labels"}),                     # 5
        "",                                                                               # 6 blank: skipped
        json.dumps(good | {"reference": "Maybe"}),                                        # 7
        json.dumps(good | {"lables": ["Yes", "No"]}),                                     # 8
        json.dumps({"task": "generation", "audio": clip, "reference": "Thank you."}),     # 9 good
        json.dumps({"task": "generation", "audio": clip, "reference": " "}),              # 10
        json.dumps(good | {"labels": ["Yes"]}),                                           # 11
        json.dumps(["a", "list"]),                                                        # 12
        json.dumps({"task": "generation", "audio": str(CLIPS), "reference": "x"}),        # 13
    ]
    path.write_text("\n".join(lines) + "\n")
    return {2: "not valid JSON", 3: f"audio file not found: {path.parent / 'clips' / 'absent.mp3'}",
            4: "unknown task type 'translation'", 5: "a classification row needs \"labels\"",
            7: "reference 'Maybe' is not one of the labels", 8: "unknown field(s) ['lables']",
            10: "missing \"reference\"", 11: "at least 2 non-empty strings", 12: "expected a JSON object",
            13: "audio file is a directory"}


def test_bad_manifest_rows_are_named_by_file_and_line(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    expected = write_bad_manifest(manifest)
    rows, errors = read_manifest(str(manifest))
    assert [r.line for r in rows] == [1, 9]
    assert len(errors) == len(expected)
    for error, (line, reason) in zip(errors, sorted(expected.items()), strict=True):
        assert error.startswith(f"{manifest}:{line}: ") and reason in error, (line, error)

    with pytest.raises(ManifestError) as info:
        read_manifests([str(EVAL / "sarcasm.jsonl"), str(manifest)])
    message = str(info.value)
    assert f"{len(expected)} bad manifest row(s)" in message and isinstance(info.value, PipelineError)
    for line in expected:
        assert f"{manifest}:{line}: " in message
    tasks, bad = read_manifests([str(EVAL / "sarcasm.jsonl"), str(manifest)], skip_bad_rows=True)
    assert [(name, len(rows)) for name, rows in tasks] == [("sarcasm", 3), ("bad", 2)]
    assert bad == {"sarcasm": [], "bad": errors}

    with pytest.raises(ManifestError, match="no such manifest file"):
        read_manifest(str(tmp_path / "absent.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(str(tmp_path / "empty.jsonl"))
    first = manifest.read_text().splitlines()[0]
    dup = tmp_path / "dup.jsonl"
    dup.write_text(first + "\n" + json.dumps(json.loads(first) | {"id": "dup:1"}))  # line 1's default id
    assert read_manifest(str(dup))[1] == [f"{dup}:2: id 'dup:1' is also on line 1"]


def run_job(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.evaluate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_the_job_refuses_bad_rows_before_anything_runs(model_dir, tmp_path):
    manifest = tmp_path / "bad.jsonl"
    expected = write_bad_manifest(manifest)
    done = run_job("--model", str(model_dir), "--tasks", str(manifest), "--output", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    assert "error:" in done.stderr and "Traceback" not in done.stderr
    for line in expected:
        assert f"{manifest}:{line}: " in done.stderr
    assert not (tmp_path / "out").exists()


# --- the Ray run -------------------------------------------------------------------------------------------------


def test_a_teacher_cache_for_another_llm_is_refused(ray_local, prepared_mels, teacher_cache, tmp_path):
    other = export_tiny(tmp_path, "teacher.tiny_seed=1")
    with pytest.raises(cache.DatasetError, match="made for another model/template"):
        evaluate_distillation(str(other), str(prepared_mels), str(teacher_cache), EvalConfig())
    with pytest.raises(EvalError, match="both"):
        run_evaluate(str(other), str(tmp_path / "out"), EvalConfig(), mels_url=str(prepared_mels))


def test_distillation_metrics_match_a_direct_computation(evaluated, loaded, prepared_mels, teacher_cache):
    out, summary = evaluated
    model, _ = loaded
    table = pq.read_table(out / "distillation" / "examples.parquet").to_pylist()
    mels = {r["id"]: r for f in (prepared_mels / "mels").glob("*.parquet") for r in pq.read_table(f).to_pylist()}
    targets = {r["id"]: r for f in (teacher_cache / "targets").glob("*.parquet") for r in pq.read_table(f).to_pylist()}
    dev = sorted(i for i, r in mels.items() if r["split"] == "dev" and i in targets)
    assert [r["id"] for r in table] == dev and len(dev) >= 5
    cfg = load_config("tiny")
    head = model.llm.get_output_embeddings()
    for row in (table[0], table[len(table) // 2], table[-1]):
        mel = mels[row["id"]]
        features = torch.from_numpy(restore_row(mel["mel"], mel["mel_pad_value"], cfg.features))[None]
        h_t = torch.from_numpy(decode_target(targets[row["id"]]["target"], "float16"))
        with torch.no_grad():
            h_s = model(features).h_student
            h_s = h_s[0]
            l2 = float(torch.sqrt(((h_s - h_t) ** 2).sum()))
            cosine = float(h_s @ h_t / (h_s.norm() * h_t.norm()))
            student, teacher = int(head(h_s).argmax()), int(head(h_t).argmax())
            p_t, log_p_s = torch.softmax(head(h_t), -1), torch.log_softmax(head(h_s), -1)
            kl = float((p_t * (p_t.log() - log_p_s)).sum())
        assert row["l2"] == pytest.approx(l2, rel=1e-4)
        assert row["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
        assert row["cosine"] == pytest.approx(cosine, rel=1e-4, abs=1e-6)
        assert (row["student_token"], row["teacher_token"], row["agree"]) == (student, teacher, student == teacher)
        assert row["n_tokens"] == len(targets[row["id"]]["token_ids"])
    d = summary["distillation"]
    l2s = [r["l2"] for r in table]
    assert d["count"] == d["l2"]["count"] == len(dev) == d["join"]["matched"]
    assert d["l2"]["mean"] == pytest.approx(np.mean(l2s)) and d["l2"]["median"] == pytest.approx(np.median(l2s))
    assert d["cosine"]["median"] == pytest.approx(np.median([r["cosine"] for r in table]))
    agree = [r["agree"] for r in table]
    assert d["first_token_agreement"] == {"count": len(agree), "agree": sum(agree), "rate": sum(agree) / len(agree)}
    assert json.loads((out / "distillation" / "summary.json").read_text()) == d


def test_task_outputs_match_direct_scoring(evaluated, loaded):
    out, summary = evaluated
    model, tokenizer = loaded
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(summary["tasks"]) == ["emotion", "mixed", "repeat", "sarcasm"]

    repeat = read_jsonl(out / "tasks" / "repeat" / "examples.jsonl")
    assert [r["id"] for r in repeat] == ["repeat-thanks", "repeat-ferry", "answer-committee"]
    assert repeat[2]["meta"] == {"note": "no instruction: the question is answered as asked"}
    for r in repeat:
        assert r["error"] is None
        assert r["prediction"] == answer(model, tokenizer, r["audio"], prompt=r["instruction"],
                                         max_new_tokens=MAX_NEW_TOKENS).strip()
        assert (r["exact"], r["contains"]) == (exact_match(r["prediction"], r["reference"]),
                                               contains_match(r["prediction"], r["reference"]))
    gen = json.loads((out / "tasks" / "repeat" / "summary.json").read_text())["generation"]
    expected = sacrebleu.corpus_bleu([r["prediction"] for r in repeat], [[r["reference"] for r in repeat]])
    assert gen["bleu"] == pytest.approx(expected.score)
    assert gen["count"] == 3 and gen["exact_match"] == np.mean([r["exact"] for r in repeat])

    for name in ("sarcasm", "emotion"):
        rows = read_jsonl(out / "tasks" / name / "examples.jsonl")
        assert [r["line"] for r in rows] == [1, 2, 3]
        for r in rows:
            features = load_audio(r["audio"])
            template = prompt_template(model, tokenizer, r["instruction"])
            best, per_token = classify(model, tokenizer, template, features, r["labels"])
            assert r["prediction"] == best and r["correct"] == (best == r["reference"])
            np.testing.assert_allclose(np.concatenate(r["label_logprobs"]), np.concatenate(per_token), atol=1e-5)
            assert r["label_scores"] == pytest.approx([sum(lp) for lp in per_token])
        s = summary["tasks"][name]["classification"]
        assert s["count"] == 3 and s["label_score"] == "sum"
        assert s["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
        assert s["weighted_f1"] == pytest.approx(weighted_f1([r["reference"] for r in rows],
                                                             [r["prediction"] for r in rows]))
        assert sum(s["predicted"].values()) == 3 and summary["tasks"][name]["skipped"] == []


def test_unreadable_audio_is_reported_on_its_row_and_bad_rows_are_skipped(evaluated):
    out, summary = evaluated
    manifest = Path(summary["tasks"]["mixed"]["manifest"])
    task = summary["tasks"]["mixed"]
    assert (task["rows"], task["scored"], task["classification"]["count"]) == (2, 1, 1)
    (error,) = task["errors"]
    assert error.startswith(f"{manifest}:2: {manifest.parent / 'clips' / 'broken.mp3'}: ") and "undecodable" in error
    assert task["skipped"] == [f"{manifest}:3: audio file not found: {manifest.parent / 'clips' / 'absent.mp3'}"]
    rows = read_jsonl(out / "tasks" / "mixed" / "examples.jsonl")
    assert [(r["line"], r["error"] is None, r["prediction"] is None) for r in rows] == [(1, True, False),
                                                                                       (2, False, True)]


def test_the_same_evaluation_again_is_not_redone(evaluated, model_dir, prepared_mels, teacher_cache, caplog):
    """Idempotent: the same model, data and settings into the same directory return the summary there, and
    write nothing; a change to any of them is a new evaluation (its fingerprint differs)."""
    out, summary = evaluated
    manifests = [str(m) for m in MANIFESTS] + [str(out.parent / "mixed.jsonl")]
    ecfg = EvalConfig(split="dev", batch_size=4, max_new_tokens=MAX_NEW_TOKENS, skip_bad_rows=True)
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="pipeline.evaluate"):
        again = run_evaluate(str(model_dir), str(out), ecfg, mels_url=str(prepared_mels),
                             teacher_url=str(teacher_cache), manifests=manifests)
    assert again == json.loads((out / "summary.json").read_text()) and again["tasks"] == summary["tasks"]
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written

    config = read_config(str(model_dir))
    args = (config, None, ecfg, str(prepared_mels), str(teacher_cache), manifests, summary["versions"])
    base = cache.fingerprint(evaluation_inputs(*args))
    assert summary["inputs_sha256"] == base
    other_weights = {**config, "source": {**config["source"], "trainable_sha256": "0" * 64}}
    for changed in [(other_weights, *args[1:]), (*args[:2], dataclasses.replace(ecfg, max_new_tokens=3), *args[3:]),
                    (*args[:5], manifests[:1], args[6]), (*args[:3], None, None, manifests, args[6])]:
        assert cache.fingerprint(evaluation_inputs(*changed)) != base


@pytest.mark.slow
def test_the_job_end_to_end(ray_local, evaluated, model_dir, tmp_path):
    """`python -m jobs.evaluate` on the session's Ray cluster: the CLI flags reach the run, and its outputs
    equal the in-process run's."""
    out = tmp_path / "out"
    done = run_job("--model", str(model_dir), "--tasks", str(EVAL / "sarcasm.jsonl"), "--tasks",
                   str(EVAL / "repeat.jsonl"), "--max-new-tokens", str(MAX_NEW_TOKENS), "--output", str(out),
                   env={"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["max_new_tokens"] == MAX_NEW_TOKENS and "distillation" not in summary
    first = evaluated[1]["tasks"]
    for name in ("sarcasm", "repeat"):
        assert read_jsonl(out / "tasks" / name / "examples.jsonl") == read_jsonl(
            evaluated[0] / "tasks" / name / "examples.jsonl")
        kind = "classification" if name == "sarcasm" else "generation"
        assert printed[name][kind] == summary["tasks"][name][kind] == first[name][kind]


@pytest.mark.slow
def test_a_learning_curve_scores_each_checkpoint_as_a_pass_of_its_own_does(ray_local, prepared_mels, tmp_path):
    """jobs.curve's core: a run's kept checkpoints (steps 2 and 4, Ray Train's layout) and the untrained student answer
    the same clips in one pass; each point equals what an answer pass of that model alone (with the untrained one,
    as the evaluation runs it) scores, and counts the examples its run had seen."""
    from pipeline.curve import learning_curve
    from pipeline.evaluate import answer_spoken_questions
    from pipeline.export import export_untrained

    run, out = tmp_path / "run", tmp_path / "curve"
    for step in (2, 4):
        nudged_checkpoint(run / "train" / f"checkpoint_2025-01-01_1{step}-00-00.000001", seed=step, step=step)
    untrained = export_untrained(load_config("tiny"), str(tmp_path / "model-0"))
    ecfg = EvalConfig(split="dev", answers=True, max_questions=3, max_new_tokens=4)
    curve = learning_curve(str(run), str(prepared_mels), str(out), ecfg, untrained=untrained)
    batch = load_config("tiny").train.global_batch_size
    assert [(p["step"], p["examples"]) for p in curve["points"]] == [(0, 0), (2, 2 * batch), (4, 4 * batch)]
    step4 = str(out / "models" / "step-4")
    assert read_config(step4)["source"]["step"] == 4
    _, alone = answer_spoken_questions({"student": step4, "baseline": untrained}, str(prepared_mels), ecfg)
    assert curve["count"] == alone["count"] == 3 and curve["cascade"] == pytest.approx(alone["cascade"])
    assert {k: curve["points"][0][k] for k in ("agree", "kl", "word_f1")} == pytest.approx(alone["baseline"])
    assert {k: curve["points"][2][k] for k in ("agree", "kl", "word_f1")} == pytest.approx(alone["student"])
    assert curve["points"][1]["kl"] != curve["points"][2]["kl"]  # two models, not one twice
    assert len((out / "examples.jsonl").read_text().splitlines()) == 3
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_a_block_of_spoken_questions_is_answered_as_each_question_alone(prepared_mels, tmp_path):
    """qa.AnswerWorker answers a block of questions as one batch per system (the typed prompts left-padded to the
    longest). Each answer, first token and KL equals what the question alone gets by the unbatched paths:
    pipeline.ask's streamed `generate` for the student, transformers' `generate` on the one unpadded prompt for the
    LLM, and a plain forward pass for the first-position log-probs."""
    from pipeline import qa
    from pipeline.ask import generate
    from pipeline.ingest import question_rows
    from pipeline.losses import kl_divergence
    from pipeline.template import stop_ids

    n = 6
    worker = qa.AnswerWorker({"student": str(export_tiny(tmp_path))}, EvalConfig(split="dev", max_new_tokens=n))
    rows = qa.pick(question_rows(str(prepared_mels), "dev"), 4)
    got = worker(rows).to_pylist()
    model, tokenizer = worker.students["student"]
    llm, template = model.llm, model.template
    stops = sorted(stop_ids(llm, tokenizer, template))
    prompts = [template.wrap(transcript_ids(tokenizer, r["sentence"])) for r in rows.to_pylist()]
    assert len({len(p) for p in prompts}) > 1, "the block's prompts should differ in length (padding)"

    def log_probs(**inputs) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(llm(**inputs).logits[0, -1].float(), -1)

    for row, prompt, answered in zip(rows.to_pylist(), prompts, got, strict=True):
        assert answered["id"] == row["id"]
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               eos_token_id=stops, pad_token_id=stops[0])
        assert answered["teacher_answer"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        teacher = log_probs(input_ids=ids)
        assert answered["teacher_first_token"] == int(teacher.argmax())

        features = torch.from_numpy(restore_row(row["mel"], row["mel_pad_value"], worker.fcfg)).unsqueeze(0)
        alone = tokenizer.decode(list(generate(model, tokenizer, features, max_new_tokens=n)), skip_special_tokens=True)
        student = log_probs(inputs_embeds=llm_inputs(model, template, features))
        assert answered["student"]["answer"] == alone.strip()
        assert answered["student"]["first_token"] == int(student.argmax())
        assert answered["student"]["kl"] == pytest.approx(float(kl_divergence(teacher, student)), rel=1e-4, abs=1e-5)
    assert any(a["student"]["answer"] for a in got), "a nudged student answers with some tokens"


def downloaded_copies() -> set[str]:
    """The model directories a load from remote storage has downloaded and left in the temporary directory."""
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("diva-model-*")}


@pytest.mark.slow
def test_a_model_on_gcs_is_evaluated_as_the_local_one(ray_local, gcs, bucket, evaluated, model_dir, prepared_mels,
                                                      teacher_cache):
    """A model directory on gs:// (README: evaluate and serve take one): its config is read without downloading it,
    the distillation metrics equal the local model's, the spoken questions are answered by it and by a gs:// baseline,
    and no downloaded copy is left behind in the temporary directory (a paper-size Q-Former is ~3 GB a copy)."""
    fs = gcs.fs()
    fs.put(str(model_dir), f"{bucket}/model", recursive=True)
    fs.invalidate_cache()
    remote = f"gs://{bucket}/model"
    assert read_config(remote) == read_config(str(model_dir))
    before = downloaded_copies()
    ecfg = EvalConfig(split="dev", batch_size=4, max_new_tokens=4, answers=True, max_questions=2)
    summary = run_evaluate(remote, f"gs://{bucket}/eval", ecfg, mels_url=str(prepared_mels),
                           teacher_url=str(teacher_cache), baseline=remote)
    assert summary["distillation"]["l2"] == pytest.approx(evaluated[1]["distillation"]["l2"])
    assert summary["answers"]["count"] == 2 and summary["answers"]["student"] == summary["answers"]["baseline"]
    assert downloaded_copies() == before
    fs.rm(f"{bucket}/model/{'tokenizer_config.json'}")
    fs.invalidate_cache()
    with pytest.raises(PipelineError, match="tokenizer_config.json is missing"):
        read_config(remote)


@pytest.mark.slow
def test_an_evaluation_of_other_inputs_replaces_the_earlier_one_whole(ray_local, evaluated, model_dir, tmp_path,
                                                                      monkeypatch):
    """Into an output that holds an evaluation (distillation and four tasks), another of other inputs (one task):
    cut short, it leaves no summary.json to vouch for a mixture, so the first one's inputs are evaluated again, not
    taken as done; run whole, it leaves only its own parts."""
    import pipeline.evaluate as evaluate

    out = tmp_path / "out"
    shutil.copytree(evaluated[0], out)
    ecfg = EvalConfig(max_new_tokens=MAX_NEW_TOKENS)
    repeat = [str(EVAL / "repeat.jsonl")]

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "_write_tasks", cut)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(str(model_dir), str(out), ecfg, manifests=repeat)
    assert not (out / "summary.json").exists() and not (out / "distillation").exists()
    monkeypatch.undo()
    summary = run_evaluate(str(model_dir), str(out), ecfg, manifests=repeat)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "tasks"]
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["repeat"] == sorted(summary["tasks"])
    assert read_jsonl(out / "tasks" / "repeat" / "examples.jsonl") == read_jsonl(
        evaluated[0] / "tasks" / "repeat" / "examples.jsonl")
