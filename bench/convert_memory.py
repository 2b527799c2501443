#!/usr/bin/env python
"""Peak resident memory of checkpoint conversion, both directions, vs the checkpoint's size.

    python bench/convert_memory.py                 # a ~23M-parameter model (about a minute)
    python bench/convert_memory.py --size 1b       # ~1B parameters (4 GB in fp32; several minutes)

Writes a random Llama-style (grouped-query attention, untied) Hugging Face checkpoint into
a temporary folder (``--work-dir``, default under /tmp; deleted afterwards): ``config.json``
from ``transformers.LlamaConfig`` and random weights streamed into ``model.safetensors``
tensor by tensor, with the tiny example's 512-piece SentencePiece tokenizer. Then runs, each
in a fresh process,

    tools/convert_from_hf.py HF  OURS
    tools/convert_to_hf.py   OURS HF2

and reads each process's peak resident set size (``ru_maxrss`` of the finished child),
next to the size of the weights it read or wrote and an idle baseline: the same
interpreter after the same imports, converting nothing. Prints one table and, with
``--json``, writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    # name: hidden, layers, heads, kv heads, ffn
    "small": (512, 8, 8, 2, 1408),  # ~23M parameters
    "1b": (2048, 22, 32, 4, 5632),  # TinyLlama-1.1B's shape (vocabulary aside): ~0.97B parameters
}
BASELINE = """
import sys
sys.path.insert(0, {root!r})
import torch, transformers, safetensors
import megatron.core
import megatron_rlhf.convert, megatron_rlhf.models.builder, megatron_rlhf.checkpoint.io
"""


def write_random_hf(folder: Path, size: str, dtype_name: str, tokenizer: Path) -> int:
    """A random LlamaForCausalLM checkpoint, written tensor by tensor; returns its weight bytes."""
    import torch
    from transformers import LlamaConfig

    from megatron_rlhf.convert.layout import Arch, hf_shapes
    from megatron_rlhf.convert.safetensors_io import SafetensorsWriter
    from megatron_rlhf.data.tokenizer import Tokenizer

    hidden, layers, heads, groups, ffn = SIZES[size]
    vocab = Tokenizer.load(tokenizer).vocab_size
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    folder.mkdir(parents=True)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=groups, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    arch = Arch("llama", layers, hidden, heads, groups, ffn, vocab, vocab, 2048, tied=False)
    shapes = hf_shapes(arch)
    writer = SafetensorsWriter(folder / "model.safetensors", [(n, s, dtype) for n, s in shapes])
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes:
        writer.write(name, (0.02 * torch.randn(shape, generator=g)).to(dtype))
    writer.close()
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return writer.total_bytes


def peak_rss(cmd: list) -> tuple[int, float]:
    """Run ``cmd``; return (its peak RSS in bytes, wall seconds)."""
    start = time.time()
    # a fresh Python wrapper per command, so ru_maxrss of *its* children is this command's alone
    probe = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
        "print(p.stdout if p.returncode else '')\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
        "sys.exit(p.returncode)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return int(proc.stdout.strip().splitlines()[-1]), time.time() - start


def weight_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--work-dir", help="where to write the checkpoints (default: a new folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)

    from megatron_rlhf.cli import _quiet

    _quiet()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="convert_memory_"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    try:
        hf, ours, back = work / "hf", work / "ours", work / "hf_back"
        t0 = time.time()
        src_bytes = write_random_hf(hf, args.size, args.dtype, ROOT / "examples/tiny/tokenizer.model")
        print(f"random HF checkpoint: {src_bytes / 1e9:.2f} GB of {args.dtype} weights ({time.time() - t0:.0f} s)", flush=True)

        base, _ = peak_rss([sys.executable, "-c", BASELINE.format(root=str(ROOT))])
        py = sys.executable
        os.environ.update(env)
        from_peak, from_s = peak_rss([py, str(ROOT / "tools/convert_from_hf.py"), str(hf), str(ours), "--no-progress"])
        ours_bytes = weight_bytes(ours, "*.distcp")
        to_peak, to_s = peak_rss([py, str(ROOT / "tools/convert_to_hf.py"), str(ours), str(back), "--no-progress"])
        back_bytes = weight_bytes(back, "*.safetensors")

        from megatron_rlhf.convert.safetensors_io import SafetensorsIndex

        a, b = SafetensorsIndex(hf), SafetensorsIndex(back)
        identical = sorted(a.names()) == sorted(b.names()) and all(a.read(n).equal(b.read(n)) for n in a.names())

        gb = 1e9
        rows = [
            ("convert_from_hf", from_peak, max(src_bytes, ours_bytes), from_s),
            ("convert_to_hf", to_peak, max(ours_bytes, back_bytes), to_s),
        ]
        print(f"\nparameters: {src_bytes / (4 if args.dtype == 'float32' else 2) / 1e9:.3f} B; idle baseline (imports only): {base / gb:.2f} GB")
        print(f"{'direction':<16} {'peak RSS':>9} {'checkpoint':>11} {'ratio':>6} {'minus baseline':>15} {'time':>7}")
        for name, peak, size, secs in rows:
            print(f"{name:<16} {peak / gb:>7.2f}GB {size / gb:>9.2f}GB {peak / size:>6.2f} {(peak - base) / size:>14.2f}x {secs:>6.0f}s")
        print(f"round trip HF -> ours -> HF bitwise identical: {identical}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "size": args.size, "dtype": args.dtype, "weights_bytes": src_bytes, "ours_bytes": ours_bytes, "baseline_rss": base,
                "from_hf": {"peak_rss": from_peak, "seconds": from_s}, "to_hf": {"peak_rss": to_peak, "seconds": to_s},
                "bitwise_identical": identical,
            }, indent=2) + "\n")
        return 0 if identical else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
