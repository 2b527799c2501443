"""Let Megatron-Core's own code run on a CPU: the one place where we bend it.

Megatron-Core hard-codes CUDA in a few spots that are otherwise device-agnostic (see the
table in README "How the CPU path works"): ``torch.cuda.current_device()`` for RoPE
frequencies and TP gathers, ``device="cuda"`` for the token counter of the pipeline
schedules, DDP grad buffers, the optimizer's scalars and checkpoint-save finalisation,
``torch.cuda.synchronize``/``Stream`` in p2p and DDP, and ``Tensor.cuda()`` in static
inference. On a machine with no CUDA device, :func:`enable` makes those spots mean "cpu":

* ``torch.cuda.current_device`` returns ``"cpu"``; ``synchronize``/``empty_cache`` do nothing;
* in the modules listed in ``_MODULES``, the module-level name ``torch`` is replaced by a
  proxy whose tensor factories map ``device="cuda"`` to the CPU and whose ``torch.cuda``
  offers no-op streams and events;
* ``Tensor.cuda()`` returns the tensor itself;
* the optimizer's ``clip_grad_by_total_norm_fp32``, whose only CUDA tie is an assertion on
  the tensor type string, is replaced by :func:`_clip_grads_cpu` (same maths: scale every
  fp32 grad by ``max_norm / (total_norm + 1e-6)`` when that is below 1). The norm itself is
  still Megatron's ``get_grad_norm_fp32`` (TP duplicates skipped, model-parallel all-reduce).

Nothing here runs when CUDA is available: the GPU path is Megatron-Core untouched. What a
shim cannot fix stays GPU-only and our code refuses it with a clear error: the distributed
optimizer, BF16/FP16 optimizers, sequence parallelism, FP8.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

import torch

# Megatron-Core modules whose module-level ``torch`` is proxied. Each entry was found by
# running the CPU tests and reading the traceback; keep it minimal.
_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.data",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.inference.contexts.static_context",
    "megatron.core.transformer.attention",
    "megatron.core.utils",
)

_FACTORIES = frozenset(
    "zeros empty ones full tensor arange randn rand randint as_tensor zeros_like empty_like "
    "ones_like full_like linspace".split()
)

_lock = threading.Lock()
_enabled = False


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    text = str(device)
    return torch.device("cpu") if text.startswith("cuda") or text == "cpu" else device


class _Event:
    """Stand-in for ``torch.cuda.Event``: records wall time so elapsed_time still works."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, *args, **kwargs):
        import time

        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 1000.0 * (other._t - self._t)


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _Event()


class _CudaOnCpu:
    """What ``torch.cuda`` looks like to a proxied module on a CPU-only machine."""

    Event = _Event
    Stream = _Stream

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def default_stream(*args, **kwargs):
        return _Stream()

    @staticmethod
    def current_stream(*args, **kwargs):
        return _Stream()

    @staticmethod
    def is_available():
        return False

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """A stand-in for the ``torch`` module in which "cuda" means the CPU."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:

            def factory(*args, _f=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return _f(*args, **kwargs)

            return factory
        if name == "device":

            def device(*args, **kwargs):
                if args and str(args[0]).startswith("cuda"):
                    return torch.device("cpu")
                return torch.device(*args, **kwargs)

            return device
        return attr


def _clip_grads_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    grads = []
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            if grad.dtype != torch.float32:
                raise TypeError(f"gradient clipping on CPU expects fp32 grads, got {grad.dtype}")
            grads.append(grad.detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def is_active() -> bool:
    return _enabled


def enable() -> bool:
    """Install the CPU layer if (and only if) no CUDA device is available. Idempotent.

    Returns True when the layer is active.
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    with _lock:
        if _enabled:
            return True
        torch.cuda.current_device = _CudaOnCpu.current_device
        torch.cuda.synchronize = _CudaOnCpu.synchronize
        torch.cuda.empty_cache = _CudaOnCpu.empty_cache
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        proxy = _TorchOnCpu()
        for name in _MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a module renamed in another megatron-core release
                continue
            if getattr(module, "torch", None) is torch:
                module.torch = proxy
        from megatron.core.optimizer import optimizer as mcore_optimizer

        mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grads_cpu
        _enabled = True
        return True
