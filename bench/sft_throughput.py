#!/usr/bin/env python
"""SFT training throughput: tokens/s, model TFLOP/s, MFU and peak memory, ours against a
plain ``transformers`` training step on the same shape, batch and precision, in one run.

    # one GPU, the acceptance figures (1.3B Llama-style, sequence 2048)
    python bench/sft_throughput.py --preset 1.3b --flavour llama --micro-batch-size 4
    python bench/sft_throughput.py --preset 1.3b --flavour llama --micro-batch-size 4 --fp8
    python bench/sft_throughput.py --preset 1.3b --flavour llama --micro-batch-size 4 --recompute full
    # sizes x {bf16, fp8} x recompute {none, full}, one JSON file and a table
    python bench/sft_throughput.py --sweep
    # CPU smoke run (seconds; fp32; numbers are not performance claims)
    python bench/sft_throughput.py --preset tiny --steps 1 --warmup 1
    # data.packing: useful (non-padding) tokens/s, packed vs padded, same examples, one run
    python bench/sft_throughput.py --preset 350m --flavour llama --micro-batch-size 4 --grad-accum 4 --packing

Ours: ``build_model`` -> ``wrap_for_training`` (Megatron DDP + optimizer) -> per step
``train_step`` (``run_schedule`` with the SFT stage's own ``sft_forward``, then
``optimizer_step``), with Transformer Engine layers and BF16/FP8 on GPU.
Baseline: ``LlamaForCausalLM``/``GPT2LMHeadModel`` of the same shape, ``attn_implementation=
"sdpa"``, fp32 weights under BF16 autocast on GPU, ``torch.optim.AdamW`` (fused on CUDA),
the same gradient clipping, ``gradient_checkpointing`` when ``--recompute full``.
Both train on the same random tokens (every position a target). Each runs in its own
process (see bench_common). Results: ``bench/results/<name>.json``; keys in bench/README.md.

``--packing``: no baseline; our SFT step twice on the same variable-length demonstrations,
padded (the trainer's collation: each step's examples at one width, the longest rounded up
to 16) and packed (``data.packing``: first-fit-decreasing bins of micro-batch-size x
seq_length tokens, THD attention). Lengths are lognormal, ``exp(N(ln(median), sigma))``
rounded and clipped to [16, seq_length] (``--length-median``, default seq_length / 8;
``--length-sigma``, default 1.0); each step takes micro-batch-size x grad-accum new
examples. The figure is useful (non-padding) tokens per second and its packed/padded ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

SWEEP_SIZES = ["125m", "350m", "1.3b", "2.7b"]


# ----------------------------------------------------------------------------- children


def _batches(spec, device):
    import torch

    from megatron_rlhf.data.sft import SftBatch

    m, mbs, s = spec["model"], spec["micro_batch_size"], spec["model"]["seq_length"]
    g = torch.Generator().manual_seed(spec["seed"])
    out = []
    for _ in range(spec["grad_accum"]):
        seq = torch.randint(1, m["vocab_size"], (mbs, s + 1), generator=g)
        tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        out.append(SftBatch(tokens.to(device), labels.to(device), torch.ones_like(tokens, dtype=torch.bool).to(device),
                            torch.arange(s).unsqueeze(0).repeat(mbs, 1).to(device)))
    return out


def _measure(step_fn, spec):
    """Run warm-up then timed steps; return timing and memory figures."""
    for _ in range(spec["warmup"]):
        step_fn()
    bc.reset_peak_memory()
    times, loss = [], None
    for _ in range(spec["steps"]):
        with bc.Timer() as t:
            loss = step_fn()
        times.append(t.seconds)
    tokens = spec["steps"] * spec["grad_accum"] * spec["micro_batch_size"] * spec["model"]["seq_length"]
    total = sum(times)
    return dict(tokens_per_s=tokens / total, step_time_s=times, median_step_time_s=sorted(times)[len(times) // 2],
                tokens_timed=tokens, final_loss=float(loss), **bc.peak_memory())


def child_ours(spec):
    import torch

    from megatron_rlhf.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_rlhf.models.builder import build_model, use_transformer_engine
    from megatron_rlhf.parallel import init_distributed, seed_everything
    from functools import partial

    from megatron_rlhf.recipes.sft import forward_step
    from megatron_rlhf.training.step import train_step, wrap_for_training

    model_cfg = ModelConfig(**spec["model"])
    parallel = ParallelConfig(**spec["parallel"])
    train = TrainConfig(lr=1e-5, micro_batch_size=spec["micro_batch_size"],
                        global_batch_size=spec["micro_batch_size"] * spec["grad_accum"], seed=spec["seed"])
    init_distributed(parallel, model_cfg)
    seed_everything(spec["seed"])
    model = build_model(model_cfg, parallel, model_cfg.vocab_size, seed=spec["seed"])
    n_params = sum(p.numel() for p in model.parameters())
    ddp, optimizer, scheduler = wrap_for_training(model, parallel, train, total_steps=spec["warmup"] + spec["steps"])
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batches = _batches(spec, device)
    forward = partial(forward_step, vocab_size=model_cfg.vocab_size)

    def step():
        metrics = train_step(ddp, optimizer, scheduler, batches, forward)
        return metrics["loss"]

    result = _measure(step, spec)
    result.update(implementation="megatron-core GPTModel (" + ("Transformer Engine" if use_transformer_engine(model_cfg) else "local layers, SDPA") + ")",
                  parameters_built=n_params)
    return result


def hf_model(m: dict, dtype=None):
    """A transformers causal LM with our shape (m: ModelConfig fields), SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from megatron_rlhf.models.sizing import ffn_hidden_size as ffn_size
    from megatron_rlhf.config import ModelConfig

    cfg = ModelConfig(**m)
    heads = cfg.num_attention_heads
    if cfg.flavour == "llama":
        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=ffn_size(cfg),
                             num_hidden_layers=cfg.num_layers, num_attention_heads=heads,
                             num_key_value_heads=cfg.num_query_groups or heads, max_position_embeddings=cfg.seq_length,
                             rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base, tie_word_embeddings=False,
                             attention_bias=False, mlp_bias=False, initializer_range=cfg.init_method_std,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=heads,
                            n_positions=cfg.seq_length, n_inner=ffn_size(cfg), activation_function="gelu",
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_epsilon,
                            tie_word_embeddings=True, initializer_range=cfg.init_method_std,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype or torch.float32)
    return model


def child_baseline(spec):
    import contextlib

    import torch

    cuda = torch.cuda.is_available()
    torch.manual_seed(spec["seed"])
    model = hf_model(spec["model"])
    if spec["model"].get("recompute_granularity") == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  **({"fused": True} if cuda else {}))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and spec["precision"] != "fp32" else contextlib.nullcontext
    batches = _batches(spec, "cuda" if cuda else "cpu")

    def step():
        total = 0.0
        for b in batches:
            with autocast():
                logits = model(input_ids=b.tokens).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b.labels.flatten())
            (loss / len(batches)).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / len(batches)

    result = _measure(step, spec)
    result.update(implementation=f"transformers {type(model).__name__} (sdpa" + (", bf16 autocast, fp32 weights" if cuda and spec["precision"] != "fp32" else ", fp32")
                  + (", gradient checkpointing" if spec["model"].get("recompute_granularity") == "full" else "") + "), torch.optim.AdamW",
                  parameters_built=n_params)
    return result


def lognormal_lengths(n: int, seq_length: int, median: float, sigma: float, seed: int) -> list:
    """``n`` sequence lengths ``exp(N(ln median, sigma))``, rounded, clipped to [16, seq_length]."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return raw.round().clamp(min=min(16, seq_length), max=seq_length).long().tolist()


def child_packing(spec):
    """Our SFT step on variable-length demonstrations, padded or packed (``spec["packing"]``)."""
    from functools import partial

    import torch

    from megatron_rlhf.config import ModelConfig, ParallelConfig, TrainConfig
    from megatron_rlhf.data import SftExample, collate_sft
    from megatron_rlhf.data.packing import pack_sft, sft_unit_length
    from megatron_rlhf.models.builder import build_model, use_transformer_engine
    from megatron_rlhf.parallel import init_distributed, seed_everything
    from megatron_rlhf.recipes.sft import forward_step
    from megatron_rlhf.training.step import train_step, wrap_for_training
    from megatron_rlhf.training.supervised import SupervisedTask, microbatches

    model_cfg = ModelConfig(**spec["model"])
    parallel = ParallelConfig(**spec["parallel"])
    s, mbs, per_step = model_cfg.seq_length, spec["micro_batch_size"], spec["micro_batch_size"] * spec["grad_accum"]
    train = TrainConfig(lr=1e-5, micro_batch_size=mbs, global_batch_size=per_step, seed=spec["seed"])
    init_distributed(parallel, model_cfg)
    seed_everything(spec["seed"])
    model = build_model(model_cfg, parallel, model_cfg.vocab_size, seed=spec["seed"])
    ddp, optimizer, scheduler = wrap_for_training(model, parallel, train, total_steps=spec["warmup"] + spec["steps"])
    forward = partial(forward_step, vocab_size=model_cfg.vocab_size)
    task = SupervisedTask(kind="policy", train_examples=[], valid_examples=[], collate=partial(collate_sft, pad_id=0, max_len=s),
                          forward_fn=forward, pack=partial(pack_sft, pad_id=0), unit_length=sft_unit_length)
    # the same examples in both runs: lengths of whole sequences [bos] + response, inputs one shorter
    n = per_step * (spec["warmup"] + spec["steps"])
    lengths = lognormal_lengths(n, s + 1, spec["length_median"], spec["length_sigma"], spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    examples = [SftExample([1], torch.randint(3, model_cfg.vocab_size, (length - 1,), generator=g).tolist()) for length in lengths]
    steps = []
    for i in range(0, n, per_step):
        micro = microbatches(task, examples[i : i + per_step], mbs, mbs * s if spec["packing"] else None)
        steps.append([type(b)(*(t.to(torch.cuda.current_device()) if torch.cuda.is_available() and hasattr(t, "to") else t for t in b)) for b in micro])
    useful = [sum(sft_unit_length(e) for e in examples[i : i + per_step]) for i in range(0, n, per_step)]
    computed = [sum(b.tokens.numel() for b in micro) for micro in steps]
    for micro in steps[: spec["warmup"]]:
        train_step(ddp, optimizer, scheduler, micro, forward)
    bc.reset_peak_memory()
    times = []
    for micro in steps[spec["warmup"]:]:
        with bc.Timer() as t:
            metrics = train_step(ddp, optimizer, scheduler, micro, forward)
        times.append(t.seconds)
    timed_useful, timed_computed = sum(useful[spec["warmup"]:]), sum(computed[spec["warmup"]:])
    median = sorted(times)[len(times) // 2]
    return dict(
        packing=spec["packing"], useful_tokens_per_s=timed_useful / sum(times),
        computed_tokens_per_s=timed_computed / sum(times),
        useful_tokens_per_s_median_step=timed_useful / len(times) / median,  # robust to one slow step on a shared machine
        padding_fraction=1 - timed_useful / timed_computed, micro_batches_per_step=[len(m) for m in steps[spec["warmup"]:]],
        step_time_s=times, useful_tokens_timed=timed_useful, final_loss=float(metrics["loss"]), **bc.peak_memory(),
        implementation="megatron-core GPTModel (" + ("Transformer Engine" if use_transformer_engine(model_cfg) else "local layers, SDPA") + ")",
    )


def measure_packing(args, spec) -> dict:
    script = Path(__file__).resolve()
    runs = {}
    for packing in (False, True):
        part_spec = dict(spec, packing=packing, label=spec["label"] + (" packed" if packing else " padded"))
        runs["packed" if packing else "padded"] = bc.run_part(script, "packing", part_spec, args.timeout)
    padded, packed = runs["padded"], runs["packed"]
    return dict(config=spec, padded=padded, packed=packed,
                useful_tokens_per_s_ratio=bc.ratio(packed.get("useful_tokens_per_s"), padded.get("useful_tokens_per_s")),
                useful_tokens_per_s_ratio_median_step=bc.ratio(packed.get("useful_tokens_per_s_median_step"), padded.get("useful_tokens_per_s_median_step")))


# ----------------------------------------------------------------------------- the parent


def build_spec(args, preset, precision, fp8, recompute) -> dict:
    import torch

    tiny = preset == "tiny"
    seq = args.seq_length or (bc.TINY["seq_length"] if tiny else 2048)
    model = bc.model_config_from_args(args, preset, seq)
    model = dataclasses.replace(model, precision=precision, fp8="hybrid" if fp8 else None,
                                recompute_granularity=None if recompute == "none" else recompute,
                                transformer_impl=args.transformer_impl)
    model.validate()
    parallel = dict(use_distributed_optimizer=args.distributed_optimizer and torch.cuda.is_available(),
                    overlap_grad_reduce=args.overlap_grad_reduce and torch.cuda.is_available())
    label = f"{preset or 'custom'} {args.flavour} {'fp8' if fp8 else precision} recompute={recompute} s={seq} mbs={args.micro_batch_size}"
    return dict(label=label, model=bc.asdict(model), parallel=parallel, precision=precision, fp8=fp8, recompute=recompute,
                micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum, steps=args.steps, warmup=args.warmup,
                seed=args.seed, preset=preset)


def figures(run: dict, spec: dict, info: dict) -> dict:
    """TFLOP/s and MFU of one measured run."""
    from megatron_rlhf.config import ModelConfig

    if "error" in run:
        return run
    m = ModelConfig(**spec["model"])
    s = m.seq_length
    tflops = run["tokens_per_s"] * bc.train_flops_per_token(m, s) / 1e12
    tflops_causal = run["tokens_per_s"] * bc.train_flops_per_token(m, s, causal=True) / 1e12
    out = dict(run, tflops=tflops, mfu=bc.fraction(tflops, info["peak_bf16_tflops"]),
               mfu_causal=bc.fraction(tflops_causal, info["peak_bf16_tflops"]))
    if spec["fp8"]:
        out["mfu_vs_fp8_peak"] = bc.fraction(tflops, info["peak_fp8_tflops"])
    return out


def measure(args, spec, info, baseline: bool, baseline_result=None) -> dict:
    from megatron_rlhf.config import ModelConfig

    script = Path(__file__).resolve()
    ours = figures(bc.run_part(script, "ours", spec, args.timeout), spec, info)
    row = dict(config=spec, shape=bc.shape_summary(ModelConfig(**spec["model"])),
               flops_per_token=bc.train_flops_per_token(ModelConfig(**spec["model"]), spec["model"]["seq_length"]),
               ours=ours, tokens_per_s=ours.get("tokens_per_s"), tflops=ours.get("tflops"), mfu=ours.get("mfu"),
               peak_memory_bytes=ours.get("peak_memory_bytes"))
    if baseline_result is None and baseline:
        base_spec = dict(spec, fp8=False, precision=spec["precision"], label=spec["label"] + " [transformers]")
        baseline_result = figures(bc.run_part(script, "baseline", base_spec, args.timeout), base_spec, info)
        if spec["fp8"]:
            baseline_result["note"] = "transformers has no plain FP8 training path: the baseline runs BF16 autocast"
    if baseline_result is not None:
        row.update(baseline=baseline_result, baseline_tokens_per_s=baseline_result.get("tokens_per_s"),
                   ratio_vs_baseline=bc.ratio(ours.get("tokens_per_s"), baseline_result.get("tokens_per_s")),
                   same_parameter_count=ours.get("parameters_built") == baseline_result.get("parameters_built"))
    else:
        row.update(baseline=None, baseline_tokens_per_s=None, ratio_vs_baseline=None)
    return row


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_row(row):
    o, b = row["ours"], row.get("baseline") or {}
    if "error" in o:
        print(f"  {row['config']['label']}: ERROR {o['error']}")
        return
    mem = o.get("peak_memory_bytes")
    print(f"  {row['config']['label']}: {o['tokens_per_s']:.1f} tokens/s, {o['tflops']:.3f} TFLOP/s, MFU {_fmt(o['mfu'] and 100 * o['mfu'])}%, "
          f"peak {mem / 2**30:.2f} GiB | transformers {_fmt(b.get('tokens_per_s'))} tokens/s, ratio {_fmt(row.get('ratio_vs_baseline'), '.2f')}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return bc.child_main(argv, {"ours": child_ours, "baseline": child_baseline, "packing": child_packing})
    p = bc.parser(__doc__)
    p.add_argument("--seq-length", type=int, help="default 2048 (tiny: 64)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--fp8", action="store_true", help="Transformer Engine FP8, hybrid recipe (E4M3 forward, E5M2 backward)")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto")
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True, help="also time the transformers step")
    p.add_argument("--packing", action="store_true", help="useful tokens/s, data.packing against padding, on lognormal lengths")
    p.add_argument("--length-median", type=float, help="--packing: median sequence length (default seq_length / 8)")
    p.add_argument("--length-sigma", type=float, default=1.0, help="--packing: sigma of the log-length")
    p.add_argument("--sweep", action="store_true", help="sizes x {bf16, fp8} x recompute {none, full}")
    p.add_argument("--sizes", nargs="+", default=None, help=f"sweep sizes (default {' '.join(SWEEP_SIZES)})")
    p.add_argument("--sweep-recompute", nargs="+", default=["none", "full"], choices=["none", "selective", "full"])
    p.add_argument("--peak-tflops", type=float, help="dense BF16 peak of a GPU the table does not know")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, help="seconds per measurement process")
    p.add_argument("--output", help="JSON file (default bench/results/sft_<shape>_<precision>_<device>.json)")
    args = p.parse_args(argv)

    import torch

    if args.steps < 1 or args.warmup < 0 or args.micro_batch_size < 1 or args.grad_accum < 1:
        p.error("need --steps >= 1, --warmup >= 0, --micro-batch-size >= 1, --grad-accum >= 1")
    precision = bc.resolve_precision(args.precision)
    bc.check_fp8(args.fp8)
    info = bc.device_info(args.peak_tflops)
    if not args.sweep:
        bc.check_recompute(args.recompute)
    device_tag = "cpu" if info["device"] == "cpu" else info["device"].replace(" ", "_").lower()

    if args.packing:
        if args.sweep:
            p.error("--packing measures one shape: drop --sweep")
        if not args.preset and not (args.num_layers and args.hidden_size and args.num_attention_heads):
            p.error("give --preset or --num-layers, --hidden-size and --num-attention-heads")
        spec = build_spec(args, args.preset, precision, args.fp8, args.recompute)
        seq = spec["model"]["seq_length"]
        median = args.length_median or seq / 8
        if not 1 <= median <= seq or args.length_sigma < 0:
            p.error(f"need 1 <= --length-median <= seq_length ({seq}) and --length-sigma >= 0")
        spec.update(length_median=median, length_sigma=args.length_sigma,
                    length_distribution=f"lognormal: round(exp(N(ln {median:g}, {args.length_sigma:g}))) clipped to [16, {seq + 1}] tokens a sequence")
        row = measure_packing(args, spec)
        for name in ("padded", "packed"):
            r = row[name]
            if "error" in r:
                print(f"  {name}: ERROR {r['error']}")
            else:
                print(f"  {name}: {r['useful_tokens_per_s']:.1f} useful tokens/s ({r['computed_tokens_per_s']:.1f} computed, "
                      f"{100 * r['padding_fraction']:.1f}% padding, {sum(r['micro_batches_per_step']) / len(r['micro_batches_per_step']):.1f} micro-batches a step)")
        print(f"  packed / padded useful tokens/s: {_fmt(row['useful_tokens_per_s_ratio'], '.2f')} "
              f"(from the median step times: {_fmt(row['useful_tokens_per_s_ratio_median_step'], '.2f')})")
        result = dict(bc.header("sft_packing", info), **row)
        name = f"sft_packing_{args.preset or 'custom'}_{args.flavour}_{'fp8' if args.fp8 else precision}_{device_tag}.json"
        bc.write_result(result, args.output, name)
        return 1 if "error" in row["padded"] or "error" in row["packed"] else 0

    if not args.sweep:
        if not args.preset and not (args.num_layers and args.hidden_size and args.num_attention_heads):
            p.error("give --preset or --num-layers, --hidden-size and --num-attention-heads")
        spec = build_spec(args, args.preset, precision, args.fp8, args.recompute)
        row = measure(args, spec, info, args.baseline)
        print_row(row)
        result = dict(bc.header("sft_throughput", info), flops_formula=bc.FLOPS_FORMULA,
                      mfu_peak="dense BF16 peak of the device (also for FP8 runs; see mfu_vs_fp8_peak)", **row)
        name = f"sft_{args.preset or 'custom'}_{args.flavour}_{'fp8' if args.fp8 else precision}_rc-{args.recompute}_{device_tag}.json"
        bc.write_result(result, args.output, name)
        return 1 if "error" in row["ours"] else 0

    sizes = args.sizes or (SWEEP_SIZES if torch.cuda.is_available() else ["tiny"])
    fp8_modes = [False]
    skipped = []
    if torch.cuda.is_available() and precision == "bf16":
        try:
            bc.check_fp8(True)
            fp8_modes.append(True)
        except SystemExit as exc:
            skipped.append(f"fp8 rows skipped: {exc}")
    else:
        skipped.append("fp8 rows skipped: FP8 needs a CUDA GPU with Transformer Engine")
    recomputes = args.sweep_recompute
    if not torch.cuda.is_available() and recomputes != ["none"]:
        skipped.append("recompute rows skipped: activation recomputation needs a CUDA GPU")
        recomputes = ["none"]
    rows = []
    for size in sizes:
        for recompute in recomputes:
            base = None
            for fp8 in fp8_modes:
                spec = build_spec(args, size, precision, fp8, recompute)
                row = measure(args, spec, info, args.baseline, baseline_result=base)
                base = row.get("baseline")
                print_row(row)
                rows.append(row)
    result = dict(bc.header("sft_throughput_sweep", info), flops_formula=bc.FLOPS_FORMULA,
                  mfu_peak="dense BF16 peak of the device (also for FP8 runs; see mfu_vs_fp8_peak)", skipped=skipped, runs=rows)
    bc.write_result(result, args.output, f"sft_sweep_{args.flavour}_{device_tag}.json")
    print("\n| shape | precision | recompute | tokens/s | TFLOP/s | MFU | peak GiB | transformers tokens/s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, o = r["config"], r["ours"]
        if "error" in o:
            print(f"| {c['preset']} | {'fp8' if c['fp8'] else c['precision']} | {c['recompute']} | error: {o['error']} | | | | | |")
            continue
        print(f"| {c['preset']} | {'fp8' if c['fp8'] else c['precision']} | {c['recompute']} | {o['tokens_per_s']:.0f} | {o['tflops']:.1f} | "
              f"{_fmt(o['mfu'] and 100 * o['mfu'])}% | {o['peak_memory_bytes'] / 2**30:.1f} | {_fmt(r['baseline_tokens_per_s'], '.0f')} | {_fmt(r['ratio_vs_baseline'], '.2f')} |")
    # An out-of-memory row only says the shape does not fit; any other error fails the sweep.
    return 1 if any("error" in r["ours"] and "out of memory" not in r["ours"]["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
