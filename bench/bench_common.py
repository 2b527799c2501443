"""What the benchmark scripts share: model shapes, FLOP and byte counts, the GPU's peaks,
versions, peak memory, and running one measurement in its own process.

Each measurement (ours, the baseline, one row of a sweep) runs in a fresh Python process
(``run_part``): it then has its own CUDA context, allocator statistics and resident-memory
high-water mark, a crash or an out-of-memory error in one does not lose the others, and
Megatron's global state (process groups, FP8 recipe) never leaks between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_rlhf.config import ModelConfig  # noqa: E402  (no torch import behind it)
from megatron_rlhf.memory_plan import PRESETS, count_params, stage_params  # noqa: E402
from megatron_rlhf.models.sizing import ffn_hidden_size as ffn_size  # noqa: E402

# (layers, hidden, heads): memory_plan's GPT-3 shapes plus GPT-3 2.7B; "tiny" is the CPU smoke shape.
SHAPES = dict(PRESETS, **{"2.7b": (32, 2560, 32), "tiny": (2, 64, 4)})
DEFAULT_VOCAB = {"llama": 32000, "gpt2": 50257}
TINY = dict(seq_length=64, vocab_size=512)

# Dense (no sparsity) tensor-core peaks in TFLOP/s and HBM bandwidth in TB/s, from NVIDIA's
# data sheets. Matched against torch.cuda.get_device_name() in this order.
GPU_PEAKS = [
    # (name contains, extra test, label, bf16, fp8, TB/s)
    ("H200", None, "H200", 989.0, 1979.0, 4.8),
    ("H100", "PCIe", "H100 PCIe", 756.0, 1513.0, 2.0),
    ("H100", "NVL", "H100 NVL", 835.0, 1671.0, 3.9),
    ("H100", None, "H100 SXM", 989.0, 1979.0, 3.35),
    ("A100", "80GB", "A100 80GB SXM", 312.0, None, 2.039),
    ("A100", None, "A100 40GB SXM", 312.0, None, 1.555),
]

FLOPS_FORMULA = (
    "model FLOPs per trained token = 6*N + 12*L*h*s (PaLM, Chowdhery et al. 2022, app. B): N = weights "
    "that multiply activations (every transformer GEMM weight + the output layer V*h, no embedding "
    "lookups, norms or biases), L layers, h hidden size, s sequence length; the attention term counts the "
    "full s x s score matrix. Recomputation is not counted (MFU, not hardware FLOPs utilisation). "
    "mfu_causal counts the attention term halved (causal mask)."
)


def model_config(preset: Optional[str], flavour: str, **overrides) -> ModelConfig:
    """A ModelConfig from a preset name and explicit overrides (None = keep the preset's)."""
    kw = dict(flavour=flavour, vocab_size=DEFAULT_VOCAB[flavour], seq_length=2048)
    if preset:
        if preset not in SHAPES:
            raise SystemExit(f"unknown --preset {preset!r}; choose one of {', '.join(SHAPES)}")
        layers, hidden, heads = SHAPES[preset]
        kw.update(num_layers=layers, hidden_size=hidden, num_attention_heads=heads)
        if preset == "tiny":
            kw.update(TINY, num_query_groups=2 if flavour == "llama" else None)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if k not in kw]
    if missing:
        raise SystemExit(f"give --preset or all of --num-layers --hidden-size --num-attention-heads (missing {', '.join(missing)})")
    cfg = ModelConfig(**kw)
    cfg.validate()
    return cfg


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's ArgumentParser (described by its module docstring's first paragraph) with
    the model-shape options every benchmark takes: --preset or explicit sizes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(SHAPES), help="model shape (layers, hidden, heads); 'tiny' for CPU smoke runs")
    p.add_argument("--flavour", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--num-query-groups", type=int)
    p.add_argument("--ffn-hidden-size", type=int)
    p.add_argument("--vocab-size", type=int, help="default 32000 (llama) / 50257 (gpt2); tiny: 512")
    return p


def model_config_from_args(args, preset: Optional[str], seq_length: int) -> ModelConfig:
    """:func:`model_config` from the shape options of :func:`parser` (``preset`` given apart: a sweep varies it)."""
    return model_config(preset, args.flavour, num_layers=args.num_layers, hidden_size=args.hidden_size,
                        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                        ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab_size, seq_length=seq_length)


def matmul_params(m: ModelConfig) -> int:
    """N of the FLOP formula: transformer GEMM weights + the output layer (unpadded vocabulary)."""
    return stage_params(m).gemm + m.vocab_size * m.hidden_size


def train_flops_per_token(m: ModelConfig, seq: int, causal: bool = False) -> float:
    attention = 12 * m.num_layers * m.hidden_size * seq
    return 6 * matmul_params(m) + (attention / 2 if causal else attention)


def forward_flops_per_token(m: ModelConfig, seq: int, causal: bool = False) -> float:
    return train_flops_per_token(m, seq, causal) / 3


def kv_bytes_per_token(m: ModelConfig, bytes_per_value: int) -> int:
    """K and V of one token in every layer."""
    groups = m.num_query_groups or m.num_attention_heads
    return 2 * m.num_layers * groups * (m.hidden_size // m.num_attention_heads) * bytes_per_value


def shape_summary(m: ModelConfig) -> dict:
    return dict(
        flavour=m.flavour, num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads, ffn_hidden_size=ffn_size(m), vocab_size=m.vocab_size,
        seq_length=m.seq_length, parameters=count_params(m), matmul_parameters=matmul_params(m),
    )


# ----------------------------------------------------------------------------- the machine


def device_info(peak_tflops: Optional[float] = None, hbm_tbs: Optional[float] = None) -> dict:
    """The device, its dense BF16/FP8 peaks and HBM bandwidth (None where unknown).

    ``peak_tflops`` / ``hbm_tbs`` override the table (for a GPU it does not list).
    """
    import torch

    if not torch.cuda.is_available():
        return dict(device="cpu", name=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                    torch_threads=torch.get_num_threads(), peak_bf16_tflops=peak_tflops, peak_fp8_tflops=None,
                    hbm_bandwidth_tbs=hbm_tbs, peak_source="given" if peak_tflops else "none: MFU is not defined on CPU")
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    memory_gb = props.total_memory / 1e9
    info = dict(device=name, name=name, capability=f"{props.major}.{props.minor}", memory_gb=round(memory_gb, 1),
                gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda,
                peak_bf16_tflops=None, peak_fp8_tflops=None, hbm_bandwidth_tbs=None, peak_source="unknown GPU")
    for contains, extra, label, bf16, fp8, tbs in GPU_PEAKS:
        if contains in name and (extra is None or extra in name or (extra == "80GB" and memory_gb > 60)):
            info.update(peak_bf16_tflops=bf16, peak_fp8_tflops=fp8, hbm_bandwidth_tbs=tbs,
                        peak_source=f"NVIDIA data sheet, {label}, dense")
            break
    if peak_tflops:
        info.update(peak_bf16_tflops=peak_tflops, peak_source="given (--peak-tflops)")
    if hbm_tbs:
        info.update(hbm_bandwidth_tbs=hbm_tbs)
    return info


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "megatron-core", "transformers", "transformer-engine", "transformer_engine", "trl", "flash-attn"):
        try:
            out[dist.replace("_", "-")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        pass
    return out


def check_fp8(fp8: bool) -> None:
    """Refuse --fp8 where it cannot run, in one line that names the fix."""
    if not fp8:
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--fp8 needs a CUDA GPU with Transformer Engine (Hopper or newer); run without --fp8 on CPU")
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 9):
        raise SystemExit(f"--fp8 needs compute capability 8.9+ (Ada/Hopper); this GPU is {major}.{minor}: run without --fp8")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        raise SystemExit("--fp8 needs Transformer Engine: pip install --no-build-isolation 'transformer_engine[pytorch]'") from None


def check_recompute(recompute: str) -> None:
    """Megatron's activation checkpointing saves the CUDA RNG state: GPU only here."""
    import torch

    if recompute != "none" and not torch.cuda.is_available():
        raise SystemExit(f"--recompute {recompute} needs a CUDA GPU (Megatron's checkpointing saves the CUDA RNG state); use --recompute none on CPU")


def resolve_precision(precision: str) -> str:
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision == "bf16" and not torch.cuda.is_available():
        raise SystemExit("--precision bf16 needs a CUDA GPU (Megatron's BF16 optimizer is CUDA-only); use --precision fp32 on CPU")
    return precision


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """CUDA: the allocator's peak (allocated and reserved). CPU: this process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return dict(peak_memory_bytes=int(torch.cuda.max_memory_allocated()),
                    peak_memory_reserved_bytes=int(torch.cuda.max_memory_reserved()),
                    peak_memory_kind="torch.cuda.max_memory_allocated")
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(peak_memory_bytes=int(rss_kib) * 1024, peak_memory_kind="cpu peak resident set size of the process (ru_maxrss)")


class Timer:
    """Wall time of a block, with the GPU synchronised at both ends."""

    def __enter__(self):
        synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize()
        self.seconds = time.perf_counter() - self.start


# ----------------------------------------------------------------------------- processes and results


def run_part(script: Path, part: str, spec: dict, timeout: Optional[float] = None) -> dict:
    """Run ``script --child PART`` on ``spec`` in a fresh process; return its result dict.

    A failed child gives ``{"error": ...}`` (its last stderr lines) instead of raising.
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(script), "--child", part, str(spec_path), str(out_path)]
        print(f"[bench] {part}: {spec.get('label', '')}", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=None, stderr=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not out_path.exists():
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            oom = any("out of memory" in line.lower() for line in lines)
            message = "CUDA out of memory" if oom else (lines[-1] if lines else f"exit status {proc.returncode}")
            sys.stderr.write("\n".join(lines[-15:]) + "\n")
            return {"error": message, "returncode": proc.returncode}
        return json.loads(out_path.read_text())


def child_main(argv: list, parts: dict) -> int:
    """Entry of a child process: ``--child PART SPEC OUT``."""
    part, spec_path, out_path = argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    result = parts[part](spec)
    Path(out_path).write_text(json.dumps(result))
    from megatron_rlhf.parallel import destroy_distributed

    destroy_distributed()  # a clean teardown: a crash at exit must not lose a finished measurement
    return 0


def header(benchmark: str, info: dict) -> dict:
    smoke = info["device"] == "cpu"
    head = dict(
        benchmark=benchmark,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        time_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=info["device"],
        device_info=info,
        versions=versions(),
        host=platform.node(),
        command=" ".join([Path(sys.executable).name] + [str(a) for a in sys.argv]),
    )
    if smoke:
        head["note"] = "CPU smoke numbers: they show the script runs end to end; they are not performance claims."
    return head


def write_result(result: dict, output: Optional[str], default_name: str) -> Path:
    path = Path(output) if output else RESULTS / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(f"[bench] wrote {path}")
    return path


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def fraction(value: Optional[float], peak: Optional[float]) -> Optional[float]:
    return value / peak if value is not None and peak else None


def asdict(cfg) -> dict:
    return dataclasses.asdict(cfg)
