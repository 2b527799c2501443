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
   pipeline size from ``PIPELINE_MIN_SLOTS`` slots on, else one). The engine runs in ticks; at tick ``t`` stage ``r`` works on what stage
   0 started at tick ``t - r`` (group ``(t - r) mod M``), so with ``M >= PP`` every stage is
   busy with a different group at once, instead of one batch walking through the stages
   while the others wait. Hidden states go to the next stage with ``isend``/``irecv``; at
   the end of each tick the last stage broadcasts the tokens it sampled over the pipeline
   group, so every stage keeps the same bookkeeping and schedules the same next tick.
   The last stage draws its sampling noise while the hidden states are on their way.

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

from collections import deque
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_rlhf.models.builder import unwrap
from megatron_rlhf.rollout.results import Generation
from megatron_rlhf.rollout.sampling import _check_sampling, prompt_seeds, sample_rows
from megatron_rlhf.rollout.stage import _check_can_generate, _checked_prompts, _pipeline_rank, _pipeline_size, _Stage

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


# Slots from which a rollout's default splits them into one group per pipeline stage: a decode
# step of this many rows is Megatron-LM's threshold for the same choice in its text generation
# (inference_batch_times_seqlen_threshold = 512 tokens); not measured here on a GPU.
PIPELINE_MIN_SLOTS = 512

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

    def __init__(self, seeds, temperature, top_k, top_p, vocab_size, padded_vocab_size):
        self.seeds, self.generators = seeds, {}
        self.temperature, self.top_k, self.top_p, self.vocab_size = temperature, top_k, top_p, vocab_size
        # the columns a draw needs noise for: the real vocabulary (the logits are cut to it)
        self.width = padded_vocab_size if vocab_size is None else min(vocab_size, padded_vocab_size)

    def noise(self, prompt_ids: List[int]) -> Optional[torch.Tensor]:
        """``[len(prompt_ids), width]`` Exponential(1) draws, the next of each prompt's stream
        (None when greedy). It needs no logits, so a later pipeline stage draws it while it
        waits for the previous stage's hidden states."""
        if self.temperature == 0:
            return None
        noise = torch.empty((len(prompt_ids), self.width))
        for row, i in enumerate(prompt_ids):
            gen = self.generators.get(i)
            if gen is None:
                gen = self.generators[i] = torch.Generator().manual_seed(self.seeds[i])
            torch.rand(self.width, generator=gen, out=noise[row])
        # -log(u), u uniform: Exponential(1), three times faster than exponential_ on CPU
        # (u = 0 gives q = inf: that token sits out one draw, with probability 2^-24)
        return noise.log_().neg_()

    def __call__(self, logits: torch.Tensor, noise: Optional[torch.Tensor]):
        return sample_rows(logits, noise, self.temperature, self.top_k, self.top_p, self.vocab_size)


def _run_forward(stage: _Stage, fwd: _Forward, caches, sends: list, sampler: _Sampler):
    """Run ``fwd`` through this rank's stage: receive, compute, send on (or sample, last stage)."""
    import torch.distributed as dist

    n, s = fwd.tokens.shape
    noise = None
    if stage.first:
        x = stage.embed(fwd.tokens, fwd.positions)
    else:
        from megatron.core import parallel_state

        x = torch.empty((s, n, stage.config.hidden_size), dtype=stage.config.pipeline_dtype or stage.dtype, device=stage.device)
        receiving = dist.irecv(x, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        if stage.last:  # the draws' noise while the hidden states are on their way
            noise = sampler.noise(fwd.prompt_ids)
        receiving.wait()
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
    if stage.first:
        noise = sampler.noise(fwd.prompt_ids)
    return sampler(stage.logits(hidden), noise)


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
        micro_batches: slot groups in flight through the pipeline stages (at most
            ``slots``). Default: the pipeline size when there are at least
            ``PIPELINE_MIN_SLOTS`` slots, else 1 (the batch walks through the stages in turn).
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
    inner = unwrap(model)
    if vocab_size is None:
        vocab_size = getattr(inner, "rlhf_vocab_size", None)
    context = int(inner.max_sequence_length)
    prompts = _checked_prompts(prompts, max_new_tokens, context)
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    if b == 0 or max_new_tokens == 0:
        return Generation.empty(prompts)
    slots = b if slots is None else slots
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    slots = min(slots, b)
    pp = _pipeline_size()
    if micro_batches is not None and micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    # default: split the slots over the stages only where a decode step is big enough to be bound
    # by compute; below that every group re-reads each stage's weights for nothing (measured on CPU
    # at PP=2 with 16 slots: one group 3.05 s, two 4.17 s)
    groups = min(micro_batches or (pp if slots >= PIPELINE_MIN_SLOTS else 1), slots)
    group_sizes = [slots // groups + (g < slots % groups) for g in range(groups)]
    budgets = [min(max_new_tokens, context - n) for n in lengths]
    length = max(n + k for n, k in zip(lengths, budgets))

    stage = _Stage(model, length)
    sched = _Scheduler(prompts, budgets, group_sizes, refill, eos_id, pad_id, use_kv_cache, length, stage.device)
    sampler = _Sampler(prompt_seeds(b, seeds, generator), temperature, top_k, top_p, vocab_size, inner.vocab_size)
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
