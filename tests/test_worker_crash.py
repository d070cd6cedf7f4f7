"""Worker crashes: a Ray worker SIGKILLed mid-stage costs a retry, never a row (issue 12).

A stage runs in this process on the session's Ray while a thread kills the processes doing its work: two prepare
task workers (the second may be running a retry), and the teacher's actor once (each restart reloads the model: tens
of seconds on a busy 2-core machine). Each stage must finish through
Ray's task retries and actor restarts (cluster.task_retries, cluster.actor_restarts) with the output of the
session's clean run of the same config: the same ids, the same bytes, no duplicates, no stray files. The session's
Ray is safe to use: the killed processes are workers, which the raylet replaces; the driver is this process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.layout import MANIFEST, PLAN

PREPARE_TASK = "ray::MapBatches(featurize)"  # Ray titles a worker `ray::<task>` while it runs one
TEACHER_CALL = "ray::MapWorker(MapBatches(TargetWorker)).submit"  # the actor, running a batch (not in __init__)


def raylet_pid() -> int:
    """The raylet of the Ray instance this process is connected to: the one started with its GCS address (other
    instances on the machine have raylets of their own)."""
    import ray

    flag = f"--gcs-address={ray.get_runtime_context().gcs_address}".encode()
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if argv[0].endswith(b"/raylet") and flag in argv:
            return int(entry.name)
    raise AssertionError("no raylet for this Ray instance")


def workers(raylet: int) -> dict[int, str]:
    """pid -> process title of the raylet's children (its workers), read from /proc now."""
    out = {}
    for children in Path(f"/proc/{raylet}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                out[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
    return out


def kill_while_running(title: str, times: int, stop: threading.Event) -> list[tuple[int, str]]:
    """From a thread: SIGKILL the first `times` distinct workers seen titled `title` (running that task), until
    `stop` is set. Returns the list of (pid, title) it fills."""
    killed: list[tuple[int, str]] = []

    def loop() -> None:
        raylet = raylet_pid()
        while len(killed) < times and not stop.is_set():
            for pid, name in workers(raylet).items():
                if name == title and pid not in dict(killed):
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, name))
                    break
            time.sleep(0.02)

    threading.Thread(target=loop, daemon=True).start()
    return killed


def rows(out: Path, sub: str) -> dict[str, dict]:
    """Every row under <out>/<sub> by id, refusing a duplicate id."""
    found = [r for f in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    by_id = {r["id"]: r for r in found}
    assert len(by_id) == len(found), f"{sub}: duplicate ids"
    return by_id


def assert_same_dataset(out: Path, clean: Path, manifest: dict) -> None:
    """The same rows as the clean run, and on disk only what the manifest lists (plus the plan)."""
    for sub in manifest["files"]:
        assert rows(out, sub) == rows(clean, sub), sub
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    listed = {f"{sub}/{name}" for sub, names in manifest["files"].items() for name in names}
    assert on_disk == listed | {PLAN, MANIFEST}, on_disk ^ (listed | {PLAN, MANIFEST})


def run_killing(stage, title: str, out: Path, times: int = 2) -> tuple[dict, list]:
    """Run `stage(out)` while `times` of its workers titled `title` are killed; the manifest and the kills."""
    stop = threading.Event()
    killed = kill_while_running(title, times, stop)
    try:
        manifest = stage(out)
    finally:
        stop.set()
    assert len(killed) == times, f"only {len(killed)} of {times} workers were killed: the stage ended first"
    assert all(not Path(f"/proc/{pid}").exists() for pid, _ in killed)
    return manifest, killed


@pytest.mark.slow
def test_prepare_survives_killed_task_workers(ray_local, corpus, prepared_mels, tmp_path):
    """Two featurize workers SIGKILLed mid-task: the tasks run again and the mels equal the clean run's."""
    from pipeline.prepare import run_prepare

    manifest, killed = run_killing(lambda out: run_prepare(load_config("tiny"), str(corpus), str(out)),
                                   PREPARE_TASK, tmp_path / "mels")
    assert_same_dataset(tmp_path / "mels", prepared_mels, manifest)
    print(f"prepare: {len(killed)} task workers killed mid-task, {manifest['counts']['clips']} clips as the clean run")


@pytest.mark.slow
def test_teacher_survives_a_killed_actor(ray_local, prepared_mels, teacher_cache, tmp_path):
    """The teacher actor SIGKILLed while it runs a batch: restarted (it reloads the model) and its batches rerun; the
    targets equal the clean run's bytes (the same batches: one block per actor call)."""
    from pipeline.teacher import run_teacher

    manifest, killed = run_killing(lambda out: run_teacher(load_config("tiny"), str(prepared_mels), str(out)),
                                   TEACHER_CALL, tmp_path / "teacher", times=1)
    assert_same_dataset(tmp_path / "teacher", teacher_cache, manifest)
    print(f"teacher: actor killed {len(killed)} time(s) mid-batch, {manifest['counts']['targets']} targets as the "
          "clean run")


def test_a_temporary_left_by_a_killed_writer_is_removed_before_the_manifest(tmp_path):
    """A writer killed between its write and its rename leaves `.part-*.tmp-*` (its task reruns under another
    name): the stage's last check deletes it, so the finished dataset holds only what its manifest lists."""
    import pyarrow as pa

    from pipeline import cache

    fs, root = cache.filesystem(str(tmp_path))
    for sub in ("good", "bad"):
        (tmp_path / sub).mkdir()
    cache.write_parquet(fs, f"{root}/good/part-a.parquet", pa.table({"id": ["x", "y"]}))
    stray = tmp_path / "good" / ".part-b.parquet.tmp-0123"
    stray.write_bytes(b"PAR1 half a file")
    out = cache.collect_outputs(str(tmp_path), "good", "bad", ["x", "y"])
    assert not stray.exists() and out.files() == {"good": ["part-a.parquet"], "bad": []}
