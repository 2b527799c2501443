"""Parallel correctness: any TP/PP layout gives the numbers of TP=PP=1 (fp32, gloo, CPU)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed, run_single

VOCAB = 120
SEQ = 16


def _model_cfg(flavour):
    from megatron_rlhf.config import ModelConfig

    return ModelConfig(
        flavour=flavour, num_layers=2, hidden_size=64, num_attention_heads=4,
        num_query_groups=2 if flavour == "llama" else None, seq_length=32,
    )


def _batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    labels = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    loss_mask = torch.ones(2, SEQ, dtype=torch.bool)
    loss_mask[:, :5] = False  # a "prompt"
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, -1).contiguous()
    return tokens, labels, loss_mask, positions


def _gather_tp(name, param, grad):
    """The full (TP=1) tensor from this rank's shard of a parameter's gradient."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return grad
    shards = [torch.empty_like(grad) for _ in range(tp)]
    dist.all_gather(shards, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    dim = param.partition_dim
    if "linear_fc1" in name and grad.shape[0] % 2 == 0 and getattr(param, "_rlhf_glu", False):
        gates = [s.chunk(2, dim=0)[0] for s in shards]  # each rank holds [gate_r; up_r]
        ups = [s.chunk(2, dim=0)[1] for s in shards]
        return torch.cat(gates + ups, dim=0)
    return torch.cat(shards, dim=dim)


def _loss_and_grads(flavour, tp):
    from megatron_rlhf.config import ParallelConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed, seed_everything

    model_cfg = _model_cfg(flavour)
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    init_distributed(parallel, model_cfg)
    seed_everything(3)
    model = build_model(model_cfg, parallel, VOCAB, seed=3)
    tokens, labels, loss_mask, positions = _batch()
    nll = model(tokens, positions, None, labels=labels)
    loss = (nll * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        p._rlhf_glu = flavour == "llama"
        grads[name] = _gather_tp(name, p, p.grad)
    return loss.item(), grads


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_tp2_matches_tp1_loss_and_gradients(flavour):
    loss1, grads1 = run_single(_loss_and_grads, flavour, 1)
    results = run_distributed(_loss_and_grads, 2, flavour, 2)
    for loss2, grads2 in results:
        assert abs(loss2 - loss1) < 1e-5
        assert grads2.keys() == grads1.keys()
        for name in grads1:
            assert grads2[name].shape == grads1[name].shape, name
            assert (grads2[name] - grads1[name]).abs().max().item() < 1e-5, name


def _save_at(flavour, tp, pp, path):
    from megatron_rlhf.config import ParallelConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed, seed_everything
    from megatron_rlhf.checkpoint import save_checkpoint

    model_cfg = _model_cfg(flavour)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(parallel, model_cfg)
    seed_everything(5)
    model = build_model(model_cfg, parallel, VOCAB, seed=5)
    save_checkpoint(path, 1, {"model": model}, {"kind": "policy"})
    return _full_logits(model)


def _full_logits(model):
    """Logits gathered over TP (only meaningful at PP=1)."""
    from megatron.core import parallel_state

    tokens, _, _, positions = _batch()
    model.eval()
    with torch.no_grad():
        logits = model(tokens, positions, None)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits


def _load_at(flavour, tp, pp, path):
    """Load the checkpoint at (tp, pp); return full logits (PP by explicit send/recv) and the
    loss computed by Megatron's pipeline schedule."""
    from megatron.core import parallel_state

    from megatron_rlhf.config import ParallelConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.recipes.sft import forward_step
    from megatron_rlhf.data import SftBatch
    from megatron_rlhf.checkpoint import load_weights, resolve_checkpoint
    from megatron_rlhf.models.schedule import means, run_schedule

    model_cfg = _model_cfg(flavour)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(parallel, model_cfg)
    model = build_model(model_cfg, parallel, VOCAB, seed=999)  # different init: weights must come from the file
    load_weights(model, resolve_checkpoint(path))
    tokens, labels, loss_mask, positions = _batch()
    model.eval()
    logits = None
    with torch.no_grad():
        if pp == 1:
            logits = _full_logits(model)
        elif parallel_state.is_pipeline_first_stage():
            hidden = model(tokens, positions, None)
            dist.send(hidden.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        else:
            hidden = torch.empty(SEQ, 2, model.config.hidden_size)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
            logits = model(tokens, positions, None)
    micro = [SftBatch(tokens[:1], labels[:1], loss_mask[:1], positions[:1]), SftBatch(tokens[1:], labels[1:], loss_mask[1:], positions[1:])]
    model.config.calculate_per_token_loss = True
    metrics = means(run_schedule(model, micro, partial(forward_step, vocab_size=VOCAB), forward_only=True))
    return logits, metrics["loss"]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_pp2_split_gives_same_logits_and_schedule_loss(flavour, tmp_path):
    ref_logits = run_single(_save_at, flavour, 1, 1, str(tmp_path))
    _, ref_loss = run_single(_load_at, flavour, 1, 1, str(tmp_path))
    results = run_distributed(_load_at, 2, flavour, 1, 2, str(tmp_path))
    last_logits, loss = results[1]
    assert (last_logits - ref_logits).abs().max().item() < 1e-5
    assert results[0][1] == pytest.approx(loss, abs=0)  # every rank reports the same loss
    assert loss == pytest.approx(ref_loss, abs=1e-5)


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_identical_logits(tmp_path):
    saved = run_distributed(_save_at, 2, "llama", 2, 1, str(tmp_path))
    loaded, _ = run_single(_load_at, "llama", 1, 1, str(tmp_path))
    assert (loaded - saved[0]).abs().max().item() < 1e-5
    assert (saved[0] - saved[1]).abs().max().item() == 0
