"""Fidelity: stored-then-restored features equal WhisperFeatureExtractor's on the same audio."""

import warnings

import librosa
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from pipeline import features
from pipeline.config import FeatureConfig

CFG = FeatureConfig()


@pytest.fixture(scope="module")
def extractor():
    return WhisperFeatureExtractor(feature_size=128)


def f16_tolerance(reference: np.ndarray) -> np.ndarray:
    """Half a float16 step at each value (storage rounding) plus float32 noise between STFT runs."""
    spacing = np.spacing(np.abs(reference).astype(np.float16)).astype(np.float32)
    return spacing / 2 + 1e-5


def test_decode_is_librosa_load(corpus):
    for path in sorted((corpus / "clips").glob("*.mp3"))[:8]:
        expected, sr = librosa.load(path, sr=16000, mono=True)
        got = features.decode(str(path))
        assert sr == 16000 and got.audio.dtype == np.float32
        np.testing.assert_array_equal(got.audio, expected)
        assert got.complete == 1.0 and got.native_rate in (32000, 48000)


def test_every_fixture_clip_restores_to_the_extractor_output(corpus, extractor):
    lengths = []
    for path in sorted((corpus / "clips").glob("*.mp3")):
        audio = features.decode(path.read_bytes()).audio
        lengths.append(len(audio))
        expected = extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
        mel = features.log_mel(audio, CFG)
        assert mel.num_frames == features.audio_frames(len(audio), CFG)
        restored = features.restore_row(features.to_bytes(mel.frames), mel.pad_value, CFG)
        assert restored.shape == (128, 3000) and restored.dtype == np.float32
        err = np.abs(restored - expected)
        assert (err <= f16_tolerance(expected)).all(), f"{path.name}: max abs diff {err.max():.2e}"
        # Beyond the audio the restored input is the extractor's up to float32 rounding (not float16).
        np.testing.assert_allclose(restored[:, mel.num_frames:], expected[:, mel.num_frames:], rtol=0, atol=1e-6)
    # The fixtures cover a clip of exactly 30 s (no padding at all) and one over 30 s (cut like Whisper).
    assert 480000 in lengths and max(lengths) > 480000


@pytest.mark.parametrize("n", [1, 200, 399, 400, 401, 16000 * 5 + 37, 479_840, 479_999, 480_000, 500_000])
def test_edge_lengths_match_the_extractor(extractor, n):
    audio = (np.random.default_rng(n).standard_normal(n) * 0.1).astype(np.float32)
    expected = extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    mel = features.log_mel(audio, CFG)
    restored = features.restore(mel.frames, mel.pad_value)
    np.testing.assert_allclose(restored, expected, rtol=0, atol=1e-5)


def test_trimmed_storage_is_small():
    audio = (np.random.default_rng(0).standard_normal(16000 * 5) * 0.1).astype(np.float32)
    mel = features.log_mel(audio, CFG)
    assert mel.num_frames == 502  # ceil((80000 + 200) / 160)
    assert len(features.to_bytes(mel.frames)) == 128 * 502 * 2  # 128 KB vs 1.5 MB padded float32


def test_truncated_mp3_is_detected(corpus):
    data = sorted((corpus / "clips").glob("*.mp3"))[0].read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole, half = features.decode(data), features.decode(data[: len(data) // 2])
    assert whole.complete == 1.0
    assert half.complete < 0.7 and len(half.audio) < len(whole.audio)
