"""The `small` preset's training throughput: the Ray Train job against a bare loop of the same model and step
in this process, and where a step's time goes (encoder, Q-Former, LLM).

    python benchmarks/bench_small.py [--clips 128] [--steps 24] [--mels runs/exp/mels --teacher runs/exp/teacher]

1. Bare loop: the small student (Whisper tiny.en + SmolLM2-135M-Instruct from models/), `pipeline.step.train_step`
   on the plain backend, batches collated from the same rows the job reads, the encoder cache warm (as in the
   job after its first epoch). Joint steps (both losses) and alignment-only steps: examples over their wall time.
   Run twice: on the main thread, and on a second thread as Ray Train runs a worker's loop.
2. The Ray Train job (`pipeline.train.run_training`, one CPU worker) on the same rows (a split of --clips), its
   logged examples/s after the first epoch (the cache warm), joint and alignment-only phases.
3. The joint step split: encoder forward (what the cache saves), Q-Former forward + backward, LLM forward +
   backward to its inputs, timed apart on one batch.

Needs a prepared mels dataset and teacher cache made with --config small (default: runs/exp/, else it prepares
a small spoken corpus there first). Prints the ratios job/bare (target >= 0.9); writes runs/bench/small.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.backends import PlainBackend  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ingest import clip_keys, collate  # noqa: E402
from pipeline.losses import DivaLoss  # noqa: E402
from pipeline.model import EncoderCache, build_student  # noqa: E402
from pipeline.step import make_optimizer, train_step  # noqa: E402

TARGET = 0.9


def ensure_data(args: argparse.Namespace, cfg) -> tuple[str, str]:
    if (Path(args.mels) / "manifest.json").exists() and (Path(args.teacher) / "manifest.json").exists():
        return args.mels, args.teacher
    from pipeline.prepare import run_prepare
    from pipeline.speech_corpus import build_corpus
    from pipeline.teacher import run_teacher

    corpus = ROOT / "runs" / "bench" / "spoken"
    build_corpus(corpus, clips=max(300, args.clips * 2), questions=4)
    run_prepare(cfg, str(corpus), args.mels)
    run_teacher(cfg, args.mels, args.teacher)
    return args.mels, args.teacher


def rows(mels: str, teacher: str, n: int) -> list[dict]:
    import pyarrow.parquet as pq

    targets = {r["id"]: r for r in pq.read_table(f"{teacher}/targets").to_pylist()}
    table = pq.read_table(f"{mels}/mels", columns=["id", "split", "mel", "mel_pad_value"]).to_pylist()
    return [r | targets[r["id"]] for r in table if r["split"] == "train" and r["id"] in targets][:n]


def batches(cfg, data: list[dict]) -> list[dict]:
    size, out = cfg.train.micro_batch_size, []
    for i in range(0, len(data) - size + 1, size):
        chunk = data[i:i + size]
        joined = {k: [r[k] for r in chunk] for k in ("id", "mel", "mel_pad_value", "token_ids", "target")}
        b = collate(joined, n_mels=cfg.features.n_mels, n_frames=cfg.features.n_frames,
                    num_queries=cfg.model.num_queries, target_dtype="float16")
        out.append(b | {"clip_key": torch.from_numpy(clip_keys(joined["id"]))})
    return out


def bare(cfg, data: list[dict], steps: int) -> dict[str, float]:
    """examples/s of the bare loop, joint and alignment-only, after one pass that fills the cache."""
    model = build_student(cfg, seed=cfg.train.seed)
    model.encoder_cache = EncoderCache(8e9)
    opt, backend = make_optimizer(model.trainable_parameters(), cfg.train), PlainBackend(cfg.train)
    bs = batches(cfg, data)
    for b in bs:
        model.encode(b["input_features"], b["clip_key"])
    out = {}
    joint = DivaLoss.from_config(cfg.train)  # the job's own objective
    for name, loss in (("joint", joint), ("align_only", joint.alignment_only())):
        times = []
        for s in range(steps):
            t0 = time.perf_counter()
            train_step(model, [bs[s % len(bs)]], loss, opt, backend, lr=cfg.train.lr, grad_clip=cfg.train.grad_clip)
            times.append(time.perf_counter() - t0)
        # examples over the wall time of the steps, as the job logs its examples_per_s (not the median step,
        # which would leave out the bare loop's slow steps and not the job's)
        out[name] = cfg.train.micro_batch_size * len(times[2:]) / sum(times[2:])
        out[f"{name}_median_step"] = cfg.train.micro_batch_size / statistics.median(times[2:])
    return out


def bare_on_a_thread(cfg, data: list[dict], steps: int) -> dict[str, float]:
    """`bare` on a second thread of this process, where Ray Train runs a worker's loop (its TrainingThread): on
    these 2 cores that alone cost about a tenth of the alignment-only rate (0.91 in docs/benchmarks.md)."""
    import threading

    out: list = []

    def run() -> None:
        torch.set_num_threads(os.cpu_count() or 1)  # as the job's worker sets it, on its training thread
        out.append(bare(cfg, data, steps))

    thread = threading.Thread(target=run, name="TrainingThread")
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError("the bare loop on a second thread failed (its traceback is above)")
    return out[0]


def split(cfg, data: list[dict], repeats: int = 3) -> dict[str, float]:
    """Median seconds of a joint step's parts on one batch."""
    model = build_student(cfg, seed=0)
    b = batches(cfg, data)[0]

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    audio = model.encode(b["input_features"])

    def qformer():  # the Q-Former and the projection, whichever the preset names
        model.project(audio).sum().backward()

    virtual = model.virtual_tokens(b["input_features"]).detach().requires_grad_(True)
    return {"encoder": timed(lambda: model.encode(b["input_features"])), "qformer": timed(qformer),
            "llm": timed(lambda: model.student_hidden(virtual).sum().backward())}


def job(cfg, mels: str, teacher: str, out: Path, clips: int, steps: int) -> dict[str, float]:
    """The Ray Train job's logged examples/s once its first epoch filled the cache, per phase."""
    import shutil

    from pipeline.report import read_metrics
    from pipeline.train import run_training

    per_epoch = clips // cfg.train.global_batch_size
    shutil.rmtree(out, ignore_errors=True)
    run = load_config("small", [f"train.steps={per_epoch + 2 * steps}", f"train.align_only_steps={per_epoch + steps}",
                                f"train.log_every={max(1, steps // 3)}", f"train.checkpoint_every={10**6}",
                                f"train.materialize_max_mb={10**6}"])
    run.train.split = "bench"
    run_training(run, mels, teacher, str(out))
    metrics = read_metrics(str(out))
    phase = {"align_only": [m for m in metrics if per_epoch < m["step"] <= per_epoch + steps],
             "joint": [m for m in metrics if m["step"] > per_epoch + steps + 2]}
    return {k: statistics.median(m["examples_per_s"] for m in v) for k, v in phase.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=128)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--mels", default=str(ROOT / "runs" / "exp" / "mels"))
    ap.add_argument("--teacher", default=str(ROOT / "runs" / "exp" / "teacher"))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "small.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config("small")
    print(f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    mels, teacher = ensure_data(args, cfg)
    data = rows(mels, teacher, args.clips)
    res = {"bare": bare(cfg, data, args.steps), "bare_thread": bare_on_a_thread(cfg, data, args.steps),
           "split_s": split(cfg, data)}
    print(f"bare loop, batch {cfg.train.micro_batch_size}: {res['bare']}")
    print(f"bare loop on a second thread: {res['bare_thread']}")
    total = sum(res["split_s"].values())
    print("joint step split (uncached encoder): " + ", ".join(
        f"{k} {v:.2f} s ({v / total:.0%})" for k, v in res["split_s"].items()))
    res["job"] = job_rows(cfg, mels, teacher, data, args)
    print(f"Ray Train job: {res['job']}")
    res["job/bare"] = {k: res["job"][k] / res["bare"][k] for k in res["job"]}
    print("job/bare: " + ", ".join(f"{k} {v:.2f} (target >= {TARGET})" for k, v in res["job/bare"].items()))
    res["job/bare_thread"] = {k: res["job"][k] / res["bare_thread"][k] for k in res["job"]}
    print("job/bare on a second thread (what Ray Train adds beyond its thread): " + ", ".join(
        f"{k} {v:.2f}" for k, v in res["job/bare_thread"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"written {args.out}")


def job_rows(cfg, mels: str, teacher: str, data: list[dict], args: argparse.Namespace) -> dict[str, float]:
    """The job on exactly the bare loop's rows: a mels dataset whose `bench` split is those clips."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    from pipeline import cache

    bench = ROOT / "runs" / "bench" / "small-mels"
    ids = {r["id"] for r in data}
    manifest = cache.check_manifest(mels, kind="mels")
    fs, _ = cache.filesystem(str(bench))
    (bench / "mels").mkdir(parents=True, exist_ok=True)
    for name in manifest["files"]["mels"]:
        table = cache.read_parquet(cache.filesystem(mels)[0], f"{mels}/mels/{name}")
        split_col = pc.if_else(pc.is_in(table.column("id"), value_set=pa.array(sorted(ids))), "bench",
                               table.column("split"))
        cache.write_parquet(fs, str(bench / "mels" / name),
                            table.set_column(table.schema.get_field_index("split"), "split", split_col))
    manifest["source"]["splits"] = [*manifest["source"]["splits"], "bench"]
    manifest["counts"]["clips_by_split"]["bench"] = len(ids)
    cache.write_manifest(str(bench), manifest)  # sizes and checksum of what this wrote, as a stage's manifest
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        return job(cfg, str(bench), teacher, ROOT / "runs" / "bench" / "small-job", len(data), args.steps)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
