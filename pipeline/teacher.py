"""The teacher stage's pure core: the frozen LLM's distillation targets for each transcript.

For every transcript the LLM reads prefix + transcript + suffix (the chat template around one user
turn, with the generation prompt). Its last position predicts the first response token; the hidden
state there, after the final norm (the LM head's input), is h_teacher in
L_distill = ||h_student - h_teacher||_2 (paper section 3.2.2, DESIGN.md section 3). It is computed
once, here, and cached. Sequences are grouped into length buckets so that padding wastes little
compute, and every result equals the single-sequence forward of the same model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import PreTrainedModel

from pipeline import cache, layout
from pipeline.builders import TINY_LLAMA, for_workers, load_teacher_model, load_tokenizer, resolve
from pipeline.template import ChatTemplate, TemplateError, derive_template, stop_ids, transcript_ids

log = logging.getLogger(__name__)

PaddingSide = Literal["left", "right"]

def length_buckets(lengths: Sequence[int], max_tokens_per_batch: int, max_batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length so that padding wastes little compute.

    Indices are sorted by (length, index) and packed greedily: a batch grows while its padded size
    (batch size x its longest length) stays within `max_tokens_per_batch` and it holds at most
    `max_batch_size` sequences. A sequence longer than the budget gets a batch of its own.
    Deterministic; every index appears exactly once; batches come shortest first.
    """
    if max_tokens_per_batch < 1 or max_batch_size < 1:
        raise ValueError(
            f"max_tokens_per_batch ({max_tokens_per_batch}) and max_batch_size ({max_batch_size}) "
            "must both be >= 1"
        )
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so lengths[i] is the longest in the batch if it joins.
        if current and (
            len(current) + 1 > max_batch_size or (len(current) + 1) * lengths[i] > max_tokens_per_batch
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / processed tokens (batch size x longest length, summed over batches); 1.0 means
    no padding. An empty input wastes nothing and gives 1.0."""
    real = sum(lengths[i] for batch in batches for i in batch)
    processed = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return real / processed if processed else 1.0


def fixed_length_efficiency(lengths: Sequence[int], padded_length: int) -> float:
    """Real tokens / processed tokens when every sequence is padded to `padded_length` (the
    baseline that bucketing is measured against, e.g. the student's fixed 448-query layout)."""
    too_long = [n for n in lengths if n > padded_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} sequences exceed padded_length {padded_length} (longest {max(too_long)})"
        )
    return sum(lengths) / (len(lengths) * padded_length) if lengths else 1.0


@dataclass(frozen=True)
class TeacherTargets:
    """Per transcript, in input order: h_teacher, optionally the top-k next-token ids and log-probs at the
    same position (for an optional KL term beyond the paper), and with `response_tokens` > 0 the greedy
    response and the state at each position that predicts one of its tokens (row 0 is `hidden`)."""

    hidden: np.ndarray  # float32 [n, H]
    topk_ids: np.ndarray | None = None  # int32 [n, k], most likely first
    topk_logprobs: np.ndarray | None = None  # float32 [n, k]
    responses: list[list[int]] | None = None  # up to K ids each, ending with the stop id when one came
    response_hidden: list[np.ndarray] | None = None  # float32 [len(response), H] each


def compute_targets(
    model: PreTrainedModel,
    template: ChatTemplate,
    token_id_lists: Sequence[Sequence[int]],
    *,
    max_tokens_per_batch: int = 16384,
    max_batch_size: int = 64,
    padding_side: PaddingSide = "right",
    top_k: int = 0,
    pad_id: int = 0,
    response_tokens: int = 0,
    stops: Sequence[int] = (),
) -> TeacherTargets:
    """Run the frozen LLM on template.wrap(ids) for every transcript, in length buckets, and return
    the final-norm hidden state at each sequence's last real position.

    The model's own device and dtype are used (set them with `tiny_llama`/`load_llm`); results are
    returned as float32 whatever the dtype. Padding (with `pad_id`, any valid id: padded positions
    are masked out) goes on `padding_side`; position ids count real tokens only, so each result
    equals the forward of that sequence alone. Top-k log-probs are log_softmax(lm_head(h)), which
    is the model's next-token distribution for Llama-style heads (the premise of the paper's
    Lemma 1: P = softmax(O h)). With `response_tokens` K > 0 the LLM first answers each transcript
    (greedy, up to K tokens, ending at the first of `stops`), then reads prompt + response in one
    teacher-forced pass whose states at the prompt's last position and at each response token but the
    last are the targets for response tokens 1..len (the first is `hidden`).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    vocab_size = model.get_input_embeddings().num_embeddings
    if top_k < 0 or top_k > vocab_size:
        raise ValueError(f"top_k must be between 0 and the vocabulary size {vocab_size}, not {top_k}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the vocabulary (size {vocab_size})")
    if response_tokens < 0:
        raise ValueError(f"response_tokens must be >= 0, not {response_tokens}")

    sequences = [template.wrap(ids) for ids in token_id_lists]
    max_positions = getattr(model.config, "max_position_embeddings", None)
    _check_sequences(sequences, vocab_size, max_positions and max_positions - response_tokens)
    lengths = [len(s) + response_tokens for s in sequences]  # what a bucket's forward passes will cover
    n = len(sequences)
    hidden = np.empty((n, model.config.hidden_size), dtype=np.float32)
    topk_ids = np.empty((n, top_k), dtype=np.int32) if top_k else None
    topk_logprobs = np.empty((n, top_k), dtype=np.float32) if top_k else None
    responses: list[list[int]] = [[] for _ in range(n)]
    response_hidden: list[np.ndarray] = [hidden[:0] for _ in range(n)]

    head = model.get_output_embeddings()
    with torch.inference_mode():
        for batch in length_buckets(lengths, max_tokens_per_batch, max_batch_size):
            prompts = [sequences[i] for i in batch]
            answers = _greedy(model, prompts, response_tokens, stops, pad_id) if response_tokens else [[]] * len(batch)
            states, last = _final_states(model, prompts, answers, padding_side, pad_id)
            h = states[torch.arange(len(batch), device=states.device), last.to(states.device)]
            index = np.asarray(batch)
            hidden[index] = h.float().cpu().numpy()
            if top_k:
                logprobs = torch.log_softmax(head(h).float(), dim=-1)
                values, ids = torch.topk(logprobs, top_k, dim=-1)
                topk_ids[index] = ids.cpu().numpy().astype(np.int32)
                topk_logprobs[index] = values.cpu().numpy()
            for row, (i, answer) in enumerate(zip(batch, answers, strict=True)):
                if answer:
                    first = int(last[row])
                    responses[i] = answer
                    response_hidden[i] = states[row, first:first + len(answer)].float().cpu().numpy()
    kept = response_tokens > 0
    return TeacherTargets(hidden, topk_ids, topk_logprobs, responses if kept else None,
                          response_hidden if kept else None)


def _final_states(model: PreTrainedModel, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                  padding_side: PaddingSide, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One padded forward of each prompt + its answer but the answer's last token (teacher forcing: that one
    predicts nothing kept): the final-norm states [b, T, H], and where each prompt's last token sits in them.

    LlamaForCausalLM is `lm_head(model(...).last_hidden_state)`. In transformers 5.23
    (models/llama/modeling_llama.py) LlamaModel.forward returns last_hidden_state = self.norm(hidden_states):
    it is POST final norm. `output_hidden_states=True` gives the same tensor as hidden_states[-1], because
    `capture_outputs(tie_last_hidden_states=True)` (utils/output_capturing.py) overwrites the last recorded
    layer output with last_hidden_state. We read last_hidden_state from the base model directly: the same
    values without logits over the whole vocabulary at every position. Tests check it against both
    hidden_states[-1] and a forward hook on model.model.norm.
    """
    device = model.device
    input_ids, attention_mask, position_ids, _ = _pad_batch(
        [[*p, *a[:-1]] for p, a in zip(prompts, answers, strict=True)], padding_side, pad_id)
    out = model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           position_ids=position_ids.to(device), use_cache=False)
    start = (input_ids.shape[1] - attention_mask.sum(1) if padding_side == "left"
             else torch.zeros(len(prompts), dtype=torch.long))
    return out.last_hidden_state, start + torch.tensor([len(p) - 1 for p in prompts])  # predicts response token 1


def _greedy(model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, stops: Sequence[int],
            pad_id: int) -> list[list[int]]:
    """transformers' greedy `generate` over a left-padded batch: each prompt's response, cut after its first
    stop id (the ids generate pads finished rows with are not the response's)."""
    from transformers import GenerationConfig

    input_ids, attention_mask, _, _ = _pad_batch(prompts, "left", pad_id)
    # A config of its own: the checkpoint's generation_config.json may ask for sampling.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stops) or None,
                              pad_token_id=pad_id)
    out = model.generate(input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                         generation_config=config)
    stop = set(stops)
    answers = []
    for row in out[:, input_ids.shape[1]:].tolist():
        end = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
        answers.append(row[:end])
    return answers


def _check_sequences(sequences: Sequence[Sequence[int]], vocab_size: int, max_positions: int | None) -> None:
    """Fail with the offending row's index rather than deep inside the model (or, on a GPU, with
    an unreadable device-side assert)."""
    for row, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"row {row}: empty sequence (an empty transcript with an empty template)")
        if max_positions is not None and len(seq) > max_positions:
            raise ValueError(
                f"row {row}: {len(seq)} tokens with the template exceed the model's {max_positions} positions"
            )
        if min(seq) < 0 or max(seq) >= vocab_size:
            bad = next(t for t in seq if not 0 <= t < vocab_size)
            raise ValueError(
                f"row {row}: token id {bad} is outside the model's vocabulary (size {vocab_size})"
            )


def _pad_batch(
    sequences: Sequence[Sequence[int]], padding_side: PaddingSide, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids, attention mask, position ids (0.. over real tokens only, whichever side is
    padded) and the index of each row's last real position."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        start = width - len(seq) if padding_side == "left" else 0
        input_ids[row, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, start : start + len(seq)] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    last = torch.full_like(lengths, width - 1) if padding_side == "left" else lengths - 1
    return input_ids, attention_mask, position_ids, last


# --- Stage 2 as a Ray Data job -------------------------------------------------------------------
#
# Output layout (any fsspec URL): <out>/_plan.json, <out>/targets/part-*.parquet (TARGETS_SCHEMA),
# <out>/rejects/part-*.parquet (id, reason, detail), <out>/manifest.json (written last). Resuming
# is by id, as in stage 1.

KIND, TARGETS_DIR, REJECTS_DIR = layout.TEACHER_KIND, layout.TARGETS_DIR, layout.REJECTS_DIR
SCHEMA_VERSION = 1
TOO_LONG, EMPTY = "too_long", "empty_transcript"
REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
_STORE = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def targets_schema(top_k: int, response_tokens: int = 0) -> pa.Schema:
    fields = [
        ("id", pa.string()),
        ("token_ids", pa.list_(pa.int32())),  # the transcript alone, no template
        ("target", pa.binary()),  # h_teacher: H values in the manifest's target_dtype, little-endian
    ]
    if top_k:
        fields += [("topk_ids", pa.list_(pa.int32())), ("topk_logprobs", pa.list_(pa.float32()))]
    if response_tokens:
        # The greedy response (<= K ids) and the state predicting each of its tokens: len x H values, row 0 = target.
        fields += [("response_ids", pa.list_(pa.int32())), ("response_target", pa.binary())]
    return pa.schema(fields)


def encode_targets(hidden: np.ndarray, dtype: str) -> list[bytes]:
    """float32 [n, H] -> one little-endian 16-bit blob per row (bf16 has no numpy dtype: go via torch)."""
    t = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32)).to(_STORE[dtype])
    raw = t.view(torch.int16).numpy()
    return [row.tobytes() for row in raw]


def decode_target(blob: bytes, dtype: str) -> np.ndarray:
    """A `target` cell -> float32 [H]."""
    raw = torch.from_numpy(np.frombuffer(blob, dtype=np.int16).copy())
    return raw.view(_STORE[dtype]).float().numpy()


def target_spec(tcfg: Any, tokenizer: Any, template: ChatTemplate) -> dict[str, Any]:
    """What a cached target is a function of: the model, the template, and how it was stored.

    A trainer compares this (built from its own LLM and tokenizer) with a cache's manifest.
    """
    if tcfg.model == "tiny":
        config = {**TINY_LLAMA, "vocab_size": len(tokenizer), "seed": tcfg.tiny_seed}
        hidden, revision = TINY_LLAMA["hidden_size"], "tiny-" + _sha(config)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve(tcfg.model), revision=tcfg.revision)
        hidden = getattr(config, "hidden_size", None) or config.get_text_config().hidden_size
        revision = getattr(config, "_commit_hash", None) or tcfg.revision or "local"
    return {
        "model": tcfg.model,
        "revision": revision,
        "hidden_size": int(hidden),
        "dtype": tcfg.dtype,
        "target_dtype": tcfg.target_dtype,
        "top_k": tcfg.top_k,
        # teacher.response_tokens is not here: the first position's state is the same for any K, and a cache
        # with more response positions serves a run that asks for fewer (the manifest records K; ingest checks).
        "template": {"prefix_ids": list(template.prefix_ids), "suffix_ids": list(template.suffix_ids),
                     "system_prompt": template.system_prompt, "fingerprint": template.fingerprint()},
    }


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class TargetWorker:
    """One Ray Data actor: holds one copy of the LLM and turns batches of (id, sentence) into rows."""

    def __init__(self, tcfg: Any, template_fingerprint: str):
        self.tcfg = tcfg
        if tcfg.device == "cpu":  # the cores Ray reserved for this actor (it sets OMP_NUM_THREADS to 1 for < 2)
            torch.set_num_threads(max(1, int(tcfg.cpus_per_actor)))
        self.tokenizer = load_tokenizer(tcfg)
        self.template = derive_template(self.tokenizer, tcfg.system_prompt)
        if self.template.fingerprint() != template_fingerprint:
            raise TemplateError("the worker derived another template than the driver: is the tokenizer "
                                "the same on every node?")
        self.model = load_teacher_model(tcfg, len(self.tokenizer))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.stops = sorted(stop_ids(self.model, self.tokenizer, self.template))
        self.schema = targets_schema(tcfg.top_k, tcfg.response_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        sentences = batch.column("sentence").to_pylist()
        rows: list[dict[str, Any]] = [{} for _ in ids]
        keep: list[int] = []
        token_lists: list[list[int]] = []
        for i, (id_, text) in enumerate(zip(ids, sentences, strict=True)):
            tokens = transcript_ids(self.tokenizer, text)
            if not tokens:
                rows[i] = {"id": id_, "reason": EMPTY, "detail": f"{text!r} has no tokens"}
            elif len(tokens) > self.tcfg.max_transcript_tokens:
                rows[i] = {"id": id_, "reason": TOO_LONG, "detail": f"{len(tokens)} tokens > "
                           f"max_transcript_tokens {self.tcfg.max_transcript_tokens}"}
            else:
                keep.append(i)
                token_lists.append(tokens)
        if keep:
            out = compute_targets(self.model, self.template, token_lists,
                                  max_tokens_per_batch=self.tcfg.max_tokens_per_batch,
                                  max_batch_size=self.tcfg.max_batch_size,
                                  padding_side=self.tcfg.padding_side, top_k=self.tcfg.top_k, pad_id=self.pad_id,
                                  response_tokens=self.tcfg.response_tokens, stops=self.stops)
            blobs = encode_targets(out.hidden, self.tcfg.target_dtype)
            for j, i in enumerate(keep):
                rows[i] = {"id": ids[i], "token_ids": token_lists[j], "target": blobs[j]}
                if self.tcfg.top_k:
                    rows[i] |= {"topk_ids": out.topk_ids[j].tolist(), "topk_logprobs": out.topk_logprobs[j].tolist()}
                if self.tcfg.response_tokens:
                    rows[i] |= {"response_ids": out.responses[j],
                                "response_target": b"".join(encode_targets(out.response_hidden[j],
                                                                           self.tcfg.target_dtype))}
        schema = pa.schema(list(self.schema) + [("reason", pa.string()), ("detail", pa.string())])
        return pa.Table.from_pylist(rows, schema=schema)


def _mels_rows(mels_url: str, manifest: dict[str, Any]) -> pa.Table:
    """Only `id` and `sentence` of the prepare output (Parquet reads just those columns)."""
    fs, root = cache.filesystem(mels_url)
    files = [cache.join(root, "mels", name) for name in manifest["files"]["mels"]]
    tables = [cache.read_parquet(fs, f, columns=["id", "sentence"]) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string()),
                                                                 "sentence": pa.array([], pa.string())})


def run_teacher(cfg: Any, mels_url: str, output_url: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume, or confirm) stage 2. Returns the manifest."""
    import ray

    from pipeline.builders import check_features
    from pipeline.resources import actor_restarts, task_retries

    require_actors(cfg)  # first: a request the cluster can never meet fails in seconds, before any other work
    check_features(cfg)  # the run this cache is for must be able to read its mels
    t0 = time.time()
    # Workers get absolute local paths; the spec keeps the names as the user gave them.
    tcfg = for_workers(cfg.teacher)
    mels = cache.check_manifest(mels_url, kind=layout.MELS_KIND)
    tokenizer = load_tokenizer(tcfg)
    template = derive_template(tokenizer, tcfg.system_prompt)
    spec = target_spec(cfg.teacher, tokenizer, template)
    content = {"schema_version": SCHEMA_VERSION, "target": spec, "input_fingerprint": mels["fingerprint"],
               "max_transcript_tokens": tcfg.max_transcript_tokens}
    if tcfg.response_tokens:  # only then: a K = 0 cache keeps the fingerprint it had before responses existed
        content["response_tokens"] = tcfg.response_tokens
    plan = {"fingerprint": cache.fingerprint(content), "content": content, "input": mels_url}
    manifest = cache.begin(output_url, plan, (TARGETS_DIR, REJECTS_DIR), overwrite=overwrite)
    if manifest:
        log.info("%s is complete (%d targets); nothing to do", output_url, manifest["counts"]["targets"])
        return manifest
    done, removed = cache.done_ids(output_url, (TARGETS_DIR, REJECTS_DIR))
    for path in removed:
        log.warning("removed unfinished file %s (a previous run stopped while writing it)", path)
    rows = _mels_rows(mels_url, mels)
    todo = rows.filter(pc.invert(pc.is_in(rows.column("id"), pa.array(sorted(done), pa.string()))))
    log.info("teacher: %d transcripts, %d already cached, %d to do (model %s on %s)",
             rows.num_rows, rows.num_rows - todo.num_rows, todo.num_rows, tcfg.model, tcfg.device)
    if todo.num_rows:
        per_block = max(1, min(tcfg.rows_per_call, math.ceil(todo.num_rows / max(1, tcfg.num_actors))))
        blocks = [todo.slice(i, per_block) for i in range(0, todo.num_rows, per_block)]
        ds = ray.data.from_arrow(blocks).map_batches(
            TargetWorker, fn_constructor_kwargs={"tcfg": tcfg, "template_fingerprint": template.fingerprint()},
            batch_size=tcfg.rows_per_call, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=tcfg.num_actors), **actor_resources(tcfg),
            **actor_restarts(cfg.cluster))  # a dead actor is restarted and reruns its batches
        ds.write_datasink(cache.split_sink(output_url, plan["run_id"], tcfg.rows_per_file, TARGETS_DIR,
                                           targets_schema(tcfg.top_k, tcfg.response_tokens), REJECTS_DIR,
                                           REJECTS_SCHEMA), ray_remote_args=task_retries(cfg.cluster))
    manifest = _finalize(output_url, plan, spec, tcfg, rows)
    c = manifest["counts"]
    log.info("teacher: %d targets, %d rejects %s in %d files; %.1f s", c["targets"], c["rejects"],
             c["rejects_by_reason"], len(manifest["files"]["targets"]), time.time() - t0)
    return manifest


def actor_resources(tcfg: Any) -> dict[str, float]:
    """What one teacher actor reserves: teacher.cpus_per_actor, and one GPU on teacher.device=cuda."""
    return {"num_cpus": tcfg.cpus_per_actor, "num_gpus": 1.0 if tcfg.device == "cuda" else 0.0}


def require_actors(cfg: Any) -> None:
    """The actor pool's resources exist on the cluster (pipeline.resources): say so now, not never."""
    from pipeline.resources import require

    t = cfg.teacher
    r = actor_resources(t)
    require({"CPU": r["num_cpus"], "GPU": r["num_gpus"]}, t.num_actors,
            what=f"the teacher stage ({t.num_actors} actor(s) on teacher.device={t.device})",
            change="teacher.device (cache_teacher --device cpu runs on CPUs), teacher.num_actors or "
                   "teacher.cpus_per_actor", timeout_s=cfg.cluster.autoscaler_timeout_s)


def _finalize(output_url: str, plan: dict[str, Any], spec: dict[str, Any], tcfg: Any,
              rows: pa.Table) -> dict[str, Any]:
    fs, _ = cache.filesystem(output_url)
    out = cache.collect_outputs(output_url, TARGETS_DIR, REJECTS_DIR, rows.column("id").to_pylist())
    n_tokens = sum(len(t) for t in cache.read_column(fs, out.good, "token_ids"))
    return cache.write_manifest(output_url, {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": plan["fingerprint"],
        "target": spec,
        "target_fingerprint": cache.fingerprint(spec),
        "response_tokens": tcfg.response_tokens,  # states cached per row: up to this many (train.distill_positions)
        "input": {"url": plan["input"], "kind": layout.MELS_KIND, "fingerprint": plan["content"]["input_fingerprint"]},
        "config": dataclasses.asdict(tcfg),
        "versions": cache.versions("ray", "torch", "transformers", "tokenizers", "pyarrow"),
        "counts": {"targets": len(out.ids), "transcript_tokens": n_tokens, "rejects": len(out.reject_ids),
                   "rejects_by_reason": dict(Counter(cache.read_column(fs, out.rejects, "reason")))},
        "files": out.files(),
    })


def open_teacher(url: str, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Open a finished teacher cache for a later stage, refusing one made for another model/template.

    `expect` is `target_spec(...)` of the model and template the caller will use; every field that
    differs is named in the error.
    """
    manifest = cache.check_manifest(url, kind=KIND)
    if expect is not None and cache.fingerprint(expect) != manifest["target_fingerprint"]:
        diffs = cache.describe_diff(manifest["target"], expect)
        raise cache.DatasetError(f"{url}: cached targets were made for another model/template; cached -> given: "
                                 + "; ".join(diffs))
    return manifest
