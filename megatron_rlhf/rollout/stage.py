"""This rank's pipeline stage of the model, run layer by layer by the rollout engine with its
own per-slot KV cache (no Megatron inference context)."""

from __future__ import annotations

import math
import torch

from megatron_rlhf.models.attention import decode_attention, prefill_attention
from megatron_rlhf.models.builder import unwrap

# ----------------------------------------------------------------------------- the model, layer by layer


def _checked_prompts(prompts, max_new_tokens: int, context: int) -> list:
    """``prompts`` as lists of ints, after the checks every rollout engine makes of its input:
    a token at least in each, ``max_new_tokens >= 0``, and room in the ``context`` length
    (``model.seq_length``) for a response when one is asked for."""
    prompts = [[int(x) for x in p] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    too_long = [i for i, p in enumerate(prompts) if len(p) >= context] if max_new_tokens > 0 else []
    if too_long:
        raise ValueError(
            f"prompt(s) {too_long[:5]} have >= {context} tokens (model.seq_length): no room to generate; "
            "truncate prompts to leave room for the response"
        )
    return prompts


def _check_can_generate(model) -> None:
    inner = unwrap(model)
    if getattr(inner, "rlhf_scalar_head", False):
        raise ValueError("this model has a scalar (reward/value) head and cannot generate tokens")
    config = inner.config
    if getattr(config, "sequence_parallel", False):
        raise ValueError("generation does not support parallel.sequence_parallel=true; build the rollout model without it")
    unsupported = [name for name in ("apply_residual_connection_post_layernorm", "rotary_interleaved",
                                     "multi_latent_attention", "fp8") if getattr(config, name, False)]
    kind = getattr(inner, "position_embedding_type", "learned_absolute")
    if kind not in ("rope", "learned_absolute", "none"):
        unsupported.append(f"position_embedding_type={kind}")
    if unsupported:
        raise ValueError(f"rollout/engine.py: the rollout engine does not support {', '.join(unsupported)}; "
                         "build the rollout model without it")


def _pipeline_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def _pipeline_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank() if _pipeline_size() > 1 else 0


def _norm(module, x):
    """A torch LayerNorm/RMSNorm (Megatron's WrappedTorchNorm builds these) called directly."""
    if type(module) is torch.nn.RMSNorm:
        return torch.nn.functional.rms_norm(x, module.normalized_shape, module.weight, module.eps)
    if type(module) is torch.nn.LayerNorm:
        return torch.nn.functional.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    return module(x)


def _plain_layers(layers, config) -> bool:
    """Whether every layer is Megatron's local spec in the form _Stage's direct path computes."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP

    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    if (config.num_query_groups or config.num_attention_heads) < tp or config.use_te_activation_func \
            or config.bias_activation_fusion or getattr(config, "activation_func_clamp_value", None) is not None \
            or getattr(config, "glu_linear_offset", 0.0) != 0.0:
        return False
    for layer in layers:
        attn, mlp = layer.self_attention, layer.mlp
        if (type(attn.linear_qkv) is not ColumnParallelLinear or attn.linear_qkv.gather_output
                or type(attn.linear_proj) is not RowParallelLinear or type(mlp) is not MLP
                or type(mlp.linear_fc1) is not ColumnParallelLinear or mlp.linear_fc1.gather_output
                or type(mlp.linear_fc2) is not RowParallelLinear
                or not isinstance(getattr(attn, "q_layernorm", None), (type(None), IdentityOp))
                or not isinstance(getattr(attn, "k_layernorm", None), (type(None), IdentityOp))):
            return False
    return True


class _Stage:
    """This rank's pipeline stage of a GPTModel, run layer by layer with a per-slot KV cache.

    Mirrors ``GPTModel.forward`` in eval mode (dropout is the identity there): embedding,
    then per layer ``x + attn(norm(x))`` and ``x + mlp(norm(x))`` (Megatron's
    bias-dropout-add), then the final norm and the output layer, which runs only on the
    positions that are sampled. The projections and MLPs are the model's own modules, so
    tensor-parallel collectives (and Transformer Engine's fused norms) happen as usual.
    """

    def __init__(self, model, length: int):
        inner = unwrap(model)
        self.inner = inner
        self.config = inner.config
        self.first, self.last = inner.pre_process, inner.post_process
        self.layers = list(inner.decoder.layers)
        attn = self.layers[0].self_attention if self.layers else None
        self.heads = attn.num_attention_heads_per_partition if attn else 0
        self.groups = attn.num_query_groups_per_partition if attn else 0
        self.head_dim = attn.hidden_size_per_attention_head if attn else 0
        scale = getattr(attn.core_attention, "softmax_scale", None) if attn else None
        self.scale = scale if scale is not None else 1.0 / math.sqrt(max(self.head_dim, 1))
        self.device = next(inner.parameters()).device
        self.dtype = self.config.params_dtype
        self.length = length  # cache columns; column `length` is the idle rows' scratch
        self.direct = attn is not None and _plain_layers(self.layers, self.config)
        self.tp_group = None
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.cos = self.sin = None
        if getattr(inner, "position_embedding_type", None) == "rope":
            freqs = inner.rotary_pos_emb(length + 1)  # [length + 1, 1, 1, rot_dim], fp32
            self.cos = torch.cos(freqs[:, 0, 0, :]).to(self.dtype)  # as Megatron's _apply_rotary_pos_emb_bshd
            self.sin = torch.sin(freqs[:, 0, 0, :]).to(self.dtype)

    def new_cache(self, slots: int) -> list:
        shape = (slots, self.groups, self.length + 1, self.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in self.layers]

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = cos.shape[-1]
        body, rest = t[..., :rot], t[..., rot:]
        x1, x2 = torch.chunk(body, 2, dim=-1)
        body = body * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((body, rest), dim=-1) if rest.shape[-1] else body

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[n, s]`` ids and positions -> ``[s, n, h]``."""
        return self.inner.embedding(input_ids=tokens, position_ids=positions)

    def layers_forward(self, x: torch.Tensor, positions: torch.Tensor, cache, rows=None, write=None, key_mask=None):
        """This stage's layers on ``x`` ``[s, n, h]``.

        ``cache`` None: causal attention within ``x`` (prefill from position 0, or full
        recomputation). With ``cache`` and ``s > 1`` (prefill): also write the keys/values
        of positions ``0..s-1`` into cache rows ``rows``. With ``s == 1`` (decode, every
        slot of the cache in order): write at column ``write`` ``[n]`` and attend to the
        cache's first ``key_mask.shape[1]`` columns where ``key_mask`` is True.
        """
        cos = sin = None
        if self.cos is not None:
            cos = self.cos[positions.t()].unsqueeze(2)  # [s, n, 1, rot]
            sin = self.sin[positions.t()].unsqueeze(2)
        decode = key_mask is not None
        if decode:
            slot = torch.arange(x.shape[1], device=x.device)
            keys = key_mask.shape[1]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attention
            if self.direct:
                query, key, value = self._qkv(attn, _norm(layer.input_layernorm, x))
            else:
                query, key, value = attn.get_query_key_value_tensors(layer.input_layernorm(x))
            if cos is not None:
                query, key = self._rope(query, cos, sin), self._rope(key, cos, sin)
            if decode:
                k_cache, v_cache = cache[i]
                k_cache[slot, :, write] = key[0]
                v_cache[slot, :, write] = value[0]
                context = decode_attention(query, k_cache[:, :, :keys], v_cache[:, :, :keys], key_mask, self.scale)
            else:
                if cache is not None:
                    k_cache, v_cache = cache[i]
                    s = x.shape[0]
                    k_cache[rows, :, :s] = key.permute(1, 2, 0, 3)
                    v_cache[rows, :, :s] = value.permute(1, 2, 0, 3)
                context = prefill_attention(query, key, value, self.scale)
            if self.direct:
                x = x + self._row_linear(attn.linear_proj, context)
                x = x + self._mlp(layer.mlp, _norm(layer.pre_mlp_layernorm, x))
            else:
                out, bias = attn.linear_proj(context)
                x = x + (out if bias is None else out + bias)
                out, bias = layer.mlp(layer.pre_mlp_layernorm(x))
                x = x + (out if bias is None else out + bias)
        return x

    # The direct path: the same maths as Megatron's local ColumnParallelLinear /
    # RowParallelLinear / MLP / get_query_key_value_tensors in eval mode, without their
    # autograd-function and process-group plumbing (about 0.1 ms a call, which is most of a
    # small model's decode step). Used only for the layer types checked by _plain_layers.

    def _row_linear(self, module, x):
        out = torch.nn.functional.linear(x, module.weight)
        if self.tp_group is not None:
            torch.distributed.all_reduce(out, group=self.tp_group)
        return out if module.bias is None else out + module.bias

    def _mlp(self, mlp, x):
        fc1 = mlp.linear_fc1
        x = torch.nn.functional.linear(x, fc1.weight, fc1.bias)
        if self.config.gated_linear_unit:
            x_glu, x_linear = torch.chunk(x, 2, dim=-1)
            x = self.config.activation_func(x_glu) * x_linear
        else:
            x = self.config.activation_func(x)
        return self._row_linear(mlp.linear_fc2, x)

    def _qkv(self, attn, x):
        mixed = torch.nn.functional.linear(x, attn.linear_qkv.weight, attn.linear_qkv.bias)
        per_group = self.heads // self.groups
        mixed = mixed.view(*mixed.shape[:2], self.groups, (per_group + 2) * self.head_dim)
        query, key, value = torch.split(mixed, [per_group * self.head_dim, self.head_dim, self.head_dim], dim=3)
        return query.reshape(*query.shape[:2], self.heads, self.head_dim), key, value

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, h]`` final hidden states (before the final norm) -> ``[n, V]`` TP-gathered logits."""
        inner = self.inner
        hidden = _norm(inner.decoder.final_layernorm, hidden.unsqueeze(0))
        weight = inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights else None
        logits, _ = inner.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits[0]


