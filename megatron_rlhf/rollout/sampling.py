"""Choosing tokens: greedy, temperature, top-k/top-p, each prompt with its own random stream
(the exponential race of :func:`sample_rows`), so a prompt's tokens do not depend on its batch."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from megatron_rlhf.models.logprobs import mask_padded_vocab

# ----------------------------------------------------------------------------- sampling


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` ``[b, V]`` (already divided by the temperature) with the tokens outside
    the top-k and outside the top-p nucleus set to ``-inf``; the most likely token always stays."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Pick one token per row from full-vocabulary logits with ``torch.multinomial``.

    Args:
        logits: ``[b, V]`` (gathered over TP; V may include embedding padding).
        temperature: 0 means greedy (argmax, first index on ties); otherwise logits are
            divided by it before top-k/top-p filtering and sampling.
        top_k: keep the k largest logits (0: off).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches
            ``top_p`` (1.0: off). The most likely token is always kept.
        generator: the ``torch.Generator`` to sample with (any device; the probabilities
            are moved to it). None: torch's global generator.
        vocab_size: ids ``>= vocab_size`` (embedding padding) are never picked.

    Returns:
        ``[b]`` int64 token ids, on ``logits``' device. (The engine itself draws with
        :func:`sample_rows`, one random stream per prompt.)
    """
    _check_sampling(temperature, top_k, top_p)
    logits = mask_padded_vocab(logits.float(), vocab_size)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(_truncate(logits / temperature, top_k, top_p), dim=-1)
    if generator is not None and probs.device != generator.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor,
    noise: Optional[torch.Tensor],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row by the exponential race, given each row's noise; and its log-prob.

    With ``q_v ~ Exponential(1)`` independent, ``argmax_v p_v / q_v`` is a draw from ``p``
    (the race ``torch.multinomial`` runs for one sample, and vLLM's sampler). A small change
    of ``p`` changes the winner only when two candidates are nearly tied, so runs whose
    policies differ slightly keep sampling the same tokens for longer than with an inverse
    CDF, where every earlier probability shifts the boundaries.

    Args:
        logits: ``[n, V]`` full-vocabulary logits (padded ids ``>= vocab_size`` are cut off).
        noise: ``[n, >= V_real]`` Exponential(1) draws, one row per logits row (unused when greedy).
        temperature, top_k, top_p: as :func:`sample_tokens`; 0 = greedy.

    Returns:
        ``tokens`` ``[n]`` int64, a function of each row's logits and noise only;
        ``logprobs`` ``[n]`` fp32: ``log_softmax(logits / T)[token]`` over the real
        vocabulary before top-k/top-p truncation (``T = 1`` when greedy).
    """
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:, :vocab_size]  # padded ids are the last columns
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return tokens, logprobs
    scaled = logits / temperature
    truncated = top_k > 0 or top_p < 1.0
    probs = torch.softmax(_truncate(scaled, top_k, top_p) if truncated else scaled, dim=-1)
    # truncated tokens have p = 0 and never win: some p_v > 0 and every q_v is finite
    tokens = (probs / noise[:, : probs.shape[-1]].to(probs.device, probs.dtype)).argmax(dim=-1)
    if truncated:
        logprobs = scaled.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)
    else:
        logprobs = probs.gather(-1, tokens[:, None])[:, 0].log()
    return tokens, logprobs


def prompt_seeds(count: int, seeds: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None) -> List[int]:
    """One sampling seed per prompt: ``seeds`` as given, else drawn from ``generator`` (one
    ``randint`` call), else from torch's global generator."""
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != count:
            raise ValueError(f"seeds has {len(seeds)} entries for {count} prompts; give one seed per prompt")
        return seeds
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (count,), generator=generator, device=device).tolist()


