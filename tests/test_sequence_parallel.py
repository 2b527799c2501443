"""Sequence parallelism for the reward model (and PPO's critic, the same network): at TP=2 with
sequence_parallel=True the scalar head sees the whole sequence, so rewards, the RM loss, the
gradient norm and the weights after one step equal TP=1's; PPO refuses the setting at start.

Sequence parallelism is GPU-only in this project (parallel.check_layout refuses it on CPU),
but Megatron's sequence-parallel mappings (all-gather / reduce-scatter along the sequence)
run on gloo. Two test-only stand-ins make a CPU model buildable with it, and both are what
the GPU path does: ``torch.nn.LayerNorm`` in place of TE's / Apex's norm, its parameters
marked ``sequence_parallel`` like theirs (so Megatron all-reduces their gradients over TP),
and a no-op CUDA RNG tracker fork (every dropout here is 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed


def _allow_sequence_parallel_on_cpu():
    from megatron.core import tensor_parallel
    from megatron.core.transformer import torch_norm

    build_norm = torch_norm.WrappedTorchNorm.__new__

    def norm(cls, config, hidden_size, eps=1e-5, **kwargs):
        sp = config.sequence_parallel
        module = build_norm(cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, **kwargs)
        for p in module.parameters():
            p.sequence_parallel = sp
        return module

    torch_norm.WrappedTorchNorm.__new__ = norm
    tensor_parallel.get_cuda_rng_tracker = lambda: types.SimpleNamespace(fork=lambda *a, **k: contextlib.nullcontext())


def _sequences():
    g = torch.Generator().manual_seed(3)
    return [[1] + torch.randint(4, 500, (int(n),), generator=g).tolist() + [2] for n in torch.randint(1, 28, (11,), generator=g)]


def _phase(tp, sequence_parallel, ckpt_dir, save):
    from megatron.core import parallel_state

    from megatron_rlhf.config import Config, ParallelConfig, TrainConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.models.reward import score_sequences
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.recipes import rm
    from megatron_rlhf.training.supervised import microbatches
    from megatron_rlhf import checkpoint as ckpt_lib
    from megatron_rlhf.models.schedule import means, run_schedule
    from megatron_rlhf.training.step import train_step, wrap_for_training
    from test_rm import _bump_head, _examples, _model_cfg

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    model_cfg = dataclasses.replace(_model_cfg(), hidden_dropout=0.0, attention_dropout=0.0)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    train = TrainConfig(lr=1e-3, global_batch_size=4, micro_batch_size=2)
    cfg = Config(stage="rm", model=model_cfg, parallel=parallel, train=train)
    rm.check_rm_config(dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, normalize=False)))  # the stage accepts it
    init_distributed(dataclasses.replace(parallel, sequence_parallel=False), model_cfg)  # the CPU refusal, bypassed
    model = build_model(model_cfg, parallel, 512, scalar_head=True, seed=5)
    assert model.config.sequence_parallel == sequence_parallel and model.output_layer.sequence_parallel == sequence_parallel
    if save:
        _bump_head(model)
        ckpt_lib.save_checkpoint(ckpt_dir, 0, {"model": model}, {"kind": "reward"})
    else:
        ckpt_lib.load_weights(model, Path(ckpt_dir) / ckpt_lib.iter_name(0))
    sequences = _sequences()
    rewards = score_sequences(model, sequences, micro_batch_size=3)
    examples = _examples([2, 3, 4, 5], seed=9)  # micro-batches of 5 and 9 rows
    task = rm.make_task(cfg, examples, [], pad_id=0)
    micro = microbatches(task, examples, 2)
    evaluated = means(run_schedule(model, micro, rm.forward_step, forward_only=True))
    ddp, optimizer, scheduler = wrap_for_training(model, cfg.parallel, cfg.train, total_steps=1)
    trained = train_step(ddp, optimizer, scheduler, micro, rm.forward_step)
    after = score_sequences(ddp, sequences, micro_batch_size=3)  # the update itself: every gradient
    return rewards, evaluated, trained, after


def _layouts(ckpt_dir):
    _allow_sequence_parallel_on_cpu()
    # TP=1 as two data-parallel replicas fed the same micro-batches: the numbers of one.
    reference = _phase(1, False, ckpt_dir, save=True)
    return reference, _phase(2, True, ckpt_dir, save=False)


def test_tp2_sequence_parallel_reward_model_matches_tp1(tmp_path):
    for (rewards, evaluated, trained, after), (sp_rewards, sp_eval, sp_trained, sp_after) in run_distributed(
        _layouts, 2, str(tmp_path / "ckpt")
    ):
        assert rewards.std() > 0.1  # not a trivially constant model
        assert sp_rewards.shape == rewards.shape and (sp_rewards - rewards).abs().max() < 1e-5
        for key in ("loss", "accuracy", "margin"):
            assert abs(sp_eval[key] - evaluated[key]) < 1e-5, key
            assert abs(sp_trained[key] - trained[key]) < 1e-5, key
        # A head that reduce-scattered its input gradient (TP identical copies summed) or
        # norm gradients left un-reduced over TP would both change the norm and the step.
        assert abs(sp_trained["grad_norm"] - trained["grad_norm"]) < 1e-4
        # The step itself. Eq. 1 sees reward differences only, so the head bias has an exact
        # gradient of 0 and Adam's first step turns its rounding noise into a shift of every
        # reward: compare the rewards about their mean.
        centred, sp_centred = after - after.mean(), sp_after - sp_after.mean()
        assert (centred - (rewards - rewards.mean())).abs().max() > 1e-2  # the step moved them
        assert (sp_centred - centred).abs().max() < 1e-4


def test_ppo_refuses_sequence_parallel_with_the_key_and_the_fix():
    from megatron_rlhf.config import ConfigError, load_config
    from megatron_rlhf.recipes.ppo import check_ppo_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "examples/instructgpt/ppo_6b.yaml"), ["parallel.sequence_parallel=true"], stage="ppo")
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel=true.*set parallel\.sequence_parallel=false"):
        check_ppo_config(cfg)
    check_ppo_config(load_config(str(root / "examples/instructgpt/ppo_6b.yaml"), stage="ppo"))
