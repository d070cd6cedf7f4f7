"""Export: a training checkpoint -> a self-contained model directory that inference loads.

A training checkpoint (pipeline.checkpoint) holds only what trains, under our own module names, plus
the optimizer and the run's config. The export directory holds what inference needs, in the layout
of the released reference model (WillHeld/DiVA-llama-3-v0-8b, `modeling_diva.py`):

    <out>/model.safetensors   query_tokens        [Q, d]
                              projection.weight   [d, H]  (in x out: the reference loads it with `.T`)
                              projection.bias     [H]     (neither with model.projection=vocabulary, whose
                                                  head is derived from the two checkpoints at load)
                              connector.<name>    every WhisperDecoder state-dict entry (the Q-Former),
                                                  embed_tokens.weight included: the reference loads the
                                                  connector with a strict `load_state_dict`. It is the
                                                  base Whisper's table, unused by the Q-Former.
    <out>/config.json         what rebuilds the rest (written last: its presence means complete):
                              the Whisper and LLM checkpoints and revisions (or, for `tiny`, the seeds
                              and the exact config the random models are built from), Q, d, H, the
                              chat template's prefix/suffix ids and system prompt, the audio front end
    <out>/tokenizer*          the LLM's tokenizer (save_pretrained), chat template included

Loading adds the frozen base weights (Whisper encoder, LLM) named in config.json. An instruction
given at inference is rendered as the system turn of the tokenizer's chat template, as the reference
model's `generate(audio, text_prompt)` does (it replaces the export's own system prompt, if any).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from pipeline import PipelineError, cache, layout
from pipeline import checkpoint as ckpt
from pipeline.builders import (
    TINY_LLAMA,
    TINY_WHISPER,
    fit_encoder_window,
    load_llm,
    load_tokenizer,
    load_whisper,
    load_whisper_tokenizer,
    student_whisper,
    tiny_llama,
    tiny_whisper,
)
from pipeline.config import Config, FeatureConfig, ModelConfig, PrepareConfig, from_dict
from pipeline.model import TRAINABLE_PARTS, DiVA, build_student, vocabulary_projection
from pipeline.template import ChatTemplate, TemplateError, derive_template

log = logging.getLogger(__name__)

FORMAT = "diva-ray-export"
FORMAT_VERSION = 1
CONFIG, WEIGHTS = "config.json", "model.safetensors"
# What a model directory cannot do without (the tokenizer's other files depend on its kind).
REQUIRED_FILES = (CONFIG, WEIGHTS, "tokenizer_config.json")
CONNECTOR = "connector."


class ExportError(PipelineError):
    """A checkpoint that cannot be exported (not found, incomplete, or an output in the way)."""


class ModelDirError(PipelineError):
    """A model directory that is missing, incomplete or inconsistent."""


# --- checkpoints --------------------------------------------------------------------------------------


def resolve_checkpoint(url: str) -> str:
    """A checkpoint directory itself, or the latest complete one under a run directory
    (<run>/train/checkpoint_*, where Ray Train keeps them) or a Ray Train run directory
    (<run>/train). Latest = highest step in its checkpoint.json, then the latest name (Ray names them
    checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>). Directories without checkpoint.json are skipped: an
    upload interrupted by a crash."""
    fs, root = cache.filesystem(url)
    if fs.exists(cache.join(root, ckpt.META)):
        return url
    candidates = complete_checkpoints(url)
    if not candidates:
        raise ExportError(f"{url}: no checkpoint here: expected {ckpt.META} in it, or complete checkpoint_* "
                          f"directories in it or in its {layout.TRAIN_RUN}/ directory")
    return candidates[-1][1]


def open_checkpoint(url: str) -> ckpt.Checkpoint:
    """A checkpoint directory as named (each file checked as it is read), or a run directory's newest complete
    checkpoint whose weights pass their checksums: a newer one that fails is skipped, with a warning saying so
    (`checkpoint.newest_intact`)."""
    fs, root = cache.filesystem(url)
    try:
        if fs.exists(cache.join(root, ckpt.META)):
            return ckpt.Checkpoint(url)
        candidates = complete_checkpoints(url)
        if not candidates:
            resolve_checkpoint(url)  # raises the error that says where checkpoints were looked for
        return ckpt.newest_intact(candidates, weights_only=True)
    except ckpt.CheckpointError as exc:
        raise ExportError(str(exc)) from None


def complete_checkpoints(run: str) -> list[tuple[int, str]]:
    """(step, URL) of every complete checkpoint_* directory of a run directory (or of its Ray Train
    directory, <run>/train), oldest first: by the step in its checkpoint.json, then by name. One that
    has no checkpoint.json, or one cut short (an interrupted upload), is skipped, with a warning."""
    fs, root = cache.filesystem(run)
    found: list[tuple[int, str, str]] = []
    for base in (root, cache.join(root, layout.TRAIN_RUN)):
        if not fs.isdir(base):
            continue
        for path in fs.ls(base, detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if not name.startswith("checkpoint_") or not fs.isdir(path):
                continue
            try:
                meta = cache.read_json(fs, cache.join(path, ckpt.META))
            except ValueError as exc:  # not JSON (cut short, damaged): the checkpoints before it still count
                log.warning("skipping checkpoint %s: its %s is not valid JSON (%s)", path, ckpt.META, exc)
                continue
            if meta is None:
                log.warning("skipping incomplete checkpoint %s (no %s)", path, ckpt.META)
                continue
            found.append((int(meta.get("state", {}).get("step", -1)), name, path))
    return [(step, _with_protocol(run, fs, path)) for step, _, path in sorted(found)]


def _with_protocol(url: str, fs: Any, path: str) -> str:
    return path if cache.is_local(fs) and "://" not in url else fs.unstrip_protocol(path)


# --- the reference layout ---------------------------------------------------------------------------


def reference_weights(student: Mapping[str, torch.Tensor], decoder_state: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """Our names (queries, qformer.*, projection.*) -> the reference's. `decoder_state` is the base
    Whisper decoder's state dict: it supplies the names the Q-Former must have, and the token
    table the Q-Former dropped."""
    out = {"query_tokens": student["queries"]}
    if "projection.weight" in student:  # the paper's linear projection (model.projection=vocabulary has no weights)
        out |= {"projection.weight": student["projection.weight"].t(), "projection.bias": student["projection.bias"]}
    for name, base in decoder_state.items():
        ours = student.get(f"qformer.{name}")
        if ours is None and name != "embed_tokens.weight":
            raise ExportError(f"the Q-Former has no {name!r}, which the Whisper decoder has")
        out[CONNECTOR + name] = base if ours is None else ours
    extra = sorted(k for k in student if k.startswith("qformer.") and k[len("qformer."):] not in decoder_state)
    if extra:
        raise ExportError(f"Q-Former weights the Whisper decoder does not have: {extra[:5]}")
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def _student_state(weights: dict[str, torch.Tensor], cfg: Config, tokenizer: Any) -> dict[str, torch.Tensor]:
    """All of queries, qformer.*, projection.*: straight from the checkpoint when everything trained
    (the default); otherwise the untrained parts are the run's initialisation, so the student is
    rebuilt as training built it (seed = train.seed) and the checkpoint loaded into it."""
    present = {name.split(".", 1)[0] for name in weights}
    if present >= set(TRAINABLE_PARTS) - ({"projection"} if cfg.model.projection == "vocabulary" else set()):
        return weights
    log.info("checkpoint trains only %s: rebuilding the student for the initial values of the rest",
             sorted(present))
    model = build_student(_on_cpu(cfg), tokenizer, seed=cfg.train.seed, device="cpu")
    model.load_trainable(weights)
    return {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in TRAINABLE_PARTS}


def _source_spec(name: str, revision: str | None) -> tuple[str, str | None]:
    """Local directories are recorded absolute, hub ids as given."""
    return (os.path.abspath(name) if os.path.isdir(name) else name), revision


def answer_temperature(mcfg: ModelConfig) -> float:
    """The vocabulary mix's temperature an exported model answers with: `model.answer_temperature`, else the one
    it trained with."""
    return mcfg.vocabulary_temperature if mcfg.answer_temperature is None else mcfg.answer_temperature


def export_config(cfg: Config, template: ChatTemplate, tokenizer: Any, weights: Mapping[str, torch.Tensor],
                  source: dict[str, Any]) -> dict[str, Any]:
    q, d = weights["query_tokens"].shape
    h = weights["projection.bias"].shape[0] if "projection.bias" in weights else None  # None: the LLM's width
    whisper, whisper_rev = _source_spec(cfg.model.whisper, cfg.model.whisper_revision)
    llm, llm_rev = _source_spec(cfg.teacher.model, cfg.teacher.revision)
    tiny_w = ({"seed": cfg.model.tiny_whisper_seed, "n_mels": cfg.features.n_mels, "config": dict(TINY_WHISPER)}
              if cfg.model.whisper == "tiny" else None)
    tiny_l = ({"seed": cfg.teacher.tiny_seed, "vocab_size": len(tokenizer),
               "config": json.loads(json.dumps(TINY_LLAMA))} if cfg.teacher.model == "tiny" else None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        # The reference's own keys (config.json of the released model). Not its "model_type": "diva",
        # which would make AutoTokenizer.from_pretrained(<this dir>) look for a model type transformers lacks.
        "reference_encoder": whisper,
        "reference_decoder": llm,
        "vocab_size": len(tokenizer),
        "whisper": {"name": whisper, "revision": whisper_rev, "tiny": tiny_w},
        "llm": {"name": llm, "revision": llm_rev, "dtype": cfg.teacher.dtype, "tiny": tiny_l},
        "num_queries": int(q),
        "d": int(d),
        "H": None if h is None else int(h),
        # "linear": the paper's (projection.* weights); "vocabulary": rebuilt from the two checkpoints at load.
        # The mix's temperature at inference: model.answer_temperature where the run set one, else the training one.
        "projection": {"kind": cfg.model.projection, "temperature": answer_temperature(cfg.model)},
        "weights": {"file": WEIGHTS, "dtype": "float32", "projection_weight": "[d, H] (in x out)"},
        "template": {
            "prefix_ids": list(template.prefix_ids),
            "suffix_ids": list(template.suffix_ids),
            "system_prompt": template.system_prompt,
            "fingerprint": template.fingerprint(),
            # An instruction at inference becomes the system turn (replacing system_prompt).
            "instruction": "system",
        },
        "features": dataclasses.asdict(cfg.features),
        "audio_checks": {k: getattr(cfg.prepare, k) for k in ("max_duration_s", "min_duration_s", "silence_peak")},
        "source": source,
        "versions": cache.versions("torch", "transformers", "safetensors"),
        "created_unix": int(time.time()),
    }


# --- export -------------------------------------------------------------------------------------------


def export_checkpoint(checkpoint: str | ckpt.Checkpoint, out: str, *, overwrite: bool = False) -> str:
    """Write the model directory for `checkpoint` (a checkpoint dir, a run dir: its newest intact one, see
    `open_checkpoint`, or one already opened) to `out` (local or any fsspec URL) and return `out`. Re-exporting
    the same checkpoint into the same directory is a no-op; another export already there is kept unless
    `overwrite`."""
    opened = checkpoint if isinstance(checkpoint, ckpt.Checkpoint) else open_checkpoint(checkpoint)
    source = {"checkpoint": opened.url, "step": opened.state.step,
              "trainable_sha256": cache.fingerprint(opened.weight_files())}

    def weights() -> dict[str, torch.Tensor]:
        try:
            return opened.weights()
        except ckpt.CheckpointError as exc:
            raise ExportError(str(exc)) from None

    return _export(weights, from_dict(Config, opened.config), source, out, overwrite)


def export_untrained(cfg: Config, out: str, *, overwrite: bool = False) -> str:
    """The student as training initialises it (seed train.seed), exported like a checkpoint at step 0: the
    baseline a trained model is compared against."""
    def weights() -> dict[str, torch.Tensor]:
        model = build_student(_on_cpu(cfg), seed=cfg.train.seed, device="cpu")
        return {k: v.detach() for k, v in model.trainable_parameters().items()}

    source = {"checkpoint": None, "step": 0, "trainable_sha256": f"untrained-{cache.fingerprint(cfg.to_dict())}"}
    return _export(weights, cfg, source, out, overwrite)


def _on_cpu(cfg: Config) -> Config:
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, device="cpu", dtype="float32"))


def _export(weights: Any, cfg: Config, source: dict[str, Any], out: str, overwrite: bool) -> str:
    """Write the export of `weights()` (trainable tensors by name; called only when there is work) to `out`."""
    from safetensors.torch import save_file

    out_fs, out_root = cache.filesystem(out)
    existing = cache.read_json(out_fs, cache.join(out_root, CONFIG))
    if existing is not None and existing.get("source", {}).get("trainable_sha256") == source["trainable_sha256"]:
        log.info("%s already holds the export of %s; nothing to do", out, source["checkpoint"] or "the untrained model")
        return out
    if not overwrite and out_fs.exists(out_root) and out_fs.ls(out_root, detail=False):
        raise ExportError(f"{out}: exists and holds something else "
                          f"({'another export' if existing else 'not an export'}); pass overwrite to replace it")
    try:
        tokenizer = load_tokenizer(cfg.teacher)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{source['checkpoint']}: cannot load the tokenizer its config names "
                          f"({cfg.teacher.tokenizer or cfg.teacher.model}): {exc}") from exc
    template = derive_template(tokenizer, cfg.teacher.system_prompt)
    student = _student_state(weights(), cfg, tokenizer)
    decoder = student_whisper(cfg.model, cfg.features.n_mels).base_model.decoder
    ref = reference_weights(student, decoder.state_dict())
    config = export_config(cfg, template, tokenizer, ref, source | {"config": cfg.to_dict()})
    with tempfile.TemporaryDirectory(prefix="diva-export-") as tmp:
        save_file(ref, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "layout": "diva-reference"})
        tokenizer.save_pretrained(tmp)
        _publish(tmp, config, out_fs, out_root)
    log.info("exported %s (step %s) to %s", source["checkpoint"] or "the untrained student", source["step"], out)
    return out


def _publish(stage: str, config: dict[str, Any], fs: Any, root: str) -> None:
    """Copy the staged files, config.json last: a reader never sees a directory that looks complete
    but is not. Locally the directory is swapped in by rename."""
    if cache.is_local(fs):
        with open(os.path.join(stage, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        fresh = os.path.join(parent, f".{os.path.basename(root)}.tmp-{uuid.uuid4().hex}")
        shutil.copytree(stage, fresh)
        if os.path.exists(root):
            shutil.rmtree(root)
        os.replace(fresh, root)
        return
    if fs.exists(root):
        fs.rm(root, recursive=True)
    for name in sorted(os.listdir(stage)):
        fs.put_file(os.path.join(stage, name), cache.join(root, name))
    cache.write_json(fs, cache.join(root, CONFIG), config)


# --- load ---------------------------------------------------------------------------------------------


def read_config(path: str) -> dict[str, Any]:
    """config.json of a model directory, local or on any fsspec URL (read in place: no weights are downloaded
    to read it), checking that the directory is complete."""
    fs, root = cache.filesystem(path)
    fs.invalidate_cache(root)  # a directory an export rewrote since this process last listed it
    if not fs.isdir(root):
        raise ModelDirError(f"{path}: no such model directory (make one with python -m jobs.export)")
    for name in REQUIRED_FILES:
        if not fs.isfile(cache.join(root, name)):
            raise ModelDirError(f"{path}: incomplete model directory: {name} is missing (re-run python -m jobs.export)")
    try:
        config = json.loads(fs.cat_file(cache.join(root, CONFIG)))
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path}/{CONFIG}: not valid JSON: {exc}") from exc
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{path}/{CONFIG}: format {config.get('format')!r} v{config.get('format_version')}, "
                            f"expected {FORMAT!r} v{FORMAT_VERSION}")
    return config


def audio_settings(config: Mapping[str, Any]) -> tuple[FeatureConfig, PrepareConfig]:
    """The front end and the clip checks the model was trained with (for pipeline.ask.load_audio)."""
    return FeatureConfig(**config["features"]), PrepareConfig(**config["audio_checks"])


@contextlib.contextmanager
def model_files(path: str, *, weights: bool = True) -> Iterator[str]:
    """A model directory (one `read_config` has checked) as a local one: itself where it is local, else a download
    into a temporary directory that is removed on exit. Loading reads every file into memory, so no copy outlives a
    load (a paper-size Q-Former is ~3 GB a copy). `weights=False` leaves the weights file out (the tokenizer alone)."""
    fs, root = cache.filesystem(path)
    if cache.is_local(fs):
        yield root
        return
    local = tempfile.mkdtemp(prefix="diva-model-")
    try:
        for remote in fs.ls(root, detail=False):
            name = posixpath.basename(remote)
            if fs.isfile(remote) and (weights or name != WEIGHTS):
                fs.get_file(remote, os.path.join(local, name))
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
               whisper: str | None = None, llm: str | None = None) -> tuple[DiVA, Any]:
    """(DiVA in eval mode carrying its template, tokenizer) from a model directory plus the base
    Whisper and LLM it names (`whisper`/`llm` override those names, e.g. with a local copy)."""
    from safetensors.torch import load_file

    config = read_config(path)
    try:
        ckpt.refuse_pickles(path, "model directory")
    except ckpt.CheckpointError as exc:
        raise ModelDirError(str(exc)) from None
    with model_files(path) as local:
        tokenizer, template = _tokenizer_and_template(local, config, path)
        state = load_file(os.path.join(local, WEIGHTS))
    _check_weights(path, config, state)
    base = _base_whisper(config, whisper, dtype, device)
    lm = _base_llm(path, config, llm, len(tokenizer), dtype, device)
    kind = config.get("projection", {"kind": "linear", "temperature": 1.0})
    mcfg = ModelConfig(whisper=config["whisper"]["name"], num_queries=config["num_queries"], trainable=[],
                       projection=kind["kind"], vocabulary_temperature=kind["temperature"])
    vocabulary = None
    if kind["kind"] == "vocabulary":
        try:
            vocabulary = vocabulary_projection(base, load_whisper_tokenizer(whisper or config["whisper"]["name"]),
                                               tokenizer, lm.get_input_embeddings().weight.shape[0],
                                               kind["temperature"])
        except ValueError as exc:
            raise ModelDirError(f"{path}: {exc}") from exc
    model = DiVA(base, lm, template, mcfg, vocabulary=vocabulary)
    if model.hidden_size != (config["H"] or model.hidden_size) or model.queries.shape[1] != config["d"]:
        raise ModelDirError(f"{path}: the weights are for d={config['d']}, H={config['H']}; the base models "
                            f"have d={model.queries.shape[1]}, H={model.hidden_size}")
    with torch.no_grad():
        model.queries.copy_(state["query_tokens"])
        if vocabulary is None:
            model.projection.weight.copy_(state["projection.weight"].t())
            model.projection.bias.copy_(state["projection.bias"])
        connector = {k[len(CONNECTOR):]: v for k, v in state.items()
                     if k.startswith(CONNECTOR) and k != CONNECTOR + "embed_tokens.weight"}
        try:
            model.qformer.load_state_dict(connector, strict=True)
        except RuntimeError as exc:
            raise ModelDirError(f"{path}/{WEIGHTS}: the connector.* weights do not fit the Whisper decoder: "
                                f"{exc}") from exc
    model.audio_settings = audio_settings(config)  # the front end it was trained with, for pipeline.ask
    return model.eval(), tokenizer


def _tokenizer_and_template(local: str, config: Mapping[str, Any], path: str) -> tuple[Any, ChatTemplate]:
    """The saved tokenizer (read from `local`, the directory `path` as a local one), and the template config.json
    records, checked to be the one it derives."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{path}: the tokenizer does not load: {exc}") from exc
    template = ChatTemplate(tuple(config["template"]["prefix_ids"]), tuple(config["template"]["suffix_ids"]),
                            config["template"]["system_prompt"])
    try:
        derived = derive_template(tokenizer, template.system_prompt)
    except TemplateError as exc:
        raise ModelDirError(f"{path}: {exc}") from exc
    if derived != template:
        raise ModelDirError(f"{path}: the saved tokenizer's chat template gives prefix {list(derived.prefix_ids)} / "
                            f"suffix {list(derived.suffix_ids)}, config.json records {list(template.prefix_ids)} / "
                            f"{list(template.suffix_ids)}")
    return tokenizer, template


def _base_whisper(config: Mapping[str, Any], override: str | None, dtype: torch.dtype, device: Any) -> Any:
    """The Whisper config.json names (or `override`), its encoder reading the features' window."""
    spec = config["whisper"]
    if spec["tiny"] and override is None:
        base = tiny_whisper(spec["tiny"]["seed"], spec["tiny"]["n_mels"], **spec["tiny"]["config"])
        base = base.to(device=device, dtype=dtype)
    else:
        base = load_whisper(override or spec["name"], None if override else spec["revision"], dtype, device)
    return fit_encoder_window(base, FeatureConfig(**config["features"]).n_frames)


def _base_llm(path: str, config: Mapping[str, Any], override: str | None, vocab_size: int, dtype: torch.dtype,
              device: Any) -> Any:
    spec = config["llm"]
    if spec["tiny"] and override is None:
        if spec["tiny"]["vocab_size"] != vocab_size:
            raise ModelDirError(f"{path}: the tiny LLM was built for {spec['tiny']['vocab_size']} tokens, "
                                f"the saved tokenizer has {vocab_size}")
        return tiny_llama(spec["tiny"]["vocab_size"], seed=spec["tiny"]["seed"], dtype=dtype, device=device,
                          **spec["tiny"]["config"])
    revision = None if override else spec["revision"]
    return load_llm(override or spec["name"], dtype=dtype, device=device, revision=revision)


def _check_weights(path: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    q, d, h = config["num_queries"], config["d"], config["H"]
    expect = {"query_tokens": (q, d)}
    if config.get("projection", {}).get("kind", "linear") == "linear":
        expect |= {"projection.weight": (d, h), "projection.bias": (h,)}
    for name, shape in expect.items():
        if name not in state:
            raise ModelDirError(f"{path}/{WEIGHTS}: {name} is missing")
        if tuple(state[name].shape) != shape:
            raise ModelDirError(f"{path}/{WEIGHTS}: {name} has shape {tuple(state[name].shape)}, config.json "
                                f"implies {shape}")
    if not any(k.startswith(CONNECTOR) for k in state):
        raise ModelDirError(f"{path}/{WEIGHTS}: no connector.* (Q-Former) weights")
