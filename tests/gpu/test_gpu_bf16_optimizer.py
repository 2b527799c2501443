"""BF16 training with Megatron's mixed-precision optimizer and gradient clipping.

A tiny Llama (2 layers, hidden 128, GQA) trains 10 steps on one fixed batch (8 sequences of 64
random tokens, two micro-batches) through ``wrap_for_training`` / ``train_step``, the path the
SFT recipe takes, once in BF16 and once in FP32, with ``train.clip_grad=0.05`` (far below the
gradient norm, so every step is clipped). Checked:

* BF16 gets Megatron's ``Float16OptimizerWithFloat16Params``: BF16 model weights, FP32 master
  weights, and after every step each model weight is exactly its master weight rounded to
  BF16 (FP32 gets ``FP32Optimizer``);
* clipping: after each step the master gradients' global L2 norm is ``clip_grad`` (relative
  1e-4; Megatron scales by ``clip / (norm + 1e-6)``), while the reported norm is the one
  before clipping and is above it;
* no step is skipped; the loss falls to below 70% of its first value in both precisions;
* BF16 tracks FP32: the first loss within 1% and the first gradient norm within 5% (one BF16
  forward/backward), the last loss within 5% (10 Adam steps; on CPU in FP32 the loss goes 6.26 -> 2.6).
"""

from __future__ import annotations

from functools import partial

import pytest

from dist_utils import run_single

pytestmark = pytest.mark.gpu

VOCAB, SEQ, MBS, STEPS, CLIP, LR = 512, 64, 4, 10, 0.05, 3e-3


def _train(precision: str) -> dict:
    import torch

    from megatron_rlhf.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_rlhf.data.sft import SftBatch
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed, seed_everything
    from megatron_rlhf.recipes.sft import forward_step
    from megatron_rlhf.training.step import train_step, wrap_for_training

    model_cfg = ModelConfig(flavour="llama", num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                            seq_length=SEQ, precision=precision)
    parallel = ParallelConfig()
    train = TrainConfig(lr=LR, min_lr=LR, lr_decay_style="constant", clip_grad=CLIP, micro_batch_size=MBS,
                        global_batch_size=2 * MBS, seed=0)
    init_distributed(parallel, model_cfg)
    seed_everything(0)
    model = build_model(model_cfg, parallel, VOCAB, seed=0)
    ddp, optimizer, scheduler = wrap_for_training(model, parallel, train, total_steps=STEPS)
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]

    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        seq = torch.randint(1, VOCAB, (MBS, SEQ + 1), generator=g)
        tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        batches.append(SftBatch(tokens.cuda(), labels.cuda(), torch.ones_like(tokens, dtype=torch.bool).cuda(),
                                torch.arange(SEQ).repeat(MBS, 1).cuda()))

    out = dict(optimizers=[type(p).__name__ for p in parts], model_dtypes=sorted({str(p.dtype) for p in model.parameters()}),
               master_dtypes=sorted({str(mp.dtype) for o in parts for group in getattr(o, "fp32_from_float16_groups", []) for mp in group}),
               losses=[], norms=[], clipped_norms=[], skipped=0, weights_are_rounded_masters=[])
    for _ in range(STEPS):
        metrics = train_step(ddp, optimizer, scheduler, batches, partial(forward_step, vocab_size=VOCAB))
        out["losses"].append(metrics["loss"])
        out["norms"].append(metrics["grad_norm"])
        out["skipped"] += int(metrics["skipped"])
        grads = [grad for o in parts for grad in o.get_main_grads_for_grad_norm()]
        out["clipped_norms"].append(torch.sqrt(sum(grad.float().pow(2).sum() for grad in grads)).item())
        if precision == "bf16":
            out["weights_are_rounded_masters"].append(all(
                torch.equal(master.to(weight.dtype), weight)
                for o in parts for weights, masters in zip(o.float16_groups, o.fp32_from_float16_groups)
                for weight, master in zip(weights, masters)))
    return out


@pytest.fixture(scope="module")
def runs():
    return {precision: run_single(_train, precision) for precision in ("bf16", "fp32")}


def test_bf16_uses_megatron_mixed_precision_optimizer(runs):
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16["optimizers"] == ["Float16OptimizerWithFloat16Params"], bf16["optimizers"]
    assert bf16["model_dtypes"] == ["torch.bfloat16"] and bf16["master_dtypes"] == ["torch.float32"], bf16
    assert all(bf16["weights_are_rounded_masters"]) and len(bf16["weights_are_rounded_masters"]) == STEPS
    assert fp32["optimizers"] == ["FP32Optimizer"] and fp32["model_dtypes"] == ["torch.float32"], fp32


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_gradient_clipping_and_learning(runs, precision):
    r = runs[precision]
    assert r["skipped"] == 0
    for step, (before, after) in enumerate(zip(r["norms"], r["clipped_norms"]), 1):
        assert before > CLIP, f"step {step}: norm {before} is not above clip_grad={CLIP}; the test would not see clipping"
        assert after == pytest.approx(CLIP, rel=1e-4), f"step {step}: master grads have norm {after} after clipping to {CLIP}"
    assert r["losses"][-1] < 0.7 * r["losses"][0], r["losses"]


def test_bf16_tracks_fp32(runs):
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], rel=1e-2)
    assert bf16["norms"][0] == pytest.approx(fp32["norms"][0], rel=5e-2)
    assert bf16["losses"][-1] == pytest.approx(fp32["losses"][-1], rel=5e-2), (bf16["losses"], fp32["losses"])
