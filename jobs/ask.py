"""Ask: `python -m jobs.ask --model <model dir> --audio <file.mp3|wav|flac> [--prompt "..."]
[--max-new-tokens N] [--temperature T] [--seed S]`.

Streams the spoken question's answer to stdout as it is generated (greedy unless --temperature > 0).
--prompt is an instruction placed in the system turn of the chat template. Any sample rate and
channel count is read; clips over 30 s are refused (the model reads one 30 s window).
"""

from __future__ import annotations

import argparse
import sys

from jobs import _common

DTYPES = ("float32", "bfloat16", "float16")


def run() -> int:
    from pipeline.ask import DEFAULT_MAX_NEW_TOKENS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by jobs.export (local or gs://)")
    p.add_argument("--audio", required=True, help="the spoken question: any file libsndfile reads (local or gs://)")
    p.add_argument("--prompt", default=None, help="optional text instruction (goes into the system turn)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--whisper", default=None, help="override the Whisper checkpoint the model dir names")
    p.add_argument("--llm", default=None, help="override the LLM checkpoint the model dir names")
    args = p.parse_args()

    import torch

    from pipeline.ask import generate, load_audio, stream_text
    from pipeline.export import audio_settings, load_model, local_model_dir, read_config

    model_dir = local_model_dir(args.model)
    fcfg, checks = audio_settings(read_config(model_dir))
    features = load_audio(args.audio, fcfg, checks)  # before the model: a bad file fails fast
    model, tokenizer = load_model(model_dir, args.device, getattr(torch, args.dtype),
                                  whisper=args.whisper, llm=args.llm)
    tokens = generate(model, tokenizer, features, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, seed=args.seed)
    for piece in stream_text(tokenizer, tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    _common.main(run)
