#!/usr/bin/env python
"""README "Performance" rows, measured peak memory against the planner, and the targets,
from benchmark result files; each figure with its date and device.

    python bench/summarize.py bench/results/*.json                 # Markdown on stdout
    python bench/summarize.py --readme README.md bench/results/*.json   # also rewrite README's table

Sections:
* Performance: the README's columns (what | device | date | ours | MFU / roofline |
  transformers | ours vs transformers). SFT: tokens/s, TFLOP/s, MFU, the transformers
  baseline's tokens/s and the ratio. PPO: iteration time split generate / score / train,
  generated tokens/s, decoding as a fraction of the HBM roofline, the speed-up over the
  transformers loop.
* Memory (GPU results only): the measured peak (``torch.cuda.max_memory_allocated``, and
  ``max_memory_reserved``) beside ``megatron_rlhf.memory_plan``'s prediction for the same
  shape, micro-batch, precision and recompute (``tools/plan_memory.py``). The planner's
  parts without its overhead term are compared with the allocated peak, and the parts plus
  its 5% allocator share with the reserved peak; its fixed 2 GiB (CUDA context, NCCL and
  library workspaces outside PyTorch's allocator) is not measured by either and is left out.
  error = (planned - measured) / measured; beyond 15% the planner needs correcting.
* Targets (GPU results only): SFT BF16 MFU >= 50%, FP8/BF16 tokens/s >= 1.35, PPO iteration
  >= 3x the transformers loop, decoding >= 50% of the HBM roofline: met / MISSED / n/a.

``--readme`` replaces the rows of the first table under "## Performance" with the rows of the
given files, plus a "not measured" row for each acceptance figure that none of them holds.
Reads JSON and the planner only (no torch, no GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLANNER_TOLERANCE = 0.15
TARGETS = dict(sft_bf16_mfu=0.50, fp8_over_bf16=1.35, ppo_speedup=3.0, decode_roofline=0.50)
PERF_HEADER = ["| what | device | date | ours | MFU / roofline | transformers | ours vs transformers |",
               "|---|---|---|---|---|---|---|"]
MEMORY_HEADER = ["| what | device | date | measured peak allocated | planner (parts) | error | measured peak reserved "
                 "| planner (+5% allocator) | error |",
                 "|---|---|---|---|---|---|---|---|---|"]


def _f(x, spec=".0f", scale=1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _pct(x, spec=".1f") -> str:
    return "-" if x is None else f"{100 * x:{spec}}%"


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def is_gpu(result: dict) -> bool:
    return result.get("device", "cpu") != "cpu"


def _device(result: dict) -> str:
    if is_gpu(result):
        return result["device"]
    cores = (result.get("device_info") or {}).get("cpu_count")
    return f"cpu ({cores} cores)" if cores else "cpu"


def _preset(config: dict) -> str:
    name = config.get("preset") or "custom"
    return name.upper() if name[0].isdigit() and name[-1] in "bm" else name


FLAVOURS = {"llama": "Llama", "gpt2": "GPT-2"}


def _precision(config: dict) -> str:
    return "FP8 (TE hybrid)" if config.get("fp8") else config["precision"].upper()


TABLED = ("sft_throughput", "sft_throughput_sweep", "ppo_step")  # the benchmarks these tables show


def runs_of(result: dict) -> list:
    """The SFT rows of a result file (a sweep holds several), each with the file's header."""
    if result["benchmark"] == "ppo_step":
        return [result]
    return [dict(result, **run) for run in result.get("runs") or [result]]


# ----------------------------------------------------------------------------- performance


def _sft_what(r: dict) -> str:
    c = r["config"]
    m = c["model"]
    n = r.get("shape", {}).get("parameters")
    name = f"{_preset(c)} {FLAVOURS.get(m['flavour'], m['flavour'])}" + (f" ({_size(n)})" if n else "")
    extra = "" if is_gpu(r) else " (CPU smoke)"
    return (f"SFT {name}, {_precision(c)}, seq {m['seq_length']}, mbs {c['micro_batch_size']}, "
            f"recompute {c.get('recompute', 'none')}{extra}")


def _ppo_what(r: dict) -> str:
    c = r["config"]
    n = r.get("shape", {}).get("parameters")
    name = f"{_preset(c)} {FLAVOURS.get(c['model']['flavour'], c['model']['flavour'])}" + (f" ({_size(n)})" if n else "")
    extra = "" if is_gpu(r) else " (CPU smoke)"
    return (f"PPO-ptx iteration {name}, {_precision(c)}, batch {c['batch']}, prompt {c['prompt_length']}, "
            f"{c['max_new_tokens']} new tokens{extra}")


def performance_row(r: dict) -> str:
    if r["benchmark"] == "ppo_step":
        what, o, b = _ppo_what(r), r["ours"], r.get("baseline") or {}
        if "error" in o:
            return f"| {what} | {_device(r)} | {r['date']} | error: {o['error']} | - | - | - |"
        roof = (o.get("decode_roofline") or {}).get("roofline_fraction")
        ours = (f"{_f(o['iteration_s'], '.2f')} s (generate {_f(o['generate_s'], '.2f')} / score {_f(o['score_s'], '.2f')} / "
                f"train {_f(o['train_s'], '.2f')}), {_f(o['generated_tokens_per_s'])} generated tokens/s")
        base = f"error: {b['error']}" if "error" in b else (f"{_f(b.get('iteration_s'), '.2f')} s" if b else "-")
        return (f"| {what} | {_device(r)} | {r['date']} | {ours} | "
                f"{'decode ' + _pct(roof, '.0f') + ' of HBM roofline' if roof is not None else '-'} | {base} | "
                f"{_f(r.get('speedup_vs_baseline'), '.2f')}{'x' if r.get('speedup_vs_baseline') else ''} |")
    what, o, b = _sft_what(r), r["ours"], r.get("baseline") or {}
    if "error" in o:
        return f"| {what} | {_device(r)} | {r['date']} | error: {o['error']} | - | - | - |"
    ours = f"{_f(o['tokens_per_s'])} tokens/s" + (f", {_f(o.get('tflops'), '.1f')} TFLOP/s" if is_gpu(r) else "")
    base = f"error: {b['error']}" if "error" in b else (f"{_f(b.get('tokens_per_s'))} tokens/s" if b else "-")
    if b and r["config"].get("fp8") and b.get("note"):
        base += " (BF16)"
    ratio = r.get("ratio_vs_baseline")
    return (f"| {what} | {_device(r)} | {r['date']} | {ours} | {_pct(o.get('mfu'))} | {base} | "
            f"{_f(ratio, '.2f')}{'x' if ratio else ''} |")


# ----------------------------------------------------------------------------- memory


def planned(r: dict):
    """``memory_plan.plan_memory`` for the run's shape and settings (None for a CPU run)."""
    from megatron_rlhf.config import ModelConfig
    from megatron_rlhf.memory_plan import plan_memory

    c = r["config"]
    model = ModelConfig(**c["model"])
    precision = "fp8" if c.get("fp8") else c["precision"]
    common = dict(precision=precision, tp=1, pp=1, dp=1, micro_batch_size=c["micro_batch_size"], attention="flash",
                  distributed_optimizer=bool((c.get("parallel") or {}).get("use_distributed_optimizer")),
                  gpus_per_node=1, gpu_memory_gib=(r.get("device_info") or {}).get("memory_gb") or 80.0)
    if r["benchmark"] == "ppo_step":
        return plan_memory(model, stage="ppo", recompute=model.recompute_granularity or "none",
                           rollout_batch_per_gpu=c["batch"], max_new_tokens=c["max_new_tokens"],
                           prompt_length=c["prompt_length"], critic=model, reward=model, offload_frozen=False, **common)
    return plan_memory(model, stage="sft", recompute=c.get("recompute") or "none", **common)


def memory_row(r: dict) -> Optional[dict]:
    """Measured vs planned peak of one GPU run; None for CPU runs and failed runs."""
    from megatron_rlhf.memory_plan import OVERHEAD_FIXED, OVERHEAD_FRACTION

    o = r["ours"]
    if not is_gpu(r) or "error" in o or not o.get("peak_memory_bytes"):
        return None
    plan = planned(r)
    phase = plan.phases[plan.peak_phase]
    parts = phase["total"] - phase["overhead"]
    with_allocator = parts * (1 + OVERHEAD_FRACTION)
    assert abs(phase["total"] - OVERHEAD_FIXED - with_allocator) < 1.0
    allocated, reserved = o["peak_memory_bytes"], o.get("peak_memory_reserved_bytes")
    err_a = (parts - allocated) / allocated
    err_r = (with_allocator - reserved) / reserved if reserved else None
    what = _ppo_what(r) if r["benchmark"] == "ppo_step" else _sft_what(r)
    return dict(what=what, device=r["device"], date=r["date"], allocated=allocated, planned=parts, error=err_a,
                reserved=reserved, planned_reserved=with_allocator, error_reserved=err_r, phase=plan.peak_phase,
                within=abs(err_a) <= PLANNER_TOLERANCE)


def memory_line(m: dict) -> str:
    return (f"| {m['what']} | {m['device']} | {m['date']} | {_gib(m['allocated'])} | {_gib(m['planned'])} ({m['phase']}) | "
            f"{_pct(m['error'], '+.1f')}{'' if m['within'] else ' (> 15%)'} | {_gib(m['reserved'])} | "
            f"{_gib(m['planned_reserved'])} | {_pct(m['error_reserved'], '+.1f')} |")


# ----------------------------------------------------------------------------- targets


def _pick(runs: list, benchmark: str, **want):
    for r in runs:
        if r["benchmark"].startswith(benchmark) and is_gpu(r) and "error" not in r["ours"]:
            c = r["config"]
            if all((c.get(k) or None) == (v or None) for k, v in want.items()):
                return r
    return None


def target_lines(runs: list) -> list:
    bf16 = _pick(runs, "sft", fp8=False, precision="bf16", recompute="none")
    fp8 = _pick(runs, "sft", fp8=True, recompute="none", preset=bf16["config"].get("preset") if bf16 else None)
    ppo = _pick(runs, "ppo")

    def verdict(what, value, target, fmt, where):
        state = "n/a" if value is None else ("met" if value >= target else "MISSED")
        shown = "-" if value is None else format(value, fmt)
        return f"- {what}: {shown} (target >= {format(target, fmt)}): {state}{where}"

    def at(r):
        return f" [{r['device']}, {r['date']}]" if r else " [no GPU result]"

    t_b, t_f = (bf16 or {}).get("ours", {}).get("tokens_per_s"), (fp8 or {}).get("ours", {}).get("tokens_per_s")
    lines = [
        verdict("SFT BF16 MFU", (bf16 or {}).get("ours", {}).get("mfu"), TARGETS["sft_bf16_mfu"], ".1%", at(bf16)),
        verdict("SFT FP8 / BF16 tokens/s", t_f / t_b if t_b and t_f else None, TARGETS["fp8_over_bf16"], ".2f", at(fp8)),
        f"- SFT ours / transformers tokens/s: {_f((bf16 or {}).get('ratio_vs_baseline'), '.2f')}{at(bf16)}",
        verdict("PPO iteration speed-up vs transformers", (ppo or {}).get("speedup_vs_baseline"), TARGETS["ppo_speedup"], ".2f", at(ppo)),
        verdict("PPO decoding, fraction of HBM roofline", (ppo or {}).get("decode_roofline_fraction"), TARGETS["decode_roofline"], ".1%", at(ppo)),
    ]
    return lines


# ----------------------------------------------------------------------------- README


def unmeasured_rows(runs: list) -> list:
    """A "not measured" row for each acceptance figure that no GPU result holds."""
    gpu = [r for r in runs if is_gpu(r)]
    seen = next((r for r in gpu), None)
    where = f"{seen['device']}, {seen['date']}" if seen else "no GPU result in bench/results"
    rows = []
    if not _pick(runs, "sft", fp8=False, precision="bf16", recompute="none"):
        rows.append(f"| SFT 1.3B Llama, BF16, seq 2048 | H100 or H200 | - | not measured yet ({where}) | target MFU >= 50% | - | - |")
    if not _pick(runs, "sft", fp8=True, recompute="none"):
        te = any("transformer-engine" in (r.get("versions") or {}) for r in gpu)
        why = where if te or not gpu else f"Transformer Engine was not installed: {where}"
        rows.append(f"| SFT 1.3B Llama, FP8 (TE hybrid), seq 2048 | H100 or H200 | - | not measured yet ({why}) | "
                    f"target >= 1.35x BF16 tokens/s | - | - |")
    if not _pick(runs, "ppo"):
        rows.append(f"| PPO-ptx iteration, 1.3B Llama, batch 64, 512 new tokens | H100 or H200 | - | not measured yet ({where}) | "
                    f"target decode >= 50% of HBM roofline | - | target >= 3x |")
    return rows


def rewrite_readme(path: Path, rows: list) -> None:
    lines = path.read_text().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "## Performance")
    except StopIteration:
        raise SystemExit(f"{path}: no '## Performance' section to write the rows into") from None
    header = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("|")), None)
    if header is None or header + 1 >= len(lines) or not lines[header + 1].startswith("|---"):
        raise SystemExit(f"{path}: no table under '## Performance' (expected a header row and a |---| row)")
    end = header + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[header:end] = PERF_HEADER + rows
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", help="result files (bench/results/*.json)")
    p.add_argument("--readme", type=Path, help="rewrite the table under '## Performance' in this file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.results:
        p.print_help()
        return 2
    runs = []
    for path in args.results:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: not a readable result file ({exc})") from None
        if result.get("benchmark") not in TABLED:
            # rollout and packing results have their own rows (bench/rollout.py --rows, bench/README.md)
            print(f"[summarize] {path}: a {result.get('benchmark')!r} result, not part of these tables; skipped", file=sys.stderr)
            continue
        runs += runs_of(result)
    # GPU figures first, then CPU smoke runs; SFT before PPO; then by date
    runs.sort(key=lambda r: (not is_gpu(r), r["benchmark"] == "ppo_step", r.get("date", "")))
    rows = [performance_row(r) for r in runs]
    print("### Performance\n")
    print("\n".join(PERF_HEADER + rows))
    memory = [m for m in (memory_row(r) for r in runs) if m]
    print("\n### Peak memory: measured vs tools/plan_memory.py\n")
    if memory:
        print("\n".join(MEMORY_HEADER + [memory_line(m) for m in memory]))
        off = [m for m in memory if not m["within"]]
        print(f"\nplanner within {PLANNER_TOLERANCE:.0%} of the allocated peak: {len(memory) - len(off)} of {len(memory)} runs"
              + (f"; off: {', '.join(m['what'] for m in off)}" if off else ""))
    else:
        print("no GPU results: the planner predicts GPU memory, CPU peaks (resident set size) are not comparable")
    print("\n### Targets\n")
    print("\n".join(target_lines(runs)))
    if args.readme:
        gpu_rows = [row for row, r in zip(rows, runs) if is_gpu(r)]
        cpu_rows = [row for row, r in zip(rows, runs) if not is_gpu(r)]
        rewrite_readme(args.readme, gpu_rows + unmeasured_rows(runs) + cpu_rows)
        print(f"\n[summarize] wrote {len(rows)} rows (+ {len(unmeasured_rows(runs))} not measured) into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
