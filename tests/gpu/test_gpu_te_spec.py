"""Transformer Engine's layer spec computes what the local spec computes, on the same weights.

For each flavour (Llama: RMSNorm, SwiGLU, RoPE, grouped-query attention; GPT-2: LayerNorm,
GELU, learned positions, biases, tied embeddings) one model is built with the local spec
(Megatron's local layers, our SDPA attention), its weights are saved with Megatron's
dist-checkpointing and loaded into a model built with TE's spec (fused norm+linear, TE's
fused attention). The local spec maps its names onto TE's (``input_layernorm.`` ->
``self_attention.linear_qkv.layer_norm_``), which is how a checkpoint moves between a CPU and
a GPU machine; the second test loads such a checkpoint with the project's ``load_weights``
(``model.init_from``), as a user moving a CPU run to a GPU does.

Then both run forward (per-token NLL) and backward on the same batch. Tolerances:
* fp32: per-token NLL within 2e-3, every gradient within 1e-2 relative (L2). Tight enough
  that any layout mistake (q/k/v order, gate/up order, a missing norm) fails by orders of
  magnitude; loose enough for TF32 GEMMs, which TE may use for fp32 inputs (10-bit mantissa).
* bf16: per-token NLL within 5e-2 (max) and 1e-2 (mean abs), each gradient with cosine
  similarity >= 0.99 and relative L2 error <= 5e-2. BF16 keeps 8 mantissa bits (a relative
  rounding of 2^-8 = 0.4% per operation); two layers of GEMMs, norms, attention and the
  logits accumulate a few such roundings, and TE's fused kernels round at other points than
  PyTorch's.
"""

from __future__ import annotations

import dataclasses

import pytest

from dist_utils import run_single

pytestmark = [pytest.mark.gpu, pytest.mark.needs_te]

VOCAB = 512
CASES = [(flavour, precision) for flavour in ("llama", "gpt2") for precision in ("fp32", "bf16")]
TOLERANCES = {
    "fp32": dict(nll_max=2e-3, nll_mean=2e-3, grad_rel=1e-2, grad_cos=0.9999),
    "bf16": dict(nll_max=5e-2, nll_mean=1e-2, grad_rel=5e-2, grad_cos=0.99),
}


def _tensors(model) -> dict:
    """``{name: parameter}`` under checkpoint names, which are TE's for both specs: a sharded
    tensor's key with its offset (the layers share one stacked key), or, for a tensor factory
    (SwiGLU's fc1), its state-dict key, the same in both specs. Tied copies are listed once."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out, seen = {}, set()
    params = {p.data_ptr(): p for p in model.parameters()}
    for name, sh in model.sharded_state_dict(prefix="").items():
        if isinstance(sh, ShardedTensor):
            key = f"{sh.key}@{tuple(sh.global_offset)}"
        elif isinstance(sh, ShardedTensorFactory):
            key = name
        else:
            continue
        ptr = sh.data.data_ptr()
        if ptr in params and ptr not in seen:
            seen.add(ptr)
            out[key] = params[ptr]
    return out


def _compare(tmp_dir: str) -> dict:
    from pathlib import Path

    import torch
    from megatron.core import dist_checkpointing

    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed, seed_everything
    from megatron_rlhf.checkpoint import load_weights

    parallel = ParallelConfig()
    results = {}
    for flavour, precision in CASES:
        base = ModelConfig(flavour=flavour, num_layers=2, hidden_size=128, num_attention_heads=4,
                           num_query_groups=2 if flavour == "llama" else None, seq_length=64, precision=precision)
        init_distributed(parallel, base)
        seed_everything(0)
        local = build_model(dataclasses.replace(base, transformer_impl="local"), parallel, VOCAB, seed=0)
        te = build_model(dataclasses.replace(base, transformer_impl="transformer_engine"), parallel, VOCAB, seed=1)
        path = Path(tmp_dir) / f"{flavour}_{precision}"
        path.mkdir()
        dist_checkpointing.save({"model": local.sharded_state_dict(prefix="")}, str(path))
        # the weights only: TE's _extra_state (FP8 metadata) has no counterpart in a local checkpoint
        wanted = {k: v for k, v in te.sharded_state_dict(prefix="").items() if not k.endswith("_extra_state")}
        loaded = dist_checkpointing.load({"model": wanted}, str(path))["model"]
        missing, _ = te.load_state_dict(loaded, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]

        lw, tw = _tensors(local), _tensors(te)
        weights_equal = sorted(lw) == sorted(tw) and all(torch.equal(lw[k], tw[k]) for k in lw)
        uncovered = len({p.data_ptr() for p in local.parameters()}) - len(lw)

        # what users do: model.init_from a checkpoint written on a CPU (local spec) into a GPU run (TE spec)
        te_user = build_model(dataclasses.replace(base, transformer_impl="transformer_engine"), parallel, VOCAB, seed=2)
        try:
            load_weights(te_user, Path(tmp_dir), name=path.name)
            uw = _tensors(te_user)
            user_load = "ok" if sorted(uw) == sorted(lw) and all(torch.equal(lw[k], uw[k]) for k in lw) else "weights differ"
        except Exception as exc:  # reported by the test, with the message
            user_load = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"

        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, VOCAB, (4, 64), generator=g).cuda()
        labels = torch.randint(0, VOCAB, (4, 64), generator=g).cuda()
        positions = torch.arange(64, device="cuda").unsqueeze(0).expand(4, -1)
        nll = {}
        for name, model in (("local", local), ("te", te)):
            model.train()
            model.zero_grad()
            out = model(tokens, positions, None, labels=labels)
            out.float().mean().backward()
            nll[name] = out.detach().float()
        diff = (nll["te"] - nll["local"]).abs()
        grads = {}
        for key in lw:
            a, b = lw[key].grad, tw[key].grad if key in tw else None
            if a is None or b is None:
                grads[key] = dict(missing=True)
                continue
            a, b = a.float().flatten(), b.float().flatten()
            rel = ((a - b).norm() / a.norm().clamp_min(1e-12)).item()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item() if a.norm() > 0 else 1.0
            grads[key] = dict(rel=rel, cos=cos)
        results[(flavour, precision)] = dict(
            missing=missing, weights_equal=weights_equal, uncovered=uncovered, keys_local=sorted(lw), keys_te=sorted(tw),
            nll_max=diff.max().item(), nll_mean=diff.mean().item(), nll_local=nll["local"].mean().item(),
            grads=grads, te_class=type(te.decoder.layers[0].self_attention.linear_qkv).__name__, user_load=user_load,
        )
    return results


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    return run_single(_compare, str(tmp_path_factory.mktemp("te_vs_local")))


@pytest.mark.parametrize("flavour,precision", CASES)
def test_te_spec_matches_local_spec(comparison, flavour, precision):
    r = comparison[(flavour, precision)]
    tol = TOLERANCES[precision]
    assert r["te_class"].startswith("TE"), f"the TE model was built with {r['te_class']}, not a Transformer Engine layer"
    assert r["uncovered"] == 0, f"{r['uncovered']} parameters have no checkpoint name: the comparison would skip them"
    assert not r["missing"], f"TE parameters not found in the local checkpoint: {r['missing']}"
    assert r["weights_equal"], f"weights differ after loading:\nlocal {r['keys_local']}\nte    {r['keys_te']}"
    assert r["nll_max"] <= tol["nll_max"] and r["nll_mean"] <= tol["nll_mean"], (
        f"{flavour}/{precision}: per-token NLL differs by max {r['nll_max']:.3g}, mean {r['nll_mean']:.3g} "
        f"(NLL about {r['nll_local']:.3f})")
    bad = {k: v for k, v in r["grads"].items() if v.get("missing") or v["rel"] > tol["grad_rel"] or v["cos"] < tol["grad_cos"]}
    assert not bad, f"{flavour}/{precision}: gradients beyond tolerance {tol}: {bad}"


@pytest.mark.parametrize("flavour,precision", CASES)
def test_cpu_checkpoint_loads_into_te_model(comparison, flavour, precision):
    """``load_weights`` (model.init_from, generate, score) takes a local-spec checkpoint into a
    TE-spec model: TE's extra state is absent from such a checkpoint and must not be required."""
    assert comparison[(flavour, precision)]["user_load"] == "ok"
