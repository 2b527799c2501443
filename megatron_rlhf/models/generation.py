"""The rollout engine: sampling from our GPTModel with a per-slot KV cache (PPO rollouts).

    gen = generate(policy, prompts, max_new_tokens=64, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    batch = gen.to_batch(pad_id=tok.pad_id)   # tokens / attention_mask / response_mask [b, s]
    gen = rollout(policy, prompts, 64, slots=16, seeds=seeds)   # continuous batching

How it works. The engine runs this rank's layers itself (embedding, then per layer: norm,
Megatron's QKV projection, RoPE at each row's own positions, our attention against our own
cache, Megatron's output projection and MLP, then the final norm and the output layer), so
it needs no ``StaticInferenceContext`` and no Megatron inference path: every row of the
batch ("slot") has its own position.

1. prefill: the prompts that enter slots are right-padded into one ``[n, L_max]`` chunk and
   run causally from position 0; each row's keys/values are written into its slot of the
   cache (``[slots, ng, length, hn]`` per layer, ``attention.prefill_attention``). Only the
   last real position of each row goes through the output layer ("logits gather"), and
   the first response token is sampled from it. No prompt is ever forced in token by token.
2. decode: every slot feeds its newest token at its own position ``p_i``; the step writes
   its key/value at ``p_i`` and attends to keys ``<= p_i`` (``attention.decode_attention``,
   a ``[b, sk]`` key mask). Idle slots ride along and write to a scratch column.
3. continuous batching (:func:`rollout` with ``slots < len(prompts)``): a slot whose
   response ended (eos, ``max_new_tokens`` or the context length) takes the next waiting
   prompt at the group's next step (its prefill runs beside the others' decode step).
   ``refill=False`` is plain static batching: a group of slots takes new prompts only
   when all of its rows are done (the baseline the benchmark compares with).
4. pipeline parallelism: the slots are split into ``micro_batches`` groups (default: the
   pipeline size). The engine runs in ticks; at tick ``t`` stage ``r`` works on what stage
   0 started at tick ``t - r`` (group ``(t - r) mod M``), so with ``M >= PP`` every stage is
   busy with a different group at once, instead of one batch walking through the stages
   while the others wait. Hidden states go to the next stage with ``isend``/``irecv``; at
   the end of each tick the last stage broadcasts the tokens it sampled over the pipeline
   group, so every stage keeps the same bookkeeping and schedules the same next tick.

Sampling. Each prompt has its own random stream: a ``torch.Generator`` seeded with
``seeds[i]`` (or with a seed drawn once per prompt from ``generator``; from torch's global
generator when neither is given). A token is drawn by the exponential race
(:func:`sample_rows`) with noise from the prompt's stream. So the tokens of a prompt do
not depend on the batch it shares, the slot it lands in, the number of slots or
micro-batches, or the TP/PP layout: a rollout gives the same tokens as generating each
prompt alone with the same seed (up to float rounding of the logits in a different batch
shape, which moves a draw only when two candidates tie within that rounding).

:func:`full_recompute_generate` runs the same schedule and the same draws with no cache
(every step re-runs each row's whole prefix through the model's layers): the exact
reference the tests compare with.

Tensor parallelism: every TP rank runs the same forwards (the collectives inside the
model require it); each samples with its own copy of the streams and TP rank 0's tokens
are broadcast over the TP group. Prompts must be identical across the ranks of a model-
parallel group (as every Megatron input is).

Log-probs (:attr:`Generation.logprobs`): for each generated token, its log-probability
under the distribution it was sampled from *before* top-k/top-p truncation, i.e.
``log_softmax(logits / temperature)`` over the real vocabulary (temperature 0, greedy:
``temperature = 1``). verl and OpenRLHF score rollouts the same way; PPO's old/new
log-probs should use :func:`megatron_rlhf.models.logprobs.token_logprobs` with the same
``temperature`` so the ratio and the KL compare like with like.

Sequence parallelism is refused; reward/value models (scalar head) cannot generate.
Padded vocabulary ids (``>= vocab_size``, untrained embedding-padding rows) are never
sampled: the logits are cut to the real vocabulary before greedy/top-k/top-p/sampling.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from megatron_rlhf.models.attention import decode_attention, prefill_attention
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
    cut by ``max_new_tokens`` or the context length). ``logprobs[i]`` has one float per
    response token: its log-prob under the tempered, untruncated distribution it was
    sampled from (see the module docstring); not compared by ``==`` (float rounding).
    """

    sequences: List[List[int]]
    prompt_lengths: List[int]
    response_lengths: List[int]
    finished: List[bool]
    logprobs: Optional[List[List[float]]] = field(default=None, compare=False)

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


# ----------------------------------------------------------------------------- the model, layer by layer


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
    config = inner.config
    if getattr(config, "sequence_parallel", False):
        raise ValueError("generation does not support parallel.sequence_parallel=true; build the rollout model without it")
    unsupported = [name for name in ("apply_residual_connection_post_layernorm", "rotary_interleaved",
                                     "multi_latent_attention", "fp8") if getattr(config, name, False)]
    kind = getattr(inner, "position_embedding_type", "learned_absolute")
    if kind not in ("rope", "learned_absolute", "none"):
        unsupported.append(f"position_embedding_type={kind}")
    if unsupported:
        raise ValueError(f"models/generation.py: the rollout engine does not support {', '.join(unsupported)}; "
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
        inner = _unwrap(model)
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


# ----------------------------------------------------------------------------- the schedule


@dataclass
class _Forward:
    """One forward of one slot group through the stages (built identically on every rank).

    ``kind``: "prefill" (rows ``rows`` of the cache from position 0), "decode" (every slot
    of the group, one token each) or "full" (no cache: each row's whole prefix).
    ``tokens``/``positions`` ``[n, s]``; ``last`` ``[n]``: the column whose output is
    sampled (prefill/full); ``sampled`` ``[k]``: the rows that sample (decode; all rows
    otherwise); ``prompt_ids``: the prompt of each sampled row, in order.
    """

    kind: str
    group: int
    tokens: torch.Tensor
    positions: torch.Tensor
    prompt_ids: List[int]
    slot_ids: List[int]
    rows: Optional[torch.Tensor] = None
    last: Optional[torch.Tensor] = None
    sampled: Optional[torch.Tensor] = None
    write: Optional[torch.Tensor] = None
    key_mask: Optional[torch.Tensor] = None


PREFILL_PADDING = 1.25  # a prefill chunk may run at most this many times its real tokens


def _length_chunks(lengths: List[int]) -> List[List[int]]:
    """Split prompts (indices into ``lengths``) into prefill chunks of similar length.

    Right padding costs ``rows x longest`` positions; prompts sorted by length are cut into
    consecutive chunks whose padded size stays within ``PREFILL_PADDING`` of their real
    tokens, so varied prompt lengths cost about what equal ones of the same mean do.
    """
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    chunks, real = [], 0
    for k in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= PREFILL_PADDING * (real + lengths[k]):
            chunks[-1].append(k)
            real += lengths[k]
        else:
            chunks.append([k])
            real = lengths[k]
    return chunks


class _Scheduler:
    """The bookkeeping every rank keeps in step: which prompt is in which slot, the tokens so
    far, and what each group runs next."""

    def __init__(self, prompts, budgets, group_sizes, refill, eos_id, pad_id, use_cache, length, device):
        self.prompts, self.budgets = prompts, budgets
        self.sequences = [list(p) for p in prompts]
        self.logprobs: List[List[float]] = [[] for _ in prompts]
        self.finished = [False] * len(prompts)
        self.done = [False] * len(prompts)
        self.slots = [[-1] * size for size in group_sizes]
        self.queue = deque(range(len(prompts)))
        self.refill, self.eos_id, self.pad_id = refill, eos_id, pad_id
        self.use_cache, self.length, self.device = use_cache, length, device
        self.remaining = len(prompts)

    def _tensor(self, rows: List[List[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=self.device)

    def _full(self, kind, group, prompt_ids, slot_ids) -> _Forward:
        seqs = [self.sequences[i] for i in prompt_ids]
        tokens = self._tensor(seqs)
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        last = torch.tensor([len(s) - 1 for s in seqs], device=self.device)
        rows = torch.tensor(slot_ids, device=self.device) if kind == "prefill" else None
        return _Forward(kind, group, tokens, positions, list(prompt_ids), list(slot_ids), rows=rows, last=last)

    def schedule(self, g: int) -> List[_Forward]:
        """What group ``g`` runs now: a prefill for prompts entering its free slots, and a
        decode step for its slots that are generating."""
        slots = self.slots[g]
        active = [j for j, i in enumerate(slots) if i >= 0]
        admitted = []
        if self.queue and (self.refill or not active):
            for j, i in enumerate(slots):
                if i < 0 and self.queue:
                    slots[j] = self.queue.popleft()
                    admitted.append(j)
        forwards = []
        if admitted:
            kind = "prefill" if self.use_cache else "full"
            for chunk in _length_chunks([len(self.sequences[slots[j]]) for j in admitted]):
                rows = [admitted[k] for k in chunk]
                forwards.append(self._full(kind, g, [slots[j] for j in rows], rows))
        if active and not self.use_cache:
            forwards.append(self._full("full", g, [slots[j] for j in active], active))
        elif active:
            n = len(slots)
            tokens = [self.pad_id] * n
            positions = [0] * n
            write = [self.length] * n  # idle slots write to the scratch column
            for j in active:
                seq = self.sequences[slots[j]]
                tokens[j], positions[j], write[j] = seq[-1], len(seq) - 1, len(seq) - 1
            keys = max(positions[j] for j in active) + 1
            pos = torch.tensor(positions, device=self.device)
            forwards.append(_Forward(
                "decode", g, torch.tensor(tokens, device=self.device)[:, None], pos[:, None],
                [slots[j] for j in active], active,
                sampled=torch.tensor(active, device=self.device),
                write=torch.tensor(write, device=self.device),
                key_mask=torch.arange(keys, device=self.device)[None, :] <= pos[:, None],
            ))
        return forwards

    def apply(self, forwards: List[_Forward], tokens: List[int], logprobs: List[float]) -> None:
        """Record the sampled tokens of ``forwards`` (in order) and free the slots that ended."""
        k = 0
        for fwd in forwards:
            for i, j in zip(fwd.prompt_ids, fwd.slot_ids):
                token = int(tokens[k])
                self.sequences[i].append(token)
                self.logprobs[i].append(float(logprobs[k]))
                k += 1
                ended_eos = self.eos_id is not None and token == self.eos_id
                if ended_eos or len(self.sequences[i]) - len(self.prompts[i]) >= self.budgets[i]:
                    self.finished[i] = ended_eos
                    self.done[i] = True
                    self.slots[fwd.group][j] = -1
                    self.remaining -= 1


class _Sampler:
    """Draws for the last stage: one generator per prompt, created on first use."""

    def __init__(self, seeds, temperature, top_k, top_p, vocab_size):
        self.seeds, self.generators = seeds, {}
        self.temperature, self.top_k, self.top_p, self.vocab_size = temperature, top_k, top_p, vocab_size

    def __call__(self, logits: torch.Tensor, prompt_ids: List[int]):
        noise = None
        if self.temperature > 0:
            vocab = logits.shape[-1] if self.vocab_size is None else min(self.vocab_size, logits.shape[-1])
            noise = torch.empty((len(prompt_ids), vocab))
            for row, i in enumerate(prompt_ids):
                gen = self.generators.get(i)
                if gen is None:
                    gen = self.generators[i] = torch.Generator().manual_seed(self.seeds[i])
                torch.rand(vocab, generator=gen, out=noise[row])
            # -log(u), u uniform: Exponential(1), three times faster than exponential_ on CPU
            # (u = 0 gives q = inf: that token sits out one draw, with probability 2^-24)
            noise.log_().neg_()
        return sample_rows(logits, noise, self.temperature, self.top_k, self.top_p, self.vocab_size)


def _run_forward(stage: _Stage, fwd: _Forward, caches, sends: list, sampler: _Sampler):
    """Run ``fwd`` through this rank's stage: receive, compute, send on (or sample, last stage)."""
    import torch.distributed as dist

    n, s = fwd.tokens.shape
    if stage.first:
        x = stage.embed(fwd.tokens, fwd.positions)
    else:
        from megatron.core import parallel_state

        x = torch.empty((s, n, stage.config.hidden_size), dtype=stage.config.pipeline_dtype or stage.dtype, device=stage.device)
        dist.recv(x, src=parallel_state.get_pipeline_model_parallel_prev_rank())
    cache = caches[fwd.group] if fwd.kind != "full" else None
    x = stage.layers_forward(x, fwd.positions, cache, rows=fwd.rows, write=fwd.write, key_mask=fwd.key_mask)
    if not stage.last:
        from megatron.core import parallel_state

        x = x.contiguous()
        sends.append((dist.isend(x, dst=parallel_state.get_pipeline_model_parallel_next_rank()), x))
        return None
    if fwd.kind == "decode":
        hidden = x[0, fwd.sampled]
    else:
        hidden = x[fwd.last, torch.arange(n, device=x.device)]
    return sampler(stage.logits(hidden), fwd.prompt_ids)


def _share(payload: torch.Tensor) -> torch.Tensor:
    """Make every rank of the model-parallel group use the last stage's TP rank 0's draws.

    ``payload`` ``[2, k]`` float64 (tokens, log-probs): the sampled values on the last stage,
    a buffer of that shape elsewhere.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return payload
    last = _pipeline_rank() == _pipeline_size() - 1
    if last and parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(payload, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                    group=parallel_state.get_tensor_model_parallel_group())
    if _pipeline_size() > 1:
        torch.distributed.broadcast(payload, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return payload


# ----------------------------------------------------------------------------- entry points


def rollout(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    slots: Optional[int] = None,
    refill: bool = True,
    micro_batches: Optional[int] = None,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Optional[Sequence[int]] = None,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
    use_kv_cache: bool = True,
) -> Generation:
    """Sample a response for every prompt, keeping ``slots`` sequences in flight.

    Args:
        model: our GPTModel (``build_model``, language-model head; possibly DDP-wrapped),
            this rank's TP/PP shard; every rank of the model-parallel group calls with the
            same arguments. Put in eval mode for the call and restored afterwards; runs
            under ``torch.no_grad()``.
        prompts: lists of token ids (lengths may differ; at least one token each).
        max_new_tokens: the most tokens to generate per prompt (eos included); a response
            is also cut at the model's context length (``seq_length``).
        slots: sequences decoded at once (default: all prompts). Fewer slots than prompts:
            continuous batching (see ``refill``).
        refill: True: a slot whose response ended takes the next prompt at once. False:
            static batches, a group takes new prompts only when all its slots are free.
        micro_batches: slot groups in flight through the pipeline stages (default: the
            pipeline size; at most ``slots``).
        eos_id: stop a response at this id (kept as its last token); None: never early.
        pad_id: padding in the engine's tensors (never part of ``Generation.sequences``).
        temperature, top_k, top_p: see :func:`sample_tokens`; temperature 0 is greedy.
        seeds: one sampling seed per prompt (a prompt's tokens then depend on nothing
            else); default: drawn from ``generator`` (see :func:`prompt_seeds`).
        vocab_size: the real vocabulary (padded ids are never sampled); default
            ``model.rlhf_vocab_size``.
        use_kv_cache: False re-runs every row's whole prefix each step
            (:func:`full_recompute_generate`).

    Returns:
        :class:`Generation` in prompt order; ``.to_batch()`` gives ``[b, s]`` tensors.
    """
    _check_can_generate(model)
    _check_sampling(temperature, top_k, top_p)
    inner = _unwrap(model)
    if vocab_size is None:
        vocab_size = getattr(inner, "rlhf_vocab_size", None)
    prompts = [[int(x) for x in p] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    if b == 0 or max_new_tokens == 0:
        return Generation([list(p) for p in prompts], lengths, [0] * b, [False] * b, [[] for _ in prompts])
    context = int(inner.max_sequence_length)
    too_long = [i for i, n in enumerate(lengths) if n >= context]
    if too_long:
        raise ValueError(
            f"prompt(s) {too_long[:5]} have >= {context} tokens (model.seq_length): no room to generate; "
            "truncate prompts to leave room for the response"
        )
    slots = b if slots is None else slots
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    slots = min(slots, b)
    pp = _pipeline_size()
    if micro_batches is not None and micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    groups = min(micro_batches or pp, slots)
    group_sizes = [slots // groups + (g < slots % groups) for g in range(groups)]
    budgets = [min(max_new_tokens, context - n) for n in lengths]
    length = max(n + k for n, k in zip(lengths, budgets))

    stage = _Stage(model, length)
    sched = _Scheduler(prompts, budgets, group_sizes, refill, eos_id, pad_id, use_kv_cache, length, stage.device)
    sampler = _Sampler(prompt_seeds(b, seeds, generator), temperature, top_k, top_p, vocab_size)
    caches = [stage.new_cache(size) for size in group_sizes] if use_kv_cache else None
    rank = _pipeline_rank()
    history: dict = {}
    sends: list = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tick = 0
            in_flight = set()  # groups whose tokens the last stage has not sent back yet
            while sched.remaining > 0:  # a prompt in flight is not done, so this also drains the pipeline
                # with fewer groups than stages a group's turn can come before its tokens: idle tick
                group = tick % groups
                history[tick] = [] if group in in_flight else sched.schedule(group)
                if history[tick]:
                    in_flight.add(group)
                mine = history.get(tick - rank) or []
                previous_sends, sends = sends, []
                results = [_run_forward(stage, fwd, caches, sends, sampler) for fwd in mine]
                for work, _ in previous_sends:
                    work.wait()
                ending = history.pop(tick - pp + 1, None)
                if ending:
                    count = sum(len(f.prompt_ids) for f in ending)
                    if results and results[0] is not None:  # the last stage: this tick's own work
                        payload = torch.stack([torch.cat([r[0] for r in results]).double(),
                                               torch.cat([r[1] for r in results]).double()])
                    else:
                        payload = torch.empty((2, count), dtype=torch.float64, device=stage.device)
                    payload = _share(payload.contiguous()).cpu()
                    sched.apply(ending, payload[0].long().tolist(), payload[1].tolist())
                    in_flight.discard(ending[0].group)
                tick += 1
            for work, _ in sends:
                work.wait()
    finally:
        model.train(was_training)
    return Generation(
        sequences=sched.sequences,
        prompt_lengths=lengths,
        response_lengths=[len(s) - n for s, n in zip(sched.sequences, lengths)],
        finished=sched.finished,
        logprobs=sched.logprobs,
    )


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
    seeds: Optional[Sequence[int]] = None,
    micro_batches: Optional[int] = None,
) -> Generation:
    """Sample a response for every prompt, all prompts in flight at once (:func:`rollout`
    with one slot per prompt). Arguments as :func:`rollout`."""
    return rollout(model, prompts, max_new_tokens, eos_id=eos_id, pad_id=pad_id, temperature=temperature, top_k=top_k,
                   top_p=top_p, generator=generator, vocab_size=vocab_size, use_kv_cache=use_kv_cache, seeds=seeds,
                   micro_batches=micro_batches)


def full_recompute_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options) -> Generation:
    """:func:`generate` without a KV cache: each step runs every row's whole prefix.

    Quadratic cost; the reference the cached engine is tested against (same schedule, same
    draws). Takes the keyword arguments of :func:`rollout`.
    """
    return rollout(model, prompts, max_new_tokens, use_kv_cache=False, **options)
