"""Per-GPU memory plan for SFT, RM and PPO-ptx on Megatron-Core: ``tools/plan_memory.py``.

    tools/plan_memory.py --preset 175b --stage ppo --precision fp8 --tp 8 --pp 16 \\
        --recompute selective --sequence-parallel --distributed-optimizer --search

prints GiB per GPU by part and, on its last line, ``plan: peak_gib_per_gpu=X nodes=N``
(``nodes=0``: nothing fits). ``plan_memory(...)`` returns the same numbers as a
:class:`MemoryPlan`; ``--json`` prints it. Notation: t, p, d = tensor-, pipeline-,
data-parallel sizes; s sequence, b micro-batch, h hidden, a heads, g query groups,
k = h/a, f ffn size (f1 = 2f when SwiGLU-gated), V vocabulary padded as the builder does.

Parameters (exact; tests compare them with ``build_model``): per layer, GEMM weights
(a+2g)k*h (QKV) + a*k*h (proj) + f1*h + f*h, divided by t; gpt2 adds column-parallel
biases ((a+2g)k + f1)/t and replicated row-parallel biases 2h; norms 2x(2h) LayerNorm or
2x h RMSNorm, replicated. The first stage adds the word embedding V*h/t (+ learned
positions s*h, replicated, for gpt2); the last adds the final norm and the output layer
V*h/t, also when tied: for p>1 Megatron keeps a copy on the last stage (for p=1 it is
shared). RM and critic have a replicated scalar head (h+1) instead. Layers split evenly
over stages; every stage is evaluated and the heaviest (stage, phase) is reported.

Bytes per parameter of a trained model, as Megatron's mixed precision does it (our
trainer sets grad_reduce_in_fp32): bf16/fp8 = 2 (bf16 weights) + 4 (fp32 main grads) +
12 (fp32 master copy + Adam m, v); fp32 = 4 + 4 + 8 (no master copy). The distributed
optimizer divides the optimizer part by d (grads stay whole: they are reduce-scattered
into a full buffer). FP8 (Megatron's default recipe) keeps bf16 parameters, but
Transformer Engine caches an FP8 copy and its transpose of every transformer GEMM weight
between micro-batches: "fp8 weight cache", 2 B per GEMM weight of each resident model
(an upper bound for frozen models, which need no transpose; ``--no-fp8-weight-cache`` for
Megatron's ``disable_parameter_transpose_cache``, which re-casts every micro-batch). Frozen models (PPO
reference and reward model) hold bf16 weights only (fp32 in fp32 mode).

Activations per layer per micro-batch: Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), s*b*h*(34 + 5*a*s/h) bytes, generalised to
GQA and SwiGLU. Kept replicated over TP (split by t only with sequence parallelism): the
two norm inputs (2h x 2 B), the QKV and fc1 inputs (h x 2 B each), two dropout masks
(h x 1 B; counted even at dropout 0, a small over-estimate); split by t: Q, K, V
((h + 2gk) x 2 B), proj input (h x 2 B), fc1 output (f1 x 2 B), fc2 input (f x 2 B),
and the attention scores 5*a*s (softmax 2 B + dropout mask 1 B + dropout output 2 B).
That is 34 + 5as/h without TP, 10 + 24/t + 5as/(ht) with TP, (34 + 5as/h)/t with TP+SP.
* Flash attention (Transformer Engine's fused attention, also PyTorch SDPA on GPU, the
  default here) never stores the s^2 scores, only an fp32 log-sum-exp (4a per token): the
  selective-recompute figure applies without any recompute. ``--attention unfused``
  restores the 5as/h term.
* Selective recompute drops the 5as/h term (one layer's scores return in its backward).
* Full recompute keeps the layer input (2h per token, /t with SP) per layer plus one
  layer's full working set.
* FP8 stores the four GEMM inputs (QKV, proj, fc1, fc2) in 1 B instead of 2 (34 -> 27
  for gpt2 without the scores): our assumption of TE's behaviour, not a measurement.
* fp32 precision doubles every 2-byte term.
* 1F1B (with at least p micro-batches a step): stage r holds p - r micro-batches in
  flight (the first stage p of them, i.e. all L layers' worth); the last stage also keeps the final-norm and head inputs (4h)
  and the logits for the cross-entropy/log-prob in fp32, s*b*V/t*4 (the transient bf16
  copy next to it is left to the overhead). The interleaved schedule is not modelled.

Stages. SFT: one trained LM. RM: a trained scalar-head model whose micro-batch is
b prompts x K responses (``--rm-responses``, default 9, the paper's largest K). PPO:
four co-located models sharing the t/p/d layout (Megatron's process groups are global):
actor (trained LM), critic (trained, scalar head), reference (frozen copy of the actor)
and reward model (frozen, scalar head). InstructGPT trained 6B reward models for every
policy, so for policies larger than 6.7B the critic and RM default to the ``6b`` shape
(``--critic-preset`` / ``--rm-preset``, each defaulting to the other as the critic starts
from the RM; ``same`` = the actor's shape), with the actor's vocabulary and sequence
length. Three phases; the largest is the peak:
* rollout: KV cache 2 * (L/p) * (g/t) * k * (prompt + new tokens) * rollout_batch * 2 B,
  plus one layer's forward over that batch and last-token logits;
* scoring: the reference and RM forward one micro-batch (one layer + fp32 logits);
  with ``--offload-frozen`` their weights stay in CPU memory except here, and we assume
  they come back one at a time;
* train: actor or critic (one at a time) activations, actor at the full sequence length
  (ptx batches), critic at prompt + new tokens.
Trained weights, grads, optimizer states and the fp8 cache stay resident in every phase.

Overhead: 2 GiB (CUDA context, NCCL buffers, cuBLAS/TE workspaces) + 5% of the rest
(allocator fragmentation). An 80 GB H100 shows about 79.1 GiB to CUDA; a plan fits when
its peak is at most ``--gpu-memory-gib`` (default 79.0). Not modelled: CPU memory, the
interleaved pipeline, context parallelism, MoE, FP8 parameters (``--fp8-param-gather``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_rlhf.config import ModelConfig
from megatron_rlhf.models.sizing import ffn_hidden_size, padded_vocab_size, tied_embeddings

GIB = 2**30
OVERHEAD_FIXED = 2 * GIB
OVERHEAD_FRACTION = 0.05
DEFAULT_GPU_GIB = 79.0

# GPT-3 (Brown et al. 2020, table 2.1) shapes: seq 2048, GPT-2 BPE vocabulary. 1.3B uses 16
# heads (k=128) and 13B a hidden size of 5120, as Megatron-LM does, so heads divide TP=8.
PRESETS = {"125m": (12, 768, 12), "350m": (24, 1024, 16), "1.3b": (24, 2048, 16),  # (layers, hidden, heads)
           "6b": (32, 4096, 32), "13b": (40, 5120, 40), "175b": (96, 12288, 96)}  # 6b: GPT-3 6.7B
PAPER_RM_PRESET = "6b"
SHAPE_FIELDS = ("flavour", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "seq_length", "vocab_size")


def preset(name: str, **overrides) -> ModelConfig:
    layers, hidden, heads = PRESETS[name]
    kw = dict(flavour="gpt2", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
              seq_length=2048, vocab_size=50257)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**kw)


# ----------------------------------------------------------------------------- parameters

def padded_vocab(m: ModelConfig) -> int:
    """The builder's padded vocabulary (``models/sizing.py``; it does not depend on TP)."""
    return padded_vocab_size(m.vocab_size, m)


def _dims(m: ModelConfig):
    h, a = m.hidden_size, m.num_attention_heads
    g = m.num_query_groups or a
    f = ffn_hidden_size(m)
    return h, a, g, h // a, f, (2 * f if m.flavour == "llama" else f)


def check_layout(m: ModelConfig, tp: int, pp: int, name: str = "model") -> None:
    h, a, g, k, f, f1 = _dims(m)
    for what, n in (("attention heads", a), ("query groups", g), ("ffn size", f),
                    ("padding multiple", m.make_vocab_size_divisible_by)):
        if n % tp:
            raise ValueError(f"{name}: tp={tp} does not divide its {what} ({n})")
    if m.num_layers % pp:
        raise ValueError(f"{name}: pp={pp} does not divide its {m.num_layers} layers")


@dataclass(frozen=True)
class StageParams:
    total: int  # parameters one TP rank of this pipeline stage holds
    gemm: int  # of which transformer GEMM weights (the ones FP8 casts)


def stage_params(m: ModelConfig, tp: int = 1, pp: int = 1, rank: int = 0, head: str = "lm") -> StageParams:
    """Parameters of pipeline stage ``rank`` on one TP rank; ``head`` is "lm" or "scalar"."""
    h, a, g, k, f, f1 = _dims(m)
    gpt2 = m.flavour == "gpt2"
    gemm = ((a + 2 * g) * k * h + a * k * h + f1 * h + f * h) // tp
    norm = 2 * h if gpt2 else h  # LayerNorm weight+bias, RMSNorm weight
    other = 2 * norm + ((((a + 2 * g) * k + f1) // tp + 2 * h) if gpt2 else 0)
    layers = m.num_layers // pp
    total, gemm_total = layers * (gemm + other), layers * gemm
    vocab = padded_vocab(m) * h // tp
    if rank == 0:
        total += vocab + (m.seq_length * h if gpt2 else 0)
    if rank == pp - 1:
        total += norm
        if head == "scalar":
            total += h + 1
        elif not (tied_embeddings(m) and pp == 1):  # tied at pp=1: shared with the embedding
            total += vocab
    return StageParams(total, gemm_total)


def count_params(m: ModelConfig, head: str = "lm") -> int:
    """Unique parameters of the whole model (what ``sum(p.numel())`` gives at TP=PP=1)."""
    return stage_params(m, 1, 1, 0, head).total


# ----------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class _Prec:
    act: int  # bytes of a stored activation / KV entry / frozen weight
    lin: int  # bytes of a stored GEMM input
    weight: int  # bytes per parameter of a trained model: weight, grad, optimizer (shardable)
    grad: int
    optim: int
    fp8_cache: int  # per GEMM weight


PRECISIONS = {"fp32": _Prec(4, 4, 4, 4, 8, 0), "bf16": _Prec(2, 2, 2, 4, 12, 0), "fp8": _Prec(2, 1, 2, 4, 12, 2)}


def layer_activations(m, s, b, tp, sp, prec: _Prec, flash=True, recompute="none"):
    """(bytes kept per layer per micro-batch, extra working set of the layer in backward)."""
    h, a, g, k, f, f1 = _dims(m)
    act, lin = prec.act, prec.lin
    rep = 2 * (h * act + h * lin + h)  # norm inputs, QKV/fc1 inputs, dropout masks
    split = (h + 2 * g * k) * act + h * lin + f1 * act + f * lin
    scores = 4 * a if flash else (2 * act + 1) * a * s  # fp32 LSE vs softmax+mask+dropout
    rep_div = tp if sp else 1
    full = s * b * (rep / rep_div + (split + scores) / tp)
    if recompute == "full":
        return s * b * h * act / rep_div, full
    if recompute == "selective" and not flash:
        return full - s * b * scores / tp, s * b * scores / tp
    return full, 0.0


# ----------------------------------------------------------------------------- the plan

@dataclass
class ModelMemory:
    role: str
    shape: str
    params_total: int
    params_per_gpu: int  # on the peak stage, one TP rank
    trainable: bool
    resident: bool  # on GPU outside the scoring phase


@dataclass
class MemoryPlan:
    stage: str
    precision: str
    tp: int
    pp: int
    dp: int
    gpus_per_node: int
    micro_batch_size: int
    recompute: str
    sequence_parallel: bool
    distributed_optimizer: bool
    flash_attention: bool
    models: list = field(default_factory=list)
    phases: dict = field(default_factory=dict)  # phase -> part -> bytes, on the peak stage
    peak_stage: int = 0
    peak_phase: str = "train"
    peak_bytes: float = 0.0
    capacity_gib: float = DEFAULT_GPU_GIB
    frozen_bytes: float = 0.0  # frozen weights on the peak stage (PPO)
    peak_gib_other_offload: Optional[float] = None  # the peak with --offload-frozen toggled
    notes: list = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def nodes(self) -> int:
        return math.ceil(self.world / self.gpus_per_node)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.capacity_gib

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(world=self.world, nodes=self.nodes, peak_gib=self.peak_gib, fits=self.fits)
        return out


PARTS = ("weights", "gradients", "optimizer states", "fp8 weight cache", "activations",
         "logits", "KV cache", "frozen models")


def _shape(m: ModelConfig) -> str:
    h, a, g, k, f, f1 = _dims(m)
    return (f"{m.flavour} L={m.num_layers} h={h} heads={a} groups={g} ffn={f} seq={m.seq_length} "
            f"vocab={m.vocab_size}->{padded_vocab(m)}")


def plan_memory(model: ModelConfig, stage: str = "sft", precision: str = "bf16", tp: int = 1, pp: int = 1,
                dp: int = 1, micro_batch_size: int = 1, recompute: str = "none",
                distributed_optimizer: bool = True, sequence_parallel: bool = False, attention: str = "flash",
                rm_responses: int = 9, rollout_batch_per_gpu: int = 16, max_new_tokens: int = 64,
                prompt_length: Optional[int] = None, offload_frozen: bool = False,
                critic: Optional[ModelConfig] = None, reward: Optional[ModelConfig] = None,
                fp8_weight_cache: bool = True, gpus_per_node: int = 8, gpu_memory_gib: float = DEFAULT_GPU_GIB,
                _compare_offload: bool = True) -> MemoryPlan:
    """Per-GPU memory of one layout; see the module docstring for every formula."""
    args = dict(locals())
    for name, value, allowed in (("stage", stage, ("sft", "rm", "ppo")), ("precision", precision, PRECISIONS),
                                 ("recompute", recompute, ("none", "selective", "full")),
                                 ("attention", attention, ("flash", "unfused"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    prec, flash = PRECISIONS[precision], attention == "flash"
    if not fp8_weight_cache:
        prec = dataclasses.replace(prec, fp8_cache=0)
    sp = sequence_parallel and tp > 1
    s = model.seq_length
    # (role, model, head, trainable, micro-batch sequences, sequence length)
    if stage == "sft":
        roles = [("policy", model, "lm", True, micro_batch_size, s)]
    elif stage == "rm":
        roles = [("reward", model, "scalar", True, micro_batch_size * rm_responses, s)]
    else:
        tokens = (s - max_new_tokens if prompt_length is None else prompt_length) + max_new_tokens
        if tokens > s or tokens <= max_new_tokens:
            raise ValueError(f"prompt + new tokens ({tokens}) must fit the sequence length {s}")
        # The critic starts from the reward model (InstructGPT), so one shape implies the other.
        critic = critic or reward or critic_default(model)
        reward = reward or critic
        roles = [("actor", model, "lm", True, micro_batch_size, s),
                 ("critic", critic, "scalar", True, micro_batch_size, tokens),
                 ("reference", model, "lm", False, micro_batch_size, tokens),
                 ("reward", reward, "scalar", False, micro_batch_size, tokens)]
    for role, m, *_ in roles:
        check_layout(m, tp, pp, role)

    plan = MemoryPlan(stage, precision, tp, pp, dp, gpus_per_node, micro_batch_size, recompute, sp,
                      distributed_optimizer, flash, capacity_gib=gpu_memory_gib)
    best = None
    for rank in range(pp):
        phases, frozen = _stage_phases(roles, prec, tp, pp, dp, rank, sp, flash, recompute, distributed_optimizer,
                                       offload_frozen, rollout_batch_per_gpu, stage)
        phase = max(phases, key=lambda p: phases[p]["total"])
        if best is None or phases[phase]["total"] > best[0]:
            best = (phases[phase]["total"], rank, phase, phases, frozen)
    plan.peak_bytes, plan.peak_stage, plan.peak_phase, plan.phases, plan.frozen_bytes = best
    for role, m, head, trainable, *_ in roles:
        plan.models.append(ModelMemory(role, _shape(m), count_params(m, head),
                                       stage_params(m, tp, pp, plan.peak_stage, head).total, trainable,
                                       trainable or not offload_frozen))
    if stage == "ppo" and _compare_offload:
        other = plan_memory(**{**args, "offload_frozen": not offload_frozen, "_compare_offload": False})
        plan.peak_gib_other_offload = other.peak_gib
    plan.notes = _notes(plan)
    return plan


def critic_default(actor: ModelConfig) -> ModelConfig:
    """The paper's 6B reward model for policies larger than it; else the actor's shape."""
    six_b = preset(PAPER_RM_PRESET, flavour=actor.flavour, vocab_size=actor.vocab_size, seq_length=actor.seq_length)
    return six_b if count_params(actor) > count_params(six_b) else actor


def _stage_phases(roles, prec, tp, pp, dp, rank, sp, flash, recompute, dist_opt, offload, rollout_b, stage):
    base = dict.fromkeys(PARTS, 0.0)
    frozen_w = []  # (weights, fp8 cache) of each frozen model on this stage
    for role, m, head, trainable, b, s in roles:
        sp_ = stage_params(m, tp, pp, rank, head)
        cache = sp_.gemm * prec.fp8_cache
        if trainable:
            base["weights"] += sp_.total * prec.weight
            base["gradients"] += sp_.total * prec.grad
            base["optimizer states"] += sp_.total * prec.optim / (dp if dist_opt else 1)
            base["fp8 weight cache"] += cache
        else:
            frozen_w.append((sp_.total * prec.act, cache))
    frozen = sum(w for w, _ in frozen_w)
    if not offload:
        base["frozen models"] = frozen
        base["fp8 weight cache"] += sum(c for _, c in frozen_w)
    last = rank == pp - 1

    def train_acts(m, head, b, s):
        kept, work = layer_activations(m, s, b, tp, sp, prec, flash, recompute)
        acts = (pp - rank) * (m.num_layers // pp) * kept + work  # 1F1B: p - r micro-batches in flight
        logits = 0.0
        if last:
            acts += 2 * s * b * m.hidden_size * prec.act / (tp if sp else 1)  # final-norm and head inputs
            logits = s * b * padded_vocab(m) * 4 / tp if head == "lm" else 0.0
        return acts, logits

    def forward_only(m, head, b, s, last_token=False):
        kept, _ = layer_activations(m, s, b, tp, sp, prec, flash, "none")
        logits = (1 if last_token else s) * b * padded_vocab(m) * 4 / tp if (last and head == "lm") else 0.0
        return kept, logits

    phases = {}
    trained = [r for r in roles if r[3]]
    acts, lg = max((train_acts(m, head, b, s) for _, m, head, _, b, s in trained), key=sum)
    phases["train"] = dict(base, activations=acts, logits=lg)
    if stage == "ppo":
        actor = roles[0][1]
        h, a, g, k, f, f1 = _dims(actor)
        tokens = roles[1][5]
        act, lg = forward_only(actor, "lm", rollout_b, tokens, last_token=True)
        kv = 2 * (actor.num_layers // pp) * (g // tp) * k * tokens * rollout_b * prec.act
        phases["rollout"] = dict(base, activations=act, logits=lg, **{"KV cache": kv})
        act, lg = max((forward_only(m, head, b, s) for _, m, head, _, b, s in roles), key=sum)
        scoring = dict(base, activations=act, logits=lg)
        if offload:  # the frozen models come back one at a time
            w, c = max(frozen_w, key=lambda wc: wc[0] + wc[1])
            scoring["frozen models"] = w
            scoring["fp8 weight cache"] += c
        phases["scoring"] = scoring
        phases = {p: phases[p] for p in ("rollout", "scoring", "train")}
    for parts in phases.values():
        sub = sum(parts[p] for p in PARTS)
        parts["overhead"] = OVERHEAD_FIXED + OVERHEAD_FRACTION * sub
        parts["total"] = sub + parts["overhead"]
    return phases, frozen


def _notes(plan: MemoryPlan) -> list:
    notes = []
    if plan.flash_attention:
        notes.append("flash/fused attention: no s^2 scores are stored (the selective-recompute figure applies)")
    if plan.precision == "fp8":
        notes.append("fp8: bf16 parameters kept; GEMM inputs stored in 1 B; TE's fp8 weight+transpose cache counted")
    if plan.tp > 1 and not plan.sequence_parallel:
        notes.append("tp>1 without --sequence-parallel: norm/dropout activations are replicated on every TP rank")
    if plan.distributed_optimizer and plan.dp == 1:
        notes.append("dp=1: the distributed optimizer has nothing to shard over")
    if plan.stage == "ppo":
        notes.append("ppo: actor/critic/reference/RM share the tp/pp layout; one model trains or scores at a time")
    return notes


# ----------------------------------------------------------------------------- search

def search_nodes(max_nodes: int = 1024, **kw) -> Optional[MemoryPlan]:
    """The plan with the fewest whole nodes that fits, growing dp for the given tp/pp.

    Only the distributed optimizer's share shrinks with dp, so fitting is monotone in dp:
    check the largest dp, then bisect for the smallest, then fill the nodes it needs.
    """
    tp, pp, gpn = kw.get("tp", 1), kw.get("pp", 1), kw.get("gpus_per_node", 8)
    if tp * pp > max_nodes * gpn:
        return None
    fits = lambda dp: plan_memory(**{**kw, "dp": dp, "_compare_offload": False}).fits  # noqa: E731
    lo, hi = 1, max(1, max_nodes * gpn // (tp * pp))
    if not fits(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    nodes = math.ceil(tp * pp * lo / gpn)
    return plan_memory(**{**kw, "dp": max(lo, nodes * gpn // (tp * pp))})


def smallest_fitting_pp(max_nodes: int = 1024, **kw) -> Optional[MemoryPlan]:
    """The first pipeline size above the given one for which some dp fits."""
    for pp in range(kw.get("pp", 1) + 1, kw["model"].num_layers + 1):
        try:
            plan = search_nodes(max_nodes, **{**kw, "pp": pp})
        except ValueError:  # pp does not divide some model's layers
            continue
        if plan is not None:
            return plan
    return None
