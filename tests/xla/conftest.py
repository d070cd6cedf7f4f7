"""torch_xla tests (run in .venv-xla: scripts/test_xla.sh): 4 virtual XLA devices on the CPU.

The variables must be set before torch_xla starts its runtime, so here, at collection. Ray workers
started later (the `ray_local` fixture) inherit them. In an environment without torch_xla the
tests skip themselves and nothing here changes the environment.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

DEVICES = 4

if importlib.util.find_spec("torch_xla") is not None:
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ.setdefault("CPU_NUM_DEVICES", str(DEVICES))
    # Compile fast rather than run fast: at full LLVM optimisation each training-step graph of the tiny
    # model takes about a minute to compile on 2 cores, and these tests run a handful of steps.
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


@pytest.fixture(scope="session")
def spmd(tmp_path_factory):
    """This process's SPMD runtime (one per process: use_spmd and the cache are process-wide). It must
    start before any backward pass in the process: autograd sizes its device queues on the first one."""
    from pipeline.config import XlaConfig
    from pipeline.xla import XlaBackend

    return XlaBackend(XlaConfig(pjrt_device="CPU", cpu_num_devices=DEVICES,
                             compilation_cache=str(tmp_path_factory.mktemp("xla-cache"))))
