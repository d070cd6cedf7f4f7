"""Every model and tokenizer a stage builds, in one place: the tiny random ones (tests, fast runs) and
real checkpoints (a hub id or a local directory, e.g. one `python -m jobs.models` converted).

Real checkpoints load from safetensors only (`use_safetensors=True`: a `pytorch_model.bin` pickle is
never opened) and never with remote code. Tiny models are rebuilt bit for bit from their seed, which
is how a student, an export and a teacher cache agree on "the same" random LLM.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from pipeline.config import ModelConfig

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Whisper-large-v3's layout (128 mel bins, 1500 encoder / 448 decoder positions, its vocabulary) at a
# width and depth that runs in milliseconds on a CPU: for tests and the local default.
TINY_WHISPER: dict[str, Any] = {
    "vocab_size": 51866,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    # Whisper's default 0.02 leaves a random d=64 encoder's output almost independent of its input
    # (relative spread across clips 0.008, against 0.25 for the log-Mels): its tiny conv outputs drown
    # in the sinusoidal positions. ~1/sqrt(d_model) keeps the audio visible (spread 0.16), as it is
    # in a trained Whisper, so a tiny student can learn to tell clips apart.
    "init_std": 0.1,
}

# A tiny Llama 3 shaped model (grouped-query attention, Llama 3's RoPE base) for tests and the local
# default, where no weights may be downloaded.
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "tie_word_embeddings": False,
}


def resolve(path: str | None) -> str | None:
    """Local directories become absolute, so Ray workers with another cwd find them."""
    return os.path.abspath(path) if path and os.path.isdir(path) else path


def for_workers(tcfg: Any) -> Any:
    """The teacher config with local model/tokenizer directories made absolute: Ray workers and
    actors do not share the driver's working directory."""
    return dataclasses.replace(tcfg, tokenizer=resolve(tcfg.tokenizer), model=resolve(tcfg.model))


def config_for_workers(cfg: Any) -> Any:
    """A whole Config with every local model directory (LLM, tokenizer, Whisper) made absolute."""
    return dataclasses.replace(cfg, teacher=for_workers(cfg.teacher),
                               model=dataclasses.replace(cfg.model, whisper=resolve(cfg.model.whisper)))


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


# --- Whisper ---------------------------------------------------------------------------------------


def tiny_whisper(seed: int = 0, n_mels: int = 128, **config_overrides: Any) -> WhisperForConditionalGeneration:
    """A random-initialised Whisper (encoder input [n_mels, 3000]) in eval mode. The same seed gives
    the same weights; the global RNG is untouched."""
    config = WhisperConfig(num_mel_bins=n_mels, **{**TINY_WHISPER, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
    return model.eval()


def load_whisper(
    id_or_dir: str | os.PathLike[str],
    revision: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> WhisperForConditionalGeneration:
    """A real Whisper checkpoint (hub id or local directory), in eval mode."""
    model = WhisperForConditionalGeneration.from_pretrained(
        resolve(os.fspath(id_or_dir)), revision=revision, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def check_features(cfg: Any) -> None:
    """Refuse features the configured Whisper cannot read, before any stage does work: the mel bins are
    the checkpoint's (80 for tiny.en/base, 128 for large-v3), and the window fits its encoder."""
    from pipeline.config import ConfigError

    fcfg, mcfg = cfg.features, cfg.model
    if mcfg.whisper == "tiny":  # built in code for whatever the features are
        return
    config = WhisperConfig.from_pretrained(resolve(mcfg.whisper), revision=mcfg.whisper_revision)
    if config.num_mel_bins != fcfg.n_mels:
        raise ConfigError(f"features.n_mels={fcfg.n_mels}, but model.whisper ({mcfg.whisper}) reads "
                          f"{config.num_mel_bins} mel bins: set features.n_mels={config.num_mel_bins}")
    if fcfg.n_frames > 2 * config.max_source_positions:
        raise ConfigError(f"features.chunk_length_s={fcfg.chunk_length_s} gives {fcfg.n_frames} frames, more "
                          f"than model.whisper's encoder reads ({2 * config.max_source_positions})")


def fit_encoder_window(whisper: WhisperForConditionalGeneration, n_frames: int) -> WhisperForConditionalGeneration:
    """Let the encoder read `n_frames` log-Mel frames (Whisper's own window is 3000, 30 s): keep the first
    n_frames / 2 of its fixed sinusoidal positions. A shorter window is a speed choice for short clips
    (the `small` preset), measured in docs/small.md; the paper's 30 s window needs nothing here."""
    encoder = whisper.base_model.encoder
    positions = n_frames // (encoder.conv1.stride[0] * encoder.conv2.stride[0])
    if positions == encoder.embed_positions.num_embeddings:
        return whisper
    if positions > encoder.embed_positions.num_embeddings:
        raise ValueError(f"{n_frames} frames exceed the encoder's {encoder.embed_positions.num_embeddings} positions")
    table = encoder.embed_positions.weight.detach()[:positions].clone()
    encoder.embed_positions = torch.nn.Embedding.from_pretrained(table, freeze=True)
    encoder.config = copy.copy(encoder.config)  # the decoder shares the original; only the encoder changes
    encoder.config.max_source_positions = encoder.max_source_positions = positions
    return whisper


def student_whisper(
    mcfg: ModelConfig, n_mels: int = 128, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    n_frames: int = 3000,
) -> WhisperForConditionalGeneration:
    """The pretrained Whisper a student starts from: its encoder is used as is (reading `n_frames`), its
    decoder copied into the Q-Former. Deterministic, so a test can rebuild it and compare."""
    if mcfg.whisper == "tiny":
        whisper = tiny_whisper(mcfg.tiny_whisper_seed, n_mels).to(device=device, dtype=dtype)
    else:
        whisper = load_whisper(mcfg.whisper, mcfg.whisper_revision, dtype, device)
    return fit_encoder_window(whisper, n_frames)


# --- the LLM and its tokenizer ------------------------------------------------------------------------


def tiny_llama(
    vocab_size: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """A random-initialised LlamaForCausalLM sized to `vocab_size` (use len(tokenizer)), in eval
    mode with gradients off. The same seed gives the same weights; the global RNG is untouched."""
    config = LlamaConfig(vocab_size=vocab_size, **{**TINY_LLAMA, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _frozen(model.to(device=device, dtype=dtype))


def load_llm(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    attn_implementation: str | None = None,
    local_files_only: bool = False,
) -> PreTrainedModel:
    """A real causal LM checkpoint (hub id or local directory) in `dtype` on `device`, in eval mode
    with gradients off: the frozen teacher."""
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local_files_only, "use_safetensors": True}
    if revision is not None:
        kwargs["revision"] = revision
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolve(os.fspath(name_or_path)), **kwargs)
    return _frozen(model.to(device))


def load_whisper_tokenizer(id_or_dir: str | os.PathLike[str]) -> Any:
    """A Whisper checkpoint's own tokenizer (model.projection=vocabulary reads the LLM's tokens through it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(os.fspath(id_or_dir)))
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.projection=vocabulary needs the tokenizer of the Whisper checkpoint {id_or_dir}: "
                         f"{exc}") from exc


def load_tokenizer(tcfg: Any):
    """The LLM's tokenizer: `teacher.tokenizer`, else the model's own."""
    from transformers import AutoTokenizer

    source = tcfg.tokenizer or tcfg.model
    if source == "tiny":
        raise ValueError("teacher.model=tiny needs teacher.tokenizer (a tokenizer directory)")
    return AutoTokenizer.from_pretrained(resolve(source), revision=tcfg.revision if not tcfg.tokenizer else None)


def load_teacher_model(tcfg: Any, vocab_size: int) -> PreTrainedModel:
    """The frozen LLM on the configured device and dtype (the tiny one is rebuilt from its seed)."""
    device: Any = tcfg.device
    if device == "xla":
        import torch_xla

        device = torch_xla.device()
    dtype = COMPUTE_DTYPES[tcfg.dtype]
    if tcfg.model == "tiny":
        return tiny_llama(vocab_size, seed=tcfg.tiny_seed, dtype=dtype, device=device)
    return load_llm(tcfg.model, dtype=dtype, device=device, revision=tcfg.revision)
