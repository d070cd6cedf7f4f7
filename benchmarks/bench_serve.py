"""Serve benchmark: time to first token and total latency of the chat endpoint at 1 and 8 concurrent requests,
with and without batching the encoder + Q-Former of concurrent requests (serve.batching, Serve's @serve.batch).

    python benchmarks/bench_serve.py [--model <export dir>] [--max-tokens 32] [--rounds 2]

Without --model, exports the small preset's untrained student (Whisper tiny.en + SmolLM2-135M-Instruct from
models/, `python -m jobs.export --untrained --config small`) to runs/bench/serve/small-untrained, or the tiny
random one when models/ lacks them (--tiny forces it). Starts a local Ray and Serve on 127.0.0.1, one replica
with every core (serve.cpus_per_replica), and sends streamed requests with the official openai client: the
bundled corpus's clips, greedy, --max-tokens each. The baseline, in this process: pipeline.ask's answer to the
same clips with the same model and threads, no server (time to first token and total). Each configuration is
warmed up, then timed --rounds times (1 concurrent: one request after another over 8 clips; 8 concurrent: the
8 clips at once). Figures are medians over requests; the answers are checked equal across configurations (the
same greedy answers, batched or not). Writes runs/bench/serve.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

CLIPS = sorted((ROOT / "tests" / "fixtures" / "commonvoice" / "clips").glob("*.mp3"))[:8]


def export(tiny: bool) -> tuple[str, str]:
    from pipeline.config import load_config
    from pipeline.export import export_untrained

    small = not tiny and (ROOT / "models" / "smollm2-135m-instruct" / "config.json").is_file() and (
        ROOT / "models" / "whisper-tiny.en").is_dir()
    preset = "small" if small else "tiny"
    out = ROOT / "runs" / "bench" / "serve" / f"{preset}-untrained"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the small preset names models/ relative to the repository
    try:
        export_untrained(load_config(preset), str(out), overwrite=True)
    finally:
        os.chdir(cwd)
    return str(out), preset


def request(client, clip: Path, max_tokens: int) -> tuple[float, float, str]:
    """(time to first token, total, text) of one streamed request."""
    data = base64.b64encode(clip.read_bytes()).decode()
    part = {"type": "input_audio", "input_audio": {"data": data, "format": "mp3"}}
    start = time.perf_counter()
    stream = client.chat.completions.create(model="bench", max_tokens=max_tokens, stream=True,
                                            messages=[{"role": "user", "content": [part]}])
    first, pieces = None, []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
    total = time.perf_counter() - start
    return first if first is not None else total, total, "".join(pieces)


def timed(client, concurrency: int, rounds: int, max_tokens: int) -> dict:
    results = []
    start = time.perf_counter()
    for _ in range(rounds):
        if concurrency == 1:
            results += [request(client, clip, max_tokens) for clip in CLIPS]
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                results += list(pool.map(lambda c: request(client, c, max_tokens), CLIPS[:concurrency]))
    return {"ttft_s": statistics.median(r[0] for r in results), "total_s": statistics.median(r[1] for r in results),
            "requests_per_s": len(results) / (time.perf_counter() - start),
            "answers": [r[2] for r in results[:len(CLIPS)]]}


def baseline(model_dir: str, threads: int, max_tokens: int) -> dict:
    """pipeline.ask in this process: the same model, clips and threads, without a server."""
    import torch

    from pipeline.ask import generate, load_audio, stream_text
    from pipeline.export import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_dir)
    fcfg, checks = model.audio_settings
    out = []
    for i, clip in enumerate([CLIPS[0], *CLIPS]):  # the first is a warm-up
        start = time.perf_counter()
        pieces = stream_text(tokenizer, generate(model, tokenizer, load_audio(clip, fcfg, checks),
                                                 max_new_tokens=max_tokens))
        first = None
        text = ""
        for piece in pieces:
            first = first or time.perf_counter() - start
            text += piece
        if i:
            out.append((first or time.perf_counter() - start, time.perf_counter() - start, text))
    return {"ttft_s": statistics.median(r[0] for r in out), "total_s": statistics.median(r[1] for r in out),
            "requests_per_s": len(out) / sum(r[1] for r in out), "answers": [r[2] for r in out]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--tiny", action="store_true", help="export and serve the tiny random model")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    args = p.parse_args()
    model_dir, preset = (args.model, "given") if args.model else export(args.tiny)

    import openai
    import ray
    from ray import serve

    from pipeline.config import load_config
    from pipeline.serve import application

    figures = {"model": model_dir, "preset": preset, "cpus": args.cpus, "max_tokens": args.max_tokens,
               "baseline": baseline(model_dir, args.cpus, args.max_tokens)}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    for batching in (False, True):
        cfg = load_config(None, ["serve.model_name=bench", f"serve.cpus_per_replica={args.cpus}",
                                 f"serve.batching={str(batching).lower()}", "serve.batch_size=8"])
        serve.run(application(model_dir, cfg), name="diva", route_prefix="/")
        request(client, CLIPS[0], args.max_tokens)  # warm-up
        for concurrency in (1, 8):
            figures[f"batching={batching} concurrency={concurrency}"] = timed(client, concurrency, args.rounds,
                                                                             args.max_tokens)
        serve.delete("diva")
    serve.shutdown()
    ray.shutdown()
    report(figures)
    return 0


def report(figures: dict) -> None:
    base = figures["baseline"]
    print(f"model {figures['model']} ({figures['preset']}), {figures['cpus']} CPUs, greedy, "
          f"max_tokens {figures['max_tokens']}, streamed")
    print(f"{'configuration':38s} {'TTFT p50 s':>11s} {'total p50 s':>12s} {'requests/s':>11s} {'TTFT / base':>12s}"
          f" {'total / base':>13s} {'req/s / base':>13s}")
    print(f"{'baseline: pipeline.ask, no server':38s} {base['ttft_s']:11.3f} {base['total_s']:12.3f}"
          f" {base['requests_per_s']:11.3f}")
    for key, f in figures.items():
        if key.startswith("batching="):
            print(f"{key:38s} {f['ttft_s']:11.3f} {f['total_s']:12.3f} {f['requests_per_s']:11.3f}"
                  f" {f['ttft_s'] / base['ttft_s']:12.2f} {f['total_s'] / base['total_s']:13.2f}"
                  f" {f['requests_per_s'] / base['requests_per_s']:13.2f}")
            same = f["answers"][:len(base["answers"])] == base["answers"][:len(f["answers"])]
            print(f"{'':38s} answers equal to the baseline's: {same}")
    for c in (1, 8):
        off, on = figures[f"batching=False concurrency={c}"], figures[f"batching=True concurrency={c}"]
        print(f"concurrency {c}: batching on / off: TTFT {on['ttft_s'] / off['ttft_s']:.2f}, "
              f"total {on['total_s'] / off['total_s']:.2f}, "
              f"requests/s {on['requests_per_s'] / off['requests_per_s']:.2f}")
    out = ROOT / "runs" / "bench" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
