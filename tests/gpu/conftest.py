"""Skip GPU tests cleanly, with the reason, where their hardware or software is missing.

Markers (registered in pytest.ini): ``gpu`` (a CUDA device), ``needs_te`` (Transformer
Engine's PyTorch extension), ``needs_fp8`` (FP8 tensor cores: compute capability 8.9+, and
Transformer Engine), ``needs_gpus(n)`` (n devices), ``needs_flash_attn`` (flash-attn >= 2.7.3 or
FlashAttention-3: the dynamic inference engine's attention). The first missing requirement is the
reason shown by ``pytest -ra`` / ``pytest -m gpu``; on a CPU machine every such test is
skipped and the rest of the suite runs as usual.

This hook runs before tests/conftest.py's generic "needs a CUDA device" skip, so its more
precise reason is the one reported.
"""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=None)
def _cuda_reason():
    import torch

    if torch.cuda.is_available():
        return None
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " (a CPU-only build)")
    return f"needs a CUDA device: {build} sees none (torch.cuda.is_available() is False); run `pytest -m gpu` on a GPU machine"


@functools.lru_cache(maxsize=None)
def _te_reason():
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or an OSError from a library built for another CUDA
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"needs Transformer Engine: `import transformer_engine.pytorch` failed ({first}); "
                "pip install --no-build-isolation 'transformer_engine[pytorch]' (tools/prepare_gpu.sh --help)")
    return None


@functools.lru_cache(maxsize=None)
def _fp8_reason():
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 9):
        return f"needs FP8 tensor cores (compute capability 8.9+); {torch.cuda.get_device_name(0)} is {major}.{minor}"
    return None


@functools.lru_cache(maxsize=None)
def _flash_attn_reason():
    from megatron_rlhf.rollout.dynamic import dynamic_engine_unavailable

    return dynamic_engine_unavailable()


def _gpus_reason(n: int):
    import torch

    have = torch.cuda.device_count()
    return None if have >= n else f"needs {n} CUDA devices, this machine has {have}"


def skip_reason(item) -> str | None:
    """Why ``item`` cannot run here (None: it can). Checks in order: CUDA, GPU count, TE, FP8, flash-attn."""
    # markers, not item.keywords: keywords also hold the names of parent nodes (this folder is "gpu")
    marks = {m.name for m in item.iter_markers()}
    if not marks & {"gpu", "needs_te", "needs_fp8", "needs_gpus", "needs_flash_attn"}:
        return None
    reason = _cuda_reason()
    if reason:
        return reason
    gpus = item.get_closest_marker("needs_gpus")
    if gpus is not None:
        reason = _gpus_reason(int(gpus.args[0]))
        if reason:
            return reason
    if "needs_te" in marks or "needs_fp8" in marks:
        reason = _te_reason()
        if reason:
            return reason
    if "needs_fp8" in marks:
        reason = _fp8_reason()
        if reason:
            return reason
    if "needs_flash_attn" in marks:
        return _flash_attn_reason()
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
