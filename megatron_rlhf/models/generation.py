"""Batched sampling from our GPTModel with Megatron-Core's static KV cache (PPO rollouts).

    gen = generate(policy, prompts, max_new_tokens=64, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    batch = gen.to_batch(pad_id=tok.pad_id)   # tokens / attention_mask / response_mask [b, s]

How the loop works (:func:`generate`). Prompts of different lengths are NOT left-padded
(left padding would shift learned positions and RoPE phases per row and needs an attention
mask on every step). Instead, with ``L_min`` the shortest prompt:

1. prefill: one forward over ``tokens[:, :L_min]`` (the part every row has) into a
   ``StaticInferenceContext``; ``runtime_gather_output=True`` (Megatron asserts it in
   inference mode) gives the full-vocabulary logits of the last position only, ``[b, 1, V]``;
   ``sequence_len_offset += L_min``;
2. decode: for ``t = L_min, L_min + 1, ...`` the logits of position ``t - 1`` predict the
   token at ``t``. A row still inside its prompt (``t < L_i``) keeps its own prompt token
   ("forcing"), a generating row takes the sampled token, a finished row takes ``pad_id``.
   The new column ``tokens[:, t]`` is then fed as a ``[b, 1]`` step with position id ``t``
   and ``sequence_len_offset += 1``. Megatron's static engine forces prompts the same way.

Every row thus sees exactly its own tokens at positions ``0..t`` with a causal mask, which
is why :func:`full_recompute_generate` (the whole prefix re-run each step, no cache) is an
exact reference, used by the tests.

Stopping: a row stops at ``eos_id`` (the eos is part of its response), at
``max_new_tokens``, or at the model's context length (``seq_length``) -- responses are cut
there, and ``Generation.finished`` tells which rows ended with eos. The loop ends as soon as
no row needs another token.

Tensor parallelism: every TP rank runs the same forwards (the collectives inside the model
require it) and must pick the same token. The gathered logits are in principle identical
on all TP ranks, but sampling is discontinuous, so we do not rely on bitwise equality:
each rank samples (so every rank's generator advances the same way and stays in step),
then the tokens chosen by TP rank 0 are broadcast over the TP group and used everywhere.
Prompts must be identical across the ranks of a TP group (as every Megatron input is).

Pipeline parallelism: every step (the prefill and each decode column) runs through the
stages in turn. Stage ``i > 0`` receives the ``[s, b, h]`` hidden states of stage ``i - 1``
(Megatron's ``recv_from_prev_pipeline_rank_``), hands them to its layers with
``set_input_tensor`` and writes its own layers' keys and values into its own
``StaticInferenceContext`` (each stage caches only its layers), then sends its output on
(``send_to_next_pipeline_rank``). The last stage computes the logits and samples (with TP,
TP rank 0's choice as above); the chosen column is then broadcast from the last stage over
the pipeline group, so every stage forces/records the same tokens, takes the same stopping
decision and feeds the same column at the next step. Only the last stage draws from
``generator`` (other stages leave theirs untouched), so a run with the same generator picks
the same tokens at any PP size. One batch goes through the stages at a time (no micro-batch
interleaving across stages during decoding).

Sequence parallelism is refused (the static context slices the last token of the sequence-
sharded hidden states); reward/value models (scalar head) cannot generate.

Padded vocabulary ids (``>= vocab_size``, untrained embedding-padding rows) are never
sampled: their logits are masked before greedy/top-k/top-p/sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_rlhf.models.logprobs import mask_padded_vocab

# ----------------------------------------------------------------------------- results


@dataclass
class RolloutBatch:
    """Right-padded tensors of a :class:`Generation`, for scoring by policy/reference/RM/critic.

    ``tokens`` ``[b, s]`` int64: prompt + response, then ``pad_id``.
    ``attention_mask`` ``[b, s]`` bool: True on real (prompt or response) tokens.
    ``response_mask`` ``[b, s]`` bool: True on generated tokens, up to and including eos.
    ``prompt_lengths``, ``response_lengths`` ``[b]`` int64.

    Log-probs computed from ``logits[:, :-1]`` against ``tokens[:, 1:]`` line up with
    ``response_mask[:, 1:]``; a reward model reads the last real token, index
    ``prompt_lengths + response_lengths - 1``.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor


@dataclass
class Generation:
    """What :func:`generate` returns, one entry per prompt, in prompt order.

    ``sequences[i]`` is prompt ``i`` followed by its response (eos included when it ended
    with one; no padding). ``finished[i]`` is True when the response ended with eos (False:
    cut by ``max_new_tokens`` or the context length).
    """

    sequences: List[List[int]]
    prompt_lengths: List[int]
    response_lengths: List[int]
    finished: List[bool]

    @property
    def responses(self) -> List[List[int]]:
        return [seq[p:] for seq, p in zip(self.sequences, self.prompt_lengths)]

    def to_batch(self, pad_id: int = 0, length: Optional[int] = None, device=None) -> RolloutBatch:
        return padded_batch(self, pad_id=pad_id, length=length, device=device)


def padded_batch(generation: Generation, pad_id: int = 0, length: Optional[int] = None, device=None) -> RolloutBatch:
    """Right-pad ``generation`` into ``[b, s]`` tensors (see :class:`RolloutBatch`).

    ``length``: ``s``; default the longest sequence (a larger value gives fixed shapes).
    """
    lengths = [len(seq) for seq in generation.sequences]
    s = max(lengths, default=0) if length is None else length
    if lengths and max(lengths) > s:
        raise ValueError(f"padded_batch: length={s} is shorter than the longest sequence ({max(lengths)})")
    b = len(lengths)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    for i, seq in enumerate(generation.sequences):
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    idx = torch.arange(s).unsqueeze(0)
    prompt = torch.tensor(generation.prompt_lengths, dtype=torch.long).reshape(b, 1)
    response = torch.tensor(generation.response_lengths, dtype=torch.long).reshape(b, 1)
    batch = RolloutBatch(
        tokens=tokens,
        attention_mask=idx < prompt + response,
        response_mask=(idx >= prompt) & (idx < prompt + response),
        prompt_lengths=prompt.reshape(b),
        response_lengths=response.reshape(b),
    )
    if device is not None:
        batch = RolloutBatch(*(t.to(device) for t in (batch.tokens, batch.attention_mask, batch.response_mask,
                                                      batch.prompt_lengths, batch.response_lengths)))
    return batch


# ----------------------------------------------------------------------------- sampling


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Pick one token per row from full-vocabulary logits.

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
        ``[b]`` int64 token ids, on ``logits``' device.
    """
    _check_sampling(temperature, top_k, top_p)
    logits = mask_padded_vocab(logits.float(), vocab_size)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
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
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and probs.device != generator.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- the loop


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (their forward passes through)."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    return inner


def _check_can_generate(model) -> None:
    inner = _unwrap(model)
    if getattr(inner, "rlhf_scalar_head", False):
        raise ValueError("this model has a scalar (reward/value) head and cannot generate tokens")
    if getattr(inner.config, "sequence_parallel", False):
        raise ValueError("generation does not support parallel.sequence_parallel=true; build the rollout model without it")


def _pipeline_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def _is_last_stage() -> bool:
    from megatron.core import parallel_state

    return _pipeline_size() == 1 or parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def _stage_forward(model, inner, tokens: torch.Tensor, positions: torch.Tensor, ctx) -> Optional[torch.Tensor]:
    """One forward of this rank's pipeline stage over ``tokens`` ``[b, s]``.

    Returns the TP-gathered logits ``[b, s or 1, V]`` on the last stage, None on the others
    (which pass their hidden states on to the next stage).
    """
    kwargs = {"runtime_gather_output": True}
    if ctx is not None:
        kwargs["inference_context"] = ctx
    if _pipeline_size() == 1:
        return model(tokens, positions, None, **kwargs)
    from megatron.core import parallel_state
    from megatron.core.inference.communication_utils import recv_from_prev_pipeline_rank_, send_to_next_pipeline_rank

    if not parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        config = inner.config
        hidden = torch.empty(
            (tokens.shape[1], tokens.shape[0], config.hidden_size),
            dtype=config.pipeline_dtype or config.params_dtype,
            device=tokens.device,
        )
        recv_from_prev_pipeline_rank_(hidden)
        inner.set_input_tensor(hidden)
    output = model(tokens, positions, None, **kwargs)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return output
    send_to_next_pipeline_rank(output.contiguous())
    return None


def _share_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Make every rank of the model-parallel group use the last stage's TP rank 0's choice.

    ``tokens`` ``[b]`` int64: the sampled ids on the last pipeline stage; a buffer of the
    same shape elsewhere (see the module docstring).
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return tokens
    if _is_last_stage() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            tokens,
            src=parallel_state.get_tensor_model_parallel_src_rank(),
            group=parallel_state.get_tensor_model_parallel_group(),
        )
    if _pipeline_size() > 1:
        torch.distributed.broadcast(
            tokens,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return tokens


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
    use_kv_cache: bool = True,
) -> Generation:
    """Sample a response for every prompt with a KV cache (see the module docstring).

    Args:
        model: our GPTModel (``build_model``, language-model head; possibly DDP-wrapped),
            this rank's TP/PP shard; every rank of the model-parallel group calls with the
            same arguments. Put in eval mode for the call
            and restored to its previous mode afterwards; runs under ``torch.no_grad()``.
        prompts: ``b`` lists of token ids (lengths may differ; at least one token each).
        max_new_tokens: the most tokens to generate per prompt (eos included).
        eos_id: stop a row when it emits this id; None: never stop early.
        pad_id: fills finished rows (never part of ``Generation.sequences``).
        temperature, top_k, top_p, generator: see :func:`sample_tokens`. Greedy: temperature=0.
        vocab_size: the real vocabulary (padded ids are never sampled); default
            ``model.rlhf_vocab_size``.
        use_kv_cache: False re-runs the whole prefix every step
            (:func:`full_recompute_generate`).

    Returns:
        :class:`Generation`; use ``.to_batch()`` for ``[b, s]`` tensors.
    """
    _check_can_generate(model)
    # checked on every rank: under PP only the last stage samples, the others would wait for it
    _check_sampling(temperature, top_k, top_p)
    inner = _unwrap(model)
    if vocab_size is None:
        vocab_size = getattr(inner, "rlhf_vocab_size", None)
    prompts = [[int(x) for x in p] for p in prompts]
    if not prompts:
        return Generation([], [], [], [])
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    context = int(inner.max_sequence_length)
    too_long = [i for i, n in enumerate(lengths) if n >= context]
    if too_long and max_new_tokens > 0:
        raise ValueError(
            f"prompt(s) {too_long[:5]} have >= {context} tokens (model.seq_length): no room to generate; "
            "truncate prompts to leave room for the response"
        )
    # Each row's response is cut at the context length.
    budgets = [min(max_new_tokens, context - n) for n in lengths]
    total = max(n + k for n, k in zip(lengths, budgets))

    device = next(inner.parameters()).device
    tokens = torch.full((b, total), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    positions = torch.arange(total, device=device).unsqueeze(0).expand(b, total)
    prompt_len = torch.tensor(lengths, device=device)
    end = torch.tensor([n + k for n, k in zip(lengths, budgets)], device=device)  # exclusive
    done = torch.zeros(b, dtype=torch.bool, device=device)  # ended with eos
    response_len = torch.zeros(b, dtype=torch.long, device=device)

    start = min(lengths)
    ctx = None
    if use_kv_cache and max_new_tokens > 0:
        from megatron.core.inference.contexts import StaticInferenceContext

        ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=total)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for t in range(start, total if max_new_tokens > 0 else start):
                # with the cache: prefill the common prefix once, then one column at a time
                lo = 0 if ctx is None or t == start else t - 1
                logits = _stage_forward(model, inner, tokens[:, lo:t], positions[:, lo:t], ctx)
                if ctx is not None:
                    ctx.sequence_len_offset += t - lo
                    if t >= max(lengths):
                        ctx.enable_decode_mode()  # every row is generating now
                if logits is not None:  # the last pipeline stage
                    # logits[:, -1]: [b, V], the distribution of the token at t
                    sampled = sample_tokens(logits[:, -1, :], temperature, top_k, top_p, generator, vocab_size)
                    sampled = sampled.to(torch.long).contiguous()
                else:
                    sampled = torch.empty(b, dtype=torch.long, device=device)
                sampled = _share_tokens(sampled)

                in_prompt = t < prompt_len
                generating = ~in_prompt & ~done & (t < end)
                tokens[:, t] = torch.where(in_prompt, tokens[:, t], torch.where(generating, sampled, pad_id))
                response_len += generating.long()
                if eos_id is not None:
                    done |= generating & (sampled == eos_id)
                # another step only if some row still has prompt to force or room to generate
                if not bool(((t + 1 < prompt_len) | (~done & (t + 1 < end))).any()):
                    break
    finally:
        model.train(was_training)

    rows = tokens.tolist()
    resp = response_len.tolist()
    return Generation(
        sequences=[rows[i][: lengths[i] + resp[i]] for i in range(b)],
        prompt_lengths=lengths,
        response_lengths=resp,
        finished=done.tolist(),
    )


def full_recompute_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options) -> Generation:
    """:func:`generate` without a KV cache: the whole prefix runs through the model every step.

    Quadratic cost; the reference the KV-cache path is tested against (same loop, same
    sampling calls, so the same generator state gives the same draws). Takes the keyword
    arguments of :func:`generate`.
    """
    return generate(model, prompts, max_new_tokens, use_kv_cache=False, **options)
