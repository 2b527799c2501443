"""Process groups: one process, ``torchrun`` or Slurm; gloo on CPU, NCCL on GPU.

``init_distributed`` reads the launcher's environment, starts ``torch.distributed``,
checks the tensor/pipeline/data-parallel layout against the world size and the model
and hands the layout to Megatron-Core's ``parallel_state``. ``seed_everything`` seeds
every generator the same way on every rank (plus Megatron's CUDA RNG tracker on GPU).
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_rlhf.config import ConfigError, ModelConfig, ParallelConfig


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # single | torchrun | slurm


def _slurm_master_addr(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # scontrol missing (e.g. inside a container): take the first name of a simple list
        first = nodelist.split(",")[0]
        if "[" in first:
            stem, rest = first.split("[", 1)
            first = stem + rest.split("-")[0].split(",")[0].rstrip("]")
        return first


def launch_env(environ=None) -> LaunchEnv:
    """Where this process sits, from torchrun's or Slurm's variables (torchrun wins)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or _slurm_master_addr(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=addr,
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 10000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0) or _free_port()), "single")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> int:
    """Validate TP/PP against the world size and the model; return the data-parallel size."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} does not divide model.num_attention_heads="
            f"{model.num_attention_heads}; choose a TP size that divides the number of heads"
        )
    groups = model.num_query_groups or model.num_attention_heads
    if groups % tp and tp % groups:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} and model.num_query_groups={groups}: one must divide the other"
        )
    if model.num_layers % pp:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} does not divide model.num_layers={model.num_layers}"
        )
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}); launch a multiple of {tp * pp} processes "
            f"or change parallel.tensor_model_parallel_size / parallel.pipeline_model_parallel_size"
        )
    if parallel.sequence_parallel and not torch.cuda.is_available():
        raise ConfigError("parallel.sequence_parallel needs GPUs with Transformer Engine; set it to false on CPU")
    if parallel.sequence_parallel and tp == 1:
        raise ConfigError(
            "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1 (it splits the sequence "
            "across the tensor-parallel ranks); set it to false at TP=1"
        )
    if parallel.use_distributed_optimizer and not torch.cuda.is_available():
        raise ConfigError("parallel.use_distributed_optimizer needs GPUs; set it to false on CPU")
    return world_size // (tp * pp)


def init_distributed(parallel: ParallelConfig, model: ModelConfig) -> LaunchEnv:
    """Start torch.distributed and Megatron's parallel_state (idempotent)."""
    from megatron.core import parallel_state

    from megatron_rlhf import cpu_compat

    cpu_compat.enable()
    env = launch_env()
    check_layout(parallel, model, env.world_size)
    if parallel_state.model_parallel_is_initialized():
        return env
    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA; use gloo (or auto) on CPU")
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=int(os.environ.get("MEGATRON_RLHF_DIST_TIMEOUT_MIN", 30))),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        create_gloo_process_groups=backend == "gloo" or parallel.use_distributed_optimizer,
    )
    return env


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank.

    Weights are initialised on the CPU from the full (unsharded) tensor and then sliced
    (``use_cpu_initialization``), so any TP layout starts from the same model. On GPU,
    Megatron's RNG tracker gives dropout distinct streams per TP rank.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    """The one device helper: this rank's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch):
    """A tensor, or a NamedTuple/dataclass of tensors, on :func:`device` (a no-op on CPU)."""
    if not torch.cuda.is_available():
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device(), non_blocking=True)
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name)) for f in dataclasses.fields(batch)})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(t) for t in batch))
    return batch


def all_reduce(tensor: torch.Tensor, group=None, op=None) -> torch.Tensor:
    """Sum (or ``op``) ``tensor`` over ``group`` on the backend's device; returned on the
    tensor's own device. A no-op without torch.distributed."""
    if not dist.is_initialized():
        return tensor
    moved = tensor.to(device())
    dist.all_reduce(moved, op=op or dist.ReduceOp.SUM, group=group)
    return moved.to(tensor.device)


def data_parallel_sum(values) -> list[float]:
    """Float64 sums of ``values`` (numbers or scalar tensors) over the data-parallel group."""
    from megatron.core import parallel_state

    totals = torch.tensor([float(v) for v in values], dtype=torch.float64)
    group = parallel_state.get_data_parallel_group() if dist.is_initialized() else None
    return all_reduce(totals, group).tolist()
