"""Shared fixtures: the bundled corpus, a local Ray instance, and corpus copies to damage."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "commonvoice"

# Quiet and local: no dashboard, no usage stats, no auth prompts.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train on one test machine (inherited by every job a test starts): its controller polls the workers every
# 0.5 s instead of 2 s, so a run's end is seen sooner, and it starts no PreemptionWatcher actor, which watches for
# autoscaler node drains (a process start per run, and no node is ever drained here). About 6 s of a tiny run's 27.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


# The suite runs on 2 pytest-xdist workers, one test module per worker at a time (scripts/test.sh: -n 2 --dist
# loadfile). xdist hands modules out in collection order: a first batch round-robin, then one to whichever worker is
# free. These modules hold most of the suite's time (`--durations`, 2026-12-05: 500 of 835 s serially), so they go
# out first and are less likely to leave one worker running alone at the end.
LONGEST_FIRST = ("test_train.py", "test_resume.py", "test_small.py", "test_ray_submit.py", "test_jobs_side_by_side.py",
                 "test_local.py", "test_evaluate.py", "test_prepare.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of LONGEST_FIRST first, in that order; every other test after them, in its usual order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def corpus() -> Path:
    return CORPUS


@pytest.fixture
def corpus_copy(tmp_path: Path) -> Path:
    """A writable copy of the bundled release, for tests that damage it."""
    dst = tmp_path / "release"
    shutil.copytree(CORPUS, dst)
    return dst


@pytest.fixture(scope="session")
def prepared_mels(ray_local, tmp_path_factory) -> Path:
    """The bundled corpus through stage 1 (tiny preset), once per session; treat as read-only."""
    from pipeline.config import load_config
    from pipeline.prepare import run_prepare

    out = tmp_path_factory.mktemp("prepared") / "mels"
    run_prepare(load_config("tiny"), str(CORPUS), str(out))
    return out


@pytest.fixture(scope="session")
def teacher_cache(prepared_mels, tmp_path_factory) -> Path:
    """Stage 2's targets for `prepared_mels` (tiny preset), once per session; treat as read-only. A
    module that needs another cache defines its own `teacher_cache`."""
    from pipeline.config import load_config
    from pipeline.teacher import run_teacher

    out = tmp_path_factory.mktemp("teacher") / "teacher"
    run_teacher(load_config("tiny"), str(prepared_mels), str(out))
    return out


@pytest.fixture(scope="session")
def sixteen_mels(ray_local, tmp_path_factory) -> Path:
    """16 train clips of the bundled corpus through stage 1 (tiny preset; stage 1 reads no model settings, so any
    tiny-based config prepares the same rows), once per session; treat as read-only. One full batch of 16."""
    from pipeline.config import load_config
    from pipeline.prepare import run_prepare

    out = tmp_path_factory.mktemp("sixteen") / "mels"
    manifest = run_prepare(load_config("tiny", ["prepare.splits=[train]", "prepare.limit=16"]), str(CORPUS), str(out))
    assert manifest["counts"]["clips"] == 16, manifest["counts"]
    return out


@pytest.fixture(scope="session")
def gcs():
    """One local GCS emulator for the session; its env (endpoint, anonymous token) is in os.environ."""
    from gcs_emulator import gcs_emulator

    with gcs_emulator() as emu:
        yield emu


@pytest.fixture
def bucket(gcs) -> str:
    """A fresh, empty bucket per test (name only, no gs://)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    gcs.make_bucket(name)
    return name


@pytest.fixture(scope="session")
def ray_local(gcs):
    """One real local Ray instance (2 CPUs) for the whole session. It starts after the GCS emulator
    so that its workers inherit the emulator's env, as a user's cluster inherits real credentials."""
    import ray

    # "local": a new instance even where another is running (a parallel test worker's, a `ray start` head).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def converted_models(tmp_path_factory) -> Path:
    """The one directory, laid out like models/, that this run converts the packaged models into: each model
    is converted (convert.ensure_model, under `conversion_lock`) by the first test that needs it,
    tests/test_convert.py or `real_models`, and found up to date by the rest. The run's xdist workers share it (the
    parent of their own temporary directories), so each model is converted once per run. Treat it as read-only."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return root / "converted" / "models"


@pytest.fixture(scope="session")
def real_models(converted_models) -> Path:
    """Whisper tiny.en and SmolLM2-135M-Instruct converted from their PyPI packages (scripts/setup.sh installs
    them), once per session, into a directory laid out like models/."""
    from helpers import conversion_lock

    from pipeline import convert

    out = converted_models
    try:
        with conversion_lock(out):
            convert.ensure_models(out, ["whisper-tiny.en", "smollm2-135m-instruct"])
    except convert.MissingPackageError as exc:
        pytest.skip(str(exc))
    return out
