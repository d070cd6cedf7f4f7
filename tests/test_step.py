"""The training step's options for small runs: the encoder cache changes no value, the alignment-only phase
skips the LLM, a shorter encoder window is Whisper's own positions; and the presets that use them."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.backends import PlainBackend
from pipeline.config import ConfigError, load_config
from pipeline.losses import DivaLoss
from pipeline.model import EncoderCache, build_student
from pipeline.step import forward_loss, make_optimizer, train_step

B = 4


def batch(step: int, n_frames: int = 3000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step % 2)  # two distinct batches, seen again and again
    return {"input_features": torch.randn(B, 128, n_frames, generator=g),
            "token_ids": torch.randint(0, 600, (B, 448), generator=g), "lengths": torch.tensor([3, 9, 5, 12]),
            "target": torch.randn(B, 64, generator=g), "clip_key": torch.arange(B) + 10 * (step % 2)}


def run(cfg, steps: int, cache: bool) -> tuple[list[float], dict[str, torch.Tensor], EncoderCache | None]:
    model = build_student(cfg, seed=0)
    model.encoder_cache = EncoderCache(1e9) if cache else None
    opt, backend, loss = make_optimizer(model.trainable_parameters(), cfg.train), PlainBackend(cfg.train), DivaLoss()
    losses = [float(train_step(model, [batch(s)], loss, opt, backend, lr=1e-3, grad_clip=1.0).parts.total)
              for s in range(steps)]
    return losses, {k: v.detach().clone() for k, v in model.trainable_parameters().items()}, model.encoder_cache


def test_the_encoder_cache_changes_no_value():
    cfg = load_config("tiny")
    plain, weights, _ = run(cfg, 4, cache=False)
    cached, cached_weights, store = run(cfg, 4, cache=True)
    # Equal up to what two runs without the cache differ by (CPU kernels' summation order, ~1e-7).
    assert cached == pytest.approx(plain, rel=1e-6)
    for k, w in weights.items():
        torch.testing.assert_close(cached_weights[k], w, rtol=0, atol=1e-6)
    assert (store.misses, store.hits) == (2 * B, 2 * B) and len(store.store) == 2 * B  # computed once per clip


def test_the_alignment_only_phase_skips_the_llm():
    model = build_student(load_config("tiny"), seed=0)
    calls = []
    model.llm.base_model.register_forward_hook(lambda *a: calls.append(1))
    parts = forward_loss(model, batch(0), DivaLoss(w_distill=0.0))
    assert not calls and torch.isnan(parts.distill) and parts.align > 0 and parts.total == parts.align
    forward_loss(model, batch(0), DivaLoss())
    assert calls == [1]
    with pytest.raises(ValueError, match="needs h_student"):
        DivaLoss()(None, batch(0)["target"], torch.zeros(B, 448, 64), torch.zeros(B, 448, 64), batch(0)["lengths"])


def test_a_shorter_encoder_window_keeps_whisper_s_first_positions():
    """features.chunk_length_s=10: the encoder reads 1000 frames with the first 500 of its sinusoidal positions,
    which is Whisper's own computation on them (checked against a hand-run of its layers)."""
    cfg = load_config("tiny", ["features.chunk_length_s=10", "prepare.max_duration_s=10"])
    full = build_student(load_config("tiny"), seed=0)
    short = build_student(cfg, seed=0)
    assert short.encoder.embed_positions.num_embeddings == 500
    assert torch.equal(short.encoder.embed_positions.weight, full.encoder.embed_positions.weight[:500])
    x = torch.randn(2, 128, 1000)
    enc = full.encoder
    with torch.no_grad():
        h = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(x)))).permute(0, 2, 1)
        h = h + enc.embed_positions.weight[:500]
        for layer in enc.layers:
            h = layer(h, None)[0] if isinstance(layer(h, None), tuple) else layer(h, None)
        expected = enc.layer_norm(h)
        torch.testing.assert_close(short.encode(x), expected, rtol=1e-5, atol=1e-5)
    assert full.encoder.embed_positions.num_embeddings == 1500  # the original Whisper is not changed
    with pytest.raises(ConfigError, match="exceeds the encoder window"):
        load_config("tiny", ["features.chunk_length_s=10"])


def test_presets_extend_each_other_and_features_are_checked_against_the_whisper(tmp_path):
    demo, small = load_config("demo"), load_config("small")
    assert demo.model.whisper == small.model.whisper and demo.train.steps < small.train.steps
    assert (demo.model.projection, small.model.projection, demo.features.n_mels) == ("vocabulary", "vocabulary", 80)
    assert load_config("paper").model.projection == "linear"  # the paper's own stays the paper's
    child = tmp_path / "child.yaml"
    child.write_text("extends: demo\ntrain:\n  lr: 2e-4\n")
    assert load_config(str(child)).train.lr == 2e-4 and load_config(str(child)).corpus == demo.corpus
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="circle"):
        load_config(str(loop))
    from pipeline.builders import check_features
    from pipeline.convert import SOURCES

    whisper = tmp_path / "whisper-tiny.en"
    whisper.mkdir()
    from transformers import WhisperConfig

    WhisperConfig(num_mel_bins=80).save_pretrained(whisper)
    assert "whisper-tiny.en" in SOURCES
    bad = copy.deepcopy(small)
    bad.model.whisper, bad.features = str(whisper), load_config("tiny").features
    with pytest.raises(ConfigError, match="features.n_mels=128, but model.whisper .* reads 80 mel bins"):
        check_features(bad)
