"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron-Core's local ``DotProductAttention`` needs the CUDA RNG tracker even in eval and
materialises the full ``[b, h, s, s]`` score matrix. This module has the same constructor
and call contract (so it drops into a ``ModuleSpec`` as ``core_attention``) and lets
PyTorch pick the kernel: flash / memory-efficient on GPU, the math kernel on CPU.

Shapes follow Megatron: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``,
output ``[sq, b, np * hn]``.

Packed sequences (``data.packing``): with ``packed_seq_params`` (``qkv_format='thd'``)
Megatron's ``Attention`` hands over query/key/value as ``[t, np, hn]`` (the sequences of a
micro-batch end to end) and ``cu_seqlens`` marks the boundaries; attention is causal
inside each sequence and never crosses a boundary (block-diagonal causal), the semantics
of Transformer Engine's THD kernels that the GPU spec uses. Output ``[t, np * hn]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the Transformer Engine spec")
        self.attn_mask_type = attn_mask_type
        if pg_collection is not None and hasattr(pg_collection, "tp"):
            tp_size = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.groups_per_partition != self.heads_per_partition:
            repeat = self.heads_per_partition // self.groups_per_partition
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)

        mask = None
        is_causal = False
        if attention_mask is not None:
            # Megatron's convention: True marks a position that may NOT be attended to.
            mask = ~attention_mask.to(torch.bool)
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                is_causal = True
            else:
                # Decoding against a KV cache: query i sits at absolute position sk - sq + i.
                # (SDPA's is_causal is top-left aligned, which would be wrong here.)
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.softmax_scale
        )
        # [b, h, sq, d] -> [sq, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.head_dim)

    def _packed(self, query, key, value, params: PackedSeqParams):
        """THD: ``[t, np, hn]`` inputs, causal attention within each ``cu_seqlens`` segment.

        Each segment is its own causal SDPA call, so the cost is the sum of the squared
        sequence lengths (a dense ``[t, t]`` block-diagonal mask would cost ``t^2``)."""
        if params.qkv_format != "thd" or query.dim() != 3:
            raise ValueError(f"SDPAttention packs only qkv_format='thd' with [t, np, hn] inputs, got {params.qkv_format!r} and {tuple(query.shape)}")
        t = query.shape[0]
        lengths = segment_lengths(params.cu_seqlens_q, t)
        if self.groups_per_partition != self.heads_per_partition:
            repeat = self.heads_per_partition // self.groups_per_partition
            key = key.repeat_interleave(repeat, dim=1)
            value = value.repeat_interleave(repeat, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        outputs = []
        for q, k, v in zip(*(x.split(lengths) for x in (query, key, value))):
            # [L, h, d] -> [1, h, L, d]
            q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale)
            outputs.append(out.squeeze(0).permute(1, 0, 2))
        return torch.cat(outputs).reshape(t, self.heads_per_partition * self.head_dim)


def segment_lengths(cu_seqlens: torch.Tensor, total: int) -> list:
    """The segment lengths of a packed row of ``total`` tokens, checked against it."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {bounds}")
    return [b - a for a, b in zip(bounds, bounds[1:])]


def packed_seq_params(batch) -> Optional[PackedSeqParams]:
    """Megatron's ``PackedSeqParams`` (THD) for a packed batch (``data.packing``), None otherwise.

    Pass it to ``GPTModel.forward(..., packed_seq_params=...)``: Transformer Engine's
    attention (GPU) or :class:`SDPAttention` (CPU) keep tokens inside their sequence, and
    RoPE restarts at every ``cu_seqlens`` boundary (learned positions read ``position_ids``).
    """
    cu_seqlens = getattr(batch, "cu_seqlens", None)
    if cu_seqlens is None:
        return None
    cu_seqlens = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen
    )


# ----------------------------------------------------------------------------- rollouts with a KV cache
#
# The rollout engine (rollout/engine.py) runs the layers itself and keeps its own cache,
# one row per batch slot: ``key_cache``/``value_cache`` ``[slots, ng, length, hn]``. Rows
# have their own positions, so prompts of different lengths are prefilled whole (right
# padding) and then decode side by side. Both functions take Megatron's ``[s, b, heads, hn]``
# layout (after RoPE) and return ``[s, b, np * hn]``, like the core attention above.


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention over a right-padded chunk that starts at position 0.

    ``query`` ``[s, b, np, hn]``, ``key``/``value`` ``[s, b, ng, hn]``. Row ``i``'s real
    tokens are its first ``L_i``; a real query ``t < L_i`` only sees keys ``<= t``, so the
    padding after it never reaches a real token and needs no mask (its own outputs are
    garbage the caller ignores).
    """
    sq, b, heads, hn = query.shape
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    groups = k.shape[1]
    if groups != heads:
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def decode_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, key_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One new token per row against that row's cached keys.

    ``query`` ``[1, b, np, hn]``; ``key_cache``/``value_cache`` ``[b, ng, sk, hn]`` (this
    step's key already written); ``key_mask`` ``[b, sk]`` True on the keys row ``i`` may
    attend to (its positions ``<= pos_i``). Grouped-query attention without copying the
    cache: the ``np / ng`` query heads of a group are laid out as that group's queries
    (Megatron orders the heads of group ``g`` as ``g * np/ng ... (g+1) * np/ng - 1``).
    """
    _, b, heads, hn = query.shape
    groups = key_cache.shape[1]
    q = query.reshape(b, groups, heads // groups, hn)
    out = F.scaled_dot_product_attention(q, key_cache, value_cache, attn_mask=key_mask[:, None, None, :], scale=scale)
    return out.reshape(1, b, heads * hn)
