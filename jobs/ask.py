"""Ask: `python -m jobs.ask --model <model dir> --audio <file.mp3|wav|flac> [--prompt "..."]
[--max-new-tokens N] [--temperature T] [--seed S]`.

Streams the spoken question's answer to stdout as it is generated (greedy unless --temperature > 0).
--prompt is an instruction placed in the system turn of the chat template. Any sample rate and
channel count is read; clips over 30 s are refused (the model reads one 30 s window). --device,
--dtype, --max-new-tokens, --whisper and --llm are the config keys eval.device, eval.dtype, ...
"""

from __future__ import annotations

import sys

from jobs import _common

ALIASES = {"--max-new-tokens": "eval.max_new_tokens", "--device": "eval.device", "--dtype": "eval.dtype",
           "--whisper": "eval.whisper", "--llm": "eval.llm"}


def run() -> int:
    p = _common.parser(__doc__, aliases=ALIASES)
    p.add_argument("--model", required=True, help="model directory written by jobs.export (local or gs://)")
    p.add_argument("--audio", required=True, help="the spoken question: any file libsndfile reads (local or gs://)")
    p.add_argument("--prompt", default=None, help="optional text instruction (goes into the system turn)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    args, cfg = _common.parse(p)
    ecfg = cfg.eval

    import torch

    from pipeline.ask import generate, load_audio, stream_text
    from pipeline.export import audio_settings, load_model, read_config

    fcfg, checks = audio_settings(read_config(args.model))
    features = load_audio(args.audio, fcfg, checks)  # before the model: a bad file fails fast
    model, tokenizer = load_model(args.model, ecfg.device, getattr(torch, ecfg.dtype), whisper=ecfg.whisper,
                                  llm=ecfg.llm)
    tokens = generate(model, tokenizer, features, prompt=args.prompt, max_new_tokens=ecfg.max_new_tokens,
                      temperature=args.temperature, seed=args.seed)
    said = ""
    for piece in stream_text(tokenizer, tokens):
        said += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not said.strip():  # an answer of nothing would otherwise be a blank line
        print("ask: the model ended its turn without an answer", file=sys.stderr)
    return 0


if __name__ == "__main__":
    _common.main(run)
