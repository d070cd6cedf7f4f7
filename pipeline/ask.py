"""Ask: answer a spoken question with a DiVA model, token by token (no Ray: the pure core of jobs.ask).

Audio front end: any file libsndfile decodes (MP3, WAV, FLAC, OGG) at any sample rate and channel
count -> 16 kHz mono -> the padded [1, n_mels, 3000] log-Mel, through the very code the prepare
stage runs (`pipeline.prepare.featurize_clip` + `features.restore_row`, float16 round trip
included), so a question reaches the encoder exactly as the training clips did, and passes the same
checks. A clip over 30 s is rejected, not chunked: the model reads one 30 s window and was trained
only on clips that fit in one (prepare rejects longer ones), and cutting a question short would
answer a different question.

Generation: transformers' `generate` on embed(prefix) ++ virtual tokens ++ embed(suffix) (its KV cache,
its stopping), streamed token by token. Greedy by default, temperature sampling on request. An
optional instruction is rendered as the system turn of the tokenizer's chat template (the reference
model's `generate(audio, text_prompt)` puts it there).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from pipeline import PipelineError, cache, features
from pipeline import commonvoice as cv
from pipeline.config import FeatureConfig, PrepareConfig
from pipeline.model import DiVA
from pipeline.template import ChatTemplate, derive_template, stop_ids

DEFAULT_MAX_NEW_TOKENS = 256


class AskError(PipelineError, ValueError):
    """A request that cannot be answered as given (bad arguments)."""


class AudioError(PipelineError, ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""


class UnreadableAudio(AudioError):
    """Missing, zero-byte, truncated or undecodable file."""


class EmptyAudio(AudioError):
    """Decodes, but holds no usable sound: no samples, too short, or silent."""


class AudioTooLong(AudioError):
    """Longer than the one window the model reads (`max_audio_seconds`)."""


_ERRORS = {cv.EMPTY_FILE: UnreadableAudio, cv.UNDECODABLE: UnreadableAudio, cv.EMPTY_AUDIO: EmptyAudio,
           cv.TOO_SHORT: EmptyAudio, cv.SILENT: EmptyAudio, cv.TOO_LONG: AudioTooLong}


def load_audio(path: str | os.PathLike[str], fcfg: FeatureConfig | None = None,
               checks: PrepareConfig | None = None) -> torch.Tensor:
    """An audio file (local path or fsspec URL) -> the encoder input [1, n_mels, n_frames] (float32),
    as the prepare stage computes it; `checks` holds its duration and silence limits (the model
    directory records the ones training used), the longest clip capped at one window."""
    name = os.fspath(path)
    fs, root = cache.filesystem(name)
    if cache.is_local(fs):
        if not os.path.exists(root):
            raise UnreadableAudio(f"{name}: no such file")
        if os.path.isdir(root):
            raise UnreadableAudio(f"{name}: is a directory, not an audio file")
        data: bytes | str = root
    else:
        try:
            data = fs.cat_file(root)
        except FileNotFoundError:
            raise UnreadableAudio(f"{name}: no such file") from None
    return audio_features(data, name, fcfg, checks)


def max_audio_seconds(fcfg: FeatureConfig, checks: PrepareConfig) -> float:
    """The longest clip the model answers: its encoder window (10 s for small/demo, 30 s for the paper's), or the
    training's clip limit where that is shorter."""
    return min(checks.max_duration_s, float(fcfg.chunk_length_s))


def audio_features(data: bytes | str, name: str, fcfg: FeatureConfig | None = None,
                   checks: PrepareConfig | None = None) -> torch.Tensor:
    """Encoded audio (bytes, e.g. an HTTP request's) or a local file -> the encoder input, as `load_audio`;
    `name` is how error messages call it."""
    from pipeline.prepare import featurize_clip

    fcfg = fcfg or FeatureConfig()
    checks = checks or PrepareConfig()
    checks = dataclasses.replace(checks, max_duration_s=max_audio_seconds(fcfg, checks))
    row = featurize_clip({"source": name}, data, fcfg, checks)
    if row.get("reason"):
        error = _ERRORS.get(row["reason"], UnreadableAudio)
        hint = f" (the model reads one {fcfg.chunk_length_s:g} s window; trim or split the clip)" \
            if error is AudioTooLong else ""
        raise error(f"{name}: {row['reason'].replace('_', ' ')}: {row['detail']}{hint}")
    return torch.from_numpy(features.restore_row(row["mel"], row["mel_pad_value"], fcfg)).unsqueeze(0)


# --- the prompt -----------------------------------------------------------------------------------------


def prompt_template(model: DiVA, tokenizer: Any, prompt: str | None = None) -> ChatTemplate:
    """The template around the virtual tokens: the model's own, or with `prompt` as the system turn."""
    if prompt is None or not prompt.strip():
        return model.template
    return derive_template(tokenizer, prompt)


def llm_inputs(model: DiVA, template: ChatTemplate, input_features: torch.Tensor | None = None, *,
               virtual: torch.Tensor | None = None) -> torch.Tensor:
    """embed(prefix) ++ virtual tokens ++ embed(suffix): [B, len(prefix) + Q + len(suffix), H] for B clips. The
    virtual tokens come from `input_features`, or are given (`virtual` [B, Q, H]: `audio_tokens` of a batch)."""
    if (input_features is None) == (virtual is None):
        raise AskError("give the clip's input_features or its virtual tokens, not both or neither")
    if virtual is None:
        virtual = audio_tokens(model, _features(model, input_features))
    with torch.inference_mode():
        embed = model.llm.get_input_embeddings()
        device = embed.weight.device
        prefix = embed(torch.tensor([template.prefix_ids], dtype=torch.long, device=device))
        suffix = embed(torch.tensor([template.suffix_ids], dtype=torch.long, device=device))
        rows = len(virtual)
        return torch.cat([prefix.expand(rows, -1, -1), virtual.to(device=device, dtype=prefix.dtype),
                          suffix.expand(rows, -1, -1)], dim=1)


def audio_tokens(model: DiVA, input_features: torch.Tensor) -> torch.Tensor:
    """The virtual tokens [B, Q, H] of B clips' encoder inputs [B, n_mels, frames], in one encoder and
    Q-Former pass (a server batches concurrent requests through it)."""
    _features(model, input_features[:1])  # each row is one clip of the shape this model reads
    was_training = model.training
    model.eval()  # no Q-Former dropout at inference, whatever mode the caller left the model in
    try:
        with torch.inference_mode():
            return model.virtual_tokens(input_features.to(model.encoder.conv1.weight.device))
    finally:
        model.train(was_training)


def _features(model: DiVA, input_features: torch.Tensor) -> torch.Tensor:
    if input_features.ndim == 2:
        input_features = input_features.unsqueeze(0)
    conv = model.encoder.conv1
    expected = (1, conv.in_channels, model.encoder.config.max_source_positions * 2)
    if tuple(input_features.shape) != expected:
        raise AskError(f"input_features: shape {tuple(input_features.shape)}, this model reads {expected} "
                       "(one clip: use load_audio)")
    return input_features.to(conv.weight.device)


# --- generation -----------------------------------------------------------------------------------------


def generate(model: DiVA, tokenizer: Any, input_features: torch.Tensor | None = None, *, prompt: str | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
             seed: int | None = None, virtual: torch.Tensor | None = None) -> TokenStream:
    """Token ids of the answer, one at a time, as the LLM produces them (KV cache). Ends after a stop
    token (which is yielded last, as the reference model keeps it; decode with
    skip_special_tokens=True) or after `max_new_tokens`. temperature 0 is greedy; above 0, samples
    from softmax(logits / temperature) with a generator seeded by `seed` (None: fresh entropy).
    The clip is its `input_features`, or its precomputed `virtual` tokens (see `llm_inputs`)."""
    if max_new_tokens < 1:
        raise AskError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
    if not temperature >= 0.0:
        raise AskError(f"temperature must be >= 0, not {temperature}")
    template = prompt_template(model, tokenizer, prompt)
    embeds = llm_inputs(model, template, input_features, virtual=virtual)
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    if limit is not None and embeds.shape[1] + max_new_tokens > limit:
        raise AskError(f"{embeds.shape[1]} prompt positions + max_new_tokens {max_new_tokens} exceed the LLM's "
                       f"{limit} positions")
    return _decode(model, embeds, stop_ids(model.llm, tokenizer, template), max_new_tokens, temperature, seed)


def _decode(model: DiVA, embeds: torch.Tensor, stops: set[int], max_new_tokens: int, temperature: float,
            seed: int | None) -> TokenStream:
    """transformers' own `generate` (KV cache, stopping at any stop id) in a thread, its tokens handed
    over one at a time through a streamer. Sampling is plain softmax(logits / temperature) (no top-k or
    top-p), drawn by `_Sampler` from a generator of its own seeded with `seed`: concurrent answers (a server's
    threads) neither share nor disturb a random state."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=sorted(stops),
                              pad_token_id=min(stops) if stops else None)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    processors = LogitsProcessorList([_Sampler(temperature, seed, embeds.device)] if temperature > 0 else [])

    def run() -> None:
        with torch.inference_mode():
            model.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                               logits_processor=processors, stopping_criteria=StoppingCriteriaList([streamer]),
                               streamer=streamer)

    streamer = TokenStream(run)
    return streamer


class _Sampler:
    """A logits processor that draws the next token from softmax(scores / temperature) with its own generator
    and leaves only that token possible, so `generate`'s greedy step takes it."""

    def __init__(self, temperature: float, seed: int | None, device: torch.device):
        self.temperature = temperature
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed) if seed is not None else self.generator.seed()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)


class TokenStream:
    """An iterator over the token ids `generate` produces in its own thread (started at the first `next`), as
    its streamer; an error in the generating thread is raised in the caller's. `stop()` (the reader is gone: a
    closed connection) ends the generation at its next token, as its stopping criterion, instead of running on
    to max_new_tokens. The first `put` is the prompt: with inputs_embeds alone, an empty tensor."""

    _END = object()

    def __init__(self, target: Any):
        self.queue: queue.Queue = queue.Queue()
        self.target = target
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.done = False

    def stop(self) -> None:
        self.stopped.set()

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        """The stopping criterion: every sequence ends once `stop()` was called."""
        return torch.full((input_ids.shape[0],), self.stopped.is_set(), dtype=torch.bool, device=input_ids.device)

    def put(self, value: torch.Tensor) -> None:
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(self._END)

    def _run(self) -> None:
        try:
            self.target()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self.queue.put(exc)
            self.queue.put(self._END)

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        if self.done:
            raise StopIteration
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        item = self.queue.get()
        if item is self._END:
            self.done = True
            self.thread.join()
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


def stream_text(tokenizer: Any, token_ids: Iterable[int]) -> Iterator[str]:
    """Decoded text as it grows, in pieces that add up to decode(all ids, skip_special_tokens=True).
    A piece is held back while the text ends in a partial UTF-8 character (a byte-level token that
    splits one) or while decoding rewrote earlier text."""
    ids: list[int] = []
    shown = ""
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text != shown:
        if text.startswith(shown):
            yield text[len(shown):]
        else:  # cannot un-print: say so rather than print a garbled total
            warnings.warn("decoded text changed after it was streamed; the final text is "
                          f"{text!r}", stacklevel=2)


def answer(model: DiVA, tokenizer: Any, audio: str | os.PathLike[str], *, prompt: str | None = None,
           fcfg: FeatureConfig | None = None, checks: PrepareConfig | None = None, **kwargs: Any) -> str:
    """The whole answer to one audio file, as text (kwargs go to `generate`). The front end and clip checks
    default to the ones the model was trained with (`export.load_model` records them on the model)."""
    recorded = getattr(model, "audio_settings", (None, None))
    features_in = load_audio(audio, fcfg or recorded[0], checks or recorded[1])
    ids = list(generate(model, tokenizer, features_in, prompt=prompt, **kwargs))
    return tokenizer.decode(ids, skip_special_tokens=True)
