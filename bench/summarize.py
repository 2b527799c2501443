#!/usr/bin/env python
"""Markdown rows for README "Performance" from result files, each with its date and device.

    python bench/summarize.py bench/results/*.json

SFT rows: tokens/s, TFLOP/s, MFU, peak memory, transformers tokens/s and the ratio.
PPO rows: iteration time and its split, generated tokens/s, decoding as a fraction of the
HBM roofline, peak memory, and the speed-up over the transformers loop. Reads JSON only
(no torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(x, spec=".0f", scale=1.0):
    return "-" if x is None else format(x * scale, spec)


def _gib(x):
    return _f(x, ".1f", 1 / 2**30)


def sft_rows(result):
    runs = result.get("runs") or [result]
    for r in runs:
        c, o = r["config"], r["ours"]
        what = f"SFT {c['preset'] or 'custom'} {c['model']['flavour']}, {'fp8' if c['fp8'] else c['precision']}, recompute {c['recompute']}, s={c['model']['seq_length']}, mbs={c['micro_batch_size']}"
        if "error" in o:
            yield f"| {what} | {result['device']} | {result['date']} | error: {o['error']} | | | | |"
            continue
        yield (f"| {what} | {result['device']} | {result['date']} | {_f(o['tokens_per_s'])} tokens/s, {_f(o['tflops'], '.1f')} TFLOP/s | "
               f"{_f(o['mfu'], '.1f', 100)}{'%' if o['mfu'] is not None else ''} | {_gib(o['peak_memory_bytes'])} GiB | "
               f"{_f(r.get('baseline_tokens_per_s'))} tokens/s | {_f(r.get('ratio_vs_baseline'), '.2f')}x |")


def ppo_rows(result):
    c, o, b = result["config"], result["ours"], result.get("baseline") or {}
    n = result["shape"]["parameters"]
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    what = f"PPO-ptx iteration {c.get('preset') or 'custom'} {c['model']['flavour']} ({size}), {'fp8' if c['fp8'] else c['precision']}, batch {c['batch']}, {c['max_new_tokens']} new tokens"
    if "error" in o:
        yield f"| {what} | {result['device']} | {result['date']} | error: {o['error']} | | | | |"
        return
    roof = o["decode_roofline"].get("roofline_fraction")
    yield (f"| {what} | {result['device']} | {result['date']} | {_f(o['iteration_s'], '.2f')} s (gen {_f(o['generate_s'], '.2f')} / score "
           f"{_f(o['score_s'], '.2f')} / train {_f(o['train_s'], '.2f')}), {_f(o['generated_tokens_per_s'])} gen. tokens/s | "
           f"decode {_f(roof, '.0f', 100)}{'%' if roof is not None else ''} of roofline | {_gib(o['peak_memory_bytes'])} GiB | "
           f"{_f(b.get('iteration_s'), '.2f')} s | {_f(result.get('speedup_vs_baseline'), '.2f')}x |")


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    print("| what | device | date | ours | MFU / roofline | peak memory | transformers | ours vs transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        result = json.loads(Path(path).read_text())
        rows = ppo_rows(result) if result["benchmark"] == "ppo_step" else sft_rows(result)
        for row in rows:
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
