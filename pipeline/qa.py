"""Did it work? Spoken questions answered by the student, scored against the LLM's answers to the typed ones.

For every clip of a prepared split (the spoken questions), three systems answer greedily:

- the teacher: the LLM on the transcript itself (the typed question), the reference;
- each student (the trained model, and optionally a baseline such as the untrained export) on the audio;
- the cascade: the same Whisper transcribes the clip (its own 30 s window), the LLM answers the transcript.

Per system: first-token agreement with the teacher (beside the constant baseline: the share of the
teacher's most common first token, which answering that token every time would score), KL(teacher ||
system) of the next-token distributions at the first response position, and the F1 of the answer's
content words against the teacher's answer (stop words left out: with them a fluent but unrelated
answer scores far above zero). The pure core needs no Ray; `answer_questions` runs it in a Ray Data
actor pool and `summarise_answers` makes the summary. Each actor call answers its block of questions
(eval.task_batch_size) as one greedy `generate` batch per system: on 2 CPU cores 16 demo questions take
35 s in one block of 16 against 144 s one at a time, with the same answers (benchmarks/bench_answers.py).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.losses import kl_divergence
from pipeline.template import ChatTemplate, transcript_ids

# Function words of English (articles, pronouns, auxiliaries, prepositions, conjunctions, wh-words).
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing done down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just let me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up us very was we were what when where
which while who whom whose why will with would you your yours yourself yourselves also may might must shall s t
""".split())
_WORD = re.compile(r"[a-z0-9]+")


def content_words(text: str) -> list[str]:
    """Lower-cased alphanumeric words, stop words left out."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


def word_f1(prediction: str, reference: str) -> float:
    """F1 of the two answers' content words as multisets (SQuAD's token F1 over content words). Two answers
    without content words agree (1.0); one without against one with scores 0."""
    pred, ref = Counter(content_words(prediction)), Counter(content_words(reference))
    if not pred or not ref:
        return float(not pred and not ref)
    overlap = sum((pred & ref).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def constant_baseline(teacher_first_tokens: Sequence[int]) -> float:
    """The first-token agreement of a system that always answers the teacher's most common first token."""
    if not teacher_first_tokens:
        return 0.0
    return Counter(teacher_first_tokens).most_common(1)[0][1] / len(teacher_first_tokens)


def greedy_batch(llm: Any, tokenizer: Any, stops: set[int], max_new_tokens: int, attention_mask: torch.Tensor, *,
                 input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
                 ) -> list[tuple[str, torch.Tensor]]:
    """transformers' greedy `generate` over a batch of prompts (left-padded where their lengths differ: its
    position ids follow the attention mask, so a padded row decodes as it would alone). Per row: the answer
    (its ids up to the first stop id, decoded) and the log-softmax of the next-token logits after the prompt
    [V] (float32; generate's first step, the full prompt's forward pass)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=sorted(stops), pad_token_id=min(stops) if stops else None,
                              return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode():
        out = llm.generate(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           generation_config=config)
    new = out.sequences[:, input_ids.shape[1]:] if input_ids is not None else out.sequences
    answers = []
    for row, logprobs in zip(new.tolist(), torch.log_softmax(out.logits[0].float(), dim=-1), strict=True):
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        answers.append((tokenizer.decode(row[:end], skip_special_tokens=True).strip(), logprobs))
    return answers


def text_answers(llm: Any, tokenizer: Any, template: ChatTemplate, texts: Sequence[str],
                 max_new_tokens: int) -> list[tuple[str, torch.Tensor]]:
    """The LLM's greedy answer to each text in the chat template, and its first-position log-probs [V]."""
    from pipeline.template import stop_ids

    stops = stop_ids(llm, tokenizer, template)
    prompts = [template.wrap(transcript_ids(tokenizer, text)) for text in texts]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[min(stops)] * (width - len(p)) + p for p in prompts], device=llm.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=llm.device)
    return greedy_batch(llm, tokenizer, stops, max_new_tokens, mask, input_ids=ids)


def student_answers(model: Any, tokenizer: Any, features: torch.Tensor, max_new_tokens: int
                    ) -> list[tuple[str, torch.Tensor]]:
    """A DiVA model's greedy answer to each clip of `features` [B, n_mels, frames] (one encoder and Q-Former
    pass for the batch; every prompt has the same length), and its first-position log-probs [V]."""
    from pipeline.ask import audio_tokens, llm_inputs
    from pipeline.template import stop_ids

    embeds = llm_inputs(model, model.template, virtual=audio_tokens(model, features))
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return greedy_batch(model.llm, tokenizer, stop_ids(model.llm, tokenizer, model.template), max_new_tokens, mask,
                        inputs_embeds=embeds)


def transcribe(whisper: Any, processor_tokenizer: Any, features: torch.Tensor) -> list[str]:
    """Whisper's own greedy transcript of each clip of `features` [B, n_mels, 3000] (its generation config:
    language, task, no timestamps)."""
    mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=whisper.device)  # no padding
    with torch.inference_mode():
        ids = whisper.generate(features.to(whisper.device, whisper.dtype), attention_mask=mask, do_sample=False,
                               num_beams=1)
    return [processor_tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


# --- one actor: the LLM, Whisper and the students ------------------------------------------------------------


ANSWER_FIELDS = ("answer", "agree", "kl", "word_f1", "first_token")


class AnswerWorker:
    """A Ray Data actor: the students (model directories by name), the cascade's Whisper and LLM; question rows
    (id, sentence, mel, mel_pad_value) -> every system's answer and scores."""

    def __init__(self, models: Mapping[str, str], ecfg: Any):
        from pipeline.evaluate import use_cpus
        from pipeline.export import load_model, read_config

        use_cpus(ecfg)
        self.ecfg = ecfg
        dtype = getattr(torch, ecfg.dtype)
        self.students = {name: load_model(path, ecfg.device, dtype, whisper=ecfg.whisper, llm=ecfg.llm)
                         for name, path in models.items()}
        model, self.tokenizer = next(iter(self.students.values()))
        self.fcfg, _ = model.audio_settings
        self.llm, self.template = model.llm, model.template
        self.whisper, self.whisper_tokenizer = _cascade_whisper(read_config(next(iter(models.values()))), ecfg, dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The block's questions answered together: each system's generation runs once over the batch."""
        from pipeline.features import restore_row

        rows, n = batch.to_pylist(), self.ecfg.max_new_tokens
        features = torch.from_numpy(np.stack([restore_row(r["mel"], r["mel_pad_value"], self.fcfg) for r in rows]))
        windows = np.stack([restore_row(r["mel"], r["mel_pad_value"], _whisper_window(self.fcfg)) for r in rows])
        teacher = text_answers(self.llm, self.tokenizer, self.template, [r["sentence"] for r in rows], n)
        systems = {name: student_answers(model, self.tokenizer, features, n)
                   for name, (model, _) in self.students.items()}
        transcripts = transcribe(self.whisper, self.whisper_tokenizer, torch.from_numpy(windows))  # Whisper's 30 s
        systems["cascade"] = text_answers(self.llm, self.tokenizer, self.template, transcripts, n)
        out = []
        for i, row in enumerate(rows):
            reference, first = teacher[i]
            answered: dict[str, Any] = {"id": row["id"], "sentence": row["sentence"], "teacher_answer": reference,
                                        "teacher_first_token": int(first.argmax()), "transcript": transcripts[i]}
            for name, answers in systems.items():
                answer, logprobs = answers[i]
                answered[name] = {"answer": answer, "first_token": int(logprobs.argmax()),
                                  "agree": int(logprobs.argmax()) == int(first.argmax()),
                                  "kl": float(kl_divergence(first, logprobs)), "word_f1": word_f1(answer, reference)}
            out.append(answered)
        return pa.Table.from_pylist(out)


def _whisper_window(fcfg: Any) -> Any:
    import dataclasses

    return dataclasses.replace(fcfg, chunk_length_s=30)


def _cascade_whisper(config: Mapping[str, Any], ecfg: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    """The Whisper the model was built on, whole (encoder + its own decoder), and its tokenizer."""
    from transformers import AutoTokenizer

    from pipeline.builders import load_whisper, tiny_whisper

    spec = config["whisper"]
    if spec["tiny"] and ecfg.whisper is None:  # a random Whisper: the cascade runs, and transcribes noise
        whisper = tiny_whisper(spec["tiny"]["seed"], spec["tiny"]["n_mels"], **spec["tiny"]["config"])
        whisper.generation_config.decoder_start_token_id = whisper.config.decoder_start_token_id = 0
        return whisper.to(ecfg.device, dtype), _TokenDecoder()
    name = ecfg.whisper or spec["name"]
    return load_whisper(name, None if ecfg.whisper else spec["revision"], dtype, ecfg.device), \
        AutoTokenizer.from_pretrained(name)


class _TokenDecoder:
    """Ids as text, for a random Whisper that has no tokenizer."""

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


# --- the summary -----------------------------------------------------------------------------------------------


def summarise_answers(rows: Sequence[Mapping[str, Any]], systems: Sequence[str]) -> dict[str, Any]:
    """Per system: mean first-token agreement, KL and content-word F1; the constant baseline; the count."""
    out: dict[str, Any] = {"count": len(rows),
                           "constant_baseline": constant_baseline([r["teacher_first_token"] for r in rows])}
    for name in systems:
        values = [r[name] for r in rows]
        out[name] = {key: statistics.fmean(float(v[key]) for v in values) if values else None
                     for key in ("agree", "kl", "word_f1")}
    return out


def answer_questions(models: Mapping[str, str], rows: pa.Table, ecfg: Any,
                     actor_options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every question row answered by every system (Ray Data actors, one copy of the models each), in id order."""
    import ray.data

    blocks = [rows.slice(i, ecfg.task_batch_size) for i in range(0, rows.num_rows, ecfg.task_batch_size)]
    ds = ray.data.from_arrow(blocks).map_batches(  # a block per actor call: progress moves as they finish
        AnswerWorker, fn_constructor_kwargs={"models": dict(models), "ecfg": ecfg}, batch_size=ecfg.task_batch_size,
        batch_format="pyarrow", **actor_options)
    out = [r for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None) for r in batch.to_pylist()]
    return sorted(out, key=lambda r: r["id"])


def pick(rows: pa.Table, limit: int | None, seed: int = 0) -> pa.Table:
    """Up to `limit` rows, a fixed sample (the same for every model evaluated)."""
    if limit is None or rows.num_rows <= limit:
        return rows
    index = np.random.default_rng(seed).choice(rows.num_rows, size=limit, replace=False)
    return rows.take(np.sort(index))
