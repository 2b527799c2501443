"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Under tensor parallelism the output layer leaves each rank with a slice of the logits,
``[b, s, V/tp]`` (``parallel_output=True``): rank ``r`` holds vocabulary ids
``[r * V/tp, (r+1) * V/tp)``. Gathering the full ``[b, s, V]`` for a 50k-256k vocabulary
would cost ``tp`` times the memory of the logits, so both functions here work on the
slice and combine per-token scalars with all-reduces over the TP group:

* :func:`token_logprobs` is ``-vocab_parallel_cross_entropy`` (Megatron-Core's own
  autograd function: max, predicted-logit and sum-exp all-reduces);
* :func:`vocab_parallel_entropy` is our :class:`_VocabParallelEntropy` (max, sum-exp and
  sum p*z all-reduces), since Megatron-Core 0.16 has no entropy helper.

Embedding padding. The vocabulary is padded to a multiple of
``make_vocab_size_divisible_by`` (``builder.padded_vocab_size``); the extra rows of the
output layer are never a training target, so they stay at their random initialisation.
Their logits are not small, and every one of them would take a share of the softmax
mass: log-probs of real tokens would be biased low, the entropy biased high, the KL
penalty would compare policy and reference on tokens neither can produce, and sampling
could emit an id the tokenizer cannot decode. Given the real ``vocab_size``, both
functions therefore replace the logits of ids ``>= vocab_size`` with a large negative
number on the rank that holds them, before the softmax: those ids get probability 0
(exactly, in fp32) and no gradient.

Both functions also run without ``torch.distributed`` (plain ``log_softmax``), so pure
maths and unit tests need no process group.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_rlhf.algorithms.sft import token_logprobs_from_logits

# exp(NEG_LOGIT - max) underflows to exactly 0 in fp32, while NEG_LOGIT * 0 stays 0 (with
# -inf it would be nan in the entropy's sum of p * z).
NEG_LOGIT = -1.0e30


def _tp_info() -> Tuple[Optional[torch.distributed.ProcessGroup], int, int]:
    """(TP group or None, TP rank, TP world size); no group when running without Megatron's state."""
    from megatron.core import parallel_state

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None, 0, 1
    if not parallel_state.model_parallel_is_initialized():
        return None, 0, 1
    return (
        parallel_state.get_tensor_model_parallel_group(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def padding_vocab_mask(
    partition_vocab_size: int, vocab_size: Optional[int], tp_rank: int, device=None
) -> Optional[torch.Tensor]:
    """``[V/tp]`` bool, True on this rank's columns whose global id is ``>= vocab_size``.

    Returns None when nothing on this rank is padding (or ``vocab_size`` is None).
    """
    if vocab_size is None:
        return None
    start = tp_rank * partition_vocab_size
    if start + partition_vocab_size <= vocab_size:
        return None
    ids = torch.arange(start, start + partition_vocab_size, device=device)
    return ids >= vocab_size


def mask_padded_vocab(logits_local: torch.Tensor, vocab_size: Optional[int], tp_rank: int = 0) -> torch.Tensor:
    """``logits_local`` with the padded vocabulary columns set to ``NEG_LOGIT`` (out of place).

    Args:
        logits_local: ``[..., V/tp]`` this rank's slice (the whole vocabulary when ``tp = 1``
            or after a gather: pass ``tp_rank=0`` then).
        vocab_size: the real (tokenizer) vocabulary size; None leaves the logits alone.
        tp_rank: which slice ``logits_local`` is.

    Returns a new tensor when something was masked, else ``logits_local`` itself.
    """
    mask = padding_vocab_mask(logits_local.shape[-1], vocab_size, tp_rank, logits_local.device)
    if mask is None:
        return logits_local
    return logits_local.masked_fill(mask, NEG_LOGIT)


def token_logprobs(
    logits_local: torch.Tensor, targets: torch.Tensor, vocab_size: Optional[int] = None, temperature: float = 1.0
) -> torch.Tensor:
    """log p(target) of every position, from vocab-parallel logits; differentiable.

    Args:
        logits_local: ``[b, s, V/tp]`` this TP rank's logits (any float dtype; computed in fp32).
            Position ``t`` holds the distribution of the token at ``t + 1``; align ``targets``
            accordingly (usually ``targets = input_ids[:, 1:]`` against ``logits[:, :-1]``).
        targets: ``[b, s]`` int64 global token ids. Ids outside ``[0, V)`` (e.g. -100) do not
            fail; their value is meaningless and the caller's mask must drop them.
        vocab_size: the real vocabulary size: ids ``>= vocab_size`` get no probability mass.
            None: use every column (no padding, or the caller masked already).
        temperature: the log-probs of ``softmax(logits / temperature)``, the distribution
            a rollout sampled from (before its top-k/top-p truncation, as verl and
            OpenRLHF score rollouts; ``Generation.logprobs`` is the same quantity). 0 (greedy
            rollouts) and 1 leave the logits as they are.

    Returns:
        ``[b, s]`` fp32 log-probs, identical on every TP rank.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    group, rank, world = _tp_info()
    # A fresh fp32 copy: Megatron's vocab_parallel_cross_entropy subtracts the max and
    # exponentiates its fp32 input in place, which would corrupt the caller's logits
    # (and the autograd graph, if they are reused for the entropy or a KL term).
    logits = logits_local.to(torch.float32, copy=True)
    if temperature not in (0, 1):
        logits.div_(temperature)  # differentiable: the copy is a fresh node
    logits = mask_padded_vocab(logits, vocab_size, rank)
    if group is None:
        # Single process without Megatron's state: the same maths, unsharded.
        return token_logprobs_from_logits(logits, targets.clamp(0, logits.shape[-1] - 1))
    from megatron.core import tensor_parallel

    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


class _VocabParallelEntropy(torch.autograd.Function):
    """Entropy ``H = -sum_v p_v log p_v`` over a vocabulary split across the TP group.

    With ``m`` the global max, ``S = sum_v exp(z_v - m)`` and ``p = exp(z - m) / S``:
    ``H = log S - sum_v p_v (z_v - m)``. Gradient: ``dH/dz_v = -p_v (z_v - E_p[z])``, of
    which each rank computes its own columns from the all-reduced ``E_p[z]``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, group) -> torch.Tensor:
        m = logits.max(dim=-1).values
        if group is not None:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
        shifted = logits - m.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            torch.distributed.all_reduce(sum_exp, group=group)
        p = exp.div_(sum_exp.unsqueeze(-1))
        mean_shifted = (p * shifted).sum(dim=-1)  # E_p[z - m]
        if group is not None:
            torch.distributed.all_reduce(mean_shifted, group=group)
        ctx.save_for_backward(p, shifted, mean_shifted)
        return sum_exp.log() - mean_shifted

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        p, shifted, mean_shifted = ctx.saved_tensors
        # The max shift cancels: z - E_p[z] = (z - m) - E_p[z - m].
        grad = -p * (shifted - mean_shifted.unsqueeze(-1)) * grad_out.unsqueeze(-1)
        return grad, None


def vocab_parallel_entropy(logits_local: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Entropy of the next-token distribution at every position; differentiable.

    Args:
        logits_local: ``[b, s, V/tp]`` this TP rank's logits (computed in fp32; not modified).
        vocab_size: the real vocabulary size: padded ids ``>= vocab_size`` are excluded
            (probability 0). None: use every column.

    Returns:
        ``[b, s]`` fp32 entropies in nats, identical on every TP rank.
    """
    group, rank, world = _tp_info()
    logits = mask_padded_vocab(logits_local.float(), vocab_size, rank)
    return _VocabParallelEntropy.apply(logits, group if world > 1 else None)
