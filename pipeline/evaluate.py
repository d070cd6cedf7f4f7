"""Evaluate an exported model: the distillation gap on a prepared split, and spoken tasks from JSONL manifests.

Distillation, per example of a prepared split joined with its teacher cache (O = the LLM's head): ``l2`` =
||h_student - h_teacher||_2, ``cosine``, ``agree`` = argmax(O h_s) == argmax(O h_t), and ``kl`` =
KL(softmax(O h_t) || softmax(O h_s)), the divergence Lemma 1 bounds by the L2 gap. Tasks: one JSONL
manifest per task (`{"audio", "instruction", "reference", "task": "generation" | "classification",
"labels", "id", "meta"}`, audio relative to the manifest); generation is scored by exact/contains match
and BLEU, classification by each label's log-probability as the answer (the paper's protocol; the choice
of sum over mean is argued in docs/design.md, "Evaluation"). The pure core needs no Ray; Ray Data actor
pools run it, and `run_evaluate` writes:

    <out>/summary.json, distillation/{examples.parquet,summary.json}, tasks/<stem>/{examples.jsonl,summary.json}
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import statistics
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import PipelineError, cache, layout
from pipeline.ask import AudioError, generate, llm_inputs, load_audio, prompt_template
from pipeline.builders import resolve
from pipeline.config import ClusterConfig, Config, EvalConfig, from_dict
from pipeline.export import load_model, model_files, read_config
from pipeline.ingest import collate, training_dataset
from pipeline.losses import kl_divergence
from pipeline.teacher import target_spec
from pipeline.template import ChatTemplate, transcript_ids

log = logging.getLogger(__name__)

TASK_TYPES = ("generation", "classification")
FIELDS = ("audio", "instruction", "reference", "task", "labels", "id", "meta")
MAX_LISTED_ERRORS = 20
DISTILL_DIR, TASKS_DIR, ANSWERS_DIR = "distillation", "tasks", "answers"
SUMMARY, EXAMPLES = "summary.json", "examples"


class EvalError(PipelineError, ValueError):
    """An evaluation that cannot run as asked (bad arguments, a model that does not fit the data)."""


class ManifestError(EvalError):
    """Task manifests with bad rows; the message names each file and line and the reason."""


# --- distillation metrics (pure) ----------------------------------------------------------------------------------


def distill_metrics(model: Any, input_features: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Per example of a batch: l2, cosine, kl (float64), student_token, teacher_token (int64), agree (bool).
    `target` is h_teacher [B, H] as cached (`teacher.decode_target`); h_student comes from `DiVA.forward`."""
    head = model.llm.get_output_embeddings()
    with torch.inference_mode():
        h_student = model(input_features.to(model.queries.device)).h_student
        h_s = h_student.float()
        h_t = target.to(device=h_s.device, dtype=torch.float32)
        student_logits = head(h_s.to(head.weight.dtype)).float()
        teacher_logits = head(h_t.to(head.weight.dtype)).float()
        kl = kl_divergence(torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1))
        student_token, teacher_token = student_logits.argmax(-1), teacher_logits.argmax(-1)
        out = {
            "l2": (h_s - h_t).norm(dim=-1),
            "cosine": torch.nn.functional.cosine_similarity(h_s, h_t, dim=-1),
            "kl": kl,
            "student_token": student_token,
            "teacher_token": teacher_token,
            "agree": student_token == teacher_token,
        }
    return {k: v.cpu().numpy().astype(np.float64) if v.is_floating_point() else v.cpu().numpy()
            for k, v in out.items()}


def describe(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, mean, median, std (population), min, max; None for an empty list."""
    v = [float(x) for x in values]
    if not v:
        return {"count": 0, "mean": None, "median": None, "std": None, "min": None, "max": None}
    return {"count": len(v), "mean": statistics.fmean(v), "median": statistics.median(v),
            "std": statistics.pstdev(v), "min": min(v), "max": max(v)}


def summarise_distillation(table: pa.Table) -> dict[str, Any]:
    agree = table.column("agree").to_pylist()
    return {
        "count": table.num_rows,
        "l2": describe(table.column("l2").to_pylist()),
        "cosine": describe(table.column("cosine").to_pylist()),
        "kl": describe(table.column("kl").to_pylist()),
        "first_token_agreement": {"count": len(agree), "agree": int(sum(agree)),
                                  "rate": sum(agree) / len(agree) if agree else None},
    }


# --- task scoring (pure) ------------------------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower case, punctuation removed (every Unicode P* character), whitespace collapsed and stripped."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return _SPACE.sub(" ", text).strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def contains_match(prediction: str, reference: str) -> bool:
    """The normalised reference occurs in the normalised prediction as whole words ("no" is not in "know")."""
    ref = normalise(reference)
    return bool(ref) and f" {ref} " in f" {normalise(prediction)} "


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """(sacrebleu corpus BLEU with its defaults: 13a tokenisation, case-sensitive; its signature)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    return float(bleu.corpus_score(list(predictions), [list(references)]).score), str(bleu.get_signature())


def weighted_f1(references: Sequence[str], predictions: Sequence[str]) -> float | None:
    """F1 per reference class, weighted by its support: the paper's score for multi-class emotion tasks."""
    if not references:
        return None
    support = Counter(references)
    total = 0.0
    for label, n in support.items():
        tp = sum(r == p == label for r, p in zip(references, predictions, strict=True))
        predicted = sum(p == label for p in predictions)
        f1 = 2 * tp / (n + predicted) if n + predicted else 0.0
        total += n * f1
    return total / len(references)


def label_logprobs(model: Any, template: ChatTemplate, input_features: torch.Tensor,
                   label_ids: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per label, the log-prob of each of its tokens as the answer: log p(y_k | audio prompt, y_<k).

    One forward over the prompt keeps its KV cache; each label with more than one token then runs on a
    copy of it (no label sees another's tokens)."""
    from transformers import DynamicCache

    if not label_ids or any(not ids for ids in label_ids):
        raise EvalError("every label needs at least one token")
    llm = model.llm
    embeds = llm_inputs(model, template, input_features)
    out: list[list[float]] = []
    with torch.inference_mode():
        prompt = llm(inputs_embeds=embeds, cache=DynamicCache(config=llm.config), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(prompt.logits[0, -1].float(), dim=-1)
        for ids in label_ids:
            scores = [float(first[ids[0]])]
            if len(ids) > 1:
                rest = llm(input_ids=torch.tensor([list(ids[:-1])], dtype=torch.long, device=embeds.device),
                           cache=copy.deepcopy(prompt.cache), use_cache=True)
                logprobs = torch.log_softmax(rest.logits[0].float(), dim=-1)
                targets = torch.tensor(list(ids[1:]), dtype=torch.long, device=logprobs.device)
                scores += logprobs[torch.arange(len(ids) - 1, device=logprobs.device), targets].tolist()
            out.append(scores)
    return out


def label_score(token_logprobs: Sequence[float], how: str = "sum") -> float:
    """A label's score: the sum of its tokens' log-probs (its log-probability) or their mean (eval.label_score)."""
    total = float(sum(token_logprobs))
    return total if how == "sum" else total / len(token_logprobs)


def classify(model: Any, tokenizer: Any, template: ChatTemplate, input_features: torch.Tensor,
             labels: Sequence[str], how: str = "sum") -> tuple[str, list[list[float]]]:
    """(the label the model scores highest, each label's token log-probs); ties go to the earlier label."""
    per_token = label_logprobs(model, template, input_features, [transcript_ids(tokenizer, x) for x in labels])
    scores = [label_score(lp, how) for lp in per_token]
    return labels[max(range(len(labels)), key=lambda i: (scores[i], -i))], per_token


# --- manifests (pure) ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskExample:
    """One good manifest row; `audio` is resolved (relative paths against the manifest's directory)."""

    manifest: str
    line: int
    id: str
    task: str
    audio: str
    instruction: str | None
    reference: str
    labels: tuple[str, ...] | None = None
    meta: str | None = None  # the row's "meta", as JSON

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


def resolve_audio(manifest: str, audio: str) -> str:
    """An audio path as written in a manifest -> a path or URL to open."""
    if "://" in audio or os.path.isabs(audio) or audio.startswith("~"):
        return os.path.expanduser(audio)
    if "://" in manifest:
        protocol, rest = manifest.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), audio))}"
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest)), audio))


def read_manifest(url: str) -> tuple[list[TaskExample], list[str]]:
    """(good rows, one "file:line: reason" per bad row). Blank lines are skipped. Raises ManifestError
    when the manifest itself is missing or holds no rows."""
    fs, root = cache.filesystem(url)
    try:
        with fs.open(root, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise ManifestError(f"{url}: no such manifest file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{url}: not UTF-8 text: {exc}") from None
    stem = posixpath.basename(root).rsplit(".", 1)[0]
    rows, errors, ids = [], [], {}
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            row = _parse_row(url, content, stem, line)
        except ValueError as exc:
            errors.append(f"{url}:{line}: {exc}")
            continue
        if row.id in ids:
            errors.append(f"{url}:{line}: id {row.id!r} is also on line {ids[row.id]}")
            continue
        ids[row.id] = line
        rows.append(row)
    if not rows and not errors:
        raise ManifestError(f"{url}: no rows")
    missing = _missing_audio(rows)
    errors += missing.values()
    errors.sort(key=lambda e: int(e[len(url) + 1:].split(":", 1)[0]))
    return [r for r in rows if r.line not in missing], errors


def _parse_row(url: str, content: str, stem: str, line: int) -> TaskExample:
    try:
        row = json.loads(content)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; valid: {list(FIELDS)} (free-form data goes under \"meta\")")
    task = row.get("task")
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task type {task!r}; expected one of {list(TASK_TYPES)}"
                         if "task" in row else f"missing \"task\" ({' or '.join(TASK_TYPES)})")
    audio = row.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        raise ValueError("missing \"audio\" (a path relative to the manifest, or absolute)")
    reference = row.get("reference")
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError("missing \"reference\" (a non-empty string)")
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise ValueError(f"\"instruction\" must be a string or null, not {instruction!r}")
    labels = row.get("labels")
    if task == "classification":
        if labels is None:
            raise ValueError("a classification row needs \"labels\" (the candidate answers)")
        if (not isinstance(labels, list) or len(labels) < 2
                or not all(isinstance(x, str) and x.strip() for x in labels)):
            raise ValueError(f"\"labels\" must be a list of at least 2 non-empty strings, not {labels!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"\"labels\" repeats a label: {labels!r}")
        if reference not in labels:
            raise ValueError(f"reference {reference!r} is not one of the labels {labels!r}")
    elif labels is not None:
        raise ValueError("\"labels\" only apply to classification rows")
    id_ = row.get("id", f"{stem}:{line}")
    if not isinstance(id_, str) or not id_:
        raise ValueError(f"\"id\" must be a non-empty string, not {id_!r}")
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"\"meta\" must be an object, not {meta!r}")
    return TaskExample(manifest=url, line=line, id=id_, task=task, audio=resolve_audio(url, audio),
                       instruction=instruction, reference=reference, labels=tuple(labels) if labels else None,
                       meta=json.dumps(meta, sort_keys=True) if meta is not None else None)


def _missing_audio(rows: Sequence[TaskExample]) -> dict[int, str]:
    """{line: error} for rows whose audio file is not there (decoding is checked when it is read)."""
    out = {}
    for row in rows:
        fs, path = cache.filesystem(row.audio)
        if not fs.isfile(path):
            reason = "is a directory" if fs.isdir(path) else "not found"
            out[row.line] = f"{row.where}: audio file {reason}: {row.audio}"
    return out


def read_manifests(urls: Sequence[str], *, skip_bad_rows: bool = False
                   ) -> tuple[list[tuple[str, list[TaskExample]]], dict[str, list[str]]]:
    """([(task name, rows)], {task name: bad rows}) for several manifests. Bad rows raise ManifestError
    naming each (all manifests are checked first) unless `skip_bad_rows`. The name is the manifest's
    stem, made unique with -2, -3, ... ."""
    repeated = sorted(u for u, n in Counter(urls).items() if n > 1)
    if repeated:
        raise ManifestError(f"manifest(s) given more than once: {repeated}")
    tasks, bad, errors, seen = [], {}, [], Counter()
    for url in urls:
        stem = posixpath.basename(cache.filesystem(url)[1]).rsplit(".", 1)[0]
        seen[stem] += 1
        name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        rows, row_errors = read_manifest(url)
        tasks.append((name, rows))
        bad[name] = row_errors
        errors += row_errors
    if errors and not skip_bad_rows:
        shown = "\n  ".join(errors[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        raise ManifestError(f"{len(errors)} bad manifest row(s) (fix them, or pass skip_bad_rows to evaluate the "
                            f"rest):\n  {shown}{more}")
    for e in errors:
        log.warning("skipping bad row %s", e)
    if not any(rows for _, rows in tasks):
        raise ManifestError(f"no good rows in {', '.join(urls)}")
    return tasks, bad


def summarise_task(rows: Sequence[Mapping[str, Any]], how: str = "sum") -> dict[str, Any]:
    """Scores of one manifest's evaluated rows (rows with an "error" are counted, not scored)."""
    errors = [r for r in rows if r.get("error")]
    good = [r for r in rows if not r.get("error")]
    out: dict[str, Any] = {"rows": len(rows), "scored": len(good),
                           "errors": [r["error"] for r in errors]}
    generation = [r for r in good if r["task"] == "generation"]
    if generation:
        bleu, signature = corpus_bleu([r["prediction"] for r in generation], [r["reference"] for r in generation])
        out["generation"] = {
            "count": len(generation),
            "exact_match": sum(r["exact"] for r in generation) / len(generation),
            "contains": sum(r["contains"] for r in generation) / len(generation),
            "bleu": bleu,
            "bleu_signature": signature,
        }
    classification = [r for r in good if r["task"] == "classification"]
    if classification:
        refs, preds = [r["reference"] for r in classification], [r["prediction"] for r in classification]
        out["classification"] = {
            "count": len(classification),
            "accuracy": sum(r == p for r, p in zip(refs, preds, strict=True)) / len(refs),
            "weighted_f1": weighted_f1(refs, preds),
            "label_score": how,
            "predicted": dict(sorted(Counter(preds).items())),
            "reference": dict(sorted(Counter(refs).items())),
        }
    return out


# --- one model per actor ------------------------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class DistillWorker:
    """A Ray Data actor: one model; joined rows (ingest's columns) -> per-example distillation metrics."""

    def __init__(self, model_dir: str, ecfg: EvalConfig, collate_kwargs: dict[str, Any]):
        use_cpus(ecfg)
        self.model, _ = load_model(model_dir, ecfg.device, _dtype(ecfg.dtype), whisper=ecfg.whisper, llm=ecfg.llm)
        self.collate_kwargs = {**collate_kwargs, "num_queries": self.model.num_queries}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = collate(batch, **self.collate_kwargs)
        metrics = distill_metrics(self.model, tensors["input_features"], tensors["target"])
        return {"id": np.asarray(batch["id"], dtype=object), "n_tokens": tensors["lengths"].numpy(), **metrics}


TASK_SCHEMA = pa.schema([
    ("manifest", pa.string()), ("line", pa.int64()), ("id", pa.string()), ("task", pa.string()),
    ("audio", pa.string()), ("instruction", pa.string()), ("reference", pa.string()),
    ("labels", pa.list_(pa.string())), ("meta", pa.string()),
    ("prediction", pa.string()), ("exact", pa.bool_()), ("contains", pa.bool_()), ("correct", pa.bool_()),
    ("label_logprobs", pa.list_(pa.list_(pa.float64()))), ("label_scores", pa.list_(pa.float64())),
    ("new_tokens", pa.int64()), ("error", pa.string()),
])


class TaskWorker:
    """A Ray Data actor: one model; manifest rows -> answers and their scores (audio errors are recorded on
    the row, naming its file and line, and the rest go on)."""

    def __init__(self, model_dir: str, ecfg: EvalConfig):
        use_cpus(ecfg)
        self.ecfg = ecfg
        self.model, self.tokenizer = load_model(model_dir, ecfg.device, _dtype(ecfg.dtype), whisper=ecfg.whisper,
                                                llm=ecfg.llm)
        self.fcfg, self.checks = self.model.audio_settings
        self.templates: dict[str | None, ChatTemplate] = {}

    def template(self, instruction: str | None) -> ChatTemplate:
        if instruction not in self.templates:  # deriving one renders the chat template a dozen times
            self.templates[instruction] = prompt_template(self.model, self.tokenizer, instruction)
        return self.templates[instruction]

    def evaluate(self, row: Mapping[str, Any]) -> dict[str, Any]:
        out = {f.name: row.get(f.name) for f in TASK_SCHEMA}
        try:
            features = load_audio(row["audio"], self.fcfg, self.checks)
        except AudioError as exc:
            out["error"] = f"{row['manifest']}:{row['line']}: {exc}"
            return out
        if row["task"] == "generation":
            ids = list(generate(self.model, self.tokenizer, features, prompt=row["instruction"],
                                max_new_tokens=self.ecfg.max_new_tokens))
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            out |= {"prediction": text, "new_tokens": len(ids), "exact": exact_match(text, row["reference"]),
                    "contains": contains_match(text, row["reference"])}
        else:
            labels = list(row["labels"])
            best, per_token = classify(self.model, self.tokenizer, self.template(row["instruction"]), features,
                                       labels, self.ecfg.label_score)
            out |= {"prediction": best, "correct": best == row["reference"], "label_logprobs": per_token,
                    "label_scores": [label_score(lp, self.ecfg.label_score) for lp in per_token]}
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.evaluate(row) for row in batch.to_pylist()], schema=TASK_SCHEMA)


# --- Ray Data wrappers --------------------------------------------------------------------------------------------


def expected_target_spec(config: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """The teacher-cache spec the exported model was trained against (`teacher.target_spec` of the run's own
    teacher config, tokenizer and template), so a cache for another LLM or template is refused."""
    source = config.get("source", {}).get("config")
    if source is None:
        raise EvalError("the model directory's config.json records no training config (source.config)")
    tcfg = from_dict(Config, source).teacher
    template = ChatTemplate(tuple(config["template"]["prefix_ids"]), tuple(config["template"]["suffix_ids"]),
                            config["template"]["system_prompt"])
    recorded = config["llm"]["name"]  # absolute for local directories: the run's name may be cwd-relative
    load = tcfg if tcfg.model == "tiny" or os.path.isdir(tcfg.model) or not os.path.isdir(recorded) \
        else dataclasses.replace(tcfg, model=recorded)
    try:
        spec = target_spec(load, tokenizer, template)
    except OSError as exc:
        raise EvalError(f"cannot read the config of the LLM {tcfg.model!r} the model was trained with: {exc}") from exc
    return spec | {"model": tcfg.model}


def _actor_options(ecfg: EvalConfig) -> dict[str, Any]:
    import ray.data

    # An actor reserving every CPU would leave none to the reads that feed it (a deadlock on a small machine):
    # it reserves at most all but one; use_cpus still gives it eval.cpus_per_actor threads.
    cpus = min(ecfg.cpus_per_actor, max(1.0, ray.cluster_resources().get("CPU", 1.0) - 1.0))
    return {"compute": ray.data.ActorPoolStrategy(size=ecfg.num_actors),
            "num_gpus": 1 if ecfg.device == "cuda" else 0, "num_cpus": cpus}


def require_actors(ecfg: EvalConfig, cluster: ClusterConfig) -> None:
    """The evaluation actors' resources exist on the cluster (pipeline.resources): say so now, not never."""
    from pipeline.resources import require

    options = _actor_options(ecfg)
    require({"CPU": options["num_cpus"], "GPU": float(options["num_gpus"])}, ecfg.num_actors,
            what=f"evaluation ({ecfg.num_actors} actor(s) on eval.device={ecfg.device})",
            change="eval.device (evaluate --device cpu runs on CPUs) or eval.num_actors",
            timeout_s=cluster.autoscaler_timeout_s)


def use_cpus(ecfg: EvalConfig) -> None:
    """An evaluation actor on the CPU computes with the cores Ray reserved for it (Ray sets one thread below 2)."""
    if ecfg.device == "cpu":
        torch.set_num_threads(max(1, int(ecfg.cpus_per_actor)))


def evaluate_distillation(model_dir: str, mels_url: str, teacher_url: str, ecfg: EvalConfig
                          ) -> tuple[pa.Table, dict[str, Any]]:
    """(per-example metrics sorted by id, summary) for `ecfg.split` of a prepared dataset and its teacher
    cache, which must be the one the model's LLM and template produce (else cache.DatasetError)."""
    from transformers import AutoTokenizer

    config = read_config(model_dir)
    with model_files(model_dir, weights=False) as local:
        tokenizer = AutoTokenizer.from_pretrained(local)
    ds, info = training_dataset(mels_url, teacher_url, expect=expected_target_spec(config, tokenizer),
                                split=ecfg.split, shuffle_seed=None)
    ds = ds.map_batches(DistillWorker, fn_constructor_kwargs={"model_dir": resolve(model_dir), "ecfg": ecfg,
                                                              "collate_kwargs": info["collate"]},
                        batch_size=ecfg.batch_size, batch_format="numpy", **_actor_options(ecfg))
    tables = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(tables).sort_by("id") if tables else None
    if table is None or table.num_rows != info["counts"]["matched"]:
        got = 0 if table is None else table.num_rows
        raise EvalError(f"evaluated {got} examples, the join holds {info['counts']['matched']}")
    for side in ("student", "teacher"):  # what each first token reads as, for a human skimming the file
        text = [tokenizer.decode([t]) for t in table.column(f"{side}_token").to_pylist()]
        table = table.append_column(f"{side}_text", pa.array(text, pa.string()))
    summary = {"split": ecfg.split, "mels": mels_url, "teacher": teacher_url, **summarise_distillation(table),
               "join": info["counts"], "mels_without_target_by_reason": info["mels_without_target_by_reason"]}
    return table, summary


def evaluate_tasks(model_dir: str, tasks: Sequence[tuple[str, Sequence[TaskExample]]], ecfg: EvalConfig
                   ) -> dict[str, list[dict[str, Any]]]:
    """{task name: evaluated rows in manifest order} for the rows of `read_manifests`."""
    import ray.data

    items = [{**dataclasses.asdict(row), "labels": list(row.labels) if row.labels else None}
             for _, rows in tasks for row in rows]
    if not items:
        return {name: [] for name, _ in tasks}
    blocks = max(1, min(len(items), -(-len(items) // ecfg.task_batch_size)))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        TaskWorker, fn_constructor_kwargs={"model_dir": resolve(model_dir), "ecfg": ecfg},
        batch_size=ecfg.task_batch_size, batch_format="pyarrow", **_actor_options(ecfg))
    batches = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    done = {(r["manifest"], r["line"]): r for r in pa.concat_tables(batches).to_pylist()}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, rows in tasks:
        out[name] = [done[(row.manifest, row.line)] for row in rows]
    return out


def run_evaluate(model_dir: str, output_url: str, ecfg: EvalConfig, *, mels_url: str | None = None,
                 teacher_url: str | None = None, manifests: Sequence[str] = (),
                 baseline: str | None = None, cluster: ClusterConfig | None = None) -> dict[str, Any]:
    """Evaluate and write everything under `output_url` (see the module docstring); returns the summary.
    With `ecfg.answers`, the split's clips are also answered and scored (pipeline.qa), by this model and by
    `baseline` (another model directory, e.g. the untrained export) beside the cascade. Manifests are
    checked before any model loads. An earlier evaluation there of the same inputs (`evaluation_inputs`) is
    returned as it is; one of other inputs is removed before anything is written (`_clear`)."""
    if (mels_url is None) != (teacher_url is None):
        raise EvalError("the distillation metrics need both a prepared dataset (mels) and its teacher cache")
    if mels_url is None and not manifests:
        raise EvalError("nothing to evaluate: give a prepared split with its teacher cache, task manifests, or both")
    t0 = time.time()
    config = read_config(model_dir)
    tasks, bad = read_manifests(manifests, skip_bad_rows=ecfg.skip_bad_rows) if manifests else ([], {})
    require_actors(ecfg, cluster or ClusterConfig())
    fs, root = cache.filesystem(output_url)
    summary: dict[str, Any] = {"model": model_dir, "model_source": config.get("source", {}).get("checkpoint"),
                               "step": config.get("source", {}).get("step"), "config": dataclasses.asdict(ecfg),
                               "versions": cache.versions("torch", "transformers", "ray", "sacrebleu")}
    summary["inputs_sha256"] = cache.fingerprint(evaluation_inputs(
        config, baseline, ecfg, mels_url, teacher_url, manifests, summary["versions"]))
    earlier = cache.read_json(fs, cache.join(root, SUMMARY))
    if earlier is not None and earlier.get("inputs_sha256") == summary["inputs_sha256"]:
        log.info("evaluate: %s already holds this evaluation (same model, data, settings); nothing to do", output_url)
        return earlier
    _clear(fs, root)
    if mels_url is not None:
        summary["distillation"] = _write_distillation(model_dir, mels_url, teacher_url, ecfg, fs, root)
    if mels_url is not None and ecfg.answers:
        summary["answers"] = _write_answers(model_dir, baseline, mels_url, ecfg, fs, root)
    if tasks:
        summary["tasks"] = _write_tasks(model_dir, tasks, bad, manifests, ecfg, fs, root)
    summary["seconds"] = round(time.time() - t0, 3)
    fs.makedirs(root, exist_ok=True)
    cache.write_json(fs, cache.join(root, SUMMARY), summary)
    return summary


def _clear(fs: Any, root: str) -> None:
    """Remove another evaluation's outputs, its summary.json (the mark of a complete one) first: an evaluation cut
    short must not leave an old summary vouching for new files, nor may one leave parts the next does not write."""
    for name in (SUMMARY, DISTILL_DIR, ANSWERS_DIR, TASKS_DIR):
        path = cache.join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def evaluation_inputs(config: Mapping[str, Any], baseline: str | None, ecfg: EvalConfig, mels_url: str | None,
                      teacher_url: str | None, manifests: Sequence[str], versions: Mapping[str, str]) -> dict[str, Any]:
    """Everything an evaluation's results follow from: the model's config.json (its trainable weights' sha256
    included) and the baseline's, the eval settings, the datasets' manifests, the task manifests' bytes, and
    the package versions. (Audio files a task manifest names are identified by their path only.)"""
    def dataset(url: str | None, kind: str) -> str | None:
        return None if url is None else cache.fingerprint(cache.check_manifest(url, kind=kind))

    def file_sha(url: str) -> str:
        fs, path = cache.filesystem(url)
        return hashlib.sha256(fs.cat_file(path)).hexdigest()

    return {"model": config, "baseline": read_config(baseline) if baseline else None,
            "eval": dataclasses.asdict(ecfg), "mels": dataset(mels_url, layout.MELS_KIND),
            "teacher": dataset(teacher_url, layout.TEACHER_KIND), "tasks": [file_sha(m) for m in manifests],
            "versions": dict(versions)}


def _write_distillation(model_dir: str, mels_url: str, teacher_url: str | None, ecfg: EvalConfig, fs: Any,
                        root: str) -> dict[str, Any]:
    table, distill = evaluate_distillation(model_dir, mels_url, teacher_url, ecfg)
    fs.makedirs(cache.join(root, DISTILL_DIR), exist_ok=True)
    cache.write_parquet(fs, cache.join(root, DISTILL_DIR, f"{EXAMPLES}.parquet"), table)
    cache.write_json(fs, cache.join(root, DISTILL_DIR, SUMMARY), distill)
    log.info("evaluate: %s split, %d examples: L2 %.4g (median %.4g), cosine %.4g, first-token agreement %.3g",
             ecfg.split, distill["count"], distill["l2"]["mean"], distill["l2"]["median"],
             distill["cosine"]["mean"], distill["first_token_agreement"]["rate"])
    return distill


def _write_answers(model_dir: str, baseline: str | None, mels_url: str, ecfg: EvalConfig, fs: Any,
                   root: str) -> dict[str, Any]:
    """Spoken questions answered by the model (and the baseline) and the cascade, scored (pipeline.qa)."""
    models = {"student": model_dir} | ({"baseline": baseline} if baseline else {})
    answered, summary = answer_spoken_questions(models, mels_url, ecfg)
    fs.makedirs(cache.join(root, ANSWERS_DIR), exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answered)
    fs.pipe_file(cache.join(root, ANSWERS_DIR, f"{EXAMPLES}.jsonl"), lines.encode())
    cache.write_json(fs, cache.join(root, ANSWERS_DIR, SUMMARY), summary)
    log.info("evaluate: %d spoken questions: %s", summary["count"],
             {k: v for k, v in summary.items() if isinstance(v, dict)})
    return summary


def answer_spoken_questions(models: dict[str, str], mels_url: str, ecfg: EvalConfig
                            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The split's clips (up to eval.max_questions) answered by every named model directory and the cascade,
    in one pass (the teacher's typed answers computed once): (one row per clip, scores per system)."""
    from pipeline import qa
    from pipeline.ingest import question_rows

    rows = qa.pick(question_rows(mels_url, ecfg.split), ecfg.max_questions)
    answered = qa.answer_questions({name: resolve(d) for name, d in models.items()}, rows, ecfg,
                                   _actor_options(ecfg))
    return answered, qa.summarise_answers(answered, [*models, "cascade"]) | {"split": ecfg.split}


def _write_tasks(model_dir: str, tasks: Sequence[tuple[str, Sequence[TaskExample]]], bad: dict[str, list[str]],
                 manifests: Sequence[str], ecfg: EvalConfig, fs: Any, root: str) -> dict[str, Any]:
    results = evaluate_tasks(model_dir, tasks, ecfg)
    out = {}
    for (name, _), url in zip(tasks, manifests, strict=True):
        task = {"manifest": url, **summarise_task(results[name], ecfg.label_score), "skipped": bad[name]}
        directory = cache.join(root, TASKS_DIR, name)
        fs.makedirs(directory, exist_ok=True)
        lines = "".join(json.dumps(r | {"meta": json.loads(r["meta"]) if r["meta"] else None}, ensure_ascii=False)
                        + "\n" for r in results[name])
        fs.pipe_file(cache.join(directory, f"{EXAMPLES}.jsonl"), lines.encode())
        cache.write_json(fs, cache.join(directory, SUMMARY), task)
        out[name] = task
        for error in task["errors"]:
            log.warning("evaluate: %s", error)
    return out
