"""Config loading/validation and the CPU compatibility layer."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_single
from megatron_rlhf.config import ConfigError, load_config


def test_yaml_plus_overrides_and_types(tmp_path):
    cfg = load_config("examples/tiny/sft.yaml", ["train.lr=3e-4", "parallel.tensor_model_parallel_size=2", "model.fp8=null"], stage="sft")
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.parallel.tensor_model_parallel_size == 2
    with pytest.raises(ConfigError, match="'train.max_steps' must be an integer"):
        load_config("examples/tiny/sft.yaml", ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="did you mean 'model.num_layers'"):
        load_config("examples/tiny/sft.yaml", ["model.num_layer=3"])
    with pytest.raises(ConfigError, match="'gpt3' is not one of"):
        load_config(None, ["model.flavour=gpt3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_sise: 8\n")
    with pytest.raises(ConfigError, match=f"{bad}: unknown config key 'model.hidden_sise'; did you mean 'model.hidden_size'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="is a 'sft' config, but the command is 'rm'"):
        load_config("examples/tiny/sft.yaml", [], stage="rm")


def test_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.train.lr = 1.0


def test_layout_errors():
    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.parallel import check_layout

    model = ModelConfig(num_layers=4, num_attention_heads=4, hidden_size=64)
    assert check_layout(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), model, 8) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        check_layout(ParallelConfig(tensor_model_parallel_size=4), model, 6)
    with pytest.raises(ConfigError, match="does not divide model.num_layers=4"):
        check_layout(ParallelConfig(pipeline_model_parallel_size=3), model, 3)


def test_launch_env_from_slurm_and_torchrun():
    from megatron_rlhf.parallel import launch_env

    env = launch_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "node[07-08]", "PATH": "/nonexistent"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port, env.launcher) == (3, 4, 1, 20123, "slurm")
    assert env.master_addr in ("node07",)
    env = launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29511"})
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.launcher) == (1, 2, "h", 29511, "torchrun")


def _compat_probe():
    from megatron.core.pipeline_parallel import schedules

    from megatron_rlhf import cpu_compat

    active = cpu_compat.enable()
    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    return active, str(t.device), str(torch.cuda.current_device()), torch.zeros(1).cuda().device.type


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is inactive with a GPU")
def test_cpu_layer_maps_cuda_to_cpu_in_listed_modules():
    active, device, current, moved = run_single(_compat_probe)
    assert active and device == "cpu" and current == "cpu" and moved == "cpu"


def test_cpu_layer_is_off_with_a_gpu(monkeypatch):
    from megatron_rlhf import cpu_compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.enable() is False


def test_rollout_micro_batches_is_validated():
    from megatron_rlhf.recipes.ppo import check_ppo_config

    with pytest.raises(ConfigError, match=r"ppo.rollout_micro_batches=-1 must be >= 0"):
        load_config(None, ["ppo.rollout_micro_batches=-1"])
    cfg = load_config("examples/tiny/ppo.yaml", ["ppo.rollout_engine=dynamic", "ppo.rollout_micro_batches=2"])
    with pytest.raises(ConfigError, match=r"ppo.rollout_micro_batches=2 sets our engine's slot groups"):
        check_ppo_config(cfg)
