"""Rollout speed: our engine against ``transformers.generate`` and against itself.

    python bench/rollout.py                          # the issue-15 shape, CPU: about 5 minutes
    python bench/rollout.py --preset tiny --batch 4 --max-new-tokens 8 --eos-prompts 8 --slots 4   # smoke
    python bench/rollout.py --parts dynamic --skip-before   # GPU: ours vs Megatron-Core's dynamic engine

Three measurements, each in its own process, each timing its contenders alternately in that
process (best of ``--repeats`` after one warm-up), so a ratio is measured under the same
conditions on a shared machine:

* ``pp1``: ``generate`` (ours) vs ``transformers`` ``model.generate`` (dynamic KV cache, SDPA,
  left padding) on the same shape, random weights, sampling at temperature 1, no eos
  (every row makes exactly ``--max-new-tokens``), prompts all ``--prompt-mean`` long
  ("equal") or spread evenly over ``4 .. 2 * mean - 4`` ("varied", same mean); and the
  engine this one replaced (``--before``, loaded from git) on the same prompts.
* ``eos``: continuous batching. ``--eos-prompts`` varied-length prompts through
  ``--slots`` slots, with the eos logit raised so that a response ends after about
  ``--eos-mean`` tokens (geometric, capped at ``--max-new-tokens``): ``rollout(refill=True)``
  vs the same engine with static batches (``refill=False``: a batch of slots takes new
  prompts only when all its rows are done). Same seeds, so both produce the same tokens.
* ``pp2``: two gloo processes, pipeline parallel size 2, ``--batch`` prompts (equal and varied
  lengths), no eos: ours with two micro-batch groups in flight vs ours with one vs the engine
  before.
* ``dynamic`` (GPU only; not in the default ``--parts``): ours (``rollout``) vs Megatron-Core's
  ``DynamicInferenceEngine`` (``ppo.rollout_engine=dynamic``) on the same model in BF16 (the
  dynamic engine's flash attention has no fp32 kernels), tokens/s:
  ``--batch`` prompts equal and varied, no eos, temperature 1; and the ``eos`` shape (``--eos-prompts``
  through ``--slots`` slots / requests in flight, eos-varied responses). Both engines sample
  (not the same tokens: their random streams differ); with no eos both generate exactly
  ``--max-new-tokens`` per prompt.

Results go to ``bench/results/rollout_<shape>_cpu.json``; ``--rows`` prints the README rows: the
ratio of the best times, and the median over repeats of the ratio of back-to-back timings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SCRIPT = Path(__file__).resolve()
BEFORE = "dcc3ff8"  # main before issue 15: static context, shortest-prompt prefill, one batch through the stages


# ----------------------------------------------------------------------------- shared pieces


def _prompts(spec: dict, count: int, varied: bool, seed: int) -> list:
    import torch

    mean = spec["prompt_mean"]
    if varied:
        lengths = [round(4 + k * (2 * mean - 8) / max(count - 1, 1)) for k in range(count)]
    else:
        lengths = [mean] * count
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, spec["model"]["vocab_size"], (n - 1,), generator=g).tolist() for n in lengths]


def _setup(spec: dict, pp: int = 1):
    import torch

    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed

    torch.set_num_threads(1)
    cfg = ModelConfig(**spec["model"])
    parallel = ParallelConfig(pipeline_model_parallel_size=pp)
    init_distributed(parallel, cfg)
    return build_model(cfg, parallel, cfg.vocab_size, seed=spec["seed"])


def _before_engine(commit: str):
    """``megatron_rlhf/models/generation.py`` as it was at ``commit`` (the engine this one replaced)."""
    source = subprocess.run(["git", "show", f"{commit}:megatron_rlhf/models/generation.py"], cwd=bc.ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="rollout-before-")) / "generation_before.py"
    path.write_text(source)
    module_spec = importlib.util.spec_from_file_location("generation_before", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["generation_before"] = module  # dataclasses look their module up
    module_spec.loader.exec_module(module)
    return module


def _best(contenders: dict, repeats: int, barrier=None) -> dict:
    """Time each contender ``repeats`` times, alternating, after one warm-up call each: best wall time."""
    results = {name: {"times_s": []} for name in contenders}
    for name, fn in contenders.items():
        results[name]["tokens"] = fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            if barrier:
                barrier()
            start = time.perf_counter()
            fn()
            if barrier:
                barrier()
            results[name]["times_s"].append(time.perf_counter() - start)
    for r in results.values():
        r["best_s"] = min(r["times_s"])
        r["tokens_per_s"] = r["tokens"] / r["best_s"]
    return results


def _eos_hook(model, eos_id: int, boost: float):
    """Raise the eos logit by ``boost`` (the response-length distribution of the eos runs)."""
    from megatron_rlhf.models.builder import unwrap as _unwrap

    def hook(module, args, output):
        logits, bias = output
        logits[..., eos_id] += boost
        return logits, bias

    return _unwrap(model).output_layer.register_forward_hook(hook)


# ----------------------------------------------------------------------------- the parts


def child_pp1(spec):
    import dataclasses

    import torch
    from transformers import GenerationConfig

    from megatron_rlhf.config import ModelConfig
    from megatron_rlhf.rollout import generate
    from sft_throughput import hf_model

    model = _setup(spec)
    before = _before_engine(spec["before"])
    hf = hf_model(dataclasses.asdict(ModelConfig(**spec["model"])))
    hf.eval()
    new, b = spec["max_new_tokens"], spec["batch"]
    gen_cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               eos_token_id=None, pad_token_id=0, bos_token_id=None, use_cache=True)
    out = {}
    for shape in ("equal", "varied"):
        prompts = _prompts(spec, b, shape == "varied", spec["seed"])
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def ours():
            gen = generate(model, prompts, new, temperature=1.0, seeds=list(range(b)))
            return sum(gen.response_lengths)

        def engine_before():
            gen = before.generate(model, prompts, new, temperature=1.0, generator=torch.Generator().manual_seed(0))
            return sum(gen.response_lengths)

        def transformers():
            with torch.no_grad():
                seqs = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            return (seqs.shape[1] - width) * b

        contenders = {"ours": ours, "transformers": transformers}
        if not spec["skip_before"]:
            contenders["before"] = engine_before
        out[shape] = _best(contenders, spec["repeats"])
        out[shape]["prompt_lengths"] = [len(p) for p in prompts]
    return out


def child_eos(spec):
    from megatron_rlhf.rollout import rollout

    model = _setup(spec)
    count, slots, new = spec["eos_prompts"], spec["slots"], spec["max_new_tokens"]
    prompts = _prompts(spec, count, True, spec["seed"] + 1)
    vocab, eos = spec["model"]["vocab_size"], 2
    # random-init logits are nearly uniform: e^boost / (e^boost + V) = 1 / eos_mean
    import math

    boost = math.log(vocab / (spec["eos_mean"] - 1))
    _eos_hook(model, eos, boost)
    lengths = {}

    def run(refill):
        def fn():
            gen = rollout(model, prompts, new, slots=slots, refill=refill, eos_id=eos, temperature=1.0, seeds=list(range(count)))
            lengths[refill] = gen.response_lengths
            return sum(gen.response_lengths)
        return fn

    out = _best({"refill": run(True), "static": run(False)}, spec["repeats"])
    out["same_tokens"] = lengths[True] == lengths[False]
    out["response_lengths"] = lengths[True]
    out["eos_boost"] = boost
    return out


def _pp2_rank(rank, world, port, spec, out_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from megatron_rlhf.rollout import generate

    model = _setup(spec, pp=2)
    before = _before_engine(spec["before"])
    b, new = spec["batch"], spec["max_new_tokens"]
    result = {}
    for shape in ("equal", "varied"):
        prompts = _prompts(spec, b, shape == "varied", spec["seed"])

        def ours(groups, prompts=prompts):
            def fn():
                gen = generate(model, prompts, new, temperature=1.0, seeds=list(range(b)), micro_batches=groups)
                return sum(gen.response_lengths)
            return fn

        def engine_before(prompts=prompts):
            gen = before.generate(model, prompts, new, temperature=1.0, generator=torch.Generator().manual_seed(0))
            return sum(gen.response_lengths)

        contenders = {"ours": ours(2), "ours_one_group": ours(1)}
        if not spec["skip_before"]:
            contenders["before"] = engine_before
        result[shape] = _best(contenders, spec["repeats"], barrier=dist.barrier)
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    from megatron_rlhf.parallel import destroy_distributed

    destroy_distributed()


def child_pp2(spec):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(bc.ROOT / "tests"))
    from dist_utils import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "pp2.json"
        mp.start_processes(_pp2_rank, args=(2, free_port(), spec, str(out_path)), nprocs=2, start_method="spawn")
        return json.loads(out_path.read_text())


def child_dynamic(spec):
    import math

    from megatron_rlhf.rollout import rollout
    from megatron_rlhf.rollout.dynamic import DynamicRollout

    model = _setup(dict(spec, model=dict(spec["model"], precision=spec["dynamic_precision"], transformer_impl="auto")))
    b, new, slots = spec["batch"], spec["max_new_tokens"], spec["slots"]
    engine = DynamicRollout(model, max_requests=b, seed=spec["seed"])
    out = {"kv_buffer_gib": engine.plan.buffer_bytes / 1024**3, "precision": spec["dynamic_precision"]}
    for shape in ("equal", "varied"):
        prompts = _prompts(spec, b, shape == "varied", spec["seed"])

        def ours(prompts=prompts):
            return sum(rollout(model, prompts, new, temperature=1.0, seeds=list(range(b))).response_lengths)

        def dynamic(prompts=prompts):
            return sum(engine(model, prompts, new, temperature=1.0, seeds=list(range(b))).response_lengths)

        out[shape] = _best({"builtin": ours, "dynamic": dynamic}, spec["repeats"])
    count, vocab, eos = spec["eos_prompts"], spec["model"]["vocab_size"], 2
    prompts = _prompts(spec, count, True, spec["seed"] + 1)
    _eos_hook(model, eos, math.log(vocab / (spec["eos_mean"] - 1)))
    sized = DynamicRollout(model, max_requests=slots, seed=spec["seed"])  # at most --slots requests in flight
    lengths = {}

    def run(name, fn):
        def timed():
            gen = fn()
            lengths[name] = gen.response_lengths
            return sum(gen.response_lengths)
        return timed

    out["eos"] = _best({
        "builtin": run("builtin", lambda: rollout(model, prompts, new, slots=slots, eos_id=eos, temperature=1.0, seeds=list(range(count)))),
        "dynamic": run("dynamic", lambda: sized(model, prompts, new, eos_id=eos, temperature=1.0, seeds=list(range(count)))),
    }, spec["repeats"])
    out["eos"]["mean_response_length"] = {k: sum(v) / len(v) for k, v in lengths.items()}
    return out


PARTS = {"pp1": child_pp1, "eos": child_eos, "pp2": child_pp2, "dynamic": child_dynamic}


# ----------------------------------------------------------------------------- the report


def paired(slow: dict, fast: dict) -> float:
    """Median over repeats of slow/fast wall time, each pair timed back to back (robust to load swings)."""
    ratios = sorted(a / b for a, b in zip(slow["times_s"], fast["times_s"]))
    return ratios[len(ratios) // 2]


def rows(result: dict) -> list:
    """Markdown rows for README "Performance" (rollouts)."""
    shape = result["shape"]
    label = f"{shape['num_layers']}x{shape['hidden_size']} {shape['flavour']}, V={shape['vocab_size']}, fp32, 1 thread"
    cfg = result["config"]
    out = []
    pp1 = result.get("pp1", {})
    for name in ("equal", "varied"):
        r = pp1.get(name)
        if r and "ours" in r:
            before = f", before {r['before']['best_s']:.2f} s" if "before" in r else ""
            out.append(f"| rollout, {cfg['batch']} prompts {name} (mean {cfg['prompt_mean']}), {cfg['max_new_tokens']} new, "
                       f"{label} | ours {r['ours']['best_s']:.2f} s, transformers {r['transformers']['best_s']:.2f} s{before} "
                       f"| **{r['transformers']['best_s'] / r['ours']['best_s']:.2f}x** transformers "
                       f"(paired median {paired(r['transformers'], r['ours']):.2f}x) |")
    if "equal" in pp1 and "varied" in pp1:
        out.append(f"| varied / equal prompt lengths (ours) | {pp1['varied']['ours']['best_s'] / pp1['equal']['ours']['best_s']:.2f}x "
                   f"(transformers {pp1['varied']['transformers']['best_s'] / pp1['equal']['transformers']['best_s']:.2f}x) | |")
    eos = result.get("eos", {})
    if "refill" in eos:
        out.append(f"| continuous batching, {cfg['eos_prompts']} prompts, {cfg['slots']} slots, eos-varied responses "
                   f"(mean {sum(eos['response_lengths']) / len(eos['response_lengths']):.1f}) | refill "
                   f"{eos['refill']['tokens_per_s']:.0f} tok/s, static {eos['static']['tokens_per_s']:.0f} tok/s "
                   f"| **{eos['refill']['tokens_per_s'] / eos['static']['tokens_per_s']:.2f}x** "
                   f"(paired median {paired(eos['static'], eos['refill']):.2f}x) |")
    dyn = result.get("dynamic", {})
    for name in ("equal", "varied", "eos"):
        r = dyn.get(name)
        if r and "dynamic" in r:
            what = (f"{cfg['eos_prompts']} prompts, {cfg['slots']} in flight, eos-varied responses" if name == "eos"
                    else f"{cfg['batch']} prompts {name} (mean {cfg['prompt_mean']}), {cfg['max_new_tokens']} new")
            out.append(f"| rollout on {result['device']}, {dyn['precision']}, {what}, {label.split(', fp32')[0]} | builtin "
                       f"{r['builtin']['tokens_per_s']:.0f} tok/s, dynamic {r['dynamic']['tokens_per_s']:.0f} tok/s "
                       f"| dynamic / builtin **{r['dynamic']['tokens_per_s'] / r['builtin']['tokens_per_s']:.2f}x** "
                       f"(paired median {paired(r['builtin'], r['dynamic']):.2f}x) |")
    for name, pp2 in result.get("pp2", {}).items():
        if not isinstance(pp2, dict) or "ours" not in pp2:
            continue
        best = min(pp2["ours"]["best_s"], pp2["ours_one_group"]["best_s"])
        before = pp2.get("before")
        vs = (f"**{before['best_s'] / best:.2f}x** before (paired median: 2 groups {paired(before, pp2['ours']):.2f}x, "
              f"one group {paired(before, pp2['ours_one_group']):.2f}x)") if before else ""
        out.append(f"| PP=2 (gloo), {cfg['batch']} prompts {name}, {cfg['max_new_tokens']} new | ours: 2 micro-batch groups "
                   f"{pp2['ours']['best_s']:.2f} s, one group {pp2['ours_one_group']['best_s']:.2f} s"
                   + (f"; before {before['best_s']:.2f} s" if before else "") + f" | {vs} |")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return bc.child_main(argv, PARTS)
    p = bc.parser(__doc__)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="prompts of the pp1 and pp2 runs")
    p.add_argument("--prompt-mean", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eos-prompts", type=int, default=64, help="prompts of the continuous-batching run")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--eos-mean", type=float, default=24.0, help="mean response length the eos boost aims at")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--before", default=BEFORE, help="git commit whose generation.py is the 'before' engine")
    p.add_argument("--skip-before", action="store_true")
    p.add_argument("--parts", default="pp1,eos,pp2", help="any of pp1,eos,pp2,dynamic (dynamic: GPU only)")
    p.add_argument("--rows", action="store_true", help="print the README rows of an existing result (--output)")
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.rows:
        for row in rows(json.loads(Path(args.output).read_text())):
            print(row)
        return 0
    if 2 * args.prompt_mean - 4 + args.max_new_tokens > args.seq_length:
        raise SystemExit(f"--seq-length {args.seq_length} is too short for varied prompts up to {2 * args.prompt_mean - 4} "
                         f"tokens + {args.max_new_tokens} new ones")
    if args.preset is None:  # the issue-15 shape
        for key, value in dict(num_layers=4, hidden_size=256, num_attention_heads=4).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    model = bc.model_config_from_args(args, args.preset, args.seq_length)
    model = bc.dataclasses.replace(model, transformer_impl="local", precision="fp32")
    spec = dict(model=bc.asdict(model), batch=args.batch, prompt_mean=args.prompt_mean, max_new_tokens=args.max_new_tokens,
                eos_prompts=args.eos_prompts, slots=args.slots, eos_mean=args.eos_mean, repeats=args.repeats, seed=args.seed,
                before=args.before, skip_before=args.skip_before, dynamic_precision="bf16")  # dynamic: flash attention has no fp32
    import torch

    torch.set_num_threads(1)
    result = bc.header("rollout", bc.device_info())
    result.update(config={k: v for k, v in spec.items() if k != "model"}, shape=bc.shape_summary(model))
    result["conditions"] = ("each part in its own process (pp2: two gloo processes), torch 1 thread per process; "
                            "contenders alternate within a part, best of repeats after one warm-up each; "
                            f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for part in args.parts.split(","):
        result[part] = bc.run_part(SCRIPT, part, spec)
    result["load_average_end"] = os.getloadavg()[0]
    device = "cpu" if result["device"] == "cpu" else result["device"].replace(" ", "_").lower()
    name = f"rollout_{model.num_layers}x{model.hidden_size}_{model.flavour}_v{model.vocab_size}_{device}.json"
    path = bc.write_result(result, args.output, name)
    for row in rows(result):
        print(row)
    return 0 if path else 1


if __name__ == "__main__":
    sys.exit(main())
