"""model.projection=vocabulary (beyond the paper, docs/small.md) with the real small models: the scores are Whisper's
own output head read on the LLM's vocabulary, the virtual tokens are mixes of the LLM's embeddings, the alignment
term is a cross-entropy against each slot's token, and an export of such a student loads as the same model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, load_config
from pipeline.losses import DivaLoss, slot_targets, token_alignment_loss

pytestmark = pytest.mark.slow  # real checkpoints, converted once per run by conftest's real_models


def vocabulary_cfg(models, *more: str):
    return load_config("demo", [f"model.whisper={models / 'whisper-tiny.en'}",
                                f"teacher.model={models / 'smollm2-135m-instruct'}",
                                "model.projection=vocabulary", "train.align_side=left", *more])


@pytest.fixture(scope="module")
def student(real_models):
    from pipeline.model import build_student

    return build_student(vocabulary_cfg(real_models), seed=0).eval()


@pytest.fixture(scope="module")
def whisper(real_models):
    from pipeline.builders import load_whisper, load_whisper_tokenizer

    return load_whisper(real_models / "whisper-tiny.en"), load_whisper_tokenizer(real_models / "whisper-tiny.en")


def test_the_scores_are_whisper_s_own_head_on_the_llm_s_tokens(student, whisper, real_models):
    """For an LLM token whose text Whisper also has as one token, its score is Whisper's output logit for that
    token (proj_out of the same state); for one Whisper splits, the mean of its pieces' logits. The " " filler
    scores as Whisper's end-of-text; the LLM's special tokens are never chosen."""
    from transformers import AutoTokenizer

    model, wtok = whisper
    tok = AutoTokenizer.from_pretrained(real_models / "smollm2-135m-instruct")
    hidden = torch.randn(2, 5, model.config.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = student.projection.scores(hidden)
        whisper_logits = model.proj_out(hidden)
    for word in [" capital", " Thailand", " What", "?", " dolphins"]:
        [llm_id] = tok(word, add_special_tokens=False)["input_ids"]
        pieces = wtok(tok.decode([llm_id]), add_special_tokens=False)["input_ids"]
        expected = whisper_logits[..., pieces].mean(-1)
        torch.testing.assert_close(scores[..., llm_id], expected, rtol=1e-5, atol=1e-4)
    filler = student.projection.filler_id
    assert tok.decode([filler]) == " "
    torch.testing.assert_close(scores[..., filler], whisper_logits[..., wtok.eos_token_id], rtol=1e-5, atol=1e-4)
    for special in tok.all_special_ids:
        assert scores[..., special].eq(float("-inf")).all(), tok.convert_ids_to_tokens(special)


def test_virtual_tokens_are_mixes_of_the_llm_s_embeddings(student):
    table = student.llm.get_input_embeddings().weight
    scores = torch.full((1, 3, table.shape[0]), -30.0)
    scores[0, 0, 42] = scores[0, 1, 7] = 30.0  # one token each
    scores[0, 2, 42] = scores[0, 2, 7] = 30.0  # an even mix of the two
    with torch.no_grad():
        virtual = student.projection.mix(scores, table)
    torch.testing.assert_close(virtual[0, 0], table[42])
    torch.testing.assert_close(virtual[0, 1], table[7])
    torch.testing.assert_close(virtual[0, 2], (table[42] + table[7]) / 2)


def test_forward_gives_the_scores_the_virtual_tokens_are_mixed_from(student):
    x = torch.randn(2, 80, 1000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = student(x)
        table = student.llm.get_input_embeddings().weight
        assert out.scores.shape == (2, student.num_queries, table.shape[0]) and out.h_student.shape == (2, 576)
        torch.testing.assert_close(out.virtual, torch.softmax(out.scores, -1) @ table)
        torch.testing.assert_close(student.virtual_tokens(x), out.virtual)
        # Without the LLM pass (alignment alone) the mix is left out: the same scores, no virtual tokens.
        alone = student(x, llm=False)
        assert alone.virtual is None and alone.h_student is None
        torch.testing.assert_close(alone.scores, out.scores)


def test_an_alignment_only_step_reads_only_the_scores(student):
    from pipeline.step import forward_loss

    x = torch.randn(2, 80, 1000, generator=torch.Generator().manual_seed(3))
    ids, lengths = torch.tensor([[504, 314, 2114, 0], [28, 6306, 30, 2]]), torch.tensor([3, 4])
    batch = {"input_features": x, "token_ids": ids, "lengths": lengths, "target": torch.zeros(2, 576)}
    with torch.no_grad():
        parts = forward_loss(student, batch, DivaLoss(w_distill=0.0, align_side="left"))
        scores = student(x).scores
    expected = token_alignment_loss(scores, ids, lengths, "left", student.projection.filler_id).mean()
    torch.testing.assert_close(parts.align, expected)
    assert parts.distill.isnan() and parts.truncated == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_alignment_cross_entropy_against_a_loop(side):
    """Each slot's target by hand: the transcript's tokens on the first (left) or last (right) min(length, Q) slots,
    the filler elsewhere; the loss is the mean over slots of -log softmax(scores)[target]."""
    q, v, filler = 6, 11, 3
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8], [9, 0, 0, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 8, 0])  # the second is longer than Q: its first Q tokens take every slot
    scores = torch.randn(3, q, v, generator=torch.Generator().manual_seed(2), requires_grad=True)
    expected_targets, expected_loss = [], []
    for row, n in zip(ids.tolist(), lengths.tolist(), strict=True):
        n = min(n, q)
        words = row[:n]
        slots = words + [filler] * (q - n) if side == "left" else [filler] * (q - n) + words
        expected_targets.append(slots)
    targets = torch.tensor(expected_targets)
    assert slot_targets(ids, lengths, q, side, filler).tolist() == expected_targets
    for b in range(3):
        logp = torch.log_softmax(scores[b].detach().double(), -1)
        expected_loss.append(-sum(float(logp[s, targets[b, s]]) for s in range(q)) / q)
    got = token_alignment_loss(scores, ids, lengths, side, filler)
    torch.testing.assert_close(got.double(), torch.tensor(expected_loss, dtype=torch.double), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(scores.grad).all()
    total, parts = DivaLoss(w_distill=0.0, align_side=side)(None, torch.zeros(3, 4), torch.zeros(3, q, 4),
                                                            torch.zeros(3, 8, 4), lengths, scores=scores,
                                                            token_ids=ids, filler_id=filler)
    torch.testing.assert_close(total, got.mean())
    assert F.cross_entropy(scores[0].detach(), targets[0]).item() == pytest.approx(float(got[0].detach()), rel=1e-5)


def test_an_export_loads_as_the_same_student(student, real_models, tmp_path):
    """The export holds the queries and the Q-Former only (the head is derived from the two checkpoints again at
    load) and records the kind and the temperature it answers with: the preset's model.answer_temperature (0.5),
    not the training one (1.0). The loaded model gives the virtual tokens of the same student built to mix at 0.5,
    and, exported without an answer temperature, the built (training) student's."""
    from safetensors.torch import load_file

    from pipeline.export import WEIGHTS, export_untrained, load_model
    from pipeline.model import build_student

    cfg = vocabulary_cfg(real_models)
    assert (cfg.model.vocabulary_temperature, cfg.model.answer_temperature) == (1.0, 0.5)
    x = torch.randn(2, 80, 1000, generator=torch.Generator().manual_seed(3))
    sharp = build_student(vocabulary_cfg(real_models, "model.vocabulary_temperature=0.5"), seed=0).eval()
    for name, answer, expected in (("sharp", "0.5", sharp), ("as-trained", "1.0", student)):
        out = export_untrained(vocabulary_cfg(real_models, f"model.answer_temperature={answer}"),
                               str(tmp_path / name))
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["projection"] == {"kind": "vocabulary", "temperature": float(answer)} and config["H"] is None
        assert not any(k.startswith("projection") for k in load_file(tmp_path / name / WEIGHTS))
        loaded, _ = load_model(out)
        with torch.no_grad():
            torch.testing.assert_close(loaded.virtual_tokens(x), expected.virtual_tokens(x))
    with torch.no_grad():  # the two temperatures give different inputs to the LLM
        assert not torch.allclose(sharp.virtual_tokens(x), student.virtual_tokens(x), atol=1e-3)


def test_the_random_tiny_whisper_cannot_read_the_vocabulary():
    with pytest.raises(ConfigError, match="model.projection=vocabulary reads the LLM's tokens through Whisper"):
        load_config("tiny", ["model.projection=vocabulary"])
    with pytest.raises(ConfigError, match="vocabulary_temperature must be > 0"):
        load_config("tiny", ["model.vocabulary_temperature=0"])
    with pytest.raises(ConfigError, match="answer_temperature must be > 0"):
        load_config("tiny", ["model.answer_temperature=-0.5"])
