"""The XLA backend's settings and Ray reservations: pure, no torch_xla needed (runs in both environments)."""

from __future__ import annotations

import os

import pytest

from pipeline.config import ConfigError, XlaConfig, load_config
from pipeline.xla import from_env, scaling_config, to_env, xla_config


def test_env_round_trip_and_defaults():
    cfg = XlaConfig(pjrt_device="CPU", cpu_num_devices=4, data=2, topology="2x2x4", accelerator_type="TPU-V4")
    env = to_env(cfg)
    assert env["DIVA_XLA_CPU_NUM_DEVICES"] == "4" and "DIVA_XLA_CHIPS_PER_HOST" not in env
    assert from_env(XlaConfig(), env) == cfg
    assert from_env(cfg, {}) == cfg
    with pytest.raises(ConfigError, match="DIVA_XLA_DATA='two'"):
        from_env(XlaConfig(), {"DIVA_XLA_DATA": "two"})


def test_the_config_section_and_the_cluster_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("DIVA_XLA_"):
            monkeypatch.delenv(name)
    tcfg = load_config("tiny", ["train.xla.topology=2x2x1", "train.xla.accelerator_type=TPU-V4",
                                "train.xla.data=2"]).train
    assert xla_config(tcfg) == XlaConfig(topology="2x2x1", accelerator_type="TPU-V4", data=2)
    with pytest.raises(ConfigError, match="train.xla.dat"):
        load_config("tiny", ["train.xla.dat=2"])
    # A cluster's manifest names its slice in the environment: it wins over the preset's section.
    monkeypatch.setenv("DIVA_XLA_TOPOLOGY", "4x4")
    assert xla_config(tcfg).topology == "4x4" and xla_config(tcfg).data == 2


def test_scaling_one_worker_per_tpu_host():
    # v4-32: topology 2x2x4 = 16 chips on 4 hosts; each worker reserves a whole host's 4 chips.
    s = scaling_config(4, XlaConfig(topology="2x2x4", accelerator_type="TPU-V4"), cpus_per_worker=8)
    assert s.use_tpu and s.num_workers == 4 and s.resources_per_worker == {"TPU": 4, "CPU": 8}
    with pytest.raises(ValueError, match="multiple of 4"):
        scaling_config(3, XlaConfig(topology="2x2x4", accelerator_type="TPU-V4"))
    # One single-host slice, named by its chips.
    assert scaling_config(1, XlaConfig(chips_per_host=8)).resources_per_worker == {"TPU": 8, "CPU": 1}
    for incomplete in (XlaConfig(), XlaConfig(topology="2x2x4")):
        with pytest.raises(ConfigError, match="topology and accelerator_type"):
            scaling_config(1, incomplete)
    cpu = scaling_config(1, XlaConfig(pjrt_device="CPU", cpu_num_devices=4), cpus_per_worker=2)
    assert not cpu.use_tpu and cpu.resources_per_worker == {"CPU": 2}
