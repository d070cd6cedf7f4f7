"""Jobs side by side (issue 12): a job started while another runs, each on a Ray of its own, leaves both logs clean.

Before jobs._common.start_local, a training job's log carried "ConnectionError: Found multiple active Ray instances"
from Ray Train's PlacementGroupCleaner as soon as a second Ray ran on the machine (this session's own counts): the
cleaner's State API calls found "the" cluster by listing the machine's gcs_server processes. Both jobs run here as
`python -m jobs.X` without RAY_ADDRESS, as a user starts them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import FEW_QUERIES

ROOT = Path(__file__).resolve().parents[1]

# 64 queries (less than half the preset's step cost) and 30 steps: training goes on well past the prepare job's Ray
# start, and ends sooner than 20 steps with the preset's 448 queries.
TRAIN = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=30", "train.log_every=1",
         "train.checkpoint_every=100", FEW_QUERIES]
# What a warning or an error line says; Ray Data's progress lines (INFO) legitimately repeat.
ALARM = re.compile(r"warn|error|fail|traceback|exception", re.IGNORECASE)
STAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+")


def start(module: str, log: Path, *args: str) -> subprocess.Popen:
    """`python -m jobs.<module> --config tiny ARGS`, as a user starts it: no RAY_ADDRESS, its output to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    with open(log, "wb") as sink:
        return subprocess.Popen([sys.executable, "-m", f"jobs.{module}", "--config", "tiny", *args], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)


def wait_for(text: str, log: Path, job: subprocess.Popen, timeout_s: float = 600) -> bool:
    """Whether `text` appeared in `log` while `job` was running (False once the job has ended without it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return job.poll() is None
        if job.poll() is not None:
            return False
        time.sleep(0.2)
    raise AssertionError(f"{log.name}: no {text!r} after {timeout_s} s:\n{log.read_text()[-3000:]}")


def repeated_alarms(log: Path) -> dict[str, int]:
    """Warning and error lines that occur more than once, timestamps aside (a worker's lines keep its pid)."""
    lines = [STAMP.sub("", line).strip() for line in log.read_text(errors="replace").splitlines()]
    return {line: n for line, n in Counter(lines).items() if n > 1 and ALARM.search(line)}


def test_a_job_s_own_ray_keeps_its_dashboard():
    """Without its dashboard an instance still records port 8265 as its State API's address, where nothing or
    another instance's dashboard answers: start_local refuses that before starting anything."""
    from jobs._common import start_local

    before = os.environ.get("RAY_ADDRESS")
    with pytest.raises(ValueError, match="needs the dashboard"):
        start_local(include_dashboard=False)
    assert os.environ.get("RAY_ADDRESS") == before


@pytest.mark.slow
def test_prepare_alongside_training_leaves_both_logs_clean(corpus, prepared_mels, teacher_cache, tmp_path):
    """Training runs; once it has logged a step, a prepare job starts its own Ray beside it. Both exit 0, neither
    log names another instance or holds a traceback, and no warning line repeats."""
    train_log, prepare_log = tmp_path / "train.log", tmp_path / "prepare.log"
    train = start("train", train_log, "--mels", str(prepared_mels), "--teacher", str(teacher_cache),
                  "--output", str(tmp_path / "run"), *TRAIN)
    prepare = None
    try:
        assert wait_for("step 1/", train_log, train), train_log.read_text()[-3000:]
        prepare = start("prepare", prepare_log, "--input", str(corpus), "--output", str(tmp_path / "mels"),
                        "prepare.limit=16")  # as the README's local-head lines: its Ray start is what matters here
        # Both instances up at once, with training still running: what made the first job's cleaner fail.
        overlapped = wait_for("Started a local Ray instance", prepare_log, train) and train.poll() is None
        assert prepare.wait(timeout=600) == 0, prepare_log.read_text()[-3000:]
        assert train.wait(timeout=900) == 0, train_log.read_text()[-3000:]
    finally:
        for job in filter(None, (train, prepare)):
            if job.poll() is None:  # a failed assertion above: leave no job behind (its Ray's reaper ends the rest)
                job.kill()
                job.wait()
    assert overlapped, "training ended before the prepare job's Ray started: raise train.steps"
    for log in (train_log, prepare_log):
        text = log.read_text(errors="replace")
        for sign in ("multiple active Ray instances", "Traceback"):
            assert sign not in text, f"{log.name}: {sign}\n{text[-3000:]}"
        # One "Failed to query ..." is the State API timing out on a saturated machine (its server gives up after
        # 6.4 s); the same line every second was the State API asking a port where no server listens.
        assert not repeated_alarms(log), f"{log.name}: {repeated_alarms(log)}"
    # Each prepare worker once logged torch's "Sparse CSR tensor support is in beta" on unpickling the sparse
    # filter bank it was sent; it is now sent dense and made sparse in the worker.
    assert "UserWarning" not in prepare_log.read_text(errors="replace"), prepare_log.read_text()[-3000:]
