"""Ask: the audio front end (any format and rate, exactly the training features, clear errors), the
instruction in the system turn, sampling and stopping, streaming text, and `python -m jobs.ask`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import nudged_run
from transformers import WhisperFeatureExtractor

from pipeline import PipelineError
from pipeline.ask import (
    AskError,
    AudioTooLong,
    EmptyAudio,
    UnreadableAudio,
    answer,
    generate,
    llm_inputs,
    load_audio,
    prompt_template,
    stream_text,
)
from pipeline.export import export_checkpoint, load_model
from pipeline.template import render_ids, stop_ids, transcript_ids

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ROOT / "tests" / "fixtures" / "commonvoice" / "clips"
CLIP = CLIPS / "common_voice_en_18327603.mp3"
LONG_CLIP = CLIPS / "common_voice_en_39243377.mp3"  # 33.2 s
INSTRUCTION = "Reply briefly, like a pirate."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run's output as Ray Train lays it out: <run>/train/checkpoint_<date>/."""
    return nudged_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model_dir(run_dir, tmp_path_factory) -> Path:
    return Path(export_checkpoint(str(run_dir), str(tmp_path_factory.mktemp("export") / "model")))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def features():
    return load_audio(CLIP)


# --- the audio front end -------------------------------------------------------------------------------


def test_features_equal_whisper_feature_extractor(features):
    """Independent reference: librosa's decode + resample and transformers' extractor (float16 storage
    precision, as the training features)."""
    audio, _ = librosa.load(CLIP, sr=16000)
    expected = WhisperFeatureExtractor(feature_size=128)(audio, sampling_rate=16000, return_tensors="np")
    assert features.shape == (1, 128, 3000) and features.dtype == torch.float32
    np.testing.assert_allclose(features.numpy(), expected["input_features"], rtol=0, atol=2e-3)


@pytest.mark.parametrize(("suffix", "rate", "channels", "subtype"),
                         [(".wav", 16000, 1, "FLOAT"), (".wav", 44100, 2, "PCM_16"), (".flac", 8000, 1, "PCM_16")])
def test_any_format_rate_and_channel_count(tmp_path, suffix, rate, channels, subtype):
    audio, _ = librosa.load(CLIP, sr=rate)
    data = np.stack([audio] * channels, axis=1) if channels > 1 else audio
    path = tmp_path / f"clip{suffix}"
    sf.write(path, data, rate, subtype=subtype)
    got = load_audio(path)
    assert got.shape == (1, 128, 3000)
    expected = WhisperFeatureExtractor(feature_size=128)(librosa.load(path, sr=16000)[0], sampling_rate=16000,
                                                         return_tensors="np")["input_features"]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-3)


def write_wav(path: Path, seconds: float, amplitude: float = 0.0) -> Path:
    n = int(seconds * 16000)
    sf.write(path, amplitude * np.sin(np.arange(n) / 16000 * 2 * np.pi * 220).astype(np.float32), 16000)
    return path


def test_each_bad_audio_file_gets_its_clear_error(tmp_path):
    cases = []
    cases.append((tmp_path / "absent.mp3", UnreadableAudio, "no such file"))
    (tmp_path / "zero.mp3").write_bytes(b"")
    cases.append((tmp_path / "zero.mp3", UnreadableAudio, "empty file: the clip file has zero bytes"))
    (tmp_path / "corrupt.mp3").write_bytes(np.random.default_rng(0).bytes(4096))
    cases.append((tmp_path / "corrupt.mp3", UnreadableAudio, "undecodable"))
    truncated = tmp_path / "truncated.mp3"
    truncated.write_bytes(CLIP.read_bytes()[: CLIP.stat().st_size // 2])
    cases.append((truncated, UnreadableAudio, "undecodable: truncated"))
    cases.append((write_wav(tmp_path / "silent.wav", 2.0), EmptyAudio, "silent"))
    cases.append((write_wav(tmp_path / "nothing.wav", 0.0), EmptyAudio, "empty audio"))
    cases.append((write_wav(tmp_path / "blip.wav", 0.02, 0.5), EmptyAudio, "too short"))
    cases.append((LONG_CLIP, AudioTooLong, r"too long: 33\.\d\d s > max_duration_s 30\.0 .*30 s window"))
    cases.append((tmp_path, UnreadableAudio, "is a directory"))
    for path, error, message in cases:
        with pytest.raises(error, match=message) as info:
            load_audio(path)
        assert str(path) in str(info.value) and isinstance(info.value, PipelineError)


def test_a_clip_just_under_30_s_is_accepted(tmp_path):
    features = load_audio(write_wav(tmp_path / "long.wav", 29.9, 0.3))
    assert features.shape == (1, 128, 3000)


# --- the prompt ---------------------------------------------------------------------------------------


def test_the_instruction_goes_into_the_system_turn(loaded, features):
    model, tokenizer = loaded
    plain, instructed = prompt_template(model, tokenizer), prompt_template(model, tokenizer, INSTRUCTION)
    assert plain == model.template and prompt_template(model, tokenizer, "  ") == model.template
    # As apply_chat_template renders [system: instruction, user: ...]; the suffix is unchanged.
    expected = render_ids(tokenizer, "Hello there", system_prompt=INSTRUCTION)
    assert instructed.wrap(transcript_ids(tokenizer, "Hello there")) == expected
    assert instructed.suffix_ids == plain.suffix_ids
    words = transcript_ids(tokenizer, INSTRUCTION)
    prefix = list(instructed.prefix_ids)
    assert any(prefix[i : i + len(words)] == words for i in range(len(prefix))), "instruction ids not in the prompt"
    (system,) = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("system"))
    assert system in prefix and system not in plain.prefix_ids
    # The LLM sees it: a longer input, and a different next-token distribution.
    a, b = llm_inputs(model, plain, features), llm_inputs(model, instructed, features)
    assert b.shape[1] - a.shape[1] == len(instructed.prefix_ids) - len(plain.prefix_ids) > len(words)
    with torch.no_grad():
        la, lb = (model.llm(inputs_embeds=x).logits[0, -1] for x in (a, b))
    assert not torch.allclose(la, lb)
    tokens = list(generate(model, tokenizer, features, prompt=INSTRUCTION, max_new_tokens=6))
    assert 1 <= len(tokens) <= 6


# --- generation ----------------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_sampling_follows_the_seed(loaded, features):
    model, tokenizer = loaded
    greedy = list(generate(model, tokenizer, features, max_new_tokens=8))
    assert greedy == list(generate(model, tokenizer, features, max_new_tokens=8))
    assert len(greedy) == 8  # no stop token among them (checked below): exactly max_new_tokens
    assert not set(greedy) & stop_ids(model.llm, tokenizer, model.template)
    hot = [list(generate(model, tokenizer, features, max_new_tokens=8, temperature=5.0, seed=s)) for s in (0, 0, 1)]
    assert hot[0] == hot[1] and hot[0] != hot[2]


def test_generation_stops_at_the_end_of_turn_token(model_dir, features):
    model, tokenizer = load_model(str(model_dir))  # a copy of its own: its head is edited below
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in stop_ids(model.llm, tokenizer, model.template)
    first = next(generate(model, tokenizer, features))
    head = model.llm.get_output_embeddings().weight
    with torch.no_grad():
        logits = model.llm(inputs_embeds=llm_inputs(model, model.template, features)).logits[0, -1]
        assert logits[first] > 0
        head[eot] = 2 * head[first]  # the eot logit is now twice the best one
    assert list(generate(model, tokenizer, features, max_new_tokens=20)) == [eot]


def test_a_stopped_generation_ends_at_its_next_token(loaded, features):
    """A reader that is gone (a server's client hung up) calls stop(): the generating thread ends after the token
    it is on, instead of running on to max_new_tokens with nobody reading."""
    model, tokenizer = loaded
    whole = list(generate(model, tokenizer, features, max_new_tokens=48))
    assert len(whole) == 48  # no stop token: unstopped, it runs to max_new_tokens
    tokens = generate(model, tokenizer, features, max_new_tokens=48)
    tokens.stop()  # before the first token: generation ends after it
    assert list(tokens) == whole[:1]
    assert not tokens.thread.is_alive()


def test_bad_generation_arguments(loaded, features):
    model, tokenizer = loaded
    with pytest.raises(AskError, match="max_new_tokens"):
        generate(model, tokenizer, features, max_new_tokens=0)
    with pytest.raises(AskError, match="temperature"):
        generate(model, tokenizer, features, temperature=-1.0)
    with pytest.raises(AskError, match="shape"):
        generate(model, tokenizer, features[:, :, :1000])
    with pytest.raises(AskError, match="exceed"):
        generate(model, tokenizer, features, max_new_tokens=5000)


def test_streamed_text_adds_up_to_the_decoded_answer(loaded, features):
    model, tokenizer = loaded
    ids = list(generate(model, tokenizer, features, max_new_tokens=12))
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == answer(
        model, tokenizer, CLIP, max_new_tokens=12)
    text = "naïve café, 東京 😀"
    ids = transcript_ids(tokenizer, text)
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# --- the jobs -----------------------------------------------------------------------------------------


def run_job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_export_and_ask_jobs(run_dir, loaded, tmp_path):
    out = tmp_path / "model"
    done = run_job("jobs.export", "--checkpoint", str(run_dir), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").is_file()

    model, tokenizer = loaded
    expected = answer(model, tokenizer, CLIP, prompt=INSTRUCTION, max_new_tokens=8)
    done = run_job("jobs.ask", "--model", str(out), "--audio", str(CLIP), "--prompt", INSTRUCTION,
                   "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"

    shutil.copytree(out, tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").unlink()
    done = run_job("jobs.ask", "--model", str(tmp_path / "broken"), "--audio", str(CLIP))
    assert done.returncode == 1
    assert "error:" in done.stderr and "model.safetensors is missing" in done.stderr
    assert "Traceback" not in done.stderr
