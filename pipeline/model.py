"""The DiVA student: Whisper encoder (frozen) -> Q-Former (a copy of the Whisper decoder) -> projection
-> frozen LLM (paper section 3.1, DESIGN.md section 2).

    input_features [B, n_mels, 3000]
      -> encoder (frozen, no grad)                              A       [B, 1500, d]
      -> qformer(inputs_embeds=queries, cross-attends to A)             [B, Q, d]
      -> projection d -> H                                      t_audio [B, Q, H]  ("virtual tokens")
         (model.projection=vocabulary, beyond the paper: softmax over the LLM's vocabulary through Whisper's
          output head [B, Q, V], then the mix of the LLM's input embeddings; `VocabularyProjection`)
      -> llm.base_model(embed(prefix) ++ t_audio ++ embed(suffix))[:, -1]   h_student [B, H]

The Q-Former starts as the pretrained Whisper decoder, all weights copied (the paper's key
initialisation): its cross-attention already maps audio features to text-like tokens. Only the query
vectors, the Q-Former and the projection train. The frozen LLM is the teacher's own model, so
h_student and the cached h_teacher come out of the same weights (the premise of the paper's Lemma 1).
Every shape is static: Q queries, a [n_mels, 3000] encoder input and len(prefix) + Q + len(suffix)
LLM positions, whatever the transcript.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, WhisperForConditionalGeneration, WhisperModel
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.builders import load_teacher_model, load_tokenizer, load_whisper_tokenizer, student_whisper
from pipeline.config import Config, ModelConfig, TrainablePart
from pipeline.template import ChatTemplate, derive_template

TRAINABLE_PARTS = typing.get_args(TrainablePart)
MEAN_INIT_SPREAD = 0.1

class DiVA(nn.Module):
    """Encoder + Q-Former + projection + frozen LLM. See the module docstring for the data flow."""

    def __init__(
        self,
        whisper: WhisperForConditionalGeneration | WhisperModel,
        llm: PreTrainedModel,
        template: ChatTemplate,
        cfg: ModelConfig,
        *,
        seed: int = 0,
        vocabulary: VocabularyProjection | None = None,
    ):
        super().__init__()
        whisper_base = whisper.base_model  # WhisperModel, whether given that or WhisperForConditionalGeneration
        decoder = whisper_base.decoder
        if not 1 <= cfg.num_queries <= decoder.max_target_positions:
            raise ValueError(f"model.num_queries={cfg.num_queries}: the Whisper decoder has "
                             f"{decoder.max_target_positions} positions, so 1..{decoder.max_target_positions}")
        self.cfg = cfg
        self.template = template
        self.activation_checkpointing = False
        self.encoder_cache: EncoderCache | None = None  # set by a training run with train.cache_encoder

        self.encoder = whisper_base.encoder.requires_grad_(False)
        # The paper's initialisation: every decoder weight, copied. The queries replace its token inputs,
        # so the token-embedding table (and the output head tied to it) is dropped, never trained.
        self.qformer = copy.deepcopy(decoder)
        self.qformer.embed_tokens = None
        self.llm = llm.requires_grad_(False)

        d = decoder.config.d_model
        embeddings = llm.get_input_embeddings()
        self.hidden_size = embeddings.embedding_dim
        like = {"device": decoder.layer_norm.weight.device, "dtype": decoder.layer_norm.weight.dtype}
        if (cfg.projection == "vocabulary") != (vocabulary is not None):
            raise ValueError(f"model.projection={cfg.projection} needs a VocabularyProjection exactly when "
                             "'vocabulary' (build_student makes it)")
        with torch.random.fork_rng(devices=[]):  # seeded, on the CPU, whatever the device: reproducible
            torch.manual_seed(seed)
            queries = torch.randn(cfg.num_queries, d) * cfg.query_init_std
            projection = vocabulary
            if projection is None:  # the paper's d -> H map (the vocabulary projection has nothing to initialise)
                projection = nn.Linear(d, self.hidden_size)
                if cfg.projection_init == "mean_embedding":
                    _init_at_mean_embedding(projection, embeddings.weight)
        self.queries = nn.Parameter(queries.to(**like))
        self.projection = projection.to(**like)

        ids = {"dtype": torch.long, "device": embeddings.weight.device}
        self.register_buffer("prefix_ids", torch.tensor(template.prefix_ids, **ids), persistent=False)
        self.register_buffer("suffix_ids", torch.tensor(template.suffix_ids, **ids), persistent=False)

        for part in TRAINABLE_PARTS:
            getattr(self, part).requires_grad_(part in cfg.trainable)
        self.train()

    # -- modes and parameters ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> DiVA:
        """The encoder and the LLM stay in eval mode: frozen parts never use dropout."""
        super().train(mode)
        self.encoder.eval()
        self.llm.eval()
        if mode and self.activation_checkpointing:
            # HF checkpoints a layer only when that layer module is in training mode. Flip only the
            # layer modules themselves: their attention/MLP children (which hold any dropout) stay in eval.
            for module in self.llm.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = True
        return self

    def enable_activation_checkpointing(self) -> None:
        """Recompute the LLM's layer activations in the backward pass instead of storing them (the LLM
        pass over len(prefix) + Q + len(suffix) positions dominates memory). Non-reentrant, so the
        gradient reaches the virtual tokens without any input needing requires_grad."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # HF also hooks the embedding table so its outputs require grad (needed only for reentrant
        # checkpointing); that would make text_embeddings() build graphs for nothing.
        self.llm.disable_input_require_grads()
        self.activation_checkpointing = True
        self.train(self.training)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for what trains (for the optimizer and for checkpoints: never the LLM)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable(self, state: Mapping[str, torch.Tensor], check_only: bool = False) -> None:
        """Copy a checkpoint's trainable weights in; the names must match trainable_parameters() exactly.
        check_only: only check names and shapes (an FSDP2 model loads through torch.distributed)."""
        params = self.trainable_parameters()
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"trainable weights do not match this model: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} in the checkpoint, {tuple(p.shape)} here")
        if check_only:
            return
        for name, p in params.items():
            p.copy_(state[name])

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    @property
    def seq_len(self) -> int:
        """The student's LLM sequence length: len(prefix) + Q + len(suffix), the same for every example."""
        return len(self.template.prefix_ids) + self.num_queries + len(self.template.suffix_ids)

    # -- the forward pass -------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, input_features: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """A: the frozen encoder's output [B, frames / 2, d], through `encoder_cache` when one is set and the
        batch carries its clips' keys."""
        if self.encoder_cache is not None and keys is not None:
            return self.encoder_cache(self.run_encoder, input_features, keys)
        return self.run_encoder(input_features)

    def run_encoder(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features.to(self.encoder.conv1.weight.dtype)).last_hidden_state

    def virtual_tokens(self, input_features: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """t_audio: log-Mel [B, n_mels, frames] -> [B, Q, H] in the projection's dtype."""
        return self.project(self.encode(input_features, keys))

    def project(self, audio: torch.Tensor) -> torch.Tensor:
        """t_audio from the encoder's output A [B, frames / 2, d]: the Q-Former and the projection (what trains)."""
        return self.slots(audio)[0]

    def slots(self, audio: torch.Tensor, mix: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(t_audio [B, Q, H], the vocabulary projection's scores [B, Q, V] or None for the paper's linear one).
        mix=False leaves out the vocabulary projection's mix (t_audio None), which its alignment term does not read:
        a [B, Q, V] x [V, H] product, a fifth of an alignment-only step (docs/small.md)."""
        # Expand the queries to the batch: Whisper's cross-attention views keys/values with the
        # *query's* batch size, so one unexpanded query set against B encoder outputs would silently
        # attend over all B clips at once.
        queries = self.queries.unsqueeze(0).expand(audio.shape[0], -1, -1)
        # inputs_embeds: the decoder adds its own positional embeddings and keeps causal self-attention.
        # use_cache=False: the config's default would build a KV cache on every training step.
        hidden = self.qformer(inputs_embeds=queries, encoder_hidden_states=audio.to(queries.dtype),
                              use_cache=False).last_hidden_state
        if not isinstance(self.projection, VocabularyProjection):
            return self.projection(hidden), None
        scores = self.projection.scores(hidden)
        return (self.projection.mix(scores, self.llm.get_input_embeddings().weight) if mix else None), scores

    def student_inputs(self, virtual: torch.Tensor) -> torch.Tensor:
        """embed(prefix) ++ virtual ++ embed(suffix): [B, len(prefix) + Q + len(suffix), H] in the LLM's dtype."""
        embed = self.llm.get_input_embeddings()
        batch = virtual.shape[0]
        prefix = embed(self.prefix_ids).unsqueeze(0).expand(batch, -1, -1)
        suffix = embed(self.suffix_ids).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([prefix, virtual.to(prefix.dtype), suffix], dim=1)

    def student_hidden(self, virtual: torch.Tensor, response_ids: torch.Tensor | None = None) -> torch.Tensor:
        """h_student [B, H]: the LLM's last hidden state after the final norm (the LM head's input) at
        the last position, the one that predicts the first response token. Not under no_grad: the
        LLM's weights are frozen, but the gradient must flow through it to the virtual tokens.

        With `response_ids` [B, P - 1] (the teacher's response, teacher-forced: train.distill_positions)
        the LLM reads them after the suffix and this is [B, P, H]: the states predicting response tokens 1..P.
        """
        inputs = self.student_inputs(virtual)
        if response_ids is None:
            return self.llm.base_model(inputs_embeds=inputs, use_cache=False).last_hidden_state[:, -1]
        inputs = torch.cat([inputs, self.llm.get_input_embeddings()(response_ids).to(inputs.dtype)], dim=1)
        out = self.llm.base_model(inputs_embeds=inputs, use_cache=False)
        return out.last_hidden_state[:, -(response_ids.shape[1] + 1):]

    @torch.no_grad()
    def text_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """t_text: the LLM's input embeddings of token ids [B, N] -> [B, N, H] (alignment targets)."""
        return self.llm.get_input_embeddings()(token_ids)

    def forward(self, input_features: torch.Tensor, keys: torch.Tensor | None = None, llm: bool = True,
                response_ids: torch.Tensor | None = None) -> StudentOutput:
        """What the alignment and distillation losses need. llm=False skips the LLM pass (h_student None), for
        the alignment loss alone, and then the vocabulary projection leaves out its mix (virtual None)."""
        virtual, scores = self.slots(self.encode(input_features, keys), mix=llm)
        return StudentOutput(virtual, self.student_hidden(virtual, response_ids) if llm else None, scores)


class StudentOutput(typing.NamedTuple):
    virtual: torch.Tensor | None  # t_audio [B, Q, H]; None from the vocabulary projection without the LLM pass
    h_student: torch.Tensor | None  # [B, H], or [B, P, H] given response_ids; None without the LLM pass
    scores: torch.Tensor | None  # the vocabulary projection's [B, Q, V]; None for the linear one


class VocabularyProjection(nn.Module):
    """model.projection=vocabulary (beyond the paper, docs/small.md): Q-Former state h -> softmax(h W^T + b) E.

    W [V, d] reads each LLM token as Whisper reads its text (the mean of Whisper's token embeddings over its
    tokenization of it), so h W^T is Whisper's own output head (tied to those embeddings) scoring the LLM's
    vocabulary; the " " token (`filler_id`, what the slots after a transcript learn) reads as Whisper's
    end-of-text. b is -inf on the LLM's special tokens. E is the LLM's input embedding table: every virtual
    token is a mix of the LLM's own embeddings. W and b are derived from the two checkpoints (never saved,
    never trained), so the decoder copied into the Q-Former starts as the transcriber it was trained to be.
    """

    def __init__(self, head: torch.Tensor, bias: torch.Tensor, filler_id: int, temperature: float = 1.0):
        super().__init__()
        self.register_buffer("head", head, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.filler_id, self.temperature = int(filler_id), float(temperature)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, Q, d] -> [B, Q, V] float32 logits over the LLM's vocabulary."""
        return (hidden @ self.head.T).float() + self.bias

    def mix(self, scores: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[B, Q, V] scores -> [B, Q, H] virtual tokens in the table's dtype."""
        return torch.softmax(scores / self.temperature, dim=-1).to(table.dtype) @ table


@torch.no_grad()
def vocabulary_projection(whisper: WhisperForConditionalGeneration | WhisperModel, whisper_tokenizer: typing.Any,
                          llm_tokenizer: typing.Any, vocab_size: int, temperature: float = 1.0) -> VocabularyProjection:
    """The `VocabularyProjection` of a Whisper checkpoint (its decoder's token embeddings and tokenizer) onto an
    LLM's vocabulary of `vocab_size` rows (its embedding table's; ids past the tokenizer's are masked)."""
    table = whisper.base_model.decoder.embed_tokens.weight.float().cpu()
    filler = llm_tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(filler) != 1:
        raise ValueError(f"model.projection=vocabulary: the LLM's tokenizer makes \" \" {len(filler)} tokens, not one")
    n = min(vocab_size, len(llm_tokenizer))
    special = set(llm_tokenizer.all_special_ids) | set(getattr(llm_tokenizer, "added_tokens_decoder", {}))
    texts = [llm_tokenizer.convert_tokens_to_string([t]) for t in llm_tokenizer.convert_ids_to_tokens(list(range(n)))]
    pieces = whisper_tokenizer(texts, add_special_tokens=False)["input_ids"]
    owner = torch.tensor([u for u, ids in enumerate(pieces) if u not in special for _ in ids], dtype=torch.long)
    flat = torch.tensor([i for u, ids in enumerate(pieces) if u not in special for i in ids], dtype=torch.long)
    head = torch.zeros(vocab_size, table.shape[1]).index_add_(0, owner, table[flat])
    counts = torch.zeros(vocab_size).index_add_(0, owner, torch.ones(len(owner)))
    head /= counts.clamp(min=1)[:, None]
    head[filler[0]] = table[whisper_tokenizer.eos_token_id]
    counts[filler[0]] = 1
    bias = torch.where(counts > 0, 0.0, float("-inf"))
    return VocabularyProjection(head, bias, filler[0], temperature)


@torch.no_grad()
def _init_at_mean_embedding(projection: nn.Linear, table: torch.Tensor) -> None:
    """bias = the mean row of the LLM's embedding table, so the virtual tokens start where text tokens
    live rather than at nn.Linear's O(1) outputs, far outside the LLM's input distribution. The weights
    are small, not zero (zero would block the Q-Former's first gradients): for a roughly unit Q-Former
    output the tokens spread around the mean by MEAN_INIT_SPREAD of the text embeddings' own spread."""
    mean, std = _embedding_stats(table)
    projection.weight.normal_(0.0, MEAN_INIT_SPREAD * std / math.sqrt(projection.in_features))
    projection.bias.copy_(mean)


@torch.no_grad()
def _embedding_stats(table: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, float]:
    """Mean row (float32 [H], on the CPU) and per-coordinate std of an embedding table, in row chunks
    so that a 128k x 4096 bf16 table is never copied whole to float32."""
    mean = sum(rows.float().sum(0) for rows in table.split(chunk)) / table.shape[0]
    sq = sum(float((rows.float() - mean).pow(2).sum()) for rows in table.split(chunk))
    return mean.cpu(), math.sqrt(sq / table.numel())


def build_student(
    cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None, *, seed: int = 0, device: str | None = None
) -> DiVA:
    """The student for a run: the configured Whisper, and the teacher's own LLM and chat template
    (the tiny LLM is rebuilt from the teacher's seed, so it is exactly the model behind the cache).
    `device` overrides teacher.device (a training worker's device); Whisper follows the LLM's device
    and dtype."""
    tcfg = dataclasses.replace(cfg.teacher, device=device) if device else cfg.teacher
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tcfg)
    llm = load_teacher_model(tcfg, len(tokenizer))
    whisper = student_whisper(cfg.model, cfg.features.n_mels, dtype=llm.dtype, device=llm.device,
                              n_frames=cfg.features.n_frames)
    vocabulary = None
    if cfg.model.projection == "vocabulary":
        vocabulary = vocabulary_projection(whisper, load_whisper_tokenizer(cfg.model.whisper), tokenizer,
                                           llm.get_input_embeddings().weight.shape[0], cfg.model.vocabulary_temperature)
    return DiVA(whisper, llm, derive_template(tokenizer, tcfg.system_prompt), cfg.model, seed=seed,
                vocabulary=vocabulary)


class EncoderCache:
    """The frozen encoder's output per clip, computed the first time a clip is seen and reused after
    (`train.cache_encoder`): the encoder is in eval mode and frozen, so the values are the same ones,
    at a fraction of the cost from the second epoch on. Kept on the host, in the encoder's dtype, up to
    `max_bytes`; clips beyond that are recomputed each time. Keys are `pipeline.ingest.clip_keys`."""

    def __init__(self, max_bytes: float):
        self.max_bytes, self.bytes = max_bytes, 0
        self.store: dict[int, torch.Tensor] = {}
        self.hits = self.misses = 0

    def __call__(self, encode: typing.Callable[[torch.Tensor], torch.Tensor], input_features: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:
        ids = keys.tolist()
        missing = [i for i, k in enumerate(ids) if k not in self.store]
        self.hits, self.misses = self.hits + len(ids) - len(missing), self.misses + len(missing)
        fresh = {}
        if missing:
            out = encode(input_features[missing])
            fresh = dict(zip((ids[i] for i in missing), out.cpu(), strict=True))
            for key, value in fresh.items():
                if self.bytes + value.nbytes <= self.max_bytes:
                    self.store[key] = value
                    self.bytes += value.nbytes
        rows = [self.store[k] if k in self.store else fresh[k] for k in ids]
        return torch.stack(rows).to(input_features.device)
