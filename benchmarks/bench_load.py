"""Load benchmark: prepare, teacher (tiny LLM) and one epoch of training ingest on a large generated corpus:
peak resident memory of the driver and of Ray's processes, and rows/s in the first and last 10% of each stage.

    python benchmarks/bench_load.py --clips 5000,20000        # corpora made once in runs/bench/load/cv-N
    python benchmarks/bench_load.py --corpus DIR               # one existing CommonVoice-layout corpus
    python benchmarks/bench_load.py --corpus DIR --replicate 4 # and DIR with every clip listed 4 times
    python benchmarks/bench_load.py --report A.json B.json     # the table and ratios of earlier runs
    python benchmarks/bench_load.py --clips 5000 train.materialize_max_mb=4096   # config overrides

Each corpus is made by the project's generator (`python -m jobs.corpus --clips N`, hibari + espeak-ng, about
30 clips/s on 2 idle cores) unless it exists. Each size runs in a fresh child process with its own local Ray
(--cpus, and an object store of --object-store-mb: memory is bounded by configuration or not at all), on the
tiny preset with file and batch sizes of a real run: the stages as the jobs run them (`run_prepare`,
`run_teacher`), then the train split as `run_training` builds it (`train.training_input`: `training_dataset` with the
seeded shuffle, materialised only under `train.materialize_max_mb`, set low here so the split streams) iterated once by
`iter_torch_batches` + `Collate` on the driver at `train.micro_batch_size` (no model step).

Memory: a thread samples every --interval s the RSS of the driver, of each Ray worker (every descendant named
`ray::...`: tasks, actors, idle workers) and of Ray's own processes (raylet, GCS, agents), per stage: the
largest single worker, the largest sum over workers at one instant, and the PSS of the whole tree (shared
object-store pages counted once; the RSS sums count them in every process that maps them).
Throughput: prepare and teacher rows are counted as their files appear (each file's publish time, its row
count from the Parquet footer); ingest rows as batches arrive. "first 10%" is the rate from the first output
to the output that passes 10% of the rows (start-up shown apart, as time to first output), "last 10%" the rate
over the last 10% of rows: a stage that degrades as it goes shows last << first.

Writes runs/bench/load-<corpus>.json per size. 5,000 clips took 12-19 minutes on 2 heavily shared cores
(figures and what grows: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local instance, as in tests/conftest.py
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline.config import load_config  # noqa: E402

BENCH = ROOT / "runs" / "bench"
# The tiny preset's models with a real run's layout: its 16- and 32-row files are there so that tests see
# several files. Files of 128/256 rows still give >= 40 progress points per stage at 5,000 clips.
DEFAULTS = ["prepare.rows_per_file=128", "prepare.batch_size=16", "teacher.rows_per_file=256",
            "teacher.rows_per_call=128", "train.materialize_max_mb=16"]
# Ray's per-node agents carry worker-style names but are Ray's own processes, present from the start.
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
MiB = 2**20


# --- sampling ------------------------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """RSS of this process and its descendants, and rows in watched output directories, every `interval` s.

    Peaks are kept per stage (`stage` is set by the main thread); rows are (publish time, cumulative rows).
    """

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.me, self.interval = psutil, psutil.Process(), interval
        self.stage = "start"
        self.peaks: dict[str, dict[str, Any]] = {}
        self.watch: list[Path] = []
        self.seen: dict[Path, tuple[float, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def kind(self, p: Any) -> str:
        if p.pid == self.me.pid:
            return "driver"
        name = p.cmdline()[:1]
        return "worker" if name and name[0].startswith("ray::") and name[0] not in AGENTS else "system"

    def sample(self) -> None:
        rss = {"driver": 0, "worker": 0, "system": 0}
        pss, uss, top, names = 0, 0, (0, ""), {}
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                kind, mem = self.kind(p), p.memory_full_info()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            rss[kind] += mem.rss
            pss += mem.pss
            if kind == "worker":
                name = p.cmdline()[0].split(".")[0]  # `ray::Actor.__init__` -> `ray::Actor`
                names[name] = max(names.get(name, 0), mem.rss)
                top, uss = max(top, (mem.rss, name)), max(uss, mem.uss)
        peak = self.peaks.setdefault(self.stage, {"driver_rss": 0, "worker_rss_max": 0, "worker_rss_max_name": "",
                                                  "worker_uss_max": 0, "workers_rss_sum": 0, "system_rss_sum": 0,
                                                  "tree_pss": 0,
                                                  "worker_rss_by_name": {}})
        for name, n in names.items():  # the largest RSS each worker name had during the stage
            peak["worker_rss_by_name"][name] = max(peak["worker_rss_by_name"].get(name, 0), n)
        peak["driver_rss"] = max(peak["driver_rss"], rss["driver"])
        if top[0] > peak["worker_rss_max"]:
            peak["worker_rss_max"], peak["worker_rss_max_name"] = top
        peak["worker_uss_max"] = max(peak["worker_uss_max"], uss)
        peak["workers_rss_sum"] = max(peak["workers_rss_sum"], rss["worker"])
        peak["system_rss_sum"] = max(peak["system_rss_sum"], rss["system"])
        peak["tree_pss"] = max(peak["tree_pss"], pss)
        self.scan()

    def scan(self) -> None:
        import pyarrow.parquet as pq

        for directory in self.watch:
            if not directory.is_dir():
                continue
            for entry in os.scandir(directory):
                path = Path(entry.path)
                if path in self.seen or not (entry.name.startswith("part-") and entry.name.endswith(".parquet")):
                    continue
                self.seen[path] = (entry.stat().st_mtime, pq.read_metadata(path).num_rows)

    def progress(self) -> list[tuple[float, int]]:
        """(time, cumulative rows) of the watched files, in publish order; then the watch is cleared."""
        self.scan()
        events, total = [], 0
        for t, n in sorted(self.seen.values()):
            total += n
            events.append((t, total))
        self.watch, self.seen = [], {}
        return events


def rates(events: list[tuple[float, int]], start: float) -> dict[str, Any]:
    """Rows/s over the first and last 10% of rows (see the module docstring), overall, and time to first output."""
    if not events:
        return {"rows": 0}
    total = events[-1][1]
    t0, n0 = events[0]
    i = next(k for k, (_, n) in enumerate(events) if n >= 0.1 * total)
    j = max([k for k, (_, n) in enumerate(events) if n <= 0.9 * total] or [0])
    first = (events[i][1] - n0) / (events[i][0] - t0) if i > 0 and events[i][0] > t0 else None
    last = (total - events[j][1]) / (events[-1][0] - events[j][0]) if events[-1][0] > events[j][0] else None
    out = {"rows": total, "to_first_output_s": t0 - start, "first10_rows_per_s": first, "last10_rows_per_s": last,
           "outputs": len(events), "rows_per_s": total / max(events[-1][0] - start, 1e-9)}
    out["last/first"] = last / first if first and last else None
    return out


# --- one size, in its own process ------------------------------------------------------------------------------


def stage(sampler: Sampler, name: str, watch: list[Path], fn: Any) -> dict[str, Any]:
    sampler.stage, sampler.watch = name, watch
    t0 = time.time()
    result = fn()
    wall = time.time() - t0
    sampler.sample()  # the stage's last instant, before the next one starts
    return {"wall_s": wall, **rates(sampler.progress(), t0), "result": result}


def ingest(cfg: Any, mels: str, teacher: str, sampler: Sampler) -> dict[str, Any]:
    """One epoch of the train split as `run_training` builds it, iterated on the driver."""
    from pipeline.ingest import Collate
    from pipeline.train import training_input

    t = cfg.train
    t0 = time.time()
    ds, info = training_input(cfg, mels, teacher)  # as run_training: a small split is read, joined and shuffled once
    materialized = info["materialized"]
    coll = Collate(**info["collate"], num_queries=cfg.model.num_queries)
    events, rows = [], 0
    for batch in ds.iter_torch_batches(batch_size=t.micro_batch_size, drop_last=True, collate_fn=coll):
        rows += len(batch["lengths"])
        events.append((time.time(), rows))
    matched = info["counts"]["matched"]
    if rows != matched - matched % t.micro_batch_size:
        raise SystemExit(f"ingest yielded {rows} rows, not the {matched} joined (in full batches)")
    return {"wall_s": time.time() - t0, **rates(events, t0), "input_mb": info["input_bytes"] / MiB,
            "num_partitions": info["num_partitions"], "materialized": materialized,
            "materialize_max_mb": t.materialize_max_mb, "batch_size": t.micro_batch_size}


def run_one(args: argparse.Namespace) -> None:
    import ray

    from pipeline.prepare import run_prepare
    from pipeline.teacher import run_teacher

    cfg = load_config("tiny", DEFAULTS + args.overrides)
    corpus, work = args.corpus[0].resolve(), args.work
    shutil.rmtree(work, ignore_errors=True)
    mels, teacher = work / "mels", work / "teacher"
    sampler = Sampler(args.interval)
    sampler.start()
    t0 = time.time()
    ray.init(num_cpus=args.cpus, object_store_memory=args.object_store_mb * MiB, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    res: dict[str, Any] = {"corpus": str(corpus), "cpus": args.cpus, "object_store_mb": args.object_store_mb,
                           "overrides": DEFAULTS + args.overrides, "ray_init_s": time.time() - t0}
    try:
        p = stage(sampler, "prepare", [mels / "mels", mels / "rejects"],
                  lambda: run_prepare(cfg, str(corpus), str(mels))["counts"])
        res["clips"] = p["result"]["clips"]
        res["prepare"] = p
        res["teacher"] = stage(sampler, "teacher", [teacher / "targets", teacher / "rejects"],
                               lambda: run_teacher(cfg, str(mels), str(teacher))["counts"])
        sampler.stage = "ingest"
        res["ingest"] = ingest(cfg, str(mels), str(teacher), sampler)
        sampler.sample()
    finally:
        ray.shutdown()
        sampler.stop.set()
        sampler.join()
    res["memory"] = sampler.peaks
    res["total_s"] = time.time() - t0
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))


# --- the parent: corpora, children, table --------------------------------------------------------------------


def ensure_corpus(clips: int) -> Path:
    path = BENCH / "load" / f"cv-{clips}"
    if not (path / "corpus.json").exists():  # written last by the generator
        print(f"generating a {clips}-clip corpus in {path} (python -m jobs.corpus) ...", flush=True)
        subprocess.run([sys.executable, "-m", "jobs.corpus", "--output", str(path), "--clips", str(clips)],
                       check=True, cwd=ROOT)
    return path


def replicate(corpus: Path, times: int) -> Path:
    """`corpus` with every clip listed `times` times under new names (hard links: no audio rendered or copied).

    For load: N x the rows through every stage (decode, featurize, teacher, join) at the cost of a directory
    of links. Copy 0 keeps its name; copy k of `x.mp3` is `x_r<k>.mp3`, in the same split as x.
    """
    out = BENCH / "load" / f"{corpus.name}-x{times}"
    if (out / "train.tsv").exists():
        return out
    (out / "clips").mkdir(parents=True, exist_ok=True)
    for tsv in sorted(corpus.glob("*.tsv")):
        header, *rows = tsv.read_text(encoding="utf-8").splitlines()
        col = header.split("\t").index("path")
        lines = [header]
        for k in range(times):
            for row in rows:
                cells = row.split("\t")
                name = cells[col] if k == 0 else cells[col].replace(".mp3", f"_r{k}.mp3")
                link = out / "clips" / name
                if tsv.name != "validated.tsv" and not link.exists():
                    os.link(corpus / "clips" / cells[col], link)
                lines.append("\t".join(cells[:col] + [name] + cells[col + 1:]))
        (out / f".{tsv.name}.tmp").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (out / f".{tsv.name}.tmp").rename(out / tsv.name)
    return out


def measure(corpus: Path, args: argparse.Namespace) -> dict[str, Any]:
    name = corpus.name
    out = BENCH / f"load-{name}.json"
    cmd = [sys.executable, __file__, "--child", "--corpus", str(corpus), "--work", str(BENCH / "load" / f"work-{name}"),
           "--out", str(out), "--cpus", str(args.cpus), "--object-store-mb", str(args.object_store_mb),
           "--interval", str(args.interval), *(["--keep"] if args.keep else []), *args.overrides]
    print(f"{name}: prepare, teacher, ingest (child process, {args.cpus} CPUs) ...", flush=True)
    subprocess.run(cmd, check=True)
    print(f"  written {out}")
    return json.loads(out.read_text())


def mb(n: float | None) -> str:
    return f"{n / MiB:7.0f}" if n else "      -"


def rate(x: float | None) -> str:
    return f"{x:8.1f}" if x else "       -"


def table(results: list[dict[str, Any]]) -> None:
    print("\nper stage: wall s, rows/s (first 10% / last 10% / overall), peak MiB (driver RSS, largest worker RSS "
          "and USS, workers' RSS sum, Ray system RSS sum, PSS of the whole tree)")
    print(f"{'clips':>6} {'stage':8} {'wall s':>7} {'1st 10%':>8} {'last 10%':>8} {'overall':>8} {'last/1st':>8}"
          f" {'driver':>7} {'worker':>7} {'w. USS':>7} {'workers':>7} {'system':>7} {'tree':>7}  largest worker")
    for r in results:
        for s in ("prepare", "teacher", "ingest"):
            st, m = r[s], r["memory"].get(s, {})
            ratio = f"{st['last/first']:8.2f}" if st.get("last/first") else "       -"
            print(f"{r['clips']:6d} {s:8} {st['wall_s']:7.1f} {rate(st.get('first10_rows_per_s'))} "
                  f"{rate(st.get('last10_rows_per_s'))} {rate(st.get('rows_per_s'))} {ratio} {mb(m['driver_rss'])} "
                  f"{mb(m['worker_rss_max'])} {mb(m.get('worker_uss_max'))} {mb(m['workers_rss_sum'])} "
                  f"{mb(m['system_rss_sum'])} {mb(m['tree_pss'])}  {m['worker_rss_max_name']}")
        ing = r["ingest"]
        print(f"{'':6} ingest: {ing['input_mb']:.0f} MiB on disk > materialize_max_mb {ing['materialize_max_mb']:g} "
              f"(streamed: {not ing['materialized']}), {ing['num_partitions']} join partition(s), first batch after "
              f"{ing['to_first_output_s']:.1f} s; Ray started in {r['ray_init_s']:.1f} s, total {r['total_s']:.0f} s")
    if len(results) < 2:
        return
    base = results[0]
    for r in results[1:]:
        print(f"\nratios {r['clips']} / {base['clips']} clips ({r['clips'] / base['clips']:.2f}x the rows): "
              "memory 1.00 = bounded, rows/s 1.00 = as fast")
        print(f"{'stage':8} {'wall':>6} {'rows/s':>6} {'driver':>7} {'worker':>7} {'w. USS':>7} {'workers':>7} "
              f"{'system':>7} {'tree':>7}")
        for s in ("prepare", "teacher", "ingest"):
            m, b = r["memory"][s], base["memory"][s]
            mem = " ".join(f"{m[k] / b[k]:7.2f}" if m.get(k) and b.get(k) else "      -"
                           for k in ("driver_rss", "worker_rss_max", "worker_uss_max", "workers_rss_sum",
                                     "system_rss_sum", "tree_pss"))
            print(f"{s:8} {r[s]['wall_s'] / base[s]['wall_s']:6.2f} "
                  f"{r[s]['rows_per_s'] / base[s]['rows_per_s']:6.2f} {mem}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (after the tiny preset and "
                                                 f"{' '.join(DEFAULTS)})")
    ap.add_argument("--clips", default="5000,20000", help="corpus sizes, comma-separated (the first is the baseline)")
    ap.add_argument("--corpus", type=Path, action="append", help="existing corpus dir(s) instead of --clips")
    ap.add_argument("--replicate", type=int, nargs="+", default=[], metavar="K",
                    help="also each --corpus with every clip listed K times (hard links; see `replicate`)")
    ap.add_argument("--report", type=Path, nargs="+", help="print the table of earlier runs' JSON files")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="the local Ray's CPUs")
    ap.add_argument("--object-store-mb", type=int, default=1024, help="the local Ray's object store")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    ap.add_argument("--keep", action="store_true", help="keep the stages' outputs (runs/bench/load/work-*)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_one(args)
        return
    if args.report:
        results = [json.loads(p.read_text()) for p in args.report]
    else:
        corpora = args.corpus or [ensure_corpus(int(n)) for n in args.clips.split(",")]
        corpora += [replicate(c, k) for c in list(corpora) for k in args.replicate]
        results = [measure(c, args) for c in corpora]
    table(sorted(results, key=lambda r: r["clips"]))


if __name__ == "__main__":
    main()
