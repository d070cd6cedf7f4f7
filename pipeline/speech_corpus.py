"""A spoken English corpus in the CommonVoice 17 layout, synthesised offline, for training a small real DiVA.

Why: the bundled espeak-ng fixture proves the pipeline's contracts but is too small and robotic to
teach a Q-Former anything. This renders thousands of distinct sentences (`pipeline.sentences`:
statements, requests and many answerable questions) with hibari's natural "heart" voice (~85% of
clips, several tempos and pitches) and espeak-ng accents (~15%), so every stage runs on it unchanged:

    <out>/clips/common_voice_en_<n>.mp3   32 kHz mono MP3 (CommonVoice's older rate; 2:1 to 16 kHz)
    <out>/train.tsv dev.tsv test.tsv      CommonVoice 17 columns; the splits share no sentence
    <out>/validated.tsv                   train + dev + test
    <out>/questions.tsv                   held-out evaluation questions, each spoken by two voices
    <out>/corpus.json                     seed, counts per split/voice/kind, audio seconds, speed
    <out>/_plan.json                      what the output is being made from (written first)

Each (voice, tempo, pitch) is one speaker with a stable client_id; speakers are shared by the
splits (there is one natural voice), sentences are not. Everything is seeded: the same arguments give
the same TSVs and the same MP3 bytes (hibari's noise is seeded per clip; LAME is deterministic).
Clips are written whole (temp file + rename), so a re-run reuses every clip on disk and renders the
rest; on a complete output it does nothing. Measured on 2 idle cores: 2,500 clips in ~67 s (~37 clips/s,
~100x real time; per clip ~25 ms of hibari and ~35 ms of MP3 encoding). The templates make ~60k
distinct sentences, enough for ~70k clips.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from pipeline import PipelineError
from pipeline import commonvoice as cv
from pipeline import sentences as text

VERSION = 2  # bump when rendering or planning changes what a given seed produces
SAMPLE_RATE = 32000
HIBARI_RATE, ESPEAK_RATE = 24000, 22050
MP3_QUALITY = 0.75  # libsndfile compression level: ~40-60 kbit/s VBR, small but clean
ESPEAK_SHARE = 0.15
REPEAT_SHARE = 0.2  # sentences spoken by a second voice (inside their split)
SPLIT_SHARES = (("train", 0.8), ("dev", 0.1), ("test", 0.1))
SPLITS = tuple(s for s, _ in SPLIT_SHARES)
QUESTIONS_SPLIT = "questions"
MIN_WORDS, MAX_WORDS = 4, 15
TRIM_DB = 40.0  # speech starts/ends where 10 ms frames come within this many dB of the loudest
PLAN_FILE, SUMMARY_FILE = "_plan.json", "corpus.json"


class CorpusError(PipelineError):
    """A corpus cannot be made as asked (missing synthesiser, mismatched output, too many clips)."""


# --- shared with scripts/make_corpus.py: speaker ids, MP3, TSV rows -------------------------------

def client_id(name: str) -> str:
    """128 hex chars, stable across runs, like CommonVoice's hashed client ids."""
    return hashlib.sha512(name.encode()).hexdigest()


def encode_mp3(audio: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="MP3", compression_level=MP3_QUALITY, bitrate_mode="VARIABLE")
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Whole or not at all: a crash leaves a temp file (ignored, then overwritten), never half a clip."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_mp3(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    write_atomic(Path(path), encode_mp3(audio, sample_rate))


def cv_row(speaker_id: str, path: str, sentence: str, up_votes: int, down_votes: int, age: str,
           gender: str, accents: str) -> list[str]:
    """One CV 17 row; fields must not contain tabs/newlines since TSVs are unquoted."""
    row = [speaker_id, path, hashlib.sha256(sentence.encode()).hexdigest(), sentence, "", str(up_votes),
           str(down_votes), age, gender, accents, "", "en", ""]
    assert len(row) == len(cv.CV_COLUMNS) and not any(ch in f for f in row for ch in "\t\r\n"), row
    return row


def tsv_text(rows: list[list[str]]) -> str:
    return "\n".join(["\t".join(cv.CV_COLUMNS)] + ["\t".join(row) for row in rows]) + "\n"


# --- voices ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Voice:
    """A pseudo contributor. hibari: speed = tempo factor, pitch = pitch factor (resampling shifts
    pitch and formants, the synthesis speed is set so the tempo stays). espeak-ng: speed = words per
    minute, pitch = -p (0-99)."""

    engine: str
    voice: str
    speed: float
    pitch: float
    gender: str
    age: str
    accents: str

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.voice}-s{self.speed:g}-p{self.pitch:g}"

    @property
    def client_id(self) -> str:
        return client_id(self.name)


F, M, US, GB = "female_feminine", "male_masculine", "United States English", "England English"
HIBARI_VOICES = tuple(Voice("hibari", "heart", s, p, g, a, acc) for s, p, g, a, acc in (
    (1.0, 1.0, F, "twenties", US), (0.9, 1.0, F, "thirties", US), (1.1, 1.0, "", "", ""),
    (0.85, 0.96, F, "fourties", US), (1.05, 1.04, F, "teens", ""), (0.95, 0.93, "", "fifties", US),
    (1.15, 1.0, F, "twenties", ""), (1.2, 1.05, F, "thirties", US), (1.0, 0.95, F, "sixties", ""),
    (0.9, 1.07, "", "teens", ""),
))
ESPEAK_VOICES = tuple(Voice("espeak", v, s, p, g, a, acc) for v, s, p, g, a, acc in (
    ("en-us+m1", 165, 45, M, "twenties", US), ("en-us+f2", 155, 60, F, "thirties", US),
    ("en-gb+m3", 150, 40, M, "fifties", GB), ("en-gb+f4", 160, 55, F, "fourties", GB),
    ("en-gb-scotland+m2", 145, 42, M, "sixties", "Scottish English"),
    ("en-gb-scotland+f1", 155, 58, F, "twenties", "Scottish English"),
    ("en-gb-x-rp+m5", 170, 48, M, "thirties", GB), ("en-gb-x-rp+f3", 150, 62, F, "seventies", GB),
    ("en-029+m4", 160, 50, M, "fourties", "West Indies and Bermuda (Bahamas, Bermuda, Jamaica, Trinidad)"),
    ("en-us-nyc+m7", 175, 44, M, "twenties", US), ("en-gb-x-gbclan+f5", 150, 56, F, "fifties", GB),
    ("en-gb-x-gbcwmd+m6", 160, 38, "", "thirties", ""),
))


# --- sentences ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sentence:
    text: str
    kind: str  # question / request / statement
    family: str


def normalise(sentence: str) -> str:
    """Case, punctuation and spacing folded: what makes two transcripts 'the same sentence'."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", sentence.lower()).split())


def eval_questions() -> list[str]:
    return [q for q, _ in text.EVAL_QUESTIONS]


def generate_sentences(seed: int, count: int) -> list[Sentence]:
    """`count` distinct sentences, families drawn by weight; held-out questions never appear.

    Each family's sentences are shuffled by the seed and drawn in that order, so a family that runs
    dry stops being drawn and the others fill in; the result depends only on (seed, count)."""
    rng = random.Random(seed)
    pools = []
    for family in text.FAMILIES:
        sentences = list(text.expanded(family))
        rng.shuffle(sentences)
        pools.append(sentences)
    taken = [0] * len(pools)
    seen = {normalise(q) for q in eval_questions()}
    out: list[Sentence] = []
    while len(out) < count:
        live = [i for i, pool in enumerate(pools) if taken[i] < len(pool)]
        if not live:
            raise CorpusError(f"the templates make only {len(out)} distinct sentences; asked for {count}")
        i = rng.choices(live, weights=[text.FAMILIES[j].weight for j in live])[0]
        sentence, taken[i] = pools[i][taken[i]], taken[i] + 1
        key = normalise(sentence)
        if key in seen or not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
            continue
        seen.add(key)
        out.append(Sentence(sentence, text.FAMILIES[i].kind, text.FAMILIES[i].name))
    return out


# --- the plan -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """Everything needed to render one clip and write its TSV row, fixed up front by the seed."""

    number: int
    voice: Voice
    sentence: str
    kind: str
    split: str
    lead_s: float
    tail_s: float
    peak: float
    up_votes: int
    down_votes: int

    @property
    def path(self) -> str:
        return f"common_voice_en_{self.number}.mp3"

    def row(self) -> list[str]:
        v = self.voice
        return cv_row(v.client_id, self.path, self.sentence, self.up_votes, self.down_votes, v.age,
                      v.gender, v.accents)


def sentence_split(index: int, count: int) -> str:
    """Contiguous 80/10/10 blocks of the (already shuffled) sentences; each split gets one if it can."""
    dev = max(1, round(count * SPLIT_SHARES[1][1])) if count >= 3 else 0
    test = max(1, round(count * SPLIT_SHARES[2][1])) if count >= 3 else 0
    if index < count - dev - test:
        return "train"
    return "dev" if index < count - test else "test"


def clip_voices(rng: random.Random, clips: int, per_sentence: list[int]) -> list[Voice]:
    """Exactly round(ESPEAK_SHARE * clips) espeak clips at shuffled positions; a sentence's clips
    always get different voices."""
    espeak = [i < round(ESPEAK_SHARE * clips) for i in range(clips)]
    rng.shuffle(espeak)
    voices: list[Voice] = []
    for repeats in per_sentence:
        used: list[Voice] = []
        for _ in range(repeats):
            pool = ESPEAK_VOICES if espeak[len(voices)] else HIBARI_VOICES
            used.append(rng.choice([v for v in pool if v not in used]))
            voices.append(used[-1])
    return voices


def make_clip(rng: random.Random, number: int, voice: Voice, sentence: Sentence, split: str) -> Clip:
    """Draw the per-clip nuisance parameters: silence around the speech, level, votes."""
    up = 2 + (rng.random() < 0.3) + (rng.random() < 0.1)
    return Clip(number=number, voice=voice, sentence=sentence.text, kind=sentence.kind, split=split,
                lead_s=round(rng.uniform(0.1, 0.35), 3), tail_s=round(rng.uniform(0.15, 0.4), 3),
                peak=round(rng.uniform(0.5, 0.9), 2), up_votes=up, down_votes=int(rng.random() < 0.1))


def plan_corpus(seed: int, clips: int, questions: int | None = None) -> list[Clip]:
    """The whole corpus, deterministic in its arguments: `clips` release clips over train/dev/test
    plus two clips (a hibari and an espeak-ng voice) for each of `questions` held-out questions spread
    evenly over the list (all of them by default; the list runs by topic, so its first few would all be
    capitals); `questions` changes nothing but questions.tsv."""
    all_questions = eval_questions()
    questions = len(all_questions) if questions is None else questions
    if clips < 1 or not 0 <= questions <= len(all_questions):
        raise CorpusError(f"need --clips >= 1 and 0 <= --questions <= {len(all_questions)}; "
                          f"got {clips} and {questions}")
    rng = random.Random(f"speech-corpus-{VERSION}-{seed}")
    try:
        sentences = generate_sentences(rng.randrange(2**32), max(1, round(clips / (1 + REPEAT_SHARE))))
    except CorpusError as e:
        raise CorpusError(f"--clips {clips} is too many: {e}") from None
    per_sentence = [1] * len(sentences)
    for i in range(clips - len(sentences)):
        per_sentence[i % len(sentences)] += 1
    rng.shuffle(per_sentence)
    voices = clip_voices(rng, clips, per_sentence)
    numbers = rng.sample(range(40_000_000, 42_000_000), clips + 2 * len(all_questions))  # any --questions
    out, k = [], 0
    for i, (sentence, repeats) in enumerate(zip(sentences, per_sentence, strict=True)):
        for _ in range(repeats):
            out.append(make_clip(rng, numbers[k], voices[k], sentence, sentence_split(i, len(sentences))))
            k += 1
    for q in spread(all_questions, questions):
        asked = Sentence(q, text.QUESTION, "evaluation")
        for pool in (HIBARI_VOICES, ESPEAK_VOICES):
            out.append(make_clip(rng, numbers[k], rng.choice(pool), asked, QUESTIONS_SPLIT))
            k += 1
    return out


def spread(items: list[str], count: int) -> list[str]:
    """`count` of `items` at evenly spaced positions, in order (all of them when count == len(items))."""
    return [items[i * len(items) // count] for i in range(count)]


def tsv_files(plan: list[Clip]) -> dict[str, str]:
    """File name -> content for every TSV of the release, rows in clip-number order."""
    ordered = sorted(plan, key=lambda c: c.number)
    files = {f"{name}.tsv": tsv_text([c.row() for c in ordered if c.split in names])
             for name, names in (("validated", SPLITS), *((s, (s,)) for s in SPLITS))}
    files["questions.tsv"] = tsv_text([c.row() for c in ordered if c.split == QUESTIONS_SPLIT])
    return files


# --- rendering ------------------------------------------------------------------------------------

_HIBARI: Any = None  # one hibari model per process, loaded on first use


def hibari_speech(clip: Clip) -> tuple[np.ndarray, float]:
    """hibari at the voice's tempo; its noise seeded by the clip number so re-renders are identical.
    Returned at the rate that, resampled to SAMPLE_RATE, gives the voice's pitch."""
    global _HIBARI
    if _HIBARI is None:
        from hibari import Hibari

        _HIBARI = Hibari(threads=1)
    v = clip.voice
    audio = _HIBARI(clip.sentence, speed=v.speed / v.pitch, seed=clip.number)
    return audio.astype(np.float32), HIBARI_RATE * v.pitch


def espeak(sentence: str, voice: str, speed: float, pitch: float | None = None) -> tuple[np.ndarray, int]:
    """espeak-ng speech (22.05 kHz) and its rate; text goes via stdin so quotes and a leading dash are
    never parsed as shell or CLI syntax. Shared with scripts/make_corpus.py."""
    args = ["espeak-ng", "-v", voice, "-s", f"{speed:g}", *(["-p", f"{pitch:g}"] if pitch is not None else []),
            "-b", "1", "--stdout"]
    wav = subprocess.run(args, input=sentence.encode(), capture_output=True, check=True).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, sr


def espeak_speech(clip: Clip) -> tuple[np.ndarray, float]:
    v = clip.voice
    audio, sr = espeak(clip.sentence, v.voice, v.speed, v.pitch)
    return audio, float(sr)


def trim(audio: np.ndarray, sample_rate: float, margin_s: float = 0.03) -> np.ndarray:
    """Cut the synthesiser's leading/trailing silence: keep from the first to the last 10 ms frame
    within TRIM_DB of the loudest, plus a small margin so soft onsets and final fricatives stay."""
    hop = max(1, int(sample_rate / 100))
    frames = len(audio) // hop
    if frames == 0:
        return audio
    rms = np.sqrt(np.mean(audio[: frames * hop].reshape(frames, hop) ** 2, axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (-TRIM_DB / 20))
    margin = int(margin_s * sample_rate)
    return audio[max(0, loud[0] * hop - margin): min(len(audio), (loud[-1] + 1) * hop + margin)]


def speak(clip: Clip) -> np.ndarray:
    """The clip's final samples at SAMPLE_RATE: speech, trimmed, resampled, padded, levelled."""
    audio, rate = hibari_speech(clip) if clip.voice.engine == "hibari" else espeak_speech(clip)
    audio = soxr.resample(trim(audio, rate), rate, SAMPLE_RATE, "HQ")
    audio = np.concatenate([np.zeros(round(clip.lead_s * SAMPLE_RATE), np.float32), audio,
                            np.zeros(round(clip.tail_s * SAMPLE_RATE), np.float32)])
    return (audio * (clip.peak / max(1e-6, float(np.abs(audio).max())))).astype(np.float32)


def render(job: tuple[Clip, str]) -> tuple[int, float]:
    """Worker: synthesise, encode and write one clip whole; returns (number, speech seconds)."""
    clip, clips_dir = job
    audio = speak(clip)
    write_mp3(Path(clips_dir) / clip.path, audio, SAMPLE_RATE)
    return clip.number, len(audio) / SAMPLE_RATE


def render_all(clips: list[Clip], clips_dir: Path, workers: int) -> None:
    """Render in a process pool (each worker loads hibari once) with a progress line every 10%."""
    import multiprocessing

    jobs = [(clip, str(clips_dir)) for clip in clips]
    step = max(1, len(jobs) // 10)
    if workers <= 1 or len(jobs) < 2:
        results = map(render, jobs)
        pool = None
    else:  # spawn: no forked copies of the parent's threads (onnxruntime, torch) in the workers
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
        results = pool.imap_unordered(render, jobs, chunksize=4)
    try:
        for i, _ in enumerate(results, 1):
            if i % step == 0 or i == len(jobs):
                print(f"rendered {i}/{len(jobs)} clips", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


# --- the release ----------------------------------------------------------------------------------

def check_tools(plan: list[Clip]) -> None:
    """Fail before any work if a synthesiser the plan needs is missing."""
    if any(c.voice.engine == "espeak" for c in plan) and shutil.which("espeak-ng") is None:
        raise CorpusError("espeak-ng not found: apt-get install espeak-ng")
    try:
        import hibari  # noqa: F401
    except ImportError:
        raise CorpusError("hibari-tts is not installed: pip install hibari-tts") from None


def plan_record(seed: int, clips: int, questions: int, files: dict[str, str]) -> dict[str, Any]:
    """What an output is made from; a re-run with anything else is refused (or --overwrite)."""
    return {"version": VERSION, "seed": seed, "clips": clips, "questions": questions,
            "sample_rate": SAMPLE_RATE,
            "tsv_sha256": {name: hashlib.sha256(data.encode()).hexdigest() for name, data in files.items()}}


def begin(out: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Claim `out` for this plan: refuse one begun with another plan unless told to start over."""
    from pipeline.cache import describe_diff

    plan_path = out / PLAN_FILE
    if not plan_path.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CorpusError(f"{out} is not empty and was not made by jobs.corpus; use another --output or --overwrite")
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old != record and not overwrite:
            args = [k for k in record if k != "tsv_sha256"]
            diff = describe_diff({k: old.get(k) for k in args}, {k: record[k] for k in args})
            raise CorpusError(f"{out} holds another corpus ({', '.join(diff) or 'made by another generator'}); "
                              "use another --output or --overwrite")
        if old != record:
            shutil.rmtree(out / "clips", ignore_errors=True)
            for name in [SUMMARY_FILE, *record["tsv_sha256"]]:
                (out / name).unlink(missing_ok=True)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    for stale in (out / "clips").glob(".*.tmp-*"):
        stale.unlink()
    data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    if not plan_path.exists() or plan_path.read_bytes() != data:
        write_atomic(plan_path, data)


def summarize(plan: list[Clip], durations: dict[int, float], record: dict[str, Any],
              render_stats: dict[str, Any]) -> dict[str, Any]:
    """corpus.json: counts per split, voice, engine and kind; audio seconds; rendering speed."""
    from pipeline.cache import versions

    by_split = {s: [c for c in plan if c.split == s] for s in (*SPLITS, QUESTIONS_SPLIT)}
    seconds = {s: round(sum(durations[c.number] for c in cs), 2) for s, cs in by_split.items()}
    release = [c for c in plan if c.split != QUESTIONS_SPLIT]
    total = sum(durations.values())
    return {
        "kind": "speech_corpus", "version": VERSION, "seed": record["seed"], "sample_rate": SAMPLE_RATE,
        "counts": {
            "clips": {s: len(cs) for s, cs in by_split.items()},
            "sentences": {s: len({c.sentence for c in cs}) for s, cs in by_split.items()},
            "audio_s": seconds,
        },
        "total_audio_s": round(total, 2),
        "mean_clip_s": round(total / max(1, len(durations)), 3),
        "clips_by_kind": dict(sorted(Counter(c.kind for c in release).items())),
        "clips_by_engine": dict(sorted(Counter(c.voice.engine for c in plan).items())),
        "clips_by_voice": dict(sorted(Counter(c.voice.name for c in plan).items())),
        "client_ids": {v.name: v.client_id for v in (*HIBARI_VOICES, *ESPEAK_VOICES)},
        "render": render_stats,
        "versions": versions("hibari-tts", "onnxruntime", "soundfile", "soxr") | {
            "libsndfile": sf.__libsndfile_version__, "espeak-ng": espeak_version()},
    }


def espeak_version() -> str:
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "absent"
    return out.split(":")[1].split()[0] if ":" in out else out.strip()


def build_corpus(output: str | os.PathLike, *, clips: int = 2500, questions: int | None = None,
                 seed: int = 17, workers: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Make (or finish) the corpus in `output`; returns corpus.json's content plus `rendered`, the
    number of clips this call rendered (0 on a complete output, which is left untouched)."""
    out = Path(output)
    if "://" in str(output):
        raise CorpusError(f"--output must be a local directory, not {output}")
    plan = plan_corpus(seed, clips, questions)
    files = tsv_files(plan)
    record = plan_record(seed, clips, sum(c.split == QUESTIONS_SPLIT for c in plan) // 2, files)
    begin(out, record, overwrite)
    clips_dir = out / "clips"
    todo = [c for c in plan if not (clips_dir / c.path).exists()]
    summary_path = out / SUMMARY_FILE
    if not todo and summary_path.exists() and all((out / n).exists() for n in files):
        return json.loads(summary_path.read_text()) | {"rendered": 0}
    if todo:
        check_tools(todo)
    workers = workers or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    render_all(todo, clips_dir, workers)
    wall = time.perf_counter() - start
    durations = {c.number: sf.info(str(clips_dir / c.path)).duration for c in plan}
    rendered_s = sum(durations[c.number] for c in todo)
    stats = {"workers": workers, "rendered": len(todo), "reused": len(plan) - len(todo),
             "wall_s": round(wall, 2), "clips_per_s": round(len(todo) / wall, 2) if todo else None,
             "x_realtime": round(rendered_s / wall, 1) if todo else None}
    summary = summarize(plan, durations, record, stats)
    for name, data in files.items():
        write_atomic(out / name, data.encode())
    write_atomic(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    return summary | {"rendered": len(todo)}


def describe(summary: dict[str, Any], output: str) -> list[str]:
    """The job's human summary: what is in the corpus and how fast it was rendered."""
    c, r = summary["counts"], summary["render"]
    splits = ", ".join(f"{s} {c['clips'][s]}" for s in SPLITS)
    lines = [f"{output}: {sum(c['clips'][s] for s in SPLITS)} clips ({splits}; "
             f"{sum(c['sentences'][s] for s in SPLITS)} sentences) + {c['clips'][QUESTIONS_SPLIT]} question "
             f"clips, {summary['total_audio_s'] / 3600:.2f} h audio, mean {summary['mean_clip_s']:.2f} s"]
    if summary["rendered"] == 0:
        lines.append(f"nothing new: all {sum(c['clips'].values())} clips and the TSVs were already there")
    else:
        lines.append(f"rendered {r['rendered']} clips (reused {r['reused']}) in {r['wall_s']:.1f} s on "
                     f"{r['workers']} workers: {r['clips_per_s']:.1f} clips/s, {r['x_realtime']:.0f}x real time")
    return lines


# --- checking the evaluation questions against the teacher -----------------------------------------

def load_smollm2(models_dir: str = "models") -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as `python -m jobs.models` converts it from its package (converted on first use)."""
    from pipeline.builders import load_llm
    from pipeline.convert import ensure_model

    path = ensure_model("smollm2-135m-instruct", models_dir).path
    from transformers import AutoTokenizer

    return load_llm(path, dtype="float32"), AutoTokenizer.from_pretrained(path)


def iter_answers(questions: list[str], max_new_tokens: int = 40, models_dir: str = "models") -> Iterator[str]:
    """SmolLM2's greedy answer to each question in turn, asked as one user turn of its chat template
    (with the template's default system prompt), as the teacher sees a transcript."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 135M model needs no more, and on a busy machine more threads only spin
    try:
        model, tokenizer = load_smollm2(models_dir)
        for question in questions:
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            yield tokenizer.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        torch.set_num_threads(threads)


def answer_questions(questions: list[str], max_new_tokens: int = 40, models_dir: str = "models") -> list[str]:
    return list(iter_answers(questions, max_new_tokens, models_dir))


def answer_ok(answer: str, accepted: tuple[str, ...]) -> bool:
    """The answer's first sentence names one of the accepted answers (lower-case substrings)."""
    first = re.split(r"(?<=[.!?])\s", answer.strip(), maxsplit=1)[0].lower()
    return any(key in first for key in accepted)
