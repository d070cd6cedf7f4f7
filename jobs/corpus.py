"""Corpus: `python -m jobs.corpus --output DIR [--clips N] [--questions M] [--seed S] [--workers K]
[--overwrite] [--check-questions]`.

Writes a spoken English corpus in the CommonVoice 17 layout (clips/*.mp3, train/dev/test/validated.tsv,
questions.tsv, corpus.json; see pipeline.speech_corpus) that `jobs.prepare --input DIR` reads
unchanged: hibari's "heart" voice for ~85% of clips, espeak-ng accents for the rest. Runs locally,
rendering over --workers processes (default: every core). Re-running with the same arguments reuses
the clips already written and says when there was nothing new to do; an output made with other
arguments is refused unless --overwrite. --check-questions renders nothing: it asks SmolLM2-135M-Instruct
the held-out questions and prints each greedy answer with whether it names an accepted answer.
--clips, --questions, --seed and --workers are the config keys corpus.clips, corpus.questions, ...
"""

from __future__ import annotations

from jobs import _common

ALIASES = {"--clips": "corpus.clips", "--questions": "corpus.questions", "--seed": "corpus.seed",
           "--workers": "corpus.workers"}


def check_questions(count: int | None) -> int:
    from pipeline import sentences
    from pipeline.speech_corpus import answer_ok, iter_answers

    chosen = sentences.EVAL_QUESTIONS[:count]
    good = 0
    for (question, accepted), answer in zip(chosen, iter_answers([q for q, _ in chosen]), strict=True):
        ok = answer_ok(answer, accepted)
        good += ok
        print(f"{'ok ' if ok else 'BAD'} {question} -> {' '.join(answer.split())}", flush=True)
    print(f"{good}/{len(chosen)} answers name an accepted answer")
    return 0 if good == len(chosen) else 1


def run() -> int:
    from pipeline.speech_corpus import build_corpus, describe

    p = _common.parser(__doc__, aliases=ALIASES)
    p.add_argument("--output", help="local directory for the release (required unless --check-questions)")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with other arguments")
    p.add_argument("--check-questions", action="store_true",
                   help="ask SmolLM2 the held-out questions instead of rendering")
    args, cfg = _common.parse(p)
    c = cfg.corpus
    if args.check_questions:
        return check_questions(c.questions)
    if not args.output:
        p.error("--output is required")
    summary = build_corpus(args.output, clips=c.clips, questions=c.questions, seed=c.seed, workers=c.workers,
                           overwrite=args.overwrite)
    for line in describe(summary, args.output):
        print(line)
    return 0


if __name__ == "__main__":
    _common.main(run)
