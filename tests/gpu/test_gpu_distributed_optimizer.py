"""Megatron's distributed optimizer (BF16, sharded FP32 master weights and Adam moments) saves
and resumes.

* Exact: a tiny Llama trains 3 steps, is checkpointed (our atomic dist-checkpoint save), and a
  freshly built model + optimizer loads it: every master weight and every Adam moment equals
  the saved one bit for bit, and the next step's loss (a forward on identical weights) is the
  same float on both.
* Through the CLI: an SFT run with ``parallel.use_distributed_optimizer=true`` for 6 steps
  (checkpoints at 3 and 6), and a second run started from a copy of its step-3 checkpoint:
  it says "resumed from", logs exactly steps 4..6, and their losses match the uninterrupted
  run's within 1e-2 relative. Not bitwise: the backward of GPU flash attention accumulates
  with atomics, so two GPU runs of the same step differ in the last bits (the exact check
  above covers the state itself).
"""

from __future__ import annotations

from functools import partial

import shutil

import pytest

from dist_utils import run_single
from gpu_utils import QUIET, SFT_YAML, all_finite, cli, ok, series

pytestmark = pytest.mark.gpu

VOCAB, SEQ, MBS = 512, 64, 4


def _setup():
    import torch

    from megatron_rlhf.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_rlhf.data.sft import SftBatch
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.training.step import wrap_for_training

    model_cfg = ModelConfig(flavour="llama", num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                            seq_length=SEQ, precision="bf16")
    parallel = ParallelConfig(use_distributed_optimizer=True)
    train = TrainConfig(lr=3e-3, min_lr=3e-3, lr_decay_style="constant", micro_batch_size=MBS, global_batch_size=2 * MBS)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(2):
        seq = torch.randint(1, VOCAB, (MBS, SEQ + 1), generator=g)
        tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        batches.append(SftBatch(tokens.cuda(), labels.cuda(), torch.ones_like(tokens, dtype=torch.bool).cuda(),
                                torch.arange(SEQ).repeat(MBS, 1).cuda()))

    def build():
        model = build_model(model_cfg, parallel, VOCAB, seed=0)
        return wrap_for_training(model, parallel, train, total_steps=10)

    return model_cfg, parallel, build, batches


def _optimizer_tensors(optimizer) -> list:
    """Every master weight and every tensor of its optimizer state, in parameter order."""
    import torch

    out = []
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = part.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                out.append(p.detach().float().cpu().clone())
                for _, value in sorted(inner.state.get(p, {}).items()):
                    if isinstance(value, torch.Tensor):
                        out.append(value.detach().float().cpu().clone())
    return out


def _save_and_load(ckpt_dir: str) -> dict:
    import torch

    from megatron_rlhf.parallel import init_distributed, seed_everything
    from megatron_rlhf.recipes.sft import forward_step
    from megatron_rlhf import checkpoint as ckpt_lib
    from megatron_rlhf.training.step import train_step

    model_cfg, parallel, build, batches = _setup()
    init_distributed(parallel, model_cfg)
    seed_everything(0)
    ddp, optimizer, scheduler = build()
    kinds = [type(p).__name__ for p in getattr(optimizer, "chained_optimizers", None) or [optimizer]]
    for _ in range(3):
        train_step(ddp, optimizer, scheduler, batches, partial(forward_step, vocab_size=VOCAB))
    saved = ckpt_lib.save_checkpoint(ckpt_dir, 3, {"model": ddp}, {"kind": "policy"}, {"model": optimizer}, {})
    before = _optimizer_tensors(optimizer)
    next_loss = train_step(ddp, optimizer, scheduler, batches, partial(forward_step, vocab_size=VOCAB))["loss"]

    ddp2, optimizer2, scheduler2 = build()
    fresh = _optimizer_tensors(optimizer2)
    ckpt_lib.load_checkpoint(saved, {"model": ddp2}, {"model": optimizer2})
    after = _optimizer_tensors(optimizer2)
    resumed_loss = train_step(ddp2, optimizer2, scheduler2, batches, partial(forward_step, vocab_size=VOCAB))["loss"]
    return dict(
        kinds=kinds, count=len(before), count_after=len(after), fresh_count=len(fresh),
        equal=[torch.equal(a, b) for a, b in zip(before, after)],
        differs_from_fresh=any(not torch.equal(a, b) for a, b in zip(before, fresh)) or len(before) != len(fresh),
        next_loss=next_loss, resumed_loss=resumed_loss,
    )


def test_distributed_optimizer_state_round_trips_exactly(tmp_path):
    r = run_single(_save_and_load, str(tmp_path / "checkpoints"))
    assert r["kinds"] == ["DistributedOptimizer"], r["kinds"]
    assert r["count"] > 0 and r["count_after"] == r["count"], r
    assert r["differs_from_fresh"], "the saved state equals a fresh optimizer's: the test would not see a failed load"
    assert all(r["equal"]), f"{r['equal'].count(False)} of {r['count']} master weights / Adam moments differ after loading"
    assert r["resumed_loss"] == r["next_loss"]


def test_cli_resume_with_distributed_optimizer(tmp_path):
    common = ["sft", "--config", SFT_YAML, *QUIET, "parallel.use_distributed_optimizer=true", "model.precision=bf16",
              "train.max_steps=6", "train.save_interval=3", "train.eval_interval=0", "data.valid_path=",
              "train.lr_warmup_steps=0", "train.lr_decay_style=constant"]
    full = tmp_path / "full"
    proc = cli(*common, f"output_dir={full}")
    assert proc.returncode == 0, ok(proc)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "iter_0000003", resumed / "checkpoints" / "iter_0000003")
    (resumed / "checkpoints" / "latest").write_text("iter_0000003\n")
    proc = cli(*common, f"output_dir={resumed}")
    assert proc.returncode == 0, ok(proc)
    assert "resumed from" in proc.stderr + proc.stdout
    expected, got = series(full, "train/loss"), series(resumed, "train/loss")
    assert sorted(got) == [4, 5, 6], got
    assert all_finite(got.values())
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-2), (step, got, expected)
