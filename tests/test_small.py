"""The real small models (Whisper tiny.en, SmolLM2-135M-Instruct from their packages) through the pipeline:
ChatML template ids, teacher targets equal a direct forward, and a short run of every stage on a small spoken
corpus - a few training steps, an export that answers a spoken question with text, the answer evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def overrides(models: Path, *more: str) -> list[str]:
    return [f"model.whisper={models / 'whisper-tiny.en'}", f"teacher.model={models / 'smollm2-135m-instruct'}", *more]


def demo(models: Path, *more: str):
    """`make demo`'s configuration: the small models through the vocabulary projection (docs/small.md)."""
    return load_config("demo", overrides(models, *more))


@pytest.fixture(scope="module")
def tokenizer(real_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_models / "smollm2-135m-instruct")


def test_chatml_template_ids_and_the_system_turn(tokenizer):
    from pipeline.template import derive_template

    empty = derive_template(tokenizer, "")  # the small preset's choice: an empty system turn
    ids = tokenizer.convert_tokens_to_ids
    assert list(empty.prefix_ids) == [ids("<|im_start|>"), *tokenizer.encode("system\n"), ids("<|im_end|>"),
                                      *tokenizer.encode("\n"), ids("<|im_start|>"), *tokenizer.encode("user\n")]
    assert list(empty.suffix_ids) == [ids("<|im_end|>"), *tokenizer.encode("\n"), ids("<|im_start|>"),
                                      *tokenizer.encode("assistant\n")]
    default = derive_template(tokenizer)  # without a system turn SmolLM2's template adds its own persona
    assert tokenizer.decode(default.prefix_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert len(default.prefix_ids) - len(empty.prefix_ids) == 16


def test_smollm2_targets_equal_a_direct_forward(real_models, tokenizer):
    from pipeline.builders import load_llm
    from pipeline.teacher import compute_targets
    from pipeline.template import derive_template, transcript_ids

    llm = load_llm(real_models / "smollm2-135m-instruct", dtype=torch.float32)
    template = derive_template(tokenizer, "")
    texts = ["What is the capital of France?", "Hi.", "Please tell me how many legs a spider has, and why."]
    ids = [transcript_ids(tokenizer, t) for t in texts]
    got = compute_targets(llm, template, ids, padding_side="left", max_batch_size=3).hidden
    for row, seq in enumerate(ids):
        with torch.no_grad():
            out = llm(torch.tensor([template.wrap(seq)]), output_hidden_states=True)
        np.testing.assert_allclose(got[row], out.hidden_states[-1][0, -1].numpy(), rtol=0, atol=2e-4)
        # ... and that state is what the LM head reads: its argmax is the greedy first answer token.
        assert int(llm.get_output_embeddings()(torch.from_numpy(got[row])).argmax()) == int(out.logits[0, -1].argmax())


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    from pipeline.speech_corpus import build_corpus

    out = tmp_path_factory.mktemp("spoken") / "release"
    build_corpus(out, clips=40, questions=3, seed=5)
    return out


def test_every_stage_runs_with_the_real_models(ray_local, real_models, spoken, tmp_path):
    from pipeline.ask import answer
    from pipeline.export import export_checkpoint, export_untrained, load_model
    from pipeline.prepare import run_prepare
    from pipeline.report import read_metrics
    from pipeline.teacher import run_teacher
    from pipeline.train import run_training

    cfg = demo(real_models, "train.steps=4", "train.align_only_steps=2", "train.log_every=1",
                "train.checkpoint_every=4", "train.micro_batch_size=8", "train.global_batch_size=8")
    mels, teacher, run = str(tmp_path / "mels"), str(tmp_path / "teacher"), str(tmp_path / "run")
    assert run_prepare(cfg, str(spoken), mels)["counts"]["clips_by_split"]["questions"] == 6
    run_teacher(cfg, mels, teacher)
    run_training(cfg, mels, teacher, run)
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert "distill" not in metrics[0] and "distill" in metrics[2]  # alignment alone, then both losses
    model_dir = export_checkpoint(run, str(tmp_path / "model"))
    untrained = export_untrained(cfg, str(tmp_path / "model-0"))
    model, tok = load_model(model_dir)
    clip = next((spoken / "clips").glob("*.mp3"))
    reply = answer(model, tok, clip, max_new_tokens=12)
    # Four steps through the vocabulary projection teach no words: the reply may be whitespace (these gave 12
    # newlines), but it is the decoded text of the tokens generated, at least one of them.
    assert isinstance(reply, str) and reply
    # The evaluation through its CLI, on this session's Ray: --baseline answers beside --model.
    done = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--config", "demo", "--model", str(model_dir),
         "--baseline", str(untrained), "--mels", mels, "--teacher", teacher, "--output", str(tmp_path / "eval"),
         *overrides(real_models, "eval.max_questions=2", "eval.max_new_tokens=12")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads((tmp_path / "eval" / "summary.json").read_text())["answers"]
    assert answers["count"] == 2 and {"student", "baseline", "cascade"} <= set(answers)
    assert json.loads(done.stdout)["answers"]["baseline"] == answers["baseline"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers" / "examples.jsonl").read_text().splitlines()]
    # The cascade transcribes TTS speech of a held-out question: its words are the question's (tiny.en is good
    # at this), so its answer is (nearly) the typed question's.
    for row in rows:
        assert row["transcript"] and row["teacher_answer"]
        assert answers["cascade"]["word_f1"] >= 0.5
