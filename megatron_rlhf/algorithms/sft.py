"""Supervised fine-tuning maths: masked token means and the SFT negative log-likelihood.

Mask convention (shared by the whole ``algorithms`` package): a ``*_mask`` tensor is
bool or float and is True/1 where a token COUNTS.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

Number = Union[int, float]
TokenCount = Optional[Union[Number, torch.Tensor]]
# What a loss builder returns to Megatron's schedule (``models/schedule.py``): this micro-batch's
# loss SUM, the number of units it covers (tokens, prompts) and {metric: (sum, count)}. The
# schedule divides by the global count (summed over micro-batches and data-parallel ranks).
LossReport = Tuple[torch.Tensor, Union[int, torch.Tensor], Dict[str, Tuple[torch.Tensor, Union[int, torch.Tensor]]]]
# ``num_tokens=AS_SUM`` makes a masked mean return the masked sum: the global division is the schedule's.
AS_SUM = 1.0


def mask_denominator(mask: torch.Tensor, num_tokens: TokenCount = None, dtype: torch.dtype = torch.float32):
    """Denominator of a masked mean: ``num_tokens`` if given, else the local mask sum.

    Clamped to at least 1 so a shard (or micro-batch) with no counted tokens yields a
    zero contribution instead of NaN.
    """
    if num_tokens is None:
        return mask.to(dtype).sum().clamp(min=1.0)
    if isinstance(num_tokens, torch.Tensor):
        return num_tokens.to(dtype).clamp(min=1.0)
    return max(float(num_tokens), 1.0)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: TokenCount = None) -> torch.Tensor:
    """Mean of ``values`` over the tokens where ``mask`` is True.

    Args:
        values: any shape, e.g. ``[batch, seq]``.
        mask: same shape as ``values``; True/1 where a token counts.
        num_tokens: denominator to use instead of the local ``mask.sum()``. Under data
            parallelism pass the GLOBAL token count: each rank then returns
            ``local_sum / global_count`` and the ranks' results sum to the global mean.

    Returns:
        A scalar tensor.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}")
    mask_f = mask.to(values.dtype)
    return (values * mask_f).sum() / mask_denominator(mask, num_tokens, values.dtype)


def token_logprobs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_ids) under ``softmax(logits)``, for unsharded (single-device) vocabularies.

    Args:
        logits: ``[..., vocab]``.
        token_ids: ``[...]`` integer ids, already aligned with ``logits`` (i.e. shifted
            by the caller so position t scores token t+1).

    Returns:
        ``[...]`` log-probabilities, same dtype as ``logits``.
    """
    # gather-then-logsumexp avoids materialising a second [..., vocab] log_softmax tensor
    chosen = logits.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def sft_loss(
    token_nll: torch.Tensor, loss_mask: torch.Tensor, num_tokens: TokenCount = None
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """SFT objective: mean negative log-likelihood over response tokens.

    ``loss = sum_t nll_t * mask_t / N`` with ``N = num_tokens`` or the local mask sum.
    The same function serves the PPO-ptx pretraining term (InstructGPT eq. 2, the
    ``gamma * E[log pi(x)]`` part) with a mask covering every non-pad token.

    Args:
        token_nll: ``[batch, seq]`` per-token negative log-likelihood (``-token_logprobs``).
        loss_mask: ``[batch, seq]``; True on response tokens (prompt and padding False).
        num_tokens: global denominator under data parallelism (see ``masked_token_mean``).

    Returns:
        ``(loss, metrics)``; metrics hold detached ``nll`` (same value as loss) and the
        local ``num_tokens`` so callers can all-reduce it.
    """
    loss = masked_token_mean(token_nll, loss_mask, num_tokens)
    metrics = {
        "nll": loss.detach(),
        "num_tokens": loss_mask.to(torch.float32).sum().detach(),
    }
    return loss, metrics


def sft_report(token_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> LossReport:
    """The SFT loss as the schedule takes it: ``sum_t nll_t * mask_t`` over this micro-batch,
    counted in response tokens, so the step is the global token mean of :func:`sft_loss`.

    Args:
        token_logprobs: ``[batch, seq]`` log p(target) (``models.logprobs.token_logprobs``:
            padded vocabulary ids excluded).
        loss_mask: ``[batch, seq]``; True on response tokens.
    """
    loss_sum, _ = sft_loss(-token_logprobs, loss_mask, num_tokens=AS_SUM)
    count = loss_mask.sum()
    return loss_sum, count, {"loss": (loss_sum.detach(), count)}
