"""`train.device=xla` under Ray Train (local Ray, the bundled corpus): the SPMD backend starts a worker
that trains like the CPU path, checkpoints its shards to gs:// (the local GCS emulator) and resumes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torch_xla")

from pipeline.config import load_config  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 4
# As in test_xla_step: CPU vs XLA float32 differences (observed ~1e-7 relative in the losses).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4


def tiny_train(*overrides: str):
    # 2 micro-batches of 4 per step: the accumulation runs inside the one compiled step graph.
    return load_config("tiny", ["train.micro_batch_size=4", "train.global_batch_size=8", f"train.steps={STEPS}",
                                "train.log_every=1", "train.checkpoint_every=2", "train.lr=1e-3",
                                "train.warmup_frac=0.25", *overrides])


def metrics(text: str) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, text.splitlines())}


def test_spmd_backend_trains_checkpoints_to_gcs_and_resumes(ray_local, prepared_mels, teacher_cache, gcs, bucket,
                                                           tmp_path):
    from pipeline.train import run_training

    cpu_out = tmp_path / "cpu"
    cpu = run_training(tiny_train(), str(prepared_mels), str(teacher_cache), str(cpu_out))
    expected = metrics((cpu_out / "logs" / "metrics.jsonl").read_text())
    assert sorted(expected) == list(range(1, STEPS + 1))

    # train.xla: 4 virtual CPU devices on the one worker (host), a compilation cache of the test's own.
    cache_dir = tmp_path / "xla-cache"
    xla = ["train.device=xla", "train.xla.pjrt_device=CPU", "train.xla.cpu_num_devices=4",
           f"train.xla.compilation_cache={cache_dir}"]
    out, fs = f"gs://{bucket}/xla", gcs.fs()
    log = f"{bucket}/xla/logs/metrics.jsonl"
    first = run_training(tiny_train(*xla, "train.stop_at_step=2"), str(prepared_mels),
                         str(teacher_cache), out)
    assert first.error is None and first.metrics["step"] == 2
    fs.invalidate_cache()
    assert sorted(metrics(fs.cat(log).decode())) == [1, 2]
    second = run_training(tiny_train(*xla), str(prepared_mels), str(teacher_cache), out)
    assert second.error is None and second.metrics["step"] == STEPS
    fs.invalidate_cache()
    got = metrics(fs.cat(log).decode())  # the resumed run went on in the same log on gs://

    assert sorted(got) == list(range(1, STEPS + 1))
    for step, m in got.items():
        for key in ("loss", "distill", "align", "grad_norm"):
            assert m[key] == pytest.approx(expected[step][key], rel=LOSS_RTOL), (step, key)
        assert m["lr"] == expected[step]["lr"] and m["truncated"] == expected[step]["truncated"]
    # Each process compiled its step graph once: no recompilation from one step to the next.
    assert got[1]["xla_compilations"] == got[2]["xla_compilations"] >= 1
    assert got[3]["xla_compilations"] == got[4]["xla_compilations"] >= 1
    assert any(cache_dir.iterdir())  # the persistent compilation cache received the graphs

    # The last checkpoint, on gs://: the hosts' shards and checkpoint.json; its assembled weights are the export's.
    from pipeline.checkpoint import Checkpoint

    assert second.checkpoint.path.startswith(f"{bucket}/xla/train/")
    names = {p.split("/")[-1] for p in fs.find(second.checkpoint.path)}
    assert names == {"checkpoint.json", "weights-00000.safetensors", "optimizer-00000.safetensors"}, names
    last, before = Checkpoint(f"gs://{second.checkpoint.path}"), Checkpoint(f"gs://{first.checkpoint.path}")
    assert last.state.step == STEPS and last.config["train"]["device"] == "xla"
    weights = last.weights()
    assert any(not torch.equal(weights[k], w) for k, w in before.weights().items())
    cpu_weights = Checkpoint(cpu.checkpoint.path).weights()
    assert weights.keys() == cpu_weights.keys()
    for k in weights:
        assert (weights[k] - cpu_weights[k]).abs().max() <= WEIGHT_ATOL, k
