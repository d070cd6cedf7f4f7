"""What joining a small split on the driver saves: `training_dataset` + materialisation, Ray Data's join against the
driver's, on one local Ray, in one process.

    python benchmarks/bench_join.py [--rounds 3] [--corpus tests/fixtures/commonvoice]

Prepares the corpus and caches the tiny preset's targets once (under runs/bench/join/), then times, each round,
the two ways `pipeline.ingest.training_dataset` can hand the train split (seeded shuffle) to a trainer in the
object store: Ray Data's hash join and sort (forced with num_partitions=2, then `.materialize()`: what a split
of more than one join partition gets) and the driver's pyarrow join (the default below one partition, already
materialised). Both yield the same rows in the same order (tests/test_ingest.py). The first round includes
Ray's worker start-up; the table shows every round and the ratio of the medians. Writes runs/bench/join.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402


def materialised(mels: str, teacher: str, **kw: int) -> tuple[float, int]:
    """(seconds, rows) from training_dataset to the split in the object store."""
    from pipeline.ingest import training_dataset

    t0 = time.perf_counter()
    ds, info = training_dataset(mels, teacher, split="train", shuffle_seed=0, **kw)
    if not info["joined_on_driver"]:
        ds = ds.materialize()
    return time.perf_counter() - t0, ds.count()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(ROOT / "tests" / "fixtures" / "commonvoice"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    import ray

    from pipeline.prepare import run_prepare
    from pipeline.teacher import run_teacher

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cfg = load_config("tiny")
    out = ROOT / "runs" / "bench" / "join"
    mels, teacher = str(out / "mels"), str(out / "teacher")
    run_prepare(cfg, args.corpus, mels)  # idempotent: confirmed, not redone, on a second run
    run_teacher(cfg, mels, teacher)
    seconds: dict[str, list[float]] = {"ray_data": [], "driver": []}
    for _ in range(args.rounds):
        for name, kw in (("ray_data", {"num_partitions": 2}), ("driver", {})):
            took, rows = materialised(mels, teacher, **kw)
            seconds[name].append(round(took, 3))
    ratio = statistics.median(seconds["ray_data"]) / statistics.median(seconds["driver"])
    print(f"train split of {args.corpus}: {rows} rows, {args.cpus} CPUs")
    for name, values in seconds.items():
        rounds = "  ".join(f"{v:7.2f} s" for v in values)
        print(f"  {name:9} {rounds}   median {statistics.median(values):.2f} s")
    print(f"  Ray Data's join / the driver's: {ratio:.1f}x")
    path = ROOT / "runs" / "bench" / "join.json"
    path.write_text(json.dumps({"corpus": args.corpus, "rows": rows, "cpus": args.cpus, "seconds": seconds,
                                "ratio_of_medians": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
