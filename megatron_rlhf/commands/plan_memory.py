"""``megatron-rlhf plan-memory`` (``tools/plan_memory.py``): the per-GPU memory plan of a layout.

The model of memory and every formula live in ``megatron_rlhf/memory_plan.py`` (its docstring);
this is its command line. The last line printed is ``plan: peak_gib_per_gpu=X nodes=N``
(nodes=0: nothing fits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from megatron_rlhf.config import Config, load_config
from megatron_rlhf.memory_plan import (
    DEFAULT_GPU_GIB, GIB, PARTS, PRECISIONS, PRESETS, SHAPE_FIELDS, MemoryPlan, plan_memory, preset, search_nodes, smallest_fitting_pp,
)


def format_plan(plan: MemoryPlan) -> str:
    lines = [
        "memory per GPU in GiB (2^30 B)",
        f"stage={plan.stage} precision={plan.precision} tp={plan.tp} pp={plan.pp} dp={plan.dp} -> "
        f"{plan.world} GPUs = {plan.nodes} node(s) x {plan.gpus_per_node}",
        f"micro_batch={plan.micro_batch_size} recompute={plan.recompute} sequence_parallel={plan.sequence_parallel} "
        f"distributed_optimizer={plan.distributed_optimizer} attention={'flash' if plan.flash_attention else 'unfused'}",
    ]
    for mm in plan.models:
        kind = "trained" if mm.trainable else ("frozen, on GPU" if mm.resident else "frozen, offloaded")
        lines.append(f"  {mm.role:<9} {mm.shape}: {mm.params_total / 1e9:.3f}B params, "
                     f"{mm.params_per_gpu / 1e9:.3f}B on this GPU ({kind})")
    lines.append(f"peak: pipeline stage {plan.peak_stage} of {plan.pp}, phase {plan.peak_phase}")
    cols = list(plan.phases)
    lines.append(f"{'part':<24}" + "".join(f"{c:>10}" for c in cols))
    for part in PARTS + ("overhead", "total"):
        label = "overhead (2 GiB + 5%)" if part == "overhead" else part
        lines.append(f"{label:<24}" + "".join(f"{plan.phases[c][part] / GIB:>10.2f}" for c in cols))
    if plan.stage == "ppo":
        on = plan.models[2].resident
        lines.append(f"frozen reference+RM weights: {plan.frozen_bytes / GIB:.2f} GiB; peak "
                     f"{'on GPU' if on else 'offloaded'} {plan.peak_gib:.1f} GiB, "
                     f"{'offloaded' if on else 'on GPU'} {plan.peak_gib_other_offload:.1f} GiB")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"fits in {plan.capacity_gib:.1f} GiB: {'yes' if plan.fits else 'NO'}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-rlhf plan-memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a megatron-rlhf YAML config to start from (flags override it)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a GPT-3 shape (seq 2048, vocab 50257)")
    for name in ("num-layers", "hidden-size", "num-attention-heads", "num-query-groups", "ffn-hidden-size",
                 "seq-length", "vocab-size", "tp", "pp", "micro-batch-size", "max-new-tokens"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--flavour", choices=("gpt2", "llama"))
    p.add_argument("--stage", choices=("sft", "rm", "ppo"))
    p.add_argument("--precision", choices=sorted(PRECISIONS))
    p.add_argument("--dp", type=int, help="data-parallel size (default: search the smallest that fits)")
    p.add_argument("--nodes", type=int, help="derive dp from nodes x gpus-per-node")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_GIB, help="usable memory per GPU")
    p.add_argument("--recompute", choices=("none", "selective", "full"))
    for name in ("distributed-optimizer", "sequence-parallel", "offload-frozen"):
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction)
    p.add_argument("--fp8-weight-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="TE's cached FP8 weights (off: Megatron's disable_parameter_transpose_cache)")
    p.add_argument("--attention", choices=("flash", "unfused"), default="flash")
    p.add_argument("--rm-responses", type=int, default=9, help="K responses per prompt (stage rm)")
    p.add_argument("--rollout-batch-per-gpu", type=int, default=16, help="sequences generated at once (ppo)")
    p.add_argument("--prompt-length", type=int, help="default: seq-length - max-new-tokens")
    p.add_argument("--critic-preset", choices=sorted(PRESETS) + ["same"], help="default: the RM's; else 6b for policies > 6.7B")
    p.add_argument("--rm-preset", choices=sorted(PRESETS) + ["same"], help="default: the critic's; else as above")
    p.add_argument("--search", action="store_true", help="grow dp to the fewest nodes that fit (ignores --dp)")
    p.add_argument("--max-nodes", type=int, default=1024)
    p.add_argument("--json", action="store_true", help="print the plan as JSON (then the plan: line)")
    return p


def _from_args(a) -> dict:
    cfg = load_config(a.config) if a.config else Config()
    m = cfg.model
    if a.preset:  # a preset sets the shape only; precision, recompute etc. stay the config's
        p = preset(a.preset)
        m = dataclasses.replace(m, **{k: getattr(p, k) for k in SHAPE_FIELDS})
    shape = {k: getattr(a, k) for k in SHAPE_FIELDS}
    m = dataclasses.replace(m, **{k: v for k, v in shape.items() if v is not None})
    if m.vocab_size is None:
        m = dataclasses.replace(m, vocab_size=50257)  # the GPT-2 BPE; pass --vocab-size for yours
    precision = a.precision or ("fp8" if m.fp8 else "fp32" if m.precision == "fp32" else "bf16")

    def side(name):
        if name is None:
            return None
        return m if name == "same" else preset(name, flavour=m.flavour, vocab_size=m.vocab_size, seq_length=m.seq_length)

    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    return dict(
        model=m, stage=a.stage or cfg.stage, precision=precision,
        tp=pick(a.tp, cfg.parallel.tensor_model_parallel_size), pp=pick(a.pp, cfg.parallel.pipeline_model_parallel_size),
        micro_batch_size=pick(a.micro_batch_size, cfg.train.micro_batch_size),
        recompute=a.recompute or m.recompute_granularity or "none",
        distributed_optimizer=pick(a.distributed_optimizer, cfg.parallel.use_distributed_optimizer),
        sequence_parallel=pick(a.sequence_parallel, cfg.parallel.sequence_parallel), attention=a.attention,
        rm_responses=a.rm_responses, rollout_batch_per_gpu=a.rollout_batch_per_gpu,
        max_new_tokens=pick(a.max_new_tokens, cfg.ppo.max_new_tokens), prompt_length=a.prompt_length,
        offload_frozen=pick(a.offload_frozen, cfg.ppo.offload_frozen), critic=side(a.critic_preset),
        reward=side(a.rm_preset), fp8_weight_cache=a.fp8_weight_cache, gpus_per_node=a.gpus_per_node, gpu_memory_gib=a.gpu_memory_gib,
    )


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        kw = _from_args(a)
        if a.nodes and not a.search:
            world = a.nodes * a.gpus_per_node
            if world % (kw["tp"] * kw["pp"]):
                raise ValueError(f"{world} GPUs are not a multiple of tp x pp = {kw['tp'] * kw['pp']}")
            a.dp = world // (kw["tp"] * kw["pp"])
        if a.dp and not a.search:
            plan = plan_memory(dp=a.dp, **kw)
            found = plan if plan.fits else None
        else:
            found = search_nodes(a.max_nodes, **kw)
            # Nothing fits: show the layout with the most data parallelism tried.
            plan = found or plan_memory(dp=max(1, a.max_nodes * a.gpus_per_node // (kw["tp"] * kw["pp"])), **kw)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if a.json else format_plan(plan))
    if found is None:
        more_dp = search_nodes(a.max_nodes, **kw) if a.dp and not a.search else None
        if more_dp is not None:
            print(f"does not fit at dp={plan.dp}; dp={more_dp.dp} ({more_dp.nodes} node(s)) fits")
        else:
            bigger = smallest_fitting_pp(a.max_nodes, **kw)
            hint = (f"pp={bigger.pp} fits on {bigger.nodes} node(s) (dp={bigger.dp})" if bigger
                    else "no pp fits either: shrink the micro-batch, recompute, offload, or raise tp")
            print(f"does not fit with tp={kw['tp']} pp={kw['pp']} on up to {a.max_nodes} nodes; pp must grow: {hint}")
    print(f"plan: peak_gib_per_gpu={plan.peak_gib:.1f} nodes={found.nodes if found else 0}")
    return 0 if found else 1
