"""Generate a tiny CommonVoice-17-style release of synthetic English speech.

Why: the pipeline's tests and benchmarks need real, decodable speech in the
exact on-disk layout of a CommonVoice release (``clips/*.mp3`` plus
``validated/train/dev/test.tsv``) without downloading the real corpus or
shipping anyone's voice.  Speech is synthesised with espeak-ng, which must be
installed (``apt-get install espeak-ng``).

    python scripts/make_corpus.py                    # bundled test fixture
    python scripts/make_corpus.py --out DIR --clips N [--workers K]

The bundled fixture also holds a clip that decodes to exactly 30.0 s at
16 kHz and one longer than 30 s, to exercise length filters.  Generation is
seeded, so rerunning rewrites identical TSVs (and identical MP3 bytes: the
libsndfile/LAME encoder is deterministic).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from dataclasses import dataclass, replace
from multiprocessing import Pool
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import soxr

from pipeline.speech_corpus import client_id, cv_row, espeak, tsv_text, write_atomic, write_mp3

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "commonvoice"
SPLITS = ("train", "dev", "test")
ESPEAK_SR = 22050
PAUSE_S = 0.45  # silence between sentences of a long concatenated clip
MIN_S, MAX_S = 1.0, 8.0  # ordinary clip duration bounds
EXACT_SR = 16000  # rate at which the "exactly 30 s" clip is verified

SENTENCES = (
    "The old lighthouse keeper lit the lamp every evening at dusk.",
    "She asked whether the train to Edinburgh was running late.",
    "Could you pass me the salt, please?",
    "My grandmother grew tomatoes, beans and squash behind the house.",
    "The museum opens at nine o'clock on weekdays.",
    'He said "good morning" to everyone he met on the bridge.',
    "We met at a small café near the river.",
    "It’s never too late to learn a new language.",
    "The children built a snow fort in the park.",
    "There are 42 steps leading up to the chapel.",
    "Rain drummed softly on the tin roof all night.",
    "Why did the committee postpone the vote again?",
    "The baker's shop smelled of fresh bread and cinnamon.",
    "A narrow path wound through the pine forest.",
    "Please remember to water the plants while I'm away.",
    "The orchestra tuned their instruments before the concert.",
    'Her favourite book was "The Wind in the Willows".',
    "The river flooded the lower fields in early spring.",
    "I don't think the shop is open on Sundays.",
    "The fishermen returned with a small but welcome catch.",
    "The council approved a new bicycle lane downtown.",
    "Where did you leave the keys to the shed?",
    "The sun set behind the hills in a blaze of orange.",
    "A gentle breeze carried the scent of lavender.",
    "They painted the fence white last summer.",
    "The library holds more than 3000 rare maps.",
    "Thunder rolled across the valley after midnight.",
    "He whistled a cheerful tune as he walked home.",
    "The recipe calls for two eggs and a cup of flour.",
    "Our neighbour's dog barks at every passing car.",
    "The clock tower was built in 1887.",
    "She wrote a long letter to her cousin in Ohio.",
    "The students debated the question until late afternoon.",
    "A flock of geese flew south over the marsh.",
    '"Mind the gap," the announcer reminded the passengers.',
    "The mountain road is closed during the winter months.",
    "Is this the right platform for the northbound train?",
    "The market sells fresh fish, cheese and honey.",
    "We watched the stars from the roof of the barn.",
    "The old mill still grinds corn for the village.",
    "The guide pointed out the ruins of a Roman wall.",
    "Nobody knew who had left the parcel on the doorstep.",
    "The garden was full of roses and buzzing bees.",
    "He fixed the broken chair with glue and patience.",
    "The ship's captain studied the charts by lamplight.",
    "Let's meet outside the theatre at half past seven.",
    "The soup was too hot to eat right away.",
    "A single candle flickered in the window.",
    "The team celebrated their victory with a picnic.",
    "She hummed quietly while she folded the laundry.",
    "Snow covered the rooftops by morning.",
    "What time does the last ferry leave the harbour?",
    "The naïve traveller trusted every map he was given.",
    "Owls hunt quietly in the dark woods.",
    "My brother’s bicycle has a squeaky front wheel.",
    "The kettle whistled just as the guests arrived.",
    "Two hundred people attended the town meeting.",
    "Thank you.",
    "Good night, everyone.",
    "According to the almanac, the first frost usually arrives in late October, "
    "long after the apples have been picked.",
)

# Word lists for the seeded sentence variations of the large benchmark corpus.
SUBJECTS = ("The old farmer", "My sister", "A tired student", "The mayor", "Our teacher",
            "The young sailor", "A quiet neighbour", "The painter", "Her uncle", "The doctor")
VERBS = ("carried", "found", "repaired", "painted", "described", "forgot", "sold",
         "borrowed", "cleaned", "photographed")
OBJECTS = ("a wooden boat", "the broken gate", "an old map", "the red umbrella",
           "a basket of apples", "the kitchen table", "a rusty bicycle", "the brass lamp")
TIMES = ("yesterday", "before breakfast", "last winter", "on Tuesday", "at sunset",
         "after the storm", "in the spring", "during the festival")


@dataclass(frozen=True)
class Speaker:
    """A pseudo contributor: one espeak-ng voice at a habitual speed."""

    name: str
    voice: str
    speed: int
    age: str
    gender: str
    accents: str

    @property
    def client_id(self) -> str:
        return client_id(self.name)


@dataclass(frozen=True)
class Clip:
    """Everything needed to render one clip and its TSV row, fixed up front."""

    number: int
    speaker: Speaker
    texts: tuple[str, ...]
    speed: int
    sample_rate: int
    lead_s: float
    peak: float
    split: str  # train/dev/test, or "" for validated-only rows
    up_votes: int
    down_votes: int
    pad_to_s: float | None = None  # total length target for long clips
    exact: bool = False  # verify decoded 16 kHz length == pad_to_s exactly

    @property
    def path(self) -> str:
        return f"common_voice_en_{self.number}.mp3"

    @property
    def sentence(self) -> str:
        return " ".join(self.texts)


BUNDLED_SPEAKERS = {
    "train": (
        Speaker("ava", "en-us+f2", 165, "twenties", "female_feminine", "United States English"),
        Speaker("brodie", "en-gb-scotland", 150, "thirties", "male_masculine", "Scottish English"),
        Speaker("carmen", "en-029+f3", 140, "fourties", "female_feminine", "Caribbean English"),
        Speaker("dmitri", "en-gb-x-rp+m3", 185, "", "", ""),
    ),
    "dev": (
        Speaker("eleanor", "en-gb+f4", 155, "fifties", "female_feminine", "England English"),
        Speaker("frank", "en-us-nyc", 175, "sixties", "male_masculine", "New York accent"),
    ),
    "test": (
        Speaker("gwen", "en-gb-x-gbcwmd+f1", 145, "teens", "female_feminine", "West Midlands"),
        Speaker("hamish", "en-us+m5", 190, "twenties", "", ""),
    ),
    "": (Speaker("isla", "en-gb-x-gbclan+f5", 160, "thirties", "female_feminine", ""),),
}


def clip_numbers(rng: random.Random, count: int) -> list[int]:
    """Unique 8-digit ids in the range real CV 17 English paths use, ascending."""
    return sorted(rng.sample(range(18_000_000, 40_000_000), count))


def votes(rng: random.Random) -> tuple[int, int]:
    """Typical validated-clip votes: mostly 2 up, sometimes more, rarely 1 down."""
    up = rng.choices((2, 3, 4, 5), weights=(70, 18, 8, 4))[0]
    return up, int(rng.random() < 0.15)


def make_clip(rng: random.Random, number: int, speaker: Speaker, texts: tuple[str, ...],
              split: str, **extra) -> Clip:
    """Draw the per-clip nuisance parameters (speed jitter, rate, level, lead-in)."""
    up, down = votes(rng)
    speed = min(200, max(120, speaker.speed + rng.randint(-12, 12)))
    return Clip(
        number=number, speaker=speaker, texts=texts, speed=speed,
        sample_rate=rng.choices((48000, 32000), weights=(6, 4))[0],
        lead_s=round(rng.uniform(0.1, 0.6), 2), peak=round(rng.uniform(0.45, 0.9), 2),
        split=split, up_votes=up, down_votes=down, **extra,
    )


def bundled_plan(seed: int) -> list[Clip]:
    """The fixture: one ordinary clip per base sentence over speaker-disjoint splits,
    4 validated-only re-recordings of train sentences, a 30.0 s clip, an over-30 s
    clip, and two low-vote rows (up_votes 1) for vote filters to drop."""
    rng = random.Random(seed)
    sentences = list(SENTENCES)
    rng.shuffle(sentences)
    per_split = {"train": len(sentences) - 20, "dev": 10, "test": 10}
    numbers = iter(clip_numbers(rng, sum(per_split.values()) + 4 + 2))
    clips: list[Clip] = []
    pos = 0
    for split, count in per_split.items():
        speakers = BUNDLED_SPEAKERS[split]
        for i, text in enumerate(sentences[pos:pos + count]):
            clips.append(make_clip(rng, next(numbers), speakers[i % len(speakers)], (text,), split))
        pos += count
    train_texts = sentences[:per_split["train"]]
    for text in rng.sample(train_texts, 4):
        clips.append(make_clip(rng, next(numbers), BUNDLED_SPEAKERS[""][0], (text,), ""))
    clips += long_clips(rng, numbers, train_texts)
    low_vote(clips, rng)
    return clips


def long_clips(rng: random.Random, numbers, texts: list[str]) -> list[Clip]:
    """One clip decoding to exactly 30.0 s (48 kHz) and one of ~33 s (32 kHz)."""
    speaker = BUNDLED_SPEAKERS["train"][0]
    out = []
    for target, rate, exact in ((30.0, 48000, True), (33.2, 32000, False)):
        clip = make_clip(rng, next(numbers), speaker, (), "train", pad_to_s=target, exact=exact)
        chosen = pick_to_fill(rng, texts, speaker, target - clip.lead_s - 0.6)
        out.append(replace(clip, texts=chosen, sample_rate=rate, speed=speaker.speed))
    return out


def pick_to_fill(rng: random.Random, texts: list[str], speaker: Speaker, seconds: float) -> tuple:
    """Sentences that, spoken with pauses between, fill up to `seconds`; measured by
    actually synthesising them so the long clips end in speech, not in silence."""
    chosen, total = [], -PAUSE_S
    for text in rng.sample(texts, len(texts)):
        spoken = len(synthesize(text, speaker.voice, speaker.speed)) / ESPEAK_SR + PAUSE_S
        if total + spoken <= seconds:
            chosen.append(text)
            total += spoken
    return tuple(chosen)


def low_vote(clips: list[Clip], rng: random.Random) -> None:
    """Give one ordinary train clip and one test clip a single up vote, in place."""
    for split in ("train", "test"):
        idx = rng.choice([i for i, c in enumerate(clips) if c.split == split and not c.pad_to_s])
        clips[idx] = replace(clips[idx], up_votes=1, down_votes=0)


def benchmark_speakers(rng: random.Random, count: int) -> list[Speaker]:
    """A pool of pseudo speakers mixing accents, voice variants and speeds."""
    accents = (("en-us", "United States English"), ("en-gb", "England English"),
               ("en-gb-scotland", "Scottish English"), ("en-029", "Caribbean English"),
               ("en-us-nyc", ""), ("en-gb-x-rp", "England English"),
               ("en-gb-x-gbcwmd", ""), ("en-gb-x-gbclan", "Lancashire"))
    variants = (("", "male_masculine"), ("+m3", "male_masculine"), ("+m5", ""),
                ("+f2", "female_feminine"), ("+f3", "female_feminine"), ("+f4", ""))
    ages = ("", "teens", "twenties", "thirties", "fourties", "fifties", "sixties")
    speakers = []
    for i in range(count):
        (base, accent), (variant, gender) = rng.choice(accents), rng.choice(variants)
        speakers.append(Speaker(f"bench-speaker-{i}", base + variant, rng.randint(125, 195),
                                rng.choice(ages), gender, accent if rng.random() < 0.6 else ""))
    return speakers


def varied_sentence(rng: random.Random, max_words: int) -> str:
    """A base sentence, a pair of short ones, or a templated one that fits max_words."""
    while True:
        kind = rng.random()
        if kind < 0.2:
            text = rng.choice(SENTENCES)
        elif kind < 0.45:
            text = f"{rng.choice(SENTENCES)} {rng.choice(SENTENCES)}"
        else:
            text = templated_sentence(rng)
        if len(text.split()) <= max_words:
            return text


def templated_sentence(rng: random.Random) -> str:
    """Subject-verb-object-time sentence, sometimes fronted or with a number tail."""
    subject, verb, obj, time = (rng.choice(words) for words in (SUBJECTS, VERBS, OBJECTS, TIMES))
    if rng.random() < 0.4:
        text = f"{time[0].upper()}{time[1:]}, {subject[0].lower()}{subject[1:]} {verb} {obj}"
    else:
        text = f"{subject} {verb} {obj} {time}"
    if rng.random() < 0.3:
        text += f", and it cost {rng.randint(2, 99)} dollars"
    return text + rng.choice((".", ".", ".", "!"))


def benchmark_plan(seed: int, count: int) -> list[Clip]:
    """`count` ordinary clips: ~80/10/10 speaker-disjoint splits, ~5% validated-only."""
    rng = random.Random(seed)
    speakers = benchmark_speakers(rng, max(10, count // 25))
    # The first three speakers guarantee every split is populated.
    split_of = {s.name: SPLITS[i] if i < 3 else rng.choices(SPLITS, weights=(8, 1, 1))[0]
                for i, s in enumerate(speakers)}
    clips = []
    for number in clip_numbers(rng, count):
        speaker = rng.choice(speakers)
        split = "" if rng.random() < 0.05 else split_of[speaker.name]
        text = varied_sentence(rng, max_words=int(speaker.speed / 60 * 6))
        clip = make_clip(rng, number, speaker, (text,), split)
        if rng.random() < 0.03:
            clip = replace(clip, up_votes=1, down_votes=0)
        clips.append(clip)
    return clips


def synthesize(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng speech at 22.05 kHz."""
    audio, sr = espeak(text, voice, speed)
    assert sr == ESPEAK_SR, sr
    return audio


def speak(clip: Clip) -> np.ndarray:
    """Speech for all of the clip's sentences, pauses between, lead-in silence first;
    ordinary clips are padded up to MIN_S and sped up if they would run past MAX_S."""
    speed = clip.speed
    while True:
        gap = np.zeros(int(PAUSE_S * ESPEAK_SR), dtype=np.float32)
        parts = [np.zeros(int(clip.lead_s * ESPEAK_SR), dtype=np.float32)]
        for text in clip.texts:
            parts += [synthesize(text, clip.speaker.voice, speed), gap]
        audio = np.concatenate(parts[:-1])
        if len(audio) < (MIN_S + 0.1) * ESPEAK_SR:  # CV clips keep some trailing silence
            audio = np.pad(audio, (0, int((MIN_S + 0.1) * ESPEAK_SR) - len(audio)))
        if clip.pad_to_s or len(audio) <= (MAX_S - 0.2) * ESPEAK_SR or speed >= 260:
            break
        speed = int(speed * len(audio) / ((MAX_S - 0.5) * ESPEAK_SR)) + 1
    audio = soxr.resample(audio, ESPEAK_SR, clip.sample_rate, "HQ")
    return (audio * (clip.peak / max(1e-6, float(np.abs(audio).max())))).astype(np.float32)


def fit_length(audio: np.ndarray, samples: int) -> np.ndarray:
    """Pad with trailing silence (or trim) to exactly `samples`."""
    if len(audio) >= samples:
        return audio[:samples]
    return np.pad(audio, (0, samples - len(audio)))


def write_exact(path: Path, audio: np.ndarray, clip: Clip) -> None:
    """MP3 encoders add delay/padding, so nudge the pre-encoding length until
    librosa decodes exactly pad_to_s seconds at 16 kHz."""
    want = round(clip.pad_to_s * EXACT_SR)
    samples = round(clip.pad_to_s * clip.sample_rate)
    for _ in range(20):
        write_mp3(path, fit_length(audio, samples), clip.sample_rate)
        got = len(librosa.load(path, sr=EXACT_SR)[0])
        if got == want:
            return
        samples += round((want - got) * clip.sample_rate / EXACT_SR) or (1 if want > got else -1)
    raise RuntimeError(f"{path.name}: could not hit {want} samples at 16 kHz (last {got})")


def render(job: tuple[Clip, str]) -> float:
    """Worker: synthesise, encode and write one clip; returns its duration in s."""
    clip, clips_dir = job
    path = Path(clips_dir) / clip.path
    audio = speak(clip)
    if clip.pad_to_s and len(audio) > (clip.pad_to_s - 0.3) * clip.sample_rate:
        raise RuntimeError(f"{clip.path}: speech does not fit in {clip.pad_to_s} s")
    if clip.exact:
        write_exact(path, audio, clip)
    else:
        if clip.pad_to_s:
            audio = fit_length(audio, round(clip.pad_to_s * clip.sample_rate))
        write_mp3(path, audio, clip.sample_rate)
    return sf.info(path).duration


def render_all(clips: list[Clip], clips_dir: Path, workers: int) -> list[float]:
    """Render in a process pool (ordered results) with a one-line progress counter."""
    jobs = [(clip, str(clips_dir)) for clip in clips]
    durations = []
    tty = sys.stderr.isatty()  # in a log (not a terminal): a line every 10%, not a \r per clip
    step = max(1, len(jobs) // 10)
    with Pool(workers) as pool:
        for i, duration in enumerate(pool.imap(render, jobs, chunksize=4), 1):
            durations.append(duration)
            if tty:
                print(f"\rrendered {i}/{len(jobs)} clips", end="", file=sys.stderr, flush=True)
            elif i % step == 0 or i == len(jobs):
                print(f"rendered {i}/{len(jobs)} clips", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    return durations


def tsv_row(clip: Clip) -> list[str]:
    s = clip.speaker
    return cv_row(s.client_id, clip.path, clip.sentence, clip.up_votes, clip.down_votes, s.age, s.gender,
                  s.accents)


def write_tsvs(clips: list[Clip], out: Path) -> None:
    """validated.tsv holds every clip; each split file holds its own subset."""
    for name in ("validated", *SPLITS):
        rows = [tsv_row(c) for c in clips if name == "validated" or c.split == name]
        write_atomic(out / f"{name}.tsv", tsv_text(rows).encode())


def summarize(clips: list[Clip], durations: list[float]) -> None:
    """Print the facts a reviewer needs to check the corpus at a glance."""
    counts = {s: sum(c.split == s for c in clips) for s in SPLITS}
    rates = {r: sum(c.sample_rate == r for c in clips) for r in (48000, 32000)}
    ordinary = [d for c, d in zip(clips, durations, strict=True) if not c.pad_to_s]
    print(f"{len(clips)} clips, splits {counts}, validated-only "
          f"{sum(not c.split for c in clips)}, rates {rates}, ordinary durations "
          f"{min(ordinary):.2f}-{max(ordinary):.2f} s")
    special = [(c, d) for c, d in zip(clips, durations, strict=True) if c.pad_to_s or c.up_votes < 2]
    print(f"{len(special)} long or low-vote clips")
    for clip, duration in special[:10]:
        print(f"  {clip.path}: {duration:.3f} s, up_votes {clip.up_votes}, split '{clip.split}'")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR)
    parser.add_argument("--clips", type=int, default=0,
                        help="generate N ordinary clips for benchmarks instead of the fixture")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: apt-get install espeak-ng")
    clips = benchmark_plan(args.seed, args.clips) if args.clips else bundled_plan(args.seed)
    clips_dir = args.out / "clips"
    shutil.rmtree(clips_dir, ignore_errors=True)
    clips_dir.mkdir(parents=True)
    durations = render_all(clips, clips_dir, args.workers)
    write_tsvs(clips, args.out)
    summarize(clips, durations)


if __name__ == "__main__":
    main()
